"""The pre-registered experiments of docs/ablation.md (E1 identifiability, E2 voxel-level grounding) on the
grounding testbed: pre-train each variant with several seeds, evaluate, bootstrap over seeds, decide by the
rules written down before the runs.

    python -m simcrop.experiments.evidence --out docs/evidence --work runs/evidence            # E1 + E2, then E3
    python -m simcrop.experiments.evidence --experiments e1 --seeds 0,1,2,3,4 --steps 600 --variants spec,soft,both

Resumable: every run and result is kept in --work; a rerun trains and evaluates only what is missing.
Writes <out>/evidence.{md,json,png} (E1, E2) and, through simcrop.experiments.downstream, <out>/e3.{md,json,png}.
"""
from __future__ import annotations

import argparse
import copy
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
from simcrop.eval.session import EvalSession
from simcrop.experiments import downstream
from simcrop.experiments.command_line import run_command
from simcrop.experiments.ablation import machine
from simcrop.experiments.pretrain_once import pretrain

# E1's variants (docs/ablation.md): every one keeps L_MIM + L_MLM; they differ in the alignment term only
E1_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "spec": ("SPEC's L_align (within-CT InfoNCE over top-K pools)", {}),
    "soft": ("cross-CT soft sentence-volume term instead of L_align", {"align_within": False, "w_align_soft": 1.0}),
    "both": ("SPEC's L_align + the cross-CT soft term", {"w_align_soft": 1.0}),
}
BOOTSTRAP = 10_000


# -- statistics ------------------------------------------------------------------------------------------------------
def bootstrap_ci(values, stat=np.mean, n: int = BOOTSTRAP, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of stat over resamples (with replacement) of `values` (seed-level: one value per seed)."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    draws = stat(v[rng.integers(0, len(v), size=(n, len(v)))], axis=1)
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return float(lo), float(hi)


def weighted_auroc(scores: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> float:
    """AUROC of items with scores [N] that stand for pos[N] positive and neg[N] negative units each (a voxel-level
    AUROC of a patch map, every voxel scored by its patch): P(score_pos > score_neg) + 0.5 P(tie)."""
    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    if pos.sum() == 0 or neg.sum() == 0:
        return float("nan")
    order = np.argsort(scores, kind="stable")
    s, p, q = np.asarray(scores)[order], pos[order], neg[order]
    total = 0.0
    neg_below = 0.0
    i = 0
    while i < len(s):  # walk groups of equal score upwards
        j = i
        while j < len(s) and s[j] == s[i]:
            j += 1
        gp, gq = p[i:j].sum(), q[i:j].sum()
        total += gp * (neg_below + 0.5 * gq)
        neg_below += gq
        i = j
    return float(total / (pos.sum() * neg.sum()))


# -- one run -----------------------------------------------------------------------------------------------------------
def run_config(variant: str, seed: int, args):
    shared = dict(seed=seed, steps=args.steps, ckpt_every=args.steps, progress=False, log_every=25,
                  text_encoder=args.text_encoder, compile=args.compile, out=str(Path(args.work) / "e1" / variant /
                                                                                  f"seed{seed}" / "run"))
    if args.cache_dir:
        shared["cache_dir"] = args.cache_dir
    if args.data:
        shared["data"] = args.data
    return make_config("testbed", **{**shared, **E1_VARIANTS[variant][1]})


def lung_and_region_weights(case, cfg, root: Path) -> tuple[np.ndarray, list[np.ndarray]]:
    """Per patch of the centre crop: its lung voxels [N] and, per sentence, its region's lung voxels [N]."""
    from simcrop.data.synthetic import LUNG_LABELS
    from simcrop.eval.data import load_nifti, patch_fractions, regions_file

    maps = regions_file(root, "valid", None).parent / "valid"
    name = case.item.name
    anatomy = load_nifti(maps / f"{name}_anatomy.nii.gz")
    lesions = load_nifti(maps / f"{name}_lesions.nii.gz")
    lung = np.isin(anatomy, LUNG_LABELS) | (lesions > 0)  # [X, Y, Z] stored grid
    voxels = int(np.prod(cfg.patch_size))
    lung_n = patch_fractions(lung, cfg.img_size, cfg.patch_size) * voxels  # after the evaluation's centre crop
    regions = [patch_fractions(sent.mask & lung, cfg.img_size, cfg.patch_size) * voxels for sent in case.sentences]
    return lung_n, regions


def voxel_grounding(session: EvalSession, max_cases: int) -> dict:
    """E2: per held-out lesion sentence, the voxel-level AUROC (inside the lungs) of its patch similarity map
    cos(g_t sentence, g_v patch), every voxel scored by its patch; mean over sentences."""
    from simcrop.eval.data import load_volume, read_grounding_cases
    from simcrop.eval.grounding import sentence_patch_similarity

    cfg = session.model.cfg
    values = []
    for case in read_grounding_cases(session.root, "valid", None, max_cases):
        lesion = [j for j, s in enumerate(case.sentences) if s.finding != "normal"]
        if not lesion:
            continue
        findings = " ".join(s.text for s in case.sentences)
        volume = load_volume(case.item, cfg.img_size)
        sim = sentence_patch_similarity(session.model, session.text, volume[None], findings, session.device).numpy()
        lung_n, regions = lung_and_region_weights(case, cfg, session.root)
        for j in lesion:
            if j >= sim.shape[0] or regions[j].sum() == 0:
                continue
            values.append(weighted_auroc(sim[j], regions[j], np.clip(lung_n - regions[j], 0, None)))
    v = np.asarray([x for x in values if np.isfinite(x)])
    return {"voxel_auroc": float(v.mean()) if len(v) else float("nan"), "n_sentences": int(len(v))}


def evaluate(ckpt: Path, args, log) -> dict:
    path = ckpt.parent.parent / "evidence.json"
    if path.is_file():
        return json.loads(path.read_text())
    s = EvalSession(ckpt, data=args.data, out=str(ckpt.parent.parent / "eval"), device=args.device,
                    cache_dir=args.cache_dir, log=log)
    g = tasks.run_grounding(s, tasks.GroundingOptions(figures=args.figures, max_cases=args.max_cases))
    p = g["lesion_pointing"]
    probe = tasks.run_patch_probe(copy.copy(s), tasks.PatchProbeOptions(max_cases=args.max_cases))
    res = {"hit": p["hit"]["mean"], "chance": p["chance"]["mean"], "control_hit": p["control_hit"]["mean"],
           "n_lesion_sentences": p["n"], "probe_ceiling": probe["tokens"]["macro_auroc"],
           "probe_raw": probe["raw"]["macro_auroc"], **voxel_grounding(s, args.max_cases),
           "figure": (g.get("figures") or [None])[0]}
    path.write_text(json.dumps(res, indent=1))
    return res


def variant_pictures(results: dict, args, out: Path, log) -> dict[str, str]:
    """One grounding picture per variant, all of the same held-out case (of the first 32, the first with the most
    lesion sentences) and the same seed (the lowest run): the lesion sentences' maps, <out>/grounding_<variant>.png."""
    from simcrop.eval.data import read_grounding_cases
    from simcrop.eval.grounding import draw_case, evaluate_case

    drawn, case = {}, None
    for v, runs in results.items():
        seed = min(runs)
        ckpt = Path(args.work) / "e1" / v / f"seed{seed}" / "run"
        s = EvalSession(ckpt, data=args.data, out=str(out), device=args.device, cache_dir=args.cache_dir, log=log)
        if case is None:
            cases = read_grounding_cases(s.root, "valid", None, 32)
            n_lesion = [sum(x.finding != "normal" for x in c.sentences) for c in cases]
            if not cases or max(n_lesion) == 0:
                return drawn
            case = cases[int(np.argmax(n_lesion))]
        cfg = s.model.cfg
        records, volume, details = evaluate_case(s.model, s.text, case, s.device, cfg.topk)
        kept = [r for r in records if "skipped" not in r]  # details[i] belongs to kept[i]
        lesion = [d for d, r in zip(details, kept) if r["group"] == "lesion"]
        path = out / f"grounding_{v}.png"
        draw_case(path, volume, lesion or details, cfg, f"{v} (seed {seed}): {case.item.name}, cos(s_j, v_i), "
                  f"top-{cfg.topk} patches", case.item.spacing, max_rows=3)
        drawn[v] = str(path)
    return drawn


# -- decisions -------------------------------------------------------------------------------------------------------
def e1_decision(per_seed: list[dict]) -> str:
    """docs/ablation.md: grounds when hit >= 2 x chance in >= 4 of 5 seeds (>= 80 %), fails when in <= 1 of 5
    (<= 20 %), else mixed."""
    wins = sum(r["hit"] >= 2 * r["chance"] for r in per_seed)
    share = wins / max(1, len(per_seed))
    return "grounds" if share >= 0.8 else ("fails" if share <= 0.2 else "mixed")


def e2_decision(per_seed: list[dict]) -> str:
    ceiling = float(np.mean([r["probe_ceiling"] for r in per_seed]))
    if ceiling < 0.8:
        return f"uninformative (patch-probe ceiling {ceiling:.3f} < 0.8)"
    lo, hi = bootstrap_ci([r["voxel_auroc"] for r in per_seed])
    if lo > 0.5:
        return "grounds at the voxel level"
    return "at chance" if lo <= 0.5 <= hi else "below chance"


def summarize(results: dict) -> dict:
    out = {}
    for v, runs in results.items():
        rows = list(runs.values())
        diff = [r["hit"] - r["chance"] for r in rows]
        ratio = [r["hit"] / r["chance"] if r["chance"] > 0 else float("nan") for r in rows]
        vox = [r["voxel_auroc"] for r in rows]
        out[v] = {"seeds": len(rows), "hit": float(np.mean([r["hit"] for r in rows])),
                  "chance": float(np.mean([r["chance"] for r in rows])),
                  "hit_minus_chance": float(np.mean(diff)), "hit_minus_chance_ci": bootstrap_ci(diff),
                  "ratio": float(np.nanmean(ratio)), "seeds_at_2x": int(sum(r["hit"] >= 2 * r["chance"] for r in rows)),
                  "e1": e1_decision(rows), "voxel_auroc": float(np.mean(vox)), "voxel_auroc_ci": bootstrap_ci(vox),
                  "probe_ceiling": float(np.mean([r["probe_ceiling"] for r in rows])),
                  "probe_raw": float(np.mean([r["probe_raw"] for r in rows])), "e2": e2_decision(rows),
                  "pretrain_s": float(np.mean([r["pretrain_s"] for r in rows]))}
    return out


def write_report(summary: dict, results: dict, settings: dict, out: Path) -> None:
    from simcrop.eval.report import fmt, md_table

    out.mkdir(parents=True, exist_ok=True)
    (out / "evidence.json").write_text(json.dumps({"settings": settings, "summary": summary, "runs": results},
                                                  indent=1, default=str))

    def ci(pair):
        return f"[{fmt(pair[0])}, {fmt(pair[1])}]"

    header = ["variant", "seeds", "lesion pointing hit", "chance", "hit - chance [95% CI]", "hit / chance",
              "seeds >= 2x chance", "E1 decision", "voxel AUROC [95% CI]", "patch-probe ceiling (raw input)",
              "E2 decision", "pre-training s / run"]
    body = [[v, s["seeds"], s["hit"], s["chance"], f"{fmt(s['hit_minus_chance'])} {ci(s['hit_minus_chance_ci'])}",
             s["ratio"], f"{s['seeds_at_2x']}/{s['seeds']}", s["e1"],
             f"{fmt(s['voxel_auroc'])} {ci(s['voxel_auroc_ci'])}", f"{fmt(s['probe_ceiling'])} ({fmt(s['probe_raw'])})",
             s["e2"], f"{s['pretrain_s']:.0f}"] for v, s in summary.items()]
    per_seed = [[v, seed, r["hit"], r["chance"], r["voxel_auroc"], r["probe_ceiling"], r["n_lesion_sentences"]]
                for v, runs in results.items() for seed, r in runs.items()]
    md = "\n\n".join([
        "# Evidence: E1 (identifiability) and E2 (voxel-level grounding) on the grounding testbed",
        f"Command: `{settings['command']}`",
        f"Machine: {settings['machine']}. Recorded time of this invocation: {settings['total_s']:.0f} s (runs "
        "already done are reused, not re-timed; each run's pre-training seconds are in the table).",
        "Pre-registered predictions and decision rules: docs/ablation.md (committed before these runs).",
        md_table(header, body),
        "Per seed:",
        md_table(["variant", "seed", "hit", "chance", "voxel AUROC", "probe ceiling", "lesion sentences"], per_seed),
        "![E1 and E2 per seed](evidence.png)",
    ] + [f"![grounding of {v}]({Path(p).name})" for v, p in settings.get("pictures", {}).items()])
    (out / "evidence.md").write_text(md + "\n")
    draw_chart(summary, results, out / "evidence.png")


def draw_chart(summary: dict, results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    for i, v in enumerate(names):
        hits = [r["hit"] for r in results[v].values()]
        ax.scatter([i] * len(hits), hits, color="C3", zorder=3, label="seed: lesion pointing hit" if i == 0 else None)
        ax.plot([i - 0.3, i + 0.3], [summary[v]["chance"]] * 2, "k-", lw=2, label="chance" if i == 0 else None)
        ax.plot([i - 0.3, i + 0.3], [2 * summary[v]["chance"]] * 2, "k--", lw=1, label="2 x chance" if i == 0 else None)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names)
    ax.set_title("E1: does the top patch fall in the described lesion?")
    ax.legend(fontsize=8)
    ax = axes[1]
    for i, v in enumerate(names):
        vals = [r["voxel_auroc"] for r in results[v].values()]
        ax.scatter([i] * len(vals), vals, color="C0", zorder=3)
        lo, hi = summary[v]["voxel_auroc_ci"]
        ax.errorbar([i + 0.15], [summary[v]["voxel_auroc"]], yerr=[[summary[v]["voxel_auroc"] - lo],
                                                                  [hi - summary[v]["voxel_auroc"]]], fmt="ks", ms=4)
    ax.axhline(0.5, color="k", lw=0.8, ls="--")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names)
    ax.set_title("E2: voxel AUROC of the sentence map in the lungs")
    for a in axes:
        a.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run(args, log=print) -> dict:
    """The experiments named in args.experiments: 'e1' (E1 + E2 on the testbed), 'e3' (downstream.run)."""
    chosen = [e for e in args.experiments.split(",") if e]
    if set(chosen) - {"e1", "e3"}:
        raise EvalError(f"--experiments: unknown {', '.join(sorted(set(chosen) - {'e1', 'e3'}))} (known: e1, e3)")
    summary = run_e1(args, log) if "e1" in chosen else {}
    if "e3" in chosen:
        args.command = "python -m simcrop.experiments.evidence " + shlex.join(getattr(args, "argv", []))
        summary["e3"] = downstream.run(args, log)
    return summary


def run_e1(args, log=print) -> dict:
    unknown = [v for v in args.variants.split(",") if v not in E1_VARIANTS]
    if unknown:
        raise EvalError(f"--variants: unknown {', '.join(unknown)} (known: {', '.join(E1_VARIANTS)})")
    t0 = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    results: dict[str, dict] = {}
    for v in args.variants.split(","):
        results[v] = {}
        for seed in seeds:
            cfg = run_config(v, seed, args)
            log(f"[E1 {v} seed {seed}] pre-training {cfg.train.steps} steps into {cfg.train.out}")
            ckpt, seconds = pretrain(cfg, log)
            results[v][seed] = {**evaluate(ckpt, args, log), "pretrain_s": seconds}
    settings = {"command": "python -m simcrop.experiments.evidence " + shlex.join(getattr(args, "argv", [])),
                "machine": machine(), "steps": args.steps, "seeds": seeds, "text_encoder": args.text_encoder,
                "total_s": time.perf_counter() - t0,
                "data": str(factory.data_root(make_config("testbed", cache_dir=args.cache_dir), args.data or None))}
    summary = summarize(results)
    if args.figures:
        settings["pictures"] = variant_pictures(results, args, Path(args.out), log)
    write_report(summary, results, settings, Path(args.out))
    log(f"wrote {Path(args.out) / 'evidence.md'}, .json, .png")
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m simcrop.experiments.evidence", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--experiments", default="e1,e3", help="comma list: e1 (E1 + E2, testbed), e3 (downstream)")
    p.add_argument("--out", default="docs/evidence", help="evidence.md / .json / .png, e3.md / .json / .png")
    p.add_argument("--work", default="runs/evidence", help="runs and per-run results (resumable)")
    p.add_argument("--data", default="", help="testbed folder ('' = the built-in testbed in the cache)")
    p.add_argument("--cache-dir", default="", help="cache folder (default: $SIMCROP_CACHE)")
    p.add_argument("--variants", default=",".join(E1_VARIANTS), help=f"comma list of {', '.join(E1_VARIANTS)}")
    p.add_argument("--seeds", default="0,1,2,3,4", help="pre-training seeds")
    p.add_argument("--steps", type=int, default=600, help="pre-training steps of every run")
    p.add_argument("--text-encoder", default="tiny-bert", help="frozen text tower of every run")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="torch.compile the step")
    p.add_argument("--max-cases", type=int, default=0, help="held-out cases evaluated (0 = all)")
    p.add_argument("--figures", type=int, default=1, help="grounding pictures per run")
    p.add_argument("--device", default="auto", help="evaluation device")
    downstream.add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_command("simcrop.experiments.evidence", build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
