"""E3 of docs/ablation.md, the powered downstream ablation: random / MIM / MIM+MLM / full SimCroP / full + the
cross-CT soft term, several pre-training seeds each, on the realistic synthetic phantoms with 256 shared test
cases; linear probe (10 % labels x 5 draws, and 100 %) over the classes a supervised reference detects, UNETR
lesion Dice; paired hierarchical bootstrap (seeds -> cases -> label draws) and the pre-registered rule.

    python -m simcrop.experiments.downstream --out docs/evidence --work runs/evidence
    python -m simcrop.experiments.downstream --e3-seeds 0,1,2 --e3-budget-minutes 60   # the seed cut by the clock

Resumable: each run's checkpoint and task results stay in <work>/e3/<variant>/seed<k>/; a rerun does only what
is missing. Seeds run in rounds (every variant at seed 0, then seed 1, ...); with --budget-minutes a new round
starts only while the budget lasts, never fewer than --e3-min-seeds rounds (the cut is by the clock, never by an
outcome). Writes <out>/e3.{md,json,png}.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from simcrop import factory
from simcrop.config import make_config
from simcrop.eval import tasks
from simcrop.eval.errors import EvalError
from simcrop.eval.linear_probe import ProbeSettings
from simcrop.eval.session import EvalSession
from simcrop.eval.supervised_reference import ReferenceSettings, detectable_classes
from simcrop.experiments import hierarchical_bootstrap as hb
from simcrop.experiments.command_line import run_command
from simcrop.experiments.ablation import machine, write_random_checkpoint
from simcrop.experiments.pretrain_once import pretrain

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "random": ("no pre-training (step-0 checkpoint of the seed)", {}),
    "mim": ("L_MIM", {"use_mlm": False, "use_align": False}),
    "mim_mlm": ("L_MIM + L_MLM", {"use_align": False}),
    "full": ("L_MIM + L_MLM + L_align (SimCroP)", {}),
    "full_soft": ("SimCroP + the cross-CT soft term", {"w_align_soft": 1.0}),
}
# the pre-registered comparisons (later - earlier)
COMPARISONS = (("mim", "random"), ("mim_mlm", "mim"), ("full", "mim_mlm"), ("full_soft", "full"))
METRICS = {"probe_10": "linear probe macro AUROC, 10 % labels (5 draws)",
           "probe_100": "linear probe macro AUROC, 100 % labels", "dice": "UNETR lesion Dice (mean per case)"}
N_CASES = 1280  # 1024 train + 256 test (the synthetic generator's 20 % validation split)


def dataset(args) -> Path:
    cfg = make_config("tiny", synthetic_n=N_CASES, **({"cache_dir": args.cache_dir} if args.cache_dir else {}))
    return factory.data_root(cfg, args.e3_data or None)


def run_dir(args, variant: str, seed: int) -> Path:
    return Path(args.work) / "e3" / variant / f"seed{seed}"


def run_config(variant: str, seed: int, root: Path, args):
    shared = dict(data=str(root), seed=seed, steps=args.e3_steps, warmup_steps=max(1, args.e3_steps // 10),
                  ckpt_every=args.e3_steps, progress=False, log_every=25, text_encoder=args.e3_text_encoder,
                  compile=args.compile, out=str(run_dir(args, variant, seed) / "run"))
    if args.cache_dir:
        shared["cache_dir"] = args.cache_dir
    return make_config("tiny", **{**shared, **VARIANTS[variant][1]})


def probe_settings(args) -> ProbeSettings:
    return ProbeSettings(fractions=(0.1, 1.0), repeats=args.e3_label_draws, epochs=args.e3_probe_epochs, keep_scores=True)


def seg_seeds(args) -> list[int]:
    """The pre-training seeds whose encoders get a UNETR (docs/ablation.md: seed 0 only, a budget deviation)."""
    return [int(v) for v in args.e3_seg_seeds.split(",") if v.strip()]


def seg_variants(args) -> list[str]:
    """The variants that get a UNETR (docs/ablation.md: random and mim only, a second budget deviation)."""
    return [v for v in args.e3_seg_variants.split(",") if v.strip()]


def seg_options(args) -> tasks.SegmentOptions:
    return tasks.SegmentOptions(target="lesions", steps=args.e3_seg_steps, lr=1e-3, feature_size=16, seed=0)


def one_run(variant: str, seed: int, root: Path, args, log) -> dict:
    """Pre-train (or reuse) and evaluate one (variant, seed) -> {'probe': linear-probe.json, 'segment': ...,
    'pretrain_s', 'probe_s', 'segment_s'}."""
    cfg = run_config(variant, seed, root, args)
    if variant == "random":
        ckpt, seconds = write_random_checkpoint(cfg), 0.0
    else:
        log(f"[E3 {variant} seed {seed}] pre-training {cfg.train.steps} steps into {cfg.train.out}")
        ckpt, seconds = pretrain(cfg, log)
    out = run_dir(args, variant, seed) / "eval"
    results: dict[str, Any] = {"pretrain_s": seconds}
    session = None
    jobs = [("probe", "linear-probe.json", lambda s: tasks.run_linear_probe(s, probe_settings(args)))]
    if seed in seg_seeds(args) and variant in seg_variants(args):
        jobs.append(("segment", "segment.json", lambda s: tasks.run_segment(s, seg_options(args))))
    for task, file, go in jobs:
        path = out / file
        timing = out / f"{task}_seconds.json"
        if path.is_file() and timing.is_file():
            results[task] = json.loads(path.read_text())
            results[f"{task}_s"] = json.loads(timing.read_text())["seconds"]
            continue
        if session is None:
            session = EvalSession(ckpt, data=str(root), out=str(out), device=args.device, cache_dir=args.cache_dir,
                                  log=log)
        log(f"[E3 {variant} seed {seed}] {task}")
        t0 = time.perf_counter()
        results[task] = go(session)
        results[f"{task}_s"] = time.perf_counter() - t0
        timing.write_text(json.dumps({"seconds": results[f"{task}_s"]}))
    return results


def reference(root: Path, args, log) -> dict:
    path = Path(args.work) / "e3" / "supervised_reference.json"
    if path.is_file():
        return json.loads(path.read_text())
    img_size = make_config("tiny").model.img_size
    res = detectable_classes(root, img_size, ReferenceSettings(epochs=args.e3_reference_epochs,
                                                                threshold=args.e3_detect_threshold), log)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1))
    return res


# -- analysis --------------------------------------------------------------------------------------------------------
def arrays(runs: dict, seeds: list[int], dice_seeds: list[int]) -> dict:
    """Per variant: probe_10 [S, D, N, C], probe_100 [S, 1, N, C] test probabilities, dice [S', N', C'] (the
    dice_seeds only); labels [N, C]."""
    out: dict[str, Any] = {}
    for v, by_seed in runs.items():
        p10, p100, dice = [], [], []
        for seed in seeds:
            r = by_seed[seed]
            fr = r["probe"]["fractions"]
            p10.append([run["test_scores"] for run in fr["0.1"]["runs"]])
            p100.append([run["test_scores"] for run in fr["1"]["runs"]])
            if seed in dice_seeds and "segment" in r:
                dice.append(r["segment"]["dice_per_case"])
            out["labels"] = np.asarray(r["probe"]["test_labels"], np.float32)
            out["classes"] = r["probe"]["classes"]
        to_nan = lambda a: np.asarray([[[np.nan if x is None else x for x in row] for row in case] for case in a],
                                      np.float64)
        out[v] = {"probe_10": np.asarray(p10, np.float32), "probe_100": np.asarray(p100, np.float32),
                  "dice": to_nan(dice) if len(dice) == len(dice_seeds) else None}  # None: no UNETR (budget)
    return out


def analyse(runs: dict, seeds: list[int], detect: list[str], dice_seeds: list[int],
            n_resamples: int = hb.N_RESAMPLES) -> dict:
    dice_seeds = [s for s in seeds if s in dice_seeds]
    if not dice_seeds:
        raise EvalError("E3: no finished seed has UNETR results (--e3-seg-seeds)")
    a = arrays(runs, seeds, dice_seeds)
    classes = [a["classes"].index(c) for c in detect]
    if not classes:
        raise EvalError("E3: the supervised reference detects no class; the probe's macro AUROC over the "
                        "detectable classes is undefined (docs/ablation.md's rule)")
    S, D, N, _ = next(v for k, v in a.items() if k in VARIANTS)["probe_10"].shape
    plan = hb.make_plan(S, N, D, n_resamples)
    plan_one = hb.Plan(plan.seeds, plan.counts, np.zeros(plan.seeds.shape + (1,), np.int64))
    with_dice = [k for k in VARIANTS if k in a and a[k]["dice"] is not None]
    if not with_dice:
        raise EvalError("E3: no variant has UNETR results for the seeds of --e3-seg-seeds")
    n_seg = a[with_dice[0]]["dice"].shape[1]
    plan_seg = plan if (n_seg, len(dice_seeds)) == (N, S) else hb.make_plan(len(dice_seeds), n_seg, 1, n_resamples,
                                                                          seed=1)

    def stat(v: str, metric: str, resampled: bool) -> np.ndarray:
        x = a[v][metric]
        if metric == "dice":
            return hb.dice_statistic(x, plan_seg if resampled else None)
        return hb.probe_statistic(x, a["labels"], classes,
                                  (plan if metric == "probe_10" else plan_one) if resampled else None)

    variants = [v for v in VARIANTS if v in runs]
    per_variant, draws = {}, {}
    for v in variants:
        per_variant[v] = {}
        for m in METRICS:
            if a[v][m] is None:  # no UNETR for this variant
                continue
            draws[v, m] = stat(v, m, True)
            per_variant[v][m] = {"mean": float(stat(v, m, False)[0]), "ci": hb.interval(draws[v, m]),
                                 "per_seed": per_seed_points(a[v][m], a["labels"], classes, m)}
    comparisons = []
    for later, earlier in COMPARISONS:
        if later not in runs or earlier not in runs:
            continue
        for m in METRICS:
            if (later, m) not in draws or (earlier, m) not in draws:
                comparisons.append({"comparison": f"{later} - {earlier}", "metric": m, "difference": float("nan"),
                                    "ci": (float("nan"), float("nan")), "decision": "not run (no UNETR, budget)",
                                    "within_margin": False})
                continue
            diff = draws[later, m] - draws[earlier, m]
            point = per_variant[later][m]["mean"] - per_variant[earlier][m]["mean"]
            lo, hi = hb.interval(diff)
            comparisons.append({"comparison": f"{later} - {earlier}", "metric": m, "difference": point,
                                "ci": (lo, hi), "decision": hb.decide(lo, hi),
                                "within_margin": bool(-hb.MARGIN <= lo and hi <= hb.MARGIN)})
    return {"seeds": seeds, "dice_seeds": dice_seeds, "n_test": int(N), "n_seg_test": int(n_seg), "label_draws": int(D),
            "classes": a["classes"], "detectable": detect, "n_resamples": n_resamples,
            "per_variant": per_variant, "comparisons": comparisons}


def per_seed_points(x: np.ndarray, labels: np.ndarray, classes: list[int], metric: str) -> list[float]:
    """The metric of each seed alone (every case and label draw once)."""
    if metric == "dice":
        return [float(hb.dice_statistic(x[s:s + 1], None)[0]) for s in range(len(x))]
    return [float(hb.probe_statistic(x[s:s + 1], labels, classes, None)[0]) for s in range(len(x))]


def write_report(res: dict, reference_res: dict, settings: dict, runs: dict, out: Path) -> None:
    from simcrop.eval.report import fmt, md_table

    out.mkdir(parents=True, exist_ok=True)
    (out / "e3.json").write_text(json.dumps({"settings": settings, "supervised_reference": reference_res,
                                             "result": res}, indent=1, default=str))

    def ci(pair):
        return f"[{fmt(pair[0])}, {fmt(pair[1])}]"

    ref_rows = [[c, fmt(a), "yes" if c in reference_res["detectable"] else "no"]
                for c, a in zip(reference_res["classes"], reference_res["val_auroc_per_class"])]
    var_rows = [[v, VARIANTS[v][0]] + [f"{fmt(r[m]['mean'])} {ci(r[m]['ci'])}" if m in r else "not run"
                                       for m in METRICS]
                + ["/".join(f"{x:.3f}" for x in r["probe_100"]["per_seed"]),
                   "/".join(f"{x:.3f}" for x in r["dice"]["per_seed"]) if "dice" in r else "not run"]
                for v, r in res["per_variant"].items()]
    cmp_rows = [[c["comparison"], METRICS[c["metric"]], f"{c['difference']:+.4f}" if np.isfinite(c["difference"])
                 else "-", ci(c["ci"]) if np.isfinite(c["difference"]) else "-", c["decision"]
                 + (" (CI also within +-0.02)" if c["within_margin"] and c["decision"] in ("gain", "loss") else "")]
                for c in res["comparisons"]]
    time_rows = [[v, seed, f"{r['pretrain_s']:.0f}", f"{r['probe_s']:.0f}",
                  f"{r['segment_s']:.0f}" if "segment_s" in r else "-"]
                 for v, by_seed in runs.items() for seed, r in sorted(by_seed.items())]
    md = "\n\n".join([
        "# E3: the downstream ablation, powered (realistic synthetic phantoms)",
        f"Command: `{settings['command']}`",
        f"Machine: {settings['machine']}. Recorded time of this invocation: {settings['total_s']:.0f} s; "
        f"pre-training + evaluation seconds of all runs: {settings['runs_s']:.0f} s.",
        f"Pre-training seeds {', '.join(map(str, res['seeds']))} ({len(res['seeds'])} per variant); "
        f"{res['n_test']} shared test cases; linear probe at 10 % labels ({res['label_draws']} draws) and 100 %; "
        f"UNETR on {res['n_seg_test']} test volumes for seed(s) {', '.join(map(str, res['dice_seeds']))}; paired "
        f"hierarchical bootstrap, {res['n_resamples']:,} "
        "resamples (seeds -> cases -> label draws). Rules: docs/ablation.md (committed before these runs).",
        "## Supervised reference (which classes are detectable at all)",
        f"{reference_res['n_train']} training / {reference_res['n_val']} validation volumes of the train split, "
        f"{reference_res['epochs']} epochs, {reference_res['seconds']:.0f} s. Detectable (AUROC >= "
        f"{reference_res['threshold']}): {', '.join(reference_res['detectable']) or 'none'}.",
        md_table(["class", "validation AUROC", "detectable"], ref_rows),
        "## Per variant (mean over seeds [95 % hierarchical-bootstrap CI])",
        md_table(["variant", "pre-training"] + list(METRICS.values()) + ["probe 100 % per seed", "Dice per seed"],
                 var_rows),
        "## Pre-registered comparisons",
        md_table(["comparison", "metric", "difference", "95 % CI", "decision"], cmp_rows),
        "## Seconds per run",
        md_table(["variant", "seed", "pre-training", "probe (features included)", "UNETR"], time_rows),
    ])
    (out / "e3.md").write_text(md + "\n")
    draw_chart(res, out / "e3.png")


def draw_chart(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6), gridspec_kw={"width_ratios": [1.2, 1]})
    ax = axes[0]
    names = list(res["per_variant"])
    for k, m in enumerate(METRICS):
        for i, v in enumerate(names):
            if m not in res["per_variant"][v]:
                continue
            r = res["per_variant"][v][m]
            x = i + (k - 1) * 0.25
            ax.scatter([x] * len(r["per_seed"]), r["per_seed"], s=10, color=f"C{k}", alpha=0.5)
            ax.errorbar([x], [r["mean"]], yerr=[[r["mean"] - r["ci"][0]], [r["ci"][1] - r["mean"]]], fmt="s",
                        color=f"C{k}", ms=5, label=METRICS[m] if i == 0 else None)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names)
    ax.set_title("per variant: seeds (dots), mean and 95 % CI")
    ax.legend(fontsize=7, loc="best")
    ax.grid(axis="y", alpha=0.3)
    ax = axes[1]
    rows = [c for c in res["comparisons"] if np.isfinite(c["difference"])]
    for j, c in enumerate(rows):
        k = list(METRICS).index(c["metric"])
        ax.errorbar([c["difference"]], [j], xerr=[[c["difference"] - c["ci"][0]], [c["ci"][1] - c["difference"]]],
                    fmt="o", color=f"C{k}")
    ax.axvspan(-hb.MARGIN, hb.MARGIN, color="0.85", label="equivalence margin +-0.02")
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{c['comparison']} ({c['metric']}): {c['decision']}" for c in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_title("paired differences, 95 % hierarchical-bootstrap CI")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run(args, log=print) -> dict:
    variants = [v for v in args.e3_variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise EvalError(f"--e3-variants: unknown {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
    seeds = [int(s) for s in args.e3_seeds.split(",") if s.strip()]
    if len(seeds) < args.e3_min_seeds:
        raise EvalError(f"--e3-seeds: {len(seeds)} seed(s), fewer than --e3-min-seeds {args.e3_min_seeds}")
    t0 = time.perf_counter()
    root = dataset(args)
    ref = reference(root, args, log)
    runs: dict[str, dict[int, dict]] = {v: {} for v in variants}
    done = []
    for k, seed in enumerate(seeds):
        elapsed = (time.perf_counter() - t0) / 60
        if args.e3_budget_minutes and k >= args.e3_min_seeds and elapsed > args.e3_budget_minutes:
            log(f"[E3] budget of {args.e3_budget_minutes} min used ({elapsed:.0f} min): stopping after {k} seed(s)")
            break
        for v in variants:
            runs[v][seed] = one_run(v, seed, root, args, log)
        done.append(seed)
    res = analyse(runs, done, ref["detectable"], seg_seeds(args))
    command = getattr(args, "command", "") or "python -m simcrop.experiments.downstream " + shlex.join(
        getattr(args, "argv", []))
    settings = {"command": command,
                "machine": machine(), "steps": args.e3_steps, "text_encoder": args.e3_text_encoder, "data": str(root),
                "seeds_asked": seeds, "seeds_done": done, "total_s": time.perf_counter() - t0,
                "runs_s": sum(r["pretrain_s"] + r["probe_s"] + r.get("segment_s", 0.0) for b in runs.values()
                              for r in b.values())}
    write_report(res, ref, settings, {v: {s: r for s, r in b.items() if s in done} for v, b in runs.items()},
                 Path(args.out))
    log(f"wrote {Path(args.out) / 'e3.md'}, .json, .png")
    return res


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--e3-variants", dest="e3_variants", default=",".join(VARIANTS), help="comma list of E3's variants")
    p.add_argument("--e3-seeds", dest="e3_seeds", default="0,1,2",
                   help="E3's pre-training seeds, run in rounds (docs/ablation.md: cut from 5 to 3 by the budget rule)")
    p.add_argument("--e3-min-seeds", dest="e3_min_seeds", type=int, default=3, help="E3: never cut below this")
    p.add_argument("--e3-budget-minutes", dest="e3_budget_minutes", type=float, default=0,
                   help="E3: start a new seed round only while this many minutes have not passed (0 = no limit)")
    p.add_argument("--e3-steps", dest="e3_steps", type=int, default=300, help="E3: pre-training steps of every run")
    p.add_argument("--e3-text-encoder", dest="e3_text_encoder", default="minilm", help="E3: frozen text tower")
    p.add_argument("--e3-label-draws", dest="e3_label_draws", type=int, default=5, help="E3: draws at 10 %% labels")
    p.add_argument("--e3-seg-steps", dest="e3_seg_steps", type=int, default=300, help="E3: UNETR training steps")
    p.add_argument("--e3-seg-variants", dest="e3_seg_variants", default="random,mim",
                   help="E3: variants that get a UNETR (docs/ablation.md: random and mim only, by the budget)")
    p.add_argument("--e3-seg-seeds", dest="e3_seg_seeds", default="0",
                   help="E3: pre-training seeds that get a UNETR (docs/ablation.md: seed 0 only, by the budget)")
    p.add_argument("--e3-probe-epochs", dest="e3_probe_epochs", type=int, default=200, help="E3: linear probe epochs")
    p.add_argument("--e3-reference-epochs", dest="e3_reference_epochs", type=int, default=12,
                   help="E3: supervised reference CNN epochs")
    p.add_argument("--e3-detect-threshold", dest="e3_detect_threshold", type=float, default=0.75,
                   help="E3: a class is detectable at this supervised-reference AUROC")
    p.add_argument("--e3-data", dest="e3_data", default="",
                   help="E3: realistic synthetic dataset ('' = the built-in one with 1280 cases, 256 test)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m simcrop.experiments.downstream", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="docs/evidence", help="e3.md / .json / .png")
    p.add_argument("--work", default="runs/evidence", help="runs and per-run results (resumable)")
    p.add_argument("--cache-dir", default="", help="cache folder (default: $SIMCROP_CACHE)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="torch.compile the step")
    p.add_argument("--device", default="auto", help="evaluation device")
    add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_command("simcrop.experiments.downstream", build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
