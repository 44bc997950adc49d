"""The paired hierarchical bootstrap of E3 (docs/ablation.md): resample pre-training seeds, then test cases
within each drawn seed, then label draws within each drawn seed; every variant is scored on the SAME resample,
so a difference between two variants is paired at every level.

One resample r draws S seed slots j (seeds with replacement), and per slot a multiplicity c[r, j, i] for every
test case i (N cases with replacement: a multinomial count) and D label-draw indices. A variant's statistic on
r is the mean over its slots of the metric computed on the slot's seed with case weights c[r, j] (and, for the
probe, averaged over the slot's drawn label draws):

    T_v(r) = 1/S sum_j  1/D sum_d  macroAUROC(scores_v[seed_rj, draw_rjd], labels; weights c[r, j])

A weighted AUROC is the Mann-Whitney statistic with multiplicities: for positives P and negatives Q of a class,
AUROC(w) = sum_{p, q} w_p w_q [s_p > s_q] (+ 1/2 on ties) / (sum_P w)(sum_Q w), computed for all resamples at
once as a matrix product with the pairwise-order matrix [|P|, |Q|].
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

N_RESAMPLES = 10_000
MARGIN = 0.02  # equivalence margin of E3's rule


@dataclass
class Plan:
    """One set of resamples shared by every variant: seeds [R, S] (indices), counts [R, S, N] (case
    multiplicities), draws [R, S, D] (label-draw indices)."""
    seeds: np.ndarray
    counts: np.ndarray
    draws: np.ndarray


def make_plan(n_seeds: int, n_cases: int, n_draws: int, n: int = N_RESAMPLES, seed: int = 0) -> Plan:
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, n_seeds, size=(n, n_seeds))
    counts = rng.multinomial(n_cases, np.full(n_cases, 1.0 / n_cases), size=(n, n_seeds)).astype(np.float32)
    draws = rng.integers(0, n_draws, size=(n, n_seeds, n_draws))
    return Plan(seeds, counts, draws)


def weighted_auroc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """scores [N], labels [N] 0/1, weights [M, N] case multiplicities -> AUROC [M] (NaN where a resample has no
    positive or no negative)."""
    pos, neg = labels > 0.5, labels <= 0.5
    if not pos.any() or not neg.any():
        return np.full(len(weights), np.nan)
    sp, sq = scores[pos][:, None], scores[neg][None, :]
    order = (sp > sq).astype(np.float32) + 0.5 * (sp == sq)  # [|P|, |Q|]
    wp, wq = weights[:, pos], weights[:, neg]
    num = ((wp @ order) * wq).sum(1)
    den = wp.sum(1) * wq.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.maximum(den, 1e-12), np.nan)


def probe_statistic(scores: np.ndarray, labels: np.ndarray, classes: list[int], plan: Plan | None) -> np.ndarray:
    """scores [S, D, N, C] test probabilities (seed, label draw, case, class), labels [N, C] -> T(r) [R]
    (macro AUROC over `classes`); plan None -> the point estimate [1] (every seed, case and draw once)."""
    S, D, N, _ = scores.shape
    if plan is None:
        plan = Plan(np.arange(S)[None], np.ones((1, S, N), np.float32), np.arange(D)[None, None].repeat(S, 1))
    R = plan.seeds.shape[0]
    per_slot = np.zeros((R, S))
    for s in range(S):
        rows, slots = np.nonzero(plan.seeds == s)  # the (resample, slot) pairs that drew seed s
        if len(rows) == 0:
            continue
        w = plan.counts[rows, slots]  # [M, N]
        with warnings.catch_warnings():  # a resample without positives of every class: NaN, left out of the macro
            warnings.simplefilter("ignore", RuntimeWarning)
            auc = np.stack([np.nanmean(np.stack([weighted_auroc(scores[s, d, :, c], labels[:, c], w)
                                                 for c in classes]), axis=0) for d in range(D)], axis=1)  # [M, D]
        picked = np.take_along_axis(auc, plan.draws[rows, slots], axis=1)  # [M, D] the slot's drawn draws
        per_slot[rows, slots] = picked.mean(1)
    return per_slot.mean(1)


def dice_statistic(dice: np.ndarray, plan: Plan | None) -> np.ndarray:
    """dice [S, N, C] per-case Dice (NaN: class absent from prediction and target) -> T(r) [R]: per slot the
    macro over classes of the weighted mean over cases (the segmentation task's 'mean Dice per case')."""
    S, N, _ = dice.shape
    if plan is None:
        plan = Plan(np.arange(S)[None], np.ones((1, S, N), np.float32), np.zeros((1, S, 1), int))
    valid = np.isfinite(dice)
    d = np.where(valid, dice, 0.0)
    w = plan.counts  # [R, S, N]
    per_slot = np.zeros(plan.seeds.shape)
    for s in range(S):
        rows, slots = np.nonzero(plan.seeds == s)
        if len(rows) == 0:
            continue
        ws = w[rows, slots]  # [M, N]
        with np.errstate(invalid="ignore", divide="ignore"):
            per_class = (ws @ d[s]) / (ws @ valid[s].astype(np.float32))  # [M, C]
        per_slot[rows, slots] = np.nanmean(per_class, axis=1)
    return per_slot.mean(1)


def interval(draws: np.ndarray) -> tuple[float, float]:
    lo, hi = np.nanpercentile(draws, [2.5, 97.5])
    return float(lo), float(hi)


def decide(lo: float, hi: float, margin: float = MARGIN) -> str:
    """E3's rule, in the pre-registered order: gain / loss when the 95 % CI excludes 0 (on that side), else
    equivalence when it lies within +-margin, else inconclusive."""
    if lo > 0:
        return "gain"
    if hi < 0:
        return "loss"
    if -margin <= lo and hi <= margin:
        return "equivalence"
    return "inconclusive"
