"""The project's ablation: pre-train variants with one budget, evaluate each the same way, tabulate.

    python -m simcrop.experiments.ablation --out docs/ablation --work runs/ablation --steps 300
    python -m simcrop.eval ablation ...          (the same)

Variants (all the tiny preset, same seed, data, steps and schedule; simcrop.pretraining.Trainer):
  random   no pre-training (the full architecture at its initialisation: step-0 checkpoint)
  mim      L_MIM only                 (use_mlm=False, use_align=False)
  mim_mlm  L_MIM + L_MLM              (use_align=False)
  full     SimCroP: L_MIM + L_MLM + L_align
  full_xct SimCroP + the sentence-volume contrast (w_align_volume=1; an extension, docs/method.md)
  (optional: mim_align use_mlm=False, align use_mim=False use_mlm=False)
Each is evaluated on the held-out split by simcrop.eval.tasks: linear probe (1/10/100 %), grounding (needs the
alignment heads: random and full only; random heads = a measured chance baseline), segmentation (UNETR,
lesions), and zero-shot / retrieval where the heads exist. Writes <out>/ablation.{md,csv,json,png}; every
variant's runs and results stay in --work (re-running skips what is done).
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import platform
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from simcrop import factory
from simcrop.checkpoint import latest_checkpoint, save_checkpoint
from simcrop.config import Config, ConfigError, add_config_arguments, make_config
from simcrop.eval import tasks
from simcrop.eval.errors import EvalError
from simcrop.eval.linear_probe import ProbeSettings
from simcrop.eval.session import EvalSession
from simcrop.experiments.command_line import run_command
from simcrop.pretraining import Trainer

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "random": ("none (random init)", {}),
    "mim": ("MIM", {"use_mlm": False, "use_align": False}),
    "mim_mlm": ("MIM + MLM", {"use_align": False}),
    "mim_align": ("MIM + align", {"use_mlm": False}),
    "align": ("align", {"use_mim": False, "use_mlm": False}),
    "full": ("MIM + MLM + align (SimCroP)", {}),
    "full_xct": ("SimCroP + sentence-volume term", {"w_align_volume": 1.0}),
}
DEFAULT_VARIANTS = ("random", "mim", "mim_mlm", "full", "full_xct")


def add_ablation_args(p) -> None:
    p.add_argument("--out", default="docs/ablation", help="table, CSV, JSON and chart go here")
    p.add_argument("--work", default="runs/ablation", help="pre-training runs and per-variant results")
    p.add_argument("--data", default="", help="CT-RATE-layout folder (default: the built-in synthetic dataset)")
    p.add_argument("--cache-dir", default="", help="synthetic data / text encoder cache (default: $SIMCROP_CACHE)")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=300, help="pre-training steps of every variant")
    p.add_argument("--text-encoder", default="minilm", help="frozen text tower of every variant")
    p.add_argument("--seed", type=int, default=42, help="pre-training seed (the same for every variant)")
    p.add_argument("--train-args", default="", help="extra training flags for every variant, as for "
                                                    "the training command line takes them (one string)")
    p.add_argument("--probe-epochs", type=int, default=200, help="linear probe: longest training")
    p.add_argument("--probe-repeats", type=int, default=3, help="linear probe: draws of the 1%%/10%% subsets")
    p.add_argument("--seg-steps", type=int, default=300, help="UNETR training steps")
    p.add_argument("--seg-lr", type=float, default=1e-3,
                   help="UNETR learning rate (higher than segment's default: a short budget)")
    p.add_argument("--seg-feature-size", type=int, default=16, help="UNETR feature size")
    p.add_argument("--seg-seeds", default="0,1", help="decoder seeds (the table shows their mean)")
    p.add_argument("--seg-target", default="lesions", choices=("lesions", "findings", "anatomy"),
                   help="segmentation labels (see segment --help)")
    p.add_argument("--seg-max-test", type=int, default=0, help="segmentation test volumes (0 = all)")
    p.add_argument("--figures", type=int, default=4, help="grounding pictures per variant")
    p.add_argument("--device", default="auto", help="evaluation device (pre-training: --train-args '--device ...')")
    p.add_argument("--skip", default="", help="comma list of evaluations to skip: probe,grounding,segment,zeroshot")


def _data_root(args) -> Path:
    return factory.data_root(make_config("tiny"), args.data or None, args.cache_dir or None)


def _train_overrides(text: str) -> dict[str, Any]:
    """--train-args '--batch-size 2 --no-use-mlm' -> {'batch_size': 2, 'use_mlm': False} (config fields only)."""
    parser = argparse.ArgumentParser(prog="--train-args", add_help=False)
    add_config_arguments(parser)
    try:
        ns = parser.parse_args(shlex.split(text))
    except SystemExit:
        raise ConfigError(f"--train-args {text!r}: not valid training flags "
                          f"(see the training command's --help)") from None
    if ns.preset != "tiny":
        raise ConfigError("--train-args: the ablation runs the tiny preset; --preset cannot change")
    return {k: v for k, v in vars(ns).items() if v is not None and k != "preset"}


def variant_config(variant: str, args, root: Path) -> Config:
    """The tiny preset with the ablation's shared budget, the variant's loss switches and --train-args."""
    shared = dict(data=str(root), text_encoder=args.text_encoder, steps=args.steps,
                  warmup_steps=max(1, args.steps // 10), seed=args.seed, ckpt_every=args.steps, progress=False,
                  log_every=10, out=str(Path(args.work) / variant / "run"))
    if args.cache_dir:
        shared["cache_dir"] = args.cache_dir
    return make_config("tiny", **{**shared, **VARIANTS[variant][1], **_train_overrides(args.train_args)})


def write_random_checkpoint(cfg: Config) -> Path:
    """Step-0 checkpoint of the full model at its initialisation (what the trainer would start from)."""
    run = Path(cfg.train.out)
    done = latest_checkpoint(run)
    if done is not None:
        return done
    factory.seed_everything(cfg.train.seed)
    root = factory.data_root(cfg)
    text = factory.build_text_encoder(cfg, root)
    model = factory.build_model(cfg, text)
    saved = cfg.to_dict()
    saved["text_encoder_id"] = text.name
    return save_checkpoint(run, 0, model.state_dict(), {"step": 0, "text_encoder": text.name}, saved)


def pretrain(variant: str, args, root: Path, work: Path, log) -> tuple[Path, float]:
    """The variant's checkpoint (trained now unless already there) and its pre-training seconds."""
    cfg = variant_config(variant, args, root)
    if variant == "random":
        return write_random_checkpoint(cfg), 0.0
    run = Path(cfg.train.out)
    timing = work / variant / "pretrain_seconds.json"
    done = latest_checkpoint(run)
    if done is not None and done.name == f"step_{args.steps:08d}" and timing.is_file():
        return done, json.loads(timing.read_text())["seconds"]
    if done is not None:
        cfg.train.resume = "auto"
    log(f"[{variant}] pre-training {args.steps} steps into {run}")
    t0 = time.perf_counter()
    Trainer(cfg, log=log).run()
    seconds = time.perf_counter() - t0
    timing.write_text(json.dumps({"seconds": seconds}))
    return latest_checkpoint(run), seconds


@dataclass
class _Job:
    """One evaluation of a variant: its result file and how to make it."""
    name: str  # the key in the variant's results (the table reads these)
    result: Path  # <task>.json written by the task
    run: Callable[[EvalSession], dict]
    out: Path  # the session's output folder for this job


def _jobs(variant: str, ckpt: Path, args, work: Path) -> list[_Job]:
    out = work / variant / "eval"
    model_cfg = json.loads((ckpt / "config.json").read_text())["model"]
    has_align, has_mlm = model_cfg["use_align"], model_cfg["use_mlm"]
    skip = set(filter(None, args.skip.split(",")))
    jobs = []
    if "probe" not in skip:
        probe = ProbeSettings(epochs=args.probe_epochs, repeats=args.probe_repeats)
        jobs.append(_Job("linear-probe", out / "linear-probe.json", lambda s: tasks.run_linear_probe(s, probe), out))
    if has_align and "grounding" not in skip:
        align = tasks.GroundingOptions(figures=args.figures, diagnose=4)
        jobs.append(_Job("grounding", out / "grounding.json", lambda s: tasks.run_grounding(s, align), out))
    if has_mlm and "grounding" not in skip:
        fusion = tasks.GroundingOptions(figures=args.figures, map="fusion")
        jobs.append(_Job("grounding-fusion", out / "grounding-fusion.json",
                         lambda s: tasks.run_grounding(s, fusion), out))
    if has_align and "zeroshot" not in skip:
        jobs.append(_Job("zero-shot", out / "zero-shot.json", lambda s: tasks.run_zero_shot(s), out))
        jobs.append(_Job("retrieval", out / "retrieval.json", lambda s: tasks.run_retrieval(s), out))
    if "segment" not in skip:
        for seed in [int(v) for v in args.seg_seeds.split(",") if v.strip()]:
            # seed s > 0 goes to its own folder (the task names its files "segment")
            seg_out = out if seed == 0 else work / variant / f"eval_seg_seed{seed}"
            opts = tasks.SegmentOptions(steps=args.seg_steps, target=args.seg_target, max_test=args.seg_max_test,
                                        lr=args.seg_lr, feature_size=args.seg_feature_size, seed=seed)
            jobs.append(_Job("segment" if seed == 0 else f"segment-seed{seed}", seg_out / "segment.json",
                             lambda s, o=opts: tasks.run_segment(s, o), seg_out))
    return jobs


def _evaluate(variant: str, ckpt: Path, args, root: Path, work: Path, log) -> dict:
    jobs = _jobs(variant, ckpt, args, work)
    session = None  # loaded once, on the first job that is not done yet
    results = {}
    for job in jobs:
        if not job.result.is_file():
            log(f"[{variant}] {job.name}")
            if session is None:
                session = EvalSession(ckpt, data=str(root), out=str(job.out), device=args.device,
                                      cache_dir=args.cache_dir, log=log)
            t0 = time.perf_counter()
            job_session = copy.copy(session)
            job_session.out = job.out
            job.run(job_session)
            data = json.loads(job.result.read_text())
            data["seconds"] = time.perf_counter() - t0
            job.result.write_text(json.dumps(data, indent=2))
        results[job.name] = json.loads(job.result.read_text())
    return results


def _g(d, *keys):
    for k in keys:
        if d is None:
            return None
        d = d.get(k) if isinstance(d, dict) else None
    return d


def _seg_values(results: dict, key: str) -> list[float]:
    return [v[key] for k, v in sorted(results.items()) if k.startswith("segment") and v.get(key) is not None]


def _seg_mean(results: dict, key: str):
    vals = _seg_values(results, key)
    return sum(vals) / len(vals) if vals else None


def table_rows(summary: dict) -> list[dict]:
    rows = []
    for v, r in summary["variants"].items():
        lp, gr = r["results"].get("linear-probe"), r["results"].get("grounding")
        gf = r["results"].get("grounding-fusion")
        zs, rt = r["results"].get("zero-shot"), r["results"].get("retrieval")
        rows.append({
            "variant": v, "losses": VARIANTS[v][0], "pretrain_s": r["pretrain_s"],
            "probe_auroc_1": _g(lp, "fractions", "0.01", "auroc"), "probe_auroc_10": _g(lp, "fractions", "0.1", "auroc"),
            "probe_auroc_100": _g(lp, "fractions", "1", "auroc"), "probe_f1_100": _g(lp, "fractions", "1", "f1"),
            "ground_lesion_share": _g(gr, "groups", "lesion", "topk_share", "mean"),
            "ground_lesion_chance": _g(gr or gf, "groups", "lesion", "chance", "mean"),
            "ground_lesion_hit": _g(gr, "groups", "lesion", "hit", "mean"),
            "ground_normal_share": _g(gr, "groups", "normal", "topk_share", "mean"),
            "ground_normal_chance": _g(gr or gf, "groups", "normal", "chance", "mean"),
            "ground_normal_hit": _g(gr, "groups", "normal", "hit", "mean"),
            "ground_patch_auroc": _g(gr, "groups", "all", "patch_auroc", "mean"),
            "ground_normal_control": _g(gr, "groups", "normal", "control_share", "mean"),
            "ground_background_share": _g(gr, "groups", "all", "background_share", "mean"),
            "ground_background_chance": _g(gr, "groups", "all", "background_chance", "mean"),
            "fusion_lesion_share": _g(gf, "groups", "lesion", "topk_share", "mean"),
            "fusion_lesion_hit": _g(gf, "groups", "lesion", "hit", "mean"),
            "fusion_normal_share": _g(gf, "groups", "normal", "topk_share", "mean"),
            "fusion_normal_control": _g(gf, "groups", "normal", "control_share", "mean"),
            "fusion_normal_hit": _g(gf, "groups", "normal", "hit", "mean"),
            "fusion_patch_auroc": _g(gf, "groups", "all", "patch_auroc", "mean"),
            "align_discrimination": _g(gr, "diagnostic", "discrimination_topk"),
            "align_discrimination_random_k": _g(gr, "diagnostic", "discrimination_random_k"),
            "align_position_share": _g(gr, "diagnostic", "position_share"),
            "seg_dice": _seg_mean(r["results"], "dice"), "seg_dice_pooled": _seg_mean(r["results"], "dice_pooled"),
            "seg_dice_per_seed": "/".join(f"{x:.3f}" for x in _seg_values(r["results"], "dice")),
            "zero_shot_auroc": _g(zs, "auroc"),
            "retrieval_r5": _g(rt, "report_to_volume", "5"),
        })
    return rows


def _slim(obj):
    """The summary without per-sentence records and probe curves (those stay in --work)."""
    if isinstance(obj, dict):
        return {k: _slim(v) for k, v in obj.items() if k not in ("sentences", "val_curve")}
    if isinstance(obj, list):
        return [_slim(v) for v in obj]
    return obj


def write_table(summary: dict, out: Path) -> None:
    from simcrop.eval.report import fmt, md_table

    out.mkdir(parents=True, exist_ok=True)
    rows = table_rows(summary)
    with open(out / "ablation.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows([{k: ("" if v is None else (f"{v:.4f}" if isinstance(v, float) else v)) for k, v in r.items()} for r in rows])
    (out / "ablation.json").write_text(json.dumps(_slim(summary), indent=1, default=str))

    def chance(key):
        vals = [r[key] for r in rows if r[key] is not None]
        return fmt(vals[0]) if vals else "n/a"

    cl, cn = chance("ground_lesion_chance"), chance("ground_normal_chance")
    header = ["variant", "pre-training", "probe AUROC 1%", "10%", "100%", "probe F1 100%",
              f"align: lesion top-K share (chance {cl})", f"lesion hit ({cl})",
              f"normal top-K share ({cn})", f"normal hit ({cn})", "normal: CT-mean map (control)", "patch AUROC (0.5)",
              f"top-K share in background ({chance('ground_background_chance')})",
              f"fusion attn: lesion top-K share ({cl})", f"normal top-K share ({cn})", "normal: CT-mean map (control)",
              "patch AUROC (0.5)",
              "L_align sentence discrimination (random-K)", "g_v variance from position",
              "seg Dice (per seed; pooled voxels)", "zero-shot AUROC (0.5)", "R@5 report→vol"]
    body = [[r["variant"], f"{r['losses']}, {r['pretrain_s']:.0f} s", r["probe_auroc_1"], r["probe_auroc_10"],
             r["probe_auroc_100"], r["probe_f1_100"], r["ground_lesion_share"], r["ground_lesion_hit"],
             r["ground_normal_share"], r["ground_normal_hit"], r["ground_normal_control"], r["ground_patch_auroc"],
             r["ground_background_share"], r["fusion_lesion_share"], r["fusion_normal_share"],
             r["fusion_normal_control"], r["fusion_patch_auroc"],
             "n/a" if r["align_discrimination"] is None else
             f"{fmt(r['align_discrimination'])} ({fmt(r['align_discrimination_random_k'])})",
             r["align_position_share"], "n/a" if r["seg_dice"] is None else
             f"{fmt(r['seg_dice'])} ({r['seg_dice_per_seed']}; {fmt(r['seg_dice_pooled'])})", r["zero_shot_auroc"], r["retrieval_r5"]] for r in rows]
    r5 = [v["results"].get("retrieval", {}).get("chance", {}).get("5") for v in summary["variants"].values()]
    r5 = next((c for c in r5 if c is not None), None)
    header[-1] += f" ({fmt(r5)})" if r5 is not None else ""
    recorded = sum(v["pretrain_s"] for v in summary["variants"].values()) + sum(
        t.get("seconds", t.get("train_s", 0.0) + t.get("eval_s", 0.0)) for v in summary["variants"].values()
        for t in v["results"].values())
    s = summary["settings"]
    md = "\n\n".join([
        "# Ablation (generated by `python -m simcrop.eval ablation`)",
        f"Command: `{s['command']}`",
        f"Machine: {s['machine']}. Data: {s['data']} (pre-training on `train`, every number on the held-out "
        f"`valid` split). Recorded time of all runs (pre-training + evaluation, summed over the invocations that "
        f"produced them): {recorded:.0f} s; this invocation: {s['total_s']:.0f} s.",
        md_table(header, body),
        "align: cos(g_t sentence, g_v patch); fusion attn: the masked-report branch's word-patch cross-attention "
        "(simcrop.eval.grounding). CT-mean map (control): the average of a CT's sentence maps scored against each "
        "sentence's region; a map that only prefers some anatomy matches it, a sentence-specific map beats it. n/a: the variant lacks the part the measure reads (alignment heads g_v / g_t "
        "for align, zero-shot and retrieval; the fusion layer for fusion attn). Chance rates depend only on the "
        "test sentences and regions, so they are the same for every variant.",
    ])
    (out / "ablation.md").write_text(md + "\n")
    draw_chart(rows, out / "ablation.png")


def draw_chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [r["variant"] for r in rows]
    x = np.arange(len(names))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    for i, (key, lab) in enumerate((("probe_auroc_1", "1%"), ("probe_auroc_10", "10%"), ("probe_auroc_100", "100%"))):
        ax.bar(x + (i - 1) * 0.27, [r[key] or 0 for r in rows], 0.27, label=f"{lab} labels")
    ax.axhline(0.5, color="k", lw=0.8, ls="--")
    ax.set_ylim(0.3, 1.0)
    ax.set_title("linear probe: macro AUROC (test)")
    ax.legend(fontsize=8)
    ax = axes[1]
    bars = (("ground_lesion_share", "ground_lesion_chance", "align, lesion", "C3", None),
            ("ground_normal_share", "ground_normal_chance", "align, normal", "C0", None),
            ("fusion_lesion_share", "ground_lesion_chance", "fusion attn, lesion", "C3", "//"),
            ("fusion_normal_share", "ground_normal_chance", "fusion attn, normal", "C0", "//"))
    w = 0.2
    for i, (key, ckey, lab, col, hatch) in enumerate(bars):
        off = (i - 1.5) * w
        vals = [r[key] for r in rows]
        ax.bar(x + off, [v or 0 for v in vals], w, color=col, alpha=0.5 if hatch else 1.0, hatch=hatch,
               edgecolor="k", lw=0.5, label=lab)
        for j, r in enumerate(rows):
            c = r[ckey]
            if c is not None and vals[j] is not None:
                ax.plot([x[j] + off - w / 2, x[j] + off + w / 2], [c, c], color="k", lw=1.5)
            if vals[j] is None:
                ax.text(x[j] + off, 0.01, "n/a", ha="center", fontsize=6, rotation=90)
    ax.set_title("grounding: top-K share in region (black: chance)")
    ax.legend(fontsize=7)
    ax = axes[2]
    ax.bar(x, [r["seg_dice"] or 0 for r in rows], 0.5, color="C2", label="mean over decoder seeds")
    for j, r in enumerate(rows):
        seeds = [float(v) for v in r["seg_dice_per_seed"].split("/") if v]
        ax.plot([x[j]] * len(seeds), seeds, "ko", ms=4, label="one seed" if j == 0 else None)
    ax.set_title("segmentation: mean Dice per case (UNETR)")
    ax.legend(fontsize=7)
    for ax in axes:
        ax.set_xticks(x)
        ax.set_xticklabels(names, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} CPU cores, {dev}, torch {torch.__version__}, Python {platform.python_version()}"


def run_ablation(args, log=print) -> dict:
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        raise EvalError(f"--variants: unknown {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
    t0 = time.perf_counter()
    root = _data_root(args)
    work = Path(args.work)
    argv = getattr(args, "argv", None)
    command = "python -m simcrop.experiments.ablation " + (shlex.join(argv) if argv else "...")
    summary = {"settings": {"command": command,
        "machine": machine(), "data": str(root), "steps": args.steps,
        "text_encoder": args.text_encoder, "seed": args.seed}, "variants": {}}
    for v in args.variants.split(","):
        ckpt, seconds = pretrain(v, args, root, work, log)
        summary["variants"][v] = {"checkpoint": str(ckpt), "pretrain_s": seconds,
                                  "results": _evaluate(v, ckpt, args, root, work, log)}
    summary["settings"]["total_s"] = time.perf_counter() - t0
    write_table(summary, Path(args.out))
    for v, r in summary["variants"].items():  # one grounding picture per variant beside the table
        figs = (r["results"].get("grounding") or {}).get("figures") or []
        if figs and Path(figs[0]).is_file():
            shutil.copyfile(figs[0], Path(args.out) / f"grounding_{v}.png")
    log(f"wrote {Path(args.out) / 'ablation.md'}, .csv, .json, .png")
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m simcrop.experiments.ablation",
                                description="Pre-train SimCroP variants with one budget, evaluate each the same way "
                                            "and tabulate (docs/ablation.md).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_ablation_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_command("simcrop.experiments.ablation", build_parser(), run_ablation, argv)


if __name__ == "__main__":
    sys.exit(main())
