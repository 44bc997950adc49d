"""Downstream metrics in plain numpy: AUROC (ties handled), F1, accuracy, recall@k, Dice, grounding scores.

Conventions: a metric that is undefined for its input (AUROC with one class present, Dice of two empty masks)
is NaN, and macro averages skip NaN entries and say how many classes they averaged.
"""
from __future__ import annotations

import math

import numpy as np


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x [N] with ties given their average rank (as scipy.stats.rankdata(method='average'))."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    i = 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i : j + 1]] = 0.5 * (i + j) + 1.0  # average of ranks i+1 .. j+1
        i = j + 1
    return ranks


def auroc(scores, labels) -> float:
    """Area under the ROC curve of scores [N] for binary labels [N] (1 = positive).

    The Mann-Whitney statistic: P(score of a random positive > score of a random negative), ties count 1/2.
    NaN when only one class is present.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel() > 0.5
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    if not np.all(np.isfinite(s)):
        raise ValueError("auroc: scores contain NaN or inf")
    r = _ranks(s)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def macro_auroc(scores, labels) -> tuple[float, list[float]]:
    """scores, labels [N, C] (multi-label, or one-vs-rest one-hot) -> (mean AUROC over defined classes,
    per-class AUROC with NaN where a class has one label value only)."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    per = [auroc(s[:, c], y[:, c]) for c in range(s.shape[1])]
    return nanmean(per), per


def f1_scores(pred, labels) -> list[float]:
    """pred, labels [N, C] binary -> per-class F1 = 2TP / (2TP + FP + FN); NaN for a class with no positive
    label and no positive prediction (nothing to find, nothing claimed)."""
    p, y = np.asarray(pred) > 0.5, np.asarray(labels) > 0.5
    out = []
    for c in range(p.shape[1]):
        tp = int((p[:, c] & y[:, c]).sum())
        fp = int((p[:, c] & ~y[:, c]).sum())
        fn = int((~p[:, c] & y[:, c]).sum())
        out.append(float("nan") if 2 * tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn))
    return out


def nanmean(values) -> float:
    v = np.asarray(list(values), dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else float("nan")


def multilabel_metrics(probs, labels, threshold: float = 0.5) -> dict:
    """probs, labels [N, C] -> macro AUROC, macro F1 (at threshold), accuracy (mean over all N x C decisions),
    exact-match accuracy, and the per-class values."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels) > 0.5
    macro, per = macro_auroc(probs, labels)
    pred = probs >= threshold
    f1 = f1_scores(pred, labels)
    return {
        "auroc": macro, "auroc_per_class": per, "auroc_classes": int(np.isfinite(per).sum()),
        "f1": nanmean(f1), "f1_per_class": f1,
        "accuracy": float((pred == labels).mean()), "exact_match": float((pred == labels).all(1).mean()),
    }


def multiclass_metrics(probs, target) -> dict:
    """probs [N, C] (softmax), target [N] int -> macro one-vs-rest AUROC, macro F1 of the argmax, accuracy."""
    probs, target = np.asarray(probs, dtype=np.float64), np.asarray(target).astype(int)
    C = probs.shape[1]
    onehot = np.eye(C, dtype=bool)[target]
    macro, per = macro_auroc(probs, onehot)
    pred = np.eye(C, dtype=bool)[probs.argmax(1)]
    f1 = f1_scores(pred, onehot)
    return {"auroc": macro, "auroc_per_class": per, "auroc_classes": int(np.isfinite(per).sum()),
            "f1": nanmean(f1), "f1_per_class": f1, "accuracy": float((probs.argmax(1) == target).mean())}


def recall_at_k(sim, ks=(1, 5, 10)) -> dict[int, float]:
    """sim [Q, Q]: similarity of query i to candidate j; the match of query i is candidate i.

    Recall@k = share of queries whose match ranks within the top k. Ties are counted against the query
    (rank = number of candidates scoring >= the match), so a constant scorer never looks good.
    """
    s = np.asarray(sim, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"recall_at_k needs a square similarity matrix, got {s.shape}")
    true = np.diag(s)[:, None]
    rank = (s >= true).sum(1)  # 1 = best
    return {int(k): float((rank <= k).mean()) for k in ks}


def dice_per_class(pred, target, num_classes: int, include_background: bool = False) -> list[float]:
    """pred, target int label maps of the same shape -> Dice per class (classes 1.. without background);
    NaN for a class absent from both."""
    p, t = np.asarray(pred), np.asarray(target)
    if p.shape != t.shape:
        raise ValueError(f"dice: shapes differ {p.shape} vs {t.shape}")
    out = []
    for c in range(0 if include_background else 1, num_classes):
        a, b = p == c, t == c
        denom = int(a.sum()) + int(b.sum())
        out.append(float("nan") if denom == 0 else 2.0 * int((a & b).sum()) / denom)
    return out


def patch_inside(fraction, threshold: float = 0.5) -> tuple[np.ndarray, str]:
    """fraction [N]: share of each patch's voxels inside a region -> (inside [N] bool, rule).

    Rule "half": a patch is inside when >= threshold of its voxels are in the region. A region too small to
    fill any patch that far (a nodule in a 64 x 64 x 64 mm patch) falls back to rule "any": the patches that
    hold any of its voxels. An empty region gives no inside patch and rule "none".
    """
    f = np.asarray(fraction, dtype=np.float64)
    inside = f >= threshold
    if inside.any():
        return inside, "half"
    inside = f > 0
    return inside, ("any" if inside.any() else "none")


def grounding_scores(sim, inside, k: int) -> dict:
    """sim [N] similarity of one sentence to every patch, inside [N] bool -> the share of the top-k patches
    inside the region, the pointing-game hit (argmax patch inside), both chance rates (the region's share of
    patches: the expectation for k random patches and for one random patch), and the patch-level AUROC."""
    s, m = np.asarray(sim, dtype=np.float64), np.asarray(inside, dtype=bool)
    if not m.any():
        raise ValueError("grounding_scores: the region holds no patch")
    k = min(int(k), len(s))
    top = np.argsort(-s, kind="stable")[:k]
    chance = float(m.mean())
    return {"topk_share": float(m[top].mean()), "hit": float(m[int(np.argmax(s))]), "chance": chance,
            "patch_auroc": auroc(s, m), "k": k, "n_inside": int(m.sum())}


def summarize(values) -> dict:
    """mean, standard error and count of the finite values."""
    v = np.asarray(list(values), dtype=np.float64)
    v = v[np.isfinite(v)]
    if not len(v):
        return {"mean": float("nan"), "sem": float("nan"), "n": 0}
    sem = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")
    return {"mean": float(v.mean()), "sem": sem, "n": int(len(v))}
