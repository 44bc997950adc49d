"""`python -m simcrop.eval {linear-probe,zero-shot,retrieval,grounding,segment,ablation} --checkpoint DIR ...`

Each task writes <out>/<task>.json (everything, per class / per sentence) and <out>/<task>.md (the tables);
grounding also writes PNG pictures into <out>/grounding/. Defaults: --data = the data the checkpoint was trained
on (its config's data folder, else the built-in synthetic dataset), --out = <run>/eval/<checkpoint name>.
Bad input ends with one line `simcrop.eval: error: <file>: <problem>` and exit code 2.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from simcrop.eval.loader import EvalError, checkpoint_fingerprint, default_cache_dir, load_pretrained, resolve_checkpoint

TASKS = ("linear-probe", "zero-shot", "retrieval", "grounding", "segment", "ablation")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints3(text: str) -> tuple[int, int, int]:
    parts = [p for p in text.replace("x", ",").split(",") if p.strip()]
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated integers, got {text!r}")
    return tuple(int(p) for p in parts)  # type: ignore[return-value]


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


def add_segment_args(p) -> None:
    g = p.add_argument_group("segmentation")
    g.add_argument("--pairs", default="", help="CSV image,label[,split] of NIfTI pairs (default: synthetic maps)")
    g.add_argument("--target", default="lesions", choices=("lesions", "findings", "anatomy"),
                   help="synthetic labels: lesion vs background, one class per finding, or the 12 anatomy labels")
    g.add_argument("--roi", type=_ints3, default=None, help="training / sliding-window ROI (default: the crop size)")
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
                                                 "(docs/eval.md). Each task writes <out>/<task>.json and .md.")
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
    p = sub.add_parser("segment", help="UNETR on the pre-trained ViT, DiceCE, sliding-window Dice", **kw)
    add_common(p)
    add_segment_args(p)
    from simcrop.eval.ablation import add_ablation_args

    p = sub.add_parser("ablation", help="pre-train variants with one budget and compare them (docs/ablation.md)", **kw)
    add_ablation_args(p)
    return parser


class Session:
    """A loaded checkpoint + data folder + output folder for one task."""

    def __init__(self, args, log=print):
        from simcrop.train import resolve_device

        self.log = log
        self.ckpt = resolve_checkpoint(args.checkpoint)
        device = args.device
        self.device = resolve_device(device) if device == "auto" else torch.device(device)
        self.cfg, self.model, self.text = load_pretrained(self.ckpt, self.device, args.cache_dir or None,
                                                          args.text_encoder or None)
        self.cache = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir(self.cfg)
        self.root = self._data_root(args.data)
        self.out = Path(args.out) if args.out else self.ckpt.parent.parent / "eval" / self.ckpt.name
        self.batch_size = args.batch_size
        self.feature_cache = None if args.no_feature_cache else self.cache / "eval-features"
        self.title = f"{self.ckpt} ({self.cfg.train.preset}, text encoder {self.text.name})"
        log(f"simcrop.eval: checkpoint {self.ckpt} (preset {self.cfg.train.preset}, "
            f"losses {'+'.join(k for k in ('mim', 'mlm', 'align') if getattr(self.cfg.model, 'use_' + k))}), "
            f"data {self.root}, device {self.device}")

    def _data_root(self, data: str) -> Path:
        from simcrop.data.ctrate import DataError, dataset_dir

        try:
            if data:
                dataset_dir(data)
                return Path(data)
            if self.cfg.data.data:
                dataset_dir(self.cfg.data.data)
                return Path(self.cfg.data.data)
        except DataError as exc:
            raise EvalError(str(exc)) from None
        from simcrop.data.synthetic import ensure_default_dataset

        return ensure_default_dataset(self.cache, n=self.cfg.data.synthetic_n)

    def features(self, items):
        from simcrop.eval.features import volume_features

        return volume_features(self.model, items, self.cfg.model.img_size, self.device, self.batch_size,
                               self.feature_cache, checkpoint_fingerprint(self.ckpt), self.log)

    def write(self, task: str, results: dict, markdown: str):
        from simcrop.eval.report import write_results

        results = {"task": task, "checkpoint": str(self.ckpt), "data": str(self.root), "preset": self.cfg.train.preset,
                   "text_encoder": self.text.name, **results}
        js, md = write_results(self.out, task, results, markdown)
        self.log(f"wrote {js} and {md}")
        return results


# -- tasks ------------------------------------------------------------------------------------------------------
def run_linear_probe(args, log=print) -> dict:
    from simcrop.eval import linear_probe as LP
    from simcrop.eval.data import labels_csv, read_items, read_labels

    s = Session(args, log)
    train_items, test_items = read_items(s.root, "train"), read_items(s.root, "valid")
    kind = "multiclass" if args.label_column else "multilabel"
    tr = read_labels(labels_csv(s.root, "train", args.labels), [it.name for it in train_items], kind, args.label_column or None)
    te = read_labels(labels_csv(s.root, "valid", args.labels), [it.name for it in test_items], kind,
                     args.label_column or None, classes=tr.names if kind == "multiclass" else None)
    if tr.names != te.names:
        raise EvalError(f"{te.source}: label columns differ from {tr.source}")
    t0 = time.perf_counter()
    ftr, fte = s.features(train_items)["mean"].numpy(), s.features(test_items)["mean"].numpy()
    log(f"  features: {len(train_items)} train + {len(test_items)} test volumes in {time.perf_counter() - t0:.1f} s")
    settings = LP.ProbeSettings(fractions=args.fractions, val_fraction=args.val_fraction, lrs=args.lrs,
                                epochs=args.epochs, eval_every=args.eval_every, repeats=args.repeats, seed=args.seed,
                                standardize=not args.no_standardize)
    res = LP.run_probe(ftr, tr.values, fte, te.values, kind, tr.names, settings, log)
    res["labels"] = tr.source
    return s.write("linear-probe", res, LP.markdown(res, s.title))


def _pooled(s: Session, items, pool: str) -> torch.Tensor:
    from simcrop.eval.features import require_heads

    require_heads(s.model, "this task")
    return s.features(items)[pool]


def run_zero_shot(args, log=print) -> dict:
    from simcrop.eval import zero_shot as ZS
    from simcrop.eval.data import labels_csv, read_items, read_labels
    from simcrop.eval.features import prompt_embeddings, require_heads

    s = Session(args, log)
    require_heads(s.model, "zero-shot")
    items = read_items(s.root, "valid")
    lab = read_labels(labels_csv(s.root, "valid", args.labels), [it.name for it in items])
    image = _pooled(s, items, args.pool)
    res = ZS.zero_shot(image, lab.values, lab.names, lambda ps: prompt_embeddings(s.model, s.text, ps, s.device),
                       args.prompts or None)
    res.update(pool=args.pool, labels=lab.source)
    macro = res["auroc"]
    log(f"  zero-shot macro AUROC {macro:.3f}")
    return s.write("zero-shot", res, ZS.markdown_zero_shot(res, s.title))


def run_retrieval(args, log=print) -> dict:
    from simcrop.eval import zero_shot as ZS
    from simcrop.eval.data import read_items
    from simcrop.eval.features import require_heads, sentence_embeddings

    s = Session(args, log)
    require_heads(s.model, "retrieval")
    items = read_items(s.root, "valid")
    image = _pooled(s, items, args.pool)
    reports = ZS.report_embeddings(sentence_embeddings(s.model, s.text, [it.findings for it in items], s.device))
    res = {**ZS.retrieval(image, reports), "pool": args.pool}
    log(f"  retrieval R@1/5/10 report->volume {res['report_to_volume']}")
    return s.write("retrieval", res, ZS.markdown_retrieval(res, s.title))


def run_grounding(args, log=print) -> dict:
    from simcrop.eval import grounding as G
    from simcrop.eval.data import read_grounding_cases
    from simcrop.eval.features import require_heads

    s = Session(args, log)
    if args.map == "align":
        require_heads(s.model, "grounding")
    elif not s.cfg.model.use_mlm:
        raise EvalError("grounding --map fusion needs the fusion layer, but this checkpoint was trained without L_MLM")
    task = "grounding" if args.map == "align" else "grounding-fusion"
    cases = read_grounding_cases(s.root, args.split, args.regions or None, args.max_cases)
    res = G.run_grounding(s.model, s.text, cases, s.device, args.topk or None, args.inside_threshold, args.figures,
                          s.out / task, log, args.map)
    if args.diagnose and args.map == "align":
        res["diagnostic"] = G.selection_diagnostic(s.model, s.text, cases, s.device, args.diagnose, args.inside_threshold)
        d = res["diagnostic"]
        log(f"  L_align diagnostic: within-CT discrimination {d['discrimination_topk']:.3f} (random-K "
            f"{d['discrimination_random_k']:.3f}, chance {d['discrimination_chance']:.3f}); masked top-K share lesion "
            f"{d['masked_lesion_share']:.3f}/{d['masked_lesion_chance']:.3f}, normal "
            f"{d['masked_normal_share']:.3f}/{d['masked_normal_chance']:.3f}; position explains "
            f"{d['position_share']:.3f} of the g_v variance")
    g = res["groups"]
    log("  grounding top-K share / chance: " + ", ".join(
        f"{k} {b['topk_share']['mean']:.3f}/{b['chance']['mean']:.3f} (n={b['n']})" for k, b in g.items()))
    res["split"] = args.split
    return s.write(task if args.split == "valid" else f"{task}-{args.split}", res, G.markdown(res, s.title))


def run_segment(args, log=print) -> dict:
    from simcrop.eval import segment as S
    from simcrop.eval.data import csv_seg_cases, synthetic_seg_cases

    s = Session(args, log)
    if args.pairs:
        train, test = csv_seg_cases(args.pairs, "train"), csv_seg_cases(args.pairs, "valid")
        n_cls = 1 + max(int(c.label().max()) for c in train)
        classes, target = ["background"] + [f"class_{i}" for i in range(1, n_cls)], f"pairs {args.pairs}"
    else:
        train, classes = synthetic_seg_cases(s.root, "train", args.target)
        test, _ = synthetic_seg_cases(s.root, "valid", args.target)
        target = args.target
    train = train[: args.max_train] if args.max_train else train
    test = test[: args.max_test] if args.max_test else test
    roi = tuple(args.roi) if args.roi else tuple(s.cfg.model.img_size)
    net = S.build_unetr(s.model, roi, len(classes), args.feature_size, args.seg_seed)
    t0 = time.perf_counter()
    S.train_segmenter(net, train, roi, args.steps, args.seg_batch_size, args.lr, s.device, args.seg_seed,
                      args.freeze_encoder, log=log)
    t_train = time.perf_counter() - t0
    res = S.evaluate_segmenter(net, test, roi, classes, s.device)
    res.update(target=target, roi=list(roi), skip_blocks=list(net.skips), up_factors=[list(f) for f in net.factors],
               steps=args.steps, batch_size=args.seg_batch_size, lr=args.lr, n_train=len(train),
               freeze_encoder=args.freeze_encoder, train_s=t_train, eval_s=time.perf_counter() - t0 - t_train)
    log(f"  segmentation mean Dice {res['dice']:.3f} ({res['classes']})")
    return s.write("segment", res, S.markdown(res, s.title))


RUNNERS = {"linear-probe": run_linear_probe, "zero-shot": run_zero_shot, "retrieval": run_retrieval,
           "grounding": run_grounding, "segment": run_segment}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log = (lambda *a, **k: None) if getattr(args, "quiet", False) else (lambda *a, **k: print(*a, **k, flush=True))
    from simcrop.checkpoint import CheckpointError
    from simcrop.config import ConfigError
    from simcrop.data.ctrate import DataError

    try:
        if args.task == "ablation":
            from simcrop.eval.ablation import run_ablation

            run_ablation(args, log)
        else:
            RUNNERS[args.task](args, log)
    except (EvalError, DataError, CheckpointError, ConfigError, FileNotFoundError) as exc:
        print(f"simcrop.eval: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    return 0
