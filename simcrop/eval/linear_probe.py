"""Linear probe: frozen encoder -> mean of patch tokens -> LayerNorm -> Linear (SimCroP's protocol).

Splits: the dataset's `train` split is divided (stratified, fixed seed) into a validation part (val_fraction,
for model selection: learning rate and number of epochs) and a training pool; each label fraction f takes
about f x |pool| volumes of the pool (stratified by label combination, then topped up so that every class has
at least one positive), repeated with `repeats` different draws when f < 1. Results are on the `valid` split,
which is used for nothing else (the authors' validation and test lists were the same; here they never are).
Features are standardised per dimension with the mean / std of the train split's features (unlabelled
statistics, as MAE's BatchNorm-without-affine before its linear probe): the pooled tokens of a small model vary
by a few percent of their magnitude across volumes, which a LayerNorm alone does not rescale (measured on the
ablation's checkpoints at 100 % labels: test macro AUROC 0.46-0.59 without, 0.62-0.64 with). `standardize=False` gives the
bare LayerNorm -> Linear. Loss: BCE (multi-label) or CE (multi-class). Metrics: macro AUROC, macro F1 (threshold 0.5 / argmax),
accuracy (multi-label: share of correct label decisions, plus exact match).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from simcrop.eval import metrics as M
from simcrop.eval.errors import EvalError


@dataclass
class ProbeSettings:
    fractions: tuple[float, ...] = (0.01, 0.1, 1.0)
    val_fraction: float = 0.2
    lrs: tuple[float, ...] = (1e-3, 1e-2)
    epochs: int = 200  # the longest run; selection among every eval_every epochs
    eval_every: int = 10
    batch_size: int = 256
    weight_decay: float = 1e-4
    repeats: int = 3  # draws of the labelled subset for fractions < 1
    seed: int = 0
    standardize: bool = True  # z-score each feature with the train split's statistics before the probe
    keep_scores: bool = False  # keep every draw's test probabilities [N_test, C] (for case-level bootstraps)


def _largest_remainder(sizes: list[int], total: int) -> list[int]:
    """Split `total` among groups proportionally to `sizes` (largest-remainder rounding, capped by size)."""
    n = sum(sizes)
    exact = [total * s / n for s in sizes]
    take = [min(s, int(math.floor(e))) for s, e in zip(sizes, exact)]
    order = sorted(range(len(sizes)), key=lambda i: -(exact[i] - take[i]))
    i = 0
    while sum(take) < total and i < 10 * len(sizes) + total:
        g = order[i % len(order)]
        if take[g] < sizes[g]:
            take[g] += 1
        i += 1
    return take


def stratified_subset(y: np.ndarray, fraction: float, rng: np.random.Generator, min_per_class: int = 1) -> np.ndarray:
    """Indices of about fraction x N samples, stratified by label (combination), with at least
    `min_per_class` sample(s) of every class present (multi-label: positives of every column) -> sorted [n].

    y: [N] class indices (multi-class) or [N, C] 0/1 (multi-label).
    """
    y = np.asarray(y)
    N = len(y)
    total = max(1, min(N, int(round(fraction * N))))
    keys = [tuple(r) for r in y] if y.ndim == 2 else [int(v) for v in y]
    groups: dict = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    names = sorted(groups, key=str)
    members = [rng.permutation(groups[k]) for k in names]
    take = _largest_remainder([len(m) for m in members], total)
    chosen = set(int(i) for m, t in zip(members, take) for i in m[:t])
    # every class present gets at least min_per_class member(s)
    if y.ndim == 2:
        columns = [np.flatnonzero(y[:, c] > 0) for c in range(y.shape[1])]
    else:
        columns = [np.flatnonzero(y == c) for c in range(int(y.max()) + 1)]
    for idx in columns:
        have = [i for i in idx if int(i) in chosen]
        spare = [int(i) for i in rng.permutation(idx) if int(i) not in chosen]
        for i in spare[: max(0, min(min_per_class, len(idx)) - len(have))]:
            chosen.add(i)
    return np.array(sorted(chosen), dtype=np.int64)


class LinearProbe(nn.Sequential):
    """[B, D] frozen features -> LayerNorm -> Linear -> [B, C] logits."""

    def __init__(self, dim: int, classes: int):
        super().__init__(nn.LayerNorm(dim), nn.Linear(dim, classes))


def _scores(head: nn.Module, x: torch.Tensor, kind: str) -> np.ndarray:
    with torch.no_grad():
        logits = head(x)
    return (torch.sigmoid(logits) if kind == "multilabel" else torch.softmax(logits, -1)).numpy()


def evaluate(head, x, y, kind: str) -> dict:
    p = _scores(head, x, kind)
    return M.multilabel_metrics(p, y) if kind == "multilabel" else M.multiclass_metrics(p, y)


def _selection_score(head, x, y, kind: str, loss_fn) -> tuple[float, float]:
    """(val macro AUROC, -val loss): compared as a tuple, so the loss breaks AUROC ties / undefined AUROC."""
    auc = evaluate(head, x, y, kind)["auroc"]
    with torch.no_grad():
        loss = float(loss_fn(head(x), _target(y, kind)))
    return (auc if math.isfinite(auc) else -1.0, -loss)


def _target(y: np.ndarray, kind: str) -> torch.Tensor:
    return torch.as_tensor(y, dtype=torch.float32 if kind == "multilabel" else torch.long)


def train_probe(x_tr, y_tr, x_val, y_val, kind: str, n_classes: int, s: ProbeSettings, seed: int):
    """Train one LinearProbe per learning rate for s.epochs; keep the (lr, epoch) with the best validation
    score. Returns (head, {'lr', 'epoch', 'val_auroc', 'curve': [(lr, epoch, val_auroc)]})."""
    loss_fn = nn.BCEWithLogitsLoss() if kind == "multilabel" else nn.CrossEntropyLoss()
    x_tr, t_tr = torch.as_tensor(x_tr, dtype=torch.float32), _target(y_tr, kind)
    x_val = torch.as_tensor(x_val, dtype=torch.float32)
    best, best_score, curve = None, None, []
    for lr in s.lrs:
        torch.manual_seed(seed)
        head = LinearProbe(x_tr.shape[1], n_classes)
        opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=s.weight_decay)
        gen = torch.Generator().manual_seed(seed)
        for epoch in range(1, s.epochs + 1):
            head.train()
            for idx in torch.randperm(len(x_tr), generator=gen).split(s.batch_size):
                loss = loss_fn(head(x_tr[idx]), t_tr[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            if epoch % s.eval_every == 0 or epoch == s.epochs:
                head.eval()
                score = _selection_score(head, x_val, y_val, kind, loss_fn)
                curve.append((lr, epoch, score[0]))
                if best_score is None or score > best_score:
                    best_score, best = score, (copy.deepcopy(head), lr, epoch)
    head, lr, epoch = best
    return head, {"lr": lr, "epoch": epoch, "val_auroc": best_score[0], "curve": curve}


def run_probe(train_x, train_y, test_x, test_y, kind: str, class_names: list[str], s: ProbeSettings, log=print) -> dict:
    """The whole protocol on precomputed features (see the module docstring); returns the results dict."""
    train_x, test_x = np.asarray(train_x, np.float32), np.asarray(test_x, np.float32)
    if s.standardize:  # per-feature z-score from the training split's features (no labels involved)
        mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
        train_x, test_x = (train_x - mu) / sd, (test_x - mu) / sd
    C = len(class_names)
    rng = np.random.default_rng(s.seed)
    val_idx = stratified_subset(train_y, s.val_fraction, rng)
    pool = np.setdiff1d(np.arange(len(train_x)), val_idx)
    if len(pool) == 0:
        raise EvalError(f"training split of {len(train_x)} volume(s) is too small to carve a validation part")
    x_val, y_val = train_x[val_idx], train_y[val_idx]
    out = {"kind": kind, "standardize": s.standardize, "classes": class_names, "n_train_split": int(len(train_x)), "n_val": int(len(val_idx)),
           "n_pool": int(len(pool)), "n_test": int(len(test_x)), "fractions": {}}
    if s.keep_scores:
        out["test_labels"] = np.asarray(test_y).tolist()
    for f in s.fractions:
        runs = []
        for r in range(s.repeats if f < 1 else 1):
            sub = pool[stratified_subset(train_y[pool], f, np.random.default_rng([s.seed, r, int(f * 1e6)]))]
            head, sel = train_probe(train_x[sub], train_y[sub], x_val, y_val, kind, C, s, seed=s.seed + r)
            test = evaluate(head.eval(), torch.as_tensor(test_x), test_y, kind)
            runs.append({"n_labelled": int(len(sub)), "selected": {k: v for k, v in sel.items() if k != "curve"},
                         "val_curve": sel["curve"], "test": test})
            if s.keep_scores:
                runs[-1]["test_scores"] = _scores(head, torch.as_tensor(test_x), kind).round(6).tolist()
            log(f"  fraction {f:g} draw {r}: {len(sub)} labelled, lr {sel['lr']:g}, epoch {sel['epoch']}, "
                f"val AUROC {sel['val_auroc']:.3f} -> test AUROC {test['auroc']:.3f}")
        agg = {}
        for key in ("auroc", "f1", "accuracy"):
            vals = [run["test"][key] for run in runs]
            agg[key] = M.nanmean(vals)
            agg[key + "_std"] = float(np.nanstd(vals)) if len(vals) > 1 else 0.0
        agg["auroc_per_class"] = [M.nanmean(v) for v in zip(*[run["test"]["auroc_per_class"] for run in runs])]
        out["fractions"][f"{f:g}"] = {**agg, "n_labelled": [run["n_labelled"] for run in runs], "runs": runs}
    return out


def markdown(res: dict, title: str) -> str:
    from simcrop.eval.report import fmt, md_table

    rows = []
    for f, r in res["fractions"].items():
        pct = f"{float(f) * 100:g}%"
        rows.append([pct, "/".join(str(n) for n in r["n_labelled"]), f"{fmt(r['auroc'])} ± {fmt(r['auroc_std'])}",
                     f"{fmt(r['f1'])} ± {fmt(r['f1_std'])}", f"{fmt(r['accuracy'])} ± {fmt(r['accuracy_std'])}"])
    per = [[c] + [fmt(r["auroc_per_class"][i]) for r in res["fractions"].values()] for i, c in enumerate(res["classes"])]
    return "\n\n".join([
        f"# Linear probe — {title}",
        f"{res['kind']}, {len(res['classes'])} classes; train split {res['n_train_split']} = validation "
        f"{res['n_val']} (model selection) + pool {res['n_pool']}; test (the `valid` split) {res['n_test']}. "
        f"Mean ± std over the draws of the labelled subset.",
        md_table(["labels", "labelled volumes", "macro AUROC", "macro F1", "accuracy"], rows),
        "Per-class test AUROC:",
        md_table(["class"] + [f"{float(f) * 100:g}%" for f in res["fractions"]], per),
    ])
