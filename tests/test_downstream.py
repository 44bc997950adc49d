"""E3's statistics (the paired hierarchical bootstrap) and its driver, end to end on a tiny dataset."""
import json

import numpy as np
import pytest

from simcrop.eval.metrics import macro_auroc
from simcrop.experiments import downstream as D
from simcrop.experiments import hierarchical_bootstrap as hb


def _auroc(scores, labels):
    pos, neg = scores[labels > 0.5], scores[labels <= 0.5]
    return ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))


def test_weighted_auroc_is_the_auroc_of_the_resampled_cases():
    rng = np.random.default_rng(0)
    scores, labels = rng.normal(size=40).round(1), rng.random(40) < 0.3  # rounded: ties between cases too
    counts = rng.multinomial(40, np.full(40, 1 / 40), size=6).astype(np.float32)
    got = hb.weighted_auroc(scores, labels, counts)
    for c, g in zip(counts, got):
        idx = np.repeat(np.arange(40), c.astype(int))
        assert g == pytest.approx(_auroc(scores[idx], labels[idx]), abs=1e-6)


def test_point_estimate_is_the_mean_macro_auroc_over_seeds_and_draws():
    rng = np.random.default_rng(1)
    labels = (rng.random((50, 3)) < 0.4).astype(np.float32)
    scores = rng.random((2, 3, 50, 3)).astype(np.float32)
    expected = np.mean([macro_auroc(scores[s, d][:, [0, 2]], labels[:, [0, 2]] > 0.5)[0]
                        for s in range(2) for d in range(3)])
    assert hb.probe_statistic(scores, labels, [0, 2], None)[0] == pytest.approx(expected, abs=1e-6)


def test_dice_point_estimate_is_the_macro_of_per_case_means():
    dice = np.array([[[0.5, np.nan], [0.7, 0.2], [np.nan, 0.4]]])  # 1 seed, 3 cases, 2 classes
    assert hb.dice_statistic(dice, None)[0] == pytest.approx((0.6 + 0.3) / 2)


def test_identical_variants_are_equivalent_and_a_better_one_gains():
    rng = np.random.default_rng(2)
    labels = (rng.random((120, 2)) < 0.5).astype(np.float32)
    noise = rng.normal(size=(3, 5, 120, 2)).astype(np.float32)
    weak, strong = noise + 0.3 * labels, noise + 1.5 * labels
    plan = hb.make_plan(3, 120, 5, n=400)
    same = hb.probe_statistic(weak, labels, [0, 1], plan) - hb.probe_statistic(weak.copy(), labels, [0, 1], plan)
    assert hb.decide(*hb.interval(same)) == "equivalence"
    gain = hb.probe_statistic(strong, labels, [0, 1], plan) - hb.probe_statistic(weak, labels, [0, 1], plan)
    assert hb.decide(*hb.interval(gain)) == "gain"
    assert hb.decide(*hb.interval(-gain)) == "loss"


@pytest.mark.parametrize("lo,hi,expected", [(0.001, 0.01, "gain"), (-0.03, -0.001, "loss"),
                                            (-0.019, 0.02, "equivalence"), (-0.03, 0.01, "inconclusive")])
def test_e3_rule_is_the_preregistered_one(lo, hi, expected):
    assert hb.decide(lo, hi) == expected


def test_the_plan_resamples_seeds_cases_and_draws():
    plan = hb.make_plan(5, 30, 4, n=200)
    assert plan.seeds.shape == (200, 5) and plan.counts.shape == (200, 5, 30) and plan.draws.shape == (200, 5, 4)
    assert (plan.counts.sum(-1) == 30).all() and plan.seeds.max() == 4 and plan.draws.max() == 3
    assert len({tuple(r) for r in plan.seeds}) > 100  # seeds are really resampled


def test_driver_end_to_end_on_a_tiny_dataset(tmp_path, cache):
    from simcrop.data.synthetic import write_dataset

    data = write_dataset(tmp_path / "ds", n=30, seed=4)
    out, work = tmp_path / "docs", tmp_path / "work"
    argv = ["--out", str(out), "--work", str(work), "--cache-dir", str(cache), "--no-compile",
            "--e3-data", str(data), "--e3-variants", "random,mim", "--e3-seeds", "0,1", "--e3-min-seeds", "2",
            "--e3-steps", "2", "--e3-text-encoder", "tiny-bert", "--e3-label-draws", "2", "--e3-seg-steps", "2",
            "--e3-probe-epochs", "2", "--e3-reference-epochs", "1", "--e3-detect-threshold", "0",
            "--e3-seg-variants", "random"]
    assert D.main(argv) == 0
    res = json.loads((out / "e3.json").read_text())["result"]
    assert res["seeds"] == [0, 1] and set(res["per_variant"]) == {"random", "mim"}
    (cmp,) = [c for c in res["comparisons"] if c["metric"] == "probe_10"]
    assert cmp["comparison"] == "mim - random" and cmp["ci"][0] <= cmp["ci"][1]
    assert cmp["decision"] in ("gain", "loss", "equivalence", "inconclusive")
    # UNETR only for --e3-seg-variants at --e3-seg-seeds (default 0): random seed 0 here
    assert len(res["per_variant"]["random"]["dice"]["per_seed"]) == 1 and "dice" not in res["per_variant"]["mim"]
    assert len(res["per_variant"]["mim"]["probe_100"]["per_seed"]) == 2
    assert res["dice_seeds"] == [0] and not (work / "e3" / "random" / "seed1" / "eval" / "segment.json").exists()
    (dice,) = [c for c in res["comparisons"] if c["metric"] == "dice"]
    assert dice["decision"].startswith("not run")
    cfg = json.loads((work / "e3" / "mim" / "seed1" / "run" / "config.json").read_text())
    assert cfg["model"]["use_mlm"] is False and cfg["train"]["seed"] == 1
    md = (out / "e3.md").read_text()
    assert "| mim - random |" in md and (out / "e3.png").read_bytes()[:4] == b"\x89PNG"
    probe = work / "e3" / "mim" / "seed0" / "eval" / "linear-probe.json"
    stamp = probe.stat().st_mtime_ns
    assert D.main(argv) == 0  # resumable: nothing is redone
    assert probe.stat().st_mtime_ns == stamp
