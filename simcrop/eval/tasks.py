"""The evaluation tasks as functions of an EvalSession and typed options (the CLI and the experiments call
these; nothing here parses argv). Each writes <session.out>/<task>.json and .md and returns the results dict.

    s = EvalSession("runs/tiny")
    run_linear_probe(s, ProbeSettings(epochs=50))
    run_grounding(s, GroundingOptions(figures=4, diagnose=4))
    run_patch_probe(s, PatchProbeOptions())          # can the encoder see the lesions? (the grounding ceiling)
    run_region_retrieval(s, RegionRetrievalOptions())  # does a lesion region point back to its sentence?
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from simcrop.eval import grounding, linear_probe, patch_probe, region_retrieval, segment, zero_shot
from simcrop.eval.data import (csv_seg_cases, labels_csv, read_grounding_cases, read_items, read_labels,
                               synthetic_seg_cases)
from simcrop.eval.errors import EvalError
from simcrop.eval.features import prompt_embeddings, require_heads, sentence_embeddings
from simcrop.eval.linear_probe import ProbeSettings
from simcrop.eval.session import EvalSession

POOLS = ("gv_mean", "gv_of_mean")  # pooled image embedding: mean of g_v(patches) | g_v(mean of patches)


@dataclass
class GroundingOptions:
    regions: str = ""  # user regions JSONL (docs/eval.md); '' = synthetic ground truth
    topk: int = 0  # K patches per sentence (0 = the checkpoint's topk)
    inside_threshold: float = 0.5  # share of a patch's voxels in the region
    figures: int = 8  # cases drawn as PNG
    max_cases: int = 0  # evaluate only the first N test cases (0 = all)
    split: str = "valid"  # valid | train (a diagnostic on the pre-training cases)
    diagnose: int = 0  # also check L_align under training conditions with so many random masks per case
    map: str = "align"  # align: cos(g_t sentence, g_v patch) | fusion: the MLM branch's word-patch attention


@dataclass
class PatchProbeOptions:
    regions: str = ""  # user regions JSONL with '{split}' (docs/eval.md); '' = synthetic ground truth
    inside_threshold: float = 0.5  # share of a patch's voxels in the region
    train_split: str = "train"  # probe trained on: 'train' (the train split) | 'valid' (even valid cases; odd = test)
    max_train_cases: int = 256  # probe-training cases (0 = all)
    max_cases: int = 0  # test cases of the valid split (0 = all)
    negatives_per_case: int = 128  # lesion-free patches sampled per case (0 = all)
    l2: float = 1e-3  # L2 penalty of the logistic regression (z-scored features)
    seed: int = 0


@dataclass
class RegionRetrievalOptions:
    regions: str = ""  # user regions JSONL (docs/eval.md); '' = synthetic ground truth
    inside_threshold: float = 0.5
    max_cases: int = 0  # first N cases (0 = all)
    split: str = "valid"
    draws: int = 8  # random same-size patch sets per sentence (control)
    seed: int = 0


@dataclass
class SegmentOptions:
    pairs: str = ""  # CSV image,label[,split] of NIfTI pairs ('' = synthetic maps)
    target: str = "lesions"  # synthetic labels: lesions | findings | anatomy
    roi: tuple[int, int, int] | None = None  # training / sliding-window ROI (None = the crop size)
    steps: int = 300
    batch_size: int = 2  # ROI crops per step
    lr: float = 3e-4  # AdamW, 10% warm-up, cosine
    feature_size: int = 16  # UNETR feature size
    freeze_encoder: bool = False
    max_train: int = 0  # first N training volumes (0 = all)
    max_test: int = 0  # first N test volumes (0 = all)
    seed: int = 0  # decoder and crops


def run_linear_probe(s: EvalSession, settings: ProbeSettings, labels: str = "auto", label_column: str = "") -> dict:
    log = s.log
    train_items, test_items = read_items(s.root, "train"), read_items(s.root, "valid")
    kind = "multiclass" if label_column else "multilabel"
    tr = read_labels(labels_csv(s.root, "train", labels), [it.name for it in train_items], kind, label_column or None)
    te = read_labels(labels_csv(s.root, "valid", labels), [it.name for it in test_items], kind,
                     label_column or None, classes=tr.names if kind == "multiclass" else None)
    if tr.names != te.names:
        raise EvalError(f"{te.source}: label columns differ from {tr.source}")
    t0 = time.perf_counter()
    ftr, fte = s.features(train_items)["mean"].numpy(), s.features(test_items)["mean"].numpy()
    log(f"  features: {len(train_items)} train + {len(test_items)} test volumes in {time.perf_counter() - t0:.1f} s")
    res = linear_probe.run_probe(ftr, tr.values, fte, te.values, kind, tr.names, settings, log)
    res["labels"] = tr.source
    return s.write("linear-probe", res, linear_probe.markdown(res, s.title))


def _pooled(s: EvalSession, items, pool: str) -> torch.Tensor:
    require_heads(s.model, "this task")
    return s.features(items)[pool]


def run_zero_shot(s: EvalSession, labels: str = "auto", prompts: str = "", pool: str = "gv_mean") -> dict:
    require_heads(s.model, "zero-shot")
    items = read_items(s.root, "valid")
    lab = read_labels(labels_csv(s.root, "valid", labels), [it.name for it in items])
    image = _pooled(s, items, pool)
    res = zero_shot.zero_shot(image, lab.values, lab.names,
                              lambda ps: prompt_embeddings(s.model, s.text, ps, s.device), prompts or None)
    res.update(pool=pool, labels=lab.source)
    s.log(f"  zero-shot macro AUROC {res['auroc']:.3f}")
    return s.write("zero-shot", res, zero_shot.markdown_zero_shot(res, s.title))


def run_retrieval(s: EvalSession, pool: str = "gv_mean") -> dict:
    require_heads(s.model, "retrieval")
    items = read_items(s.root, "valid")
    image = _pooled(s, items, pool)
    reports = zero_shot.report_embeddings(sentence_embeddings(s.model, s.text, [it.findings for it in items], s.device))
    res = {**zero_shot.retrieval(image, reports), "pool": pool}
    s.log(f"  retrieval R@1/5/10 report->volume {res['report_to_volume']}")
    return s.write("retrieval", res, zero_shot.markdown_retrieval(res, s.title))


def grounding_task_name(o: GroundingOptions) -> str:
    """The results' file stem: grounding[-fusion][-train]."""
    task = "grounding" if o.map == "align" else "grounding-fusion"
    return task if o.split == "valid" else f"{task}-{o.split}"


def run_grounding(s: EvalSession, o: GroundingOptions) -> dict:
    log = s.log
    if o.map == "align":
        require_heads(s.model, "grounding")
    elif not s.cfg.model.use_mlm:
        raise EvalError("grounding --map fusion needs the fusion layer, but this checkpoint was trained without L_MLM")
    fig_dir = s.out / ("grounding" if o.map == "align" else "grounding-fusion")
    cases = read_grounding_cases(s.root, o.split, o.regions or None, o.max_cases)
    res = grounding.run_grounding(s.model, s.text, cases, s.device, o.topk or None, o.inside_threshold, o.figures,
                                  fig_dir, log, o.map)
    if o.diagnose and o.map == "align":
        res["diagnostic"] = grounding.selection_diagnostic(s.model, s.text, cases, s.device, o.diagnose,
                                                           o.inside_threshold)
        d = res["diagnostic"]
        log(f"  L_align diagnostic: within-CT discrimination {d['discrimination_topk']:.3f} (random-K "
            f"{d['discrimination_random_k']:.3f}, chance {d['discrimination_chance']:.3f}); masked top-K share lesion "
            f"{d['masked_lesion_share']:.3f}/{d['masked_lesion_chance']:.3f}, normal "
            f"{d['masked_normal_share']:.3f}/{d['masked_normal_chance']:.3f}; position explains "
            f"{d['position_share']:.3f} of the g_v variance")
    g = res["groups"]
    log("  grounding top-K share / chance: " + ", ".join(
        f"{k} {b['topk_share']['mean']:.3f}/{b['chance']['mean']:.3f} (n={b['n']})" for k, b in g.items()))
    res["split"] = o.split
    return s.write(grounding_task_name(o), res, grounding.markdown(res, s.title))


def run_patch_probe(s: EvalSession, o: PatchProbeOptions) -> dict:
    """Per-patch linear probe on the frozen tokens and on the raw input patches (simcrop.eval.patch_probe)."""
    if o.train_split == "train":
        train = read_grounding_cases(s.root, "train", o.regions or None, o.max_train_cases)
        test = read_grounding_cases(s.root, "valid", o.regions or None, o.max_cases)
    elif o.train_split == "valid":
        cases = read_grounding_cases(s.root, "valid", o.regions or None, 0)
        train, test = cases[0::2], cases[1::2]
        train = train[: o.max_train_cases] if o.max_train_cases else train
        test = test[: o.max_cases] if o.max_cases else test
    else:
        raise EvalError(f"patch-probe --train-split must be train or valid, got {o.train_split!r}")
    if not train or not test:
        raise EvalError(f"{s.root}: patch-probe needs cases to train and to test on ({len(train)} / {len(test)})")
    res = patch_probe.run_patch_probe(s.model, train, test, s.device, o.inside_threshold, o.negatives_per_case,
                                      o.l2, o.seed, s.log)
    res["train_split"] = o.train_split
    return s.write("patch-probe", res, patch_probe.markdown(res, s.title))


def run_region_retrieval(s: EvalSession, o: RegionRetrievalOptions) -> dict:
    """Region -> sentence retrieval with shuffled-region and random-set controls (simcrop.eval.region_retrieval)."""
    require_heads(s.model, "region-retrieval")
    cases = read_grounding_cases(s.root, o.split, o.regions or None, o.max_cases)
    res = region_retrieval.run_region_retrieval(s.model, s.text, cases, s.device, o.inside_threshold, o.draws,
                                                o.seed, s.log)
    g = res["groups"]
    s.log("  region -> sentence top-1 / chance / shuffled / random: " + ", ".join(
        f"{k} {b['hit']['mean']:.3f}/{b['chance']['mean']:.3f}/{b['shuffled_hit']['mean']:.3f}/"
        f"{b['random_hit']['mean']:.3f} (n={b['n']})" for k, b in g.items()))
    res["split"] = o.split
    task = "region-retrieval" if o.split == "valid" else f"region-retrieval-{o.split}"
    return s.write(task, res, region_retrieval.markdown(res, s.title))


def run_segment(s: EvalSession, o: SegmentOptions) -> dict:
    if o.pairs:
        train, test = csv_seg_cases(o.pairs, "train"), csv_seg_cases(o.pairs, "valid")
        n_cls = 1 + max(int(c.label().max()) for c in train)
        classes, target = ["background"] + [f"class_{i}" for i in range(1, n_cls)], f"pairs {o.pairs}"
    else:
        train, classes = synthetic_seg_cases(s.root, "train", o.target)
        test, _ = synthetic_seg_cases(s.root, "valid", o.target)
        target = o.target
    train = train[: o.max_train] if o.max_train else train
    test = test[: o.max_test] if o.max_test else test
    roi = tuple(o.roi) if o.roi else tuple(s.cfg.model.img_size)
    net = segment.build_unetr(s.model, roi, len(classes), o.feature_size, o.seed)
    t0 = time.perf_counter()
    segment.train_segmenter(net, train, roi, o.steps, o.batch_size, o.lr, s.device, o.seed, o.freeze_encoder,
                            log=s.log)
    t_train = time.perf_counter() - t0
    res = segment.evaluate_segmenter(net, test, roi, classes, s.device)
    res.update(target=target, roi=list(roi), skip_blocks=list(net.skips), up_factors=[list(f) for f in net.factors],
               steps=o.steps, batch_size=o.batch_size, lr=o.lr, n_train=len(train),
               freeze_encoder=o.freeze_encoder, train_s=t_train, eval_s=time.perf_counter() - t0 - t_train)
    s.log(f"  segmentation mean Dice {res['dice']:.3f} ({res['classes']})")
    return s.write("segment", res, segment.markdown(res, s.title))
