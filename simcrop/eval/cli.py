"""`python -m simcrop.eval {linear-probe,zero-shot,retrieval,grounding,patch-probe,region-retrieval,segment}
--checkpoint DIR ...`
(and `python -m simcrop.eval ablation ...`, which runs simcrop.experiments.ablation).

Each task writes <out>/<task>.json (everything, per class / per sentence) and <out>/<task>.md (the tables);
grounding also writes PNG pictures into <out>/grounding/. Defaults: --data = the data the checkpoint was trained
on (its config's data folder, else the built-in synthetic dataset), --out = <run>/eval/<checkpoint name>.
Bad input ends with one line `simcrop.eval: error: <file>: <problem>` and exit code 2.
This file only turns argv into simcrop.eval.tasks calls.
"""
from __future__ import annotations

import argparse
import sys

from simcrop.checkpoint import CheckpointError
from simcrop.config import ConfigError, parse_triple
from simcrop.data.errors import DataError
from simcrop.eval import tasks
from simcrop.eval.errors import EvalError
from simcrop.eval.linear_probe import ProbeSettings
from simcrop.eval.session import EvalSession

TASKS = ("linear-probe", "zero-shot", "retrieval", "grounding", "patch-probe", "region-retrieval", "segment")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_common(p: argparse.ArgumentParser, checkpoint: bool = True) -> None:
    if checkpoint:
        p.add_argument("--checkpoint", required=True, help="checkpoint folder (…/checkpoints/step_N) or run folder")
    p.add_argument("--data", default="", help="CT-RATE-layout folder (default: the checkpoint's training data)")
    p.add_argument("--out", default="", help="results folder (default: <run>/eval/<checkpoint>)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--cache-dir", default="", help="where the tiny-bert build / synthetic data / feature cache live "
                                                   "(default: the checkpoint config's, $SIMCROP_CACHE, ~/.cache/simcrop)")
    p.add_argument("--text-encoder", default="", help="override the recorded text encoder (a local folder)")
    p.add_argument("--batch-size", type=int, default=4, help="volumes per encoder forward")
    p.add_argument("--no-feature-cache", action="store_true", help="recompute pooled features")
    p.add_argument("--quiet", action="store_true", help="print errors only")


def add_probe_args(p) -> None:
    g = p.add_argument_group("linear probe")
    g.add_argument("--labels", default="auto", help="auto | synthetic | ctrate | a CSV path ('{split}' = train/valid)")
    g.add_argument("--label-column", default="", help="multi-class: the CSV column holding the class (CE loss)")
    g.add_argument("--fractions", type=_floats, default=(0.01, 0.1, 1.0), help="label fractions of the training pool")
    g.add_argument("--val-fraction", type=float, default=0.2, help="share of the train split held out for selection")
    g.add_argument("--lrs", type=_floats, default=(1e-3, 1e-2), help="learning rates tried")
    g.add_argument("--epochs", type=int, default=200, help="longest training; selection every --eval-every epochs")
    g.add_argument("--eval-every", type=int, default=10, help="validation every N epochs")
    g.add_argument("--repeats", type=int, default=3, help="draws of the labelled subset for fractions < 1")
    g.add_argument("--seed", type=int, default=0, help="seed of the splits, draws and probe")
    g.add_argument("--no-standardize", action="store_true",
                   help="skip the per-feature z-score (train-split statistics) before LayerNorm -> Linear")


def add_grounding_args(p) -> None:
    g = p.add_argument_group("grounding")
    g.add_argument("--regions", default="", help="user regions JSONL (docs/eval.md); default: synthetic ground truth")
    g.add_argument("--topk", type=int, default=0, help="K patches per sentence (default: the checkpoint's topk)")
    g.add_argument("--inside-threshold", type=float, default=0.5, help="share of a patch's voxels in the region")
    g.add_argument("--figures", type=int, default=8, help="cases drawn as PNG")
    g.add_argument("--max-cases", type=int, default=0, help="evaluate only the first N test cases (0 = all)")
    g.add_argument("--split", default="valid", choices=("valid", "train"),
                   help="cases to ground (train: a diagnostic on the pre-training cases)")
    g.add_argument("--diagnose", type=int, default=0, metavar="DRAWS",
                   help="also check L_align under training conditions with DRAWS random masks per case (align map)")
    g.add_argument("--map", default="align", choices=("align", "fusion"),
                   help="align: cos(g_t sentence, g_v patch); fusion: the MLM branch's word-patch cross-attention")


def add_patch_probe_args(p) -> None:
    g = p.add_argument_group("patch probe")
    g.add_argument("--regions", default="", help="user regions JSONL with '{split}' (docs/eval.md); default: "
                                                 "synthetic ground truth")
    g.add_argument("--inside-threshold", type=float, default=0.5, help="share of a patch's voxels in the region")
    g.add_argument("--train-split", default="train", choices=("train", "valid"),
                   help="train: probe trained on the train split, tested on valid; valid: even valid cases train, "
                        "odd ones test")
    g.add_argument("--max-train-cases", type=int, default=256, help="probe-training cases (0 = all)")
    g.add_argument("--max-cases", type=int, default=0, help="test cases (0 = all)")
    g.add_argument("--negatives-per-case", type=int, default=128, help="lesion-free patches sampled per case (0 = all)")
    g.add_argument("--l2", type=float, default=1e-3, help="L2 penalty of the logistic regression")
    g.add_argument("--seed", type=int, default=0, help="seed of the negative sampling")


def add_region_retrieval_args(p) -> None:
    g = p.add_argument_group("region retrieval")
    g.add_argument("--regions", default="", help="user regions JSONL (docs/eval.md); default: synthetic ground truth")
    g.add_argument("--inside-threshold", type=float, default=0.5, help="share of a patch's voxels in the region")
    g.add_argument("--max-cases", type=int, default=0, help="evaluate only the first N cases (0 = all)")
    g.add_argument("--split", default="valid", choices=("valid", "train"), help="cases to evaluate")
    g.add_argument("--draws", type=int, default=8, help="random same-size patch sets per sentence (control)")
    g.add_argument("--seed", type=int, default=0, help="seed of the random patch sets")


def add_segment_args(p) -> None:
    g = p.add_argument_group("segmentation")
    g.add_argument("--pairs", default="", help="CSV image,label[,split] of NIfTI pairs (default: synthetic maps)")
    g.add_argument("--target", default="lesions", choices=("lesions", "findings", "anatomy"),
                   help="synthetic labels: lesion vs background, one class per finding, or the 12 anatomy labels")
    g.add_argument("--roi", type=parse_triple, default=None, help="training / sliding-window ROI (default: the crop size)")
    g.add_argument("--steps", type=int, default=300, help="training steps")
    g.add_argument("--seg-batch-size", type=int, default=2, help="ROI crops per step")
    g.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate (10%% warm-up, cosine)")
    g.add_argument("--feature-size", type=int, default=16, help="UNETR feature size")
    g.add_argument("--freeze-encoder", action="store_true", help="train the decoder only")
    g.add_argument("--max-train", type=int, default=0, help="use only the first N training volumes (0 = all)")
    g.add_argument("--max-test", type=int, default=0, help="evaluate only the first N test volumes (0 = all)")
    g.add_argument("--seg-seed", type=int, default=0, help="seed of the decoder and the crops")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where it says something (not for '', None, False, or help that names it)."""

    def _get_help_string(self, action):
        d = action.default
        if d is None or d is False or (isinstance(d, str) and not d) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m simcrop.eval", formatter_class=_Formatter,
                                     description="Downstream evaluation of pre-trained SimCroP checkpoints "
                                                 "(docs/eval.md). Each task writes <out>/<task>.json and .md. "
                                                 "`python -m simcrop.eval ablation --help`: the ablation experiment.")
    sub = parser.add_subparsers(dest="task", required=True, metavar="{" + ",".join(TASKS) + "}")
    kw = dict(formatter_class=_Formatter)
    p = sub.add_parser("linear-probe", help="frozen encoder + LayerNorm + Linear, 1/10/100%% labels", **kw)
    add_common(p)
    add_probe_args(p)
    for name, text in (("zero-shot", "positive vs negative prompt per finding"),
                       ("retrieval", "report <-> volume recall@1/5/10")):
        p = sub.add_parser(name, help=text, **kw)
        add_common(p)
        p.add_argument("--pool", default="gv_mean", choices=("gv_mean", "gv_of_mean"),
                       help="pooled image embedding: mean of g_v(patches) | g_v(mean of patches)")
        if name == "zero-shot":
            p.add_argument("--labels", default="auto", help="auto | synthetic | ctrate | CSV path")
            p.add_argument("--prompts", default="", help="JSON {class: [positive, negative]} overriding the built-ins")
    p = sub.add_parser("grounding", help="sentence -> patch similarity vs ground-truth regions, pictures", **kw)
    add_common(p)
    add_grounding_args(p)
    p = sub.add_parser("patch-probe", help="per-patch linear probe (lesion type t?) on tokens and raw patches", **kw)
    add_common(p)
    add_patch_probe_args(p)
    p = sub.add_parser("region-retrieval", help="pooled lesion region -> its sentence, top-1 vs 1/M and controls",
                       **kw)
    add_common(p)
    add_region_retrieval_args(p)
    p = sub.add_parser("segment", help="UNETR on the pre-trained ViT, DiceCE, sliding-window Dice", **kw)
    add_common(p)
    add_segment_args(p)
    return parser


def session(args, log=print) -> EvalSession:
    return EvalSession(args.checkpoint, data=args.data, out=args.out, device=args.device, cache_dir=args.cache_dir,
                       text_encoder=args.text_encoder, batch_size=args.batch_size,
                       feature_cache=not args.no_feature_cache, log=log)


def probe_settings(args) -> ProbeSettings:
    return ProbeSettings(fractions=args.fractions, val_fraction=args.val_fraction, lrs=args.lrs, epochs=args.epochs,
                         eval_every=args.eval_every, repeats=args.repeats, seed=args.seed,
                         standardize=not args.no_standardize)


def grounding_options(args) -> tasks.GroundingOptions:
    return tasks.GroundingOptions(regions=args.regions, topk=args.topk, inside_threshold=args.inside_threshold,
                                  figures=args.figures, max_cases=args.max_cases, split=args.split,
                                  diagnose=args.diagnose, map=args.map)


def patch_probe_options(args) -> tasks.PatchProbeOptions:
    return tasks.PatchProbeOptions(regions=args.regions, inside_threshold=args.inside_threshold,
                                   train_split=args.train_split, max_train_cases=args.max_train_cases,
                                   max_cases=args.max_cases, negatives_per_case=args.negatives_per_case, l2=args.l2,
                                   seed=args.seed)


def region_retrieval_options(args) -> tasks.RegionRetrievalOptions:
    return tasks.RegionRetrievalOptions(regions=args.regions, inside_threshold=args.inside_threshold,
                                        max_cases=args.max_cases, split=args.split, draws=args.draws, seed=args.seed)


def segment_options(args) -> tasks.SegmentOptions:
    return tasks.SegmentOptions(pairs=args.pairs, target=args.target, roi=args.roi, steps=args.steps,
                                batch_size=args.seg_batch_size, lr=args.lr, feature_size=args.feature_size,
                                freeze_encoder=args.freeze_encoder, max_train=args.max_train, max_test=args.max_test,
                                seed=args.seg_seed)


def run_task(args, log=print) -> dict:
    s = session(args, log)
    if args.task == "linear-probe":
        return tasks.run_linear_probe(s, probe_settings(args), args.labels, args.label_column)
    if args.task == "zero-shot":
        return tasks.run_zero_shot(s, args.labels, args.prompts, args.pool)
    if args.task == "retrieval":
        return tasks.run_retrieval(s, args.pool)
    if args.task == "grounding":
        return tasks.run_grounding(s, grounding_options(args))
    if args.task == "patch-probe":
        return tasks.run_patch_probe(s, patch_probe_options(args))
    if args.task == "region-retrieval":
        return tasks.run_region_retrieval(s, region_retrieval_options(args))
    return tasks.run_segment(s, segment_options(args))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log = (lambda *a, **k: None) if getattr(args, "quiet", False) else (lambda *a, **k: print(*a, **k, flush=True))
    try:
        run_task(args, log)
    except (EvalError, DataError, CheckpointError, ConfigError, FileNotFoundError) as exc:
        print(f"simcrop.eval: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    return 0
