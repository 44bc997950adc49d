"""Metrics on hand-built cases: AUROC, F1, recall@k, Dice, grounding scores, subsets, crop alignment."""
import math

import numpy as np
import pytest
import torch

from simcrop.data.augment import center_crop_pad
from simcrop.eval import metrics as M
from simcrop.eval.data import center_crop_zero, patch_fractions
from simcrop.eval.linear_probe import stratified_subset


def test_auroc_perfect_constant_inverted_and_ties():
    y = np.array([0, 0, 1, 1, 0, 1])
    assert M.auroc(y * 2.0 + 0.1, y) == 1.0
    assert M.auroc(-y.astype(float), y) == 0.0
    assert M.auroc(np.full(6, 0.3), y) == 0.5  # a constant scorer: every pair tied
    # ties across classes count 1/2: positives (0.5, 0.9), negatives (0.5, 0.1): pairs 1/2, 1, 1, 1 -> 3.5 / 4
    assert M.auroc([0.5, 0.9, 0.5, 0.1], [1, 1, 0, 0]) == pytest.approx(0.875)
    assert math.isnan(M.auroc([0.1, 0.2], [1, 1]))  # one class only


def test_auroc_matches_sklearn_on_random_ties():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for _ in range(5):
        y = rng.integers(0, 2, 57)
        s = rng.integers(0, 6, 57).astype(float)  # many ties
        assert M.auroc(s, y) == pytest.approx(sk.roc_auc_score(y, s))


def test_macro_auroc_skips_undefined_classes():
    scores = np.array([[0.9, 0.1], [0.1, 0.2], [0.8, 0.3]])
    labels = np.array([[1, 0], [0, 0], [1, 0]])
    macro, per = M.macro_auroc(scores, labels)
    assert macro == 1.0 and per[0] == 1.0 and math.isnan(per[1])


def test_f1_and_accuracy():
    pred = np.array([[1, 0], [1, 0], [0, 0]])
    y = np.array([[1, 0], [0, 0], [1, 0]])
    f1 = M.f1_scores(pred, y)
    assert f1[0] == pytest.approx(0.5) and math.isnan(f1[1])  # TP 1, FP 1, FN 1; class 2 absent
    m = M.multilabel_metrics(np.array([[0.9, 0.1], [0.7, 0.2], [0.2, 0.4]]), y)
    assert m["accuracy"] == pytest.approx(4 / 6) and m["exact_match"] == pytest.approx(1 / 3)
    mc = M.multiclass_metrics(np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1]]),
                              np.array([0, 1, 2, 1]))
    assert mc["accuracy"] == 0.75 and mc["auroc"] == 1.0  # every one-vs-rest ranking is perfect


def test_recall_at_k_hand_case():
    sim = np.array([[0.9, 0.1, 0.0],  # query 0: match first
                    [0.8, 0.5, 0.1],  # query 1: match second
                    [0.9, 0.8, 0.7]])  # query 2: match third
    r = M.recall_at_k(sim, (1, 2, 3))
    assert r == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3), 3: 1.0}
    assert M.recall_at_k(np.ones((4, 4)), (1, 3))[1] == 0.0  # ties count against the query


def test_dice_identical_disjoint_and_absent():
    a = np.zeros((4, 4, 4), int)
    a[:2] = 1
    b = np.zeros_like(a)
    b[2:] = 1
    assert M.dice_per_class(a, a, 2) == [1.0]
    assert M.dice_per_class(a, b, 2) == [0.0]
    d = M.dice_per_class(a, a, 3)
    assert d[0] == 1.0 and math.isnan(d[1])  # class 2 absent from both


def test_grounding_case_with_known_region():
    # grid 4 x 4 x 2 patches of 2 x 2 x 2 voxels; the region fills patches (0,0,0) and (0,0,1) fully, and 1/4 of (1,0,0)
    size, patch = (8, 8, 4), (2, 2, 2)
    mask = np.zeros(size, bool)
    mask[0:2, 0:2, :] = True
    mask[2, 0, 0:2] = True  # 2 of 8 voxels of patch (1, 0, 0)
    frac = patch_fractions(mask, size, patch)
    assert frac.shape == (32,)
    assert frac[0] == 1.0 and frac[1] == 1.0 and frac[(1 * 4 + 0) * 2 + 0] == 0.25
    inside, rule = M.patch_inside(frac)
    assert rule == "half" and inside.sum() == 2
    sim = np.zeros(32)
    sim[[0, 5, 7, 9]] = [0.9, 0.8, 0.7, 0.6]  # argmax inside; 1 of the top 4 inside
    s = M.grounding_scores(sim, inside, 4)
    assert s["hit"] == 1.0 and s["topk_share"] == 0.25 and s["chance"] == pytest.approx(2 / 32)
    sim2 = sim.copy()
    sim2[1] = 1.0
    assert M.grounding_scores(sim2, inside, 2)["topk_share"] == 1.0
    assert M.grounding_scores(-sim2, inside, 2)["hit"] == 0.0
    # a region smaller than half a patch falls back to "holds region voxels"
    small = np.zeros(size, bool)
    small[5, 5, 1] = True
    inside, rule = M.patch_inside(patch_fractions(small, size, patch))
    assert rule == "any" and inside.sum() == 1 and inside[(2 * 4 + 2) * 2 + 0]


def test_region_crop_matches_volume_crop():
    """The mask crop uses the same offsets as center_crop_pad (crop on x, pad on y and z)."""
    shape, size = (9, 4, 3), (6, 7, 4)
    vol = torch.arange(np.prod(shape), dtype=torch.float32).reshape(shape)
    cropped = center_crop_pad(vol, size)
    idx = center_crop_zero(np.arange(1, np.prod(shape) + 1).reshape(shape), size)  # 0 = padding
    real = idx > 0
    assert real.sum() == 6 * 4 * 3
    assert np.array_equal(cropped.numpy()[real], (idx[real] - 1).astype(np.float32))


def test_stratified_subset_covers_every_class():
    rng = np.random.default_rng(0)
    y = (rng.random((200, 5)) < [0.5, 0.2, 0.05, 0.02, 0.3]).astype(int)
    sub = stratified_subset(y, 0.01, np.random.default_rng(1))
    assert (y[sub].sum(0) >= 1).all()
    assert len(sub) <= 2 + 5 and len(set(sub)) == len(sub)
    full = stratified_subset(y, 1.0, np.random.default_rng(1))
    assert len(full) == 200
    yc = np.repeat([0, 1, 2], [90, 9, 1])
    sub = stratified_subset(yc, 0.1, np.random.default_rng(2))
    assert set(yc[sub]) == {0, 1, 2} and 10 <= len(sub) <= 11


def test_background_patches_are_those_mostly_air_outside_the_body():
    from simcrop.eval.grounding import BACKGROUND_HU, background_patches

    vol = torch.zeros(1, 8, 4, 4)  # soft tissue (0 HU), patches of 2 x 4 x 4 -> 4 patches along x
    vol[0, :2] = -1.0  # patch 0: outside air (-1000 HU)
    vol[0, 2:4, :, :2] = -1.0  # patch 1: half air -> background (>= half)
    vol[0, 4:6, :, :1] = -1.0  # patch 2: a quarter air -> not background
    vol[0, 6:] = -0.85  # patch 3: lung parenchyma (-850 HU) is not background
    assert background_patches(vol, (2, 4, 4)).tolist() == [True, True, False, False]
    assert BACKGROUND_HU > -1000 and BACKGROUND_HU < -850


def test_sentence_specific_map_beats_the_ct_mean_control_and_a_generic_one_does_not():
    from simcrop.eval.grounding import sentence_scores

    N = 8
    regions = [(np.arange(N) // 2) == r for r in range(3)]  # sentence r: patches 2r, 2r + 1
    background = np.arange(N) >= 6  # patches 6-7 are air
    specific = np.stack([(r + 1.0) * regions[r] for r in range(3)])  # each map lights its own region
    generic = np.stack([np.linspace(1, 0, N)] * 3)  # every map: "low patch index first", whatever the sentence

    def scores(sim):
        return [sentence_scores(sim[r], sim.mean(0), regions[r], background, 2) for r in range(3)]

    spec, gen = scores(specific), scores(generic)
    assert [s["topk_share"] for s in spec] == [1.0, 1.0, 1.0]
    assert [s["control_share"] for s in spec] == [0.0, 0.0, 1.0]  # the mean map favours the strongest map only
    # the generic map beats the region-share chance (0.25) for sentence 0, but never its control
    assert gen[0]["topk_share"] == 1.0 and gen[0]["chance"] == 0.25
    assert all(s["topk_share"] == s["control_share"] for s in gen)
    assert all(s["background_share"] == 0.0 and s["background_chance"] == 0.25 for s in spec + gen)
