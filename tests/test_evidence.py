"""simcrop.experiments.evidence: its statistics (hand-checked), its decision rules as pre-registered in
docs/ablation.md, and the driver end to end on a tiny testbed with a 2-step budget."""
import json

import numpy as np
import pytest

from simcrop.eval.metrics import auroc
from simcrop.experiments import evidence as E


def test_weighted_auroc_equals_the_auroc_of_the_expanded_voxels():
    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(size=37), 1)  # ties on purpose
    pos, neg = rng.integers(0, 5, 37), rng.integers(0, 9, 37)
    expanded_scores = np.repeat(scores, pos + neg)
    expanded_labels = np.concatenate([np.r_[np.ones(p), np.zeros(q)] for p, q in zip(pos, neg)])
    assert E.weighted_auroc(scores, pos, neg) == pytest.approx(auroc(expanded_scores, expanded_labels), abs=1e-12)
    assert E.weighted_auroc(np.array([3.0, 1.0]), np.array([2, 0]), np.array([0, 5])) == 1.0
    assert np.isnan(E.weighted_auroc(scores, np.zeros(37), neg))


def test_bootstrap_ci_covers_the_mean_and_shrinks_with_agreement():
    lo, hi = E.bootstrap_ci([0.1, 0.2, 0.3, 0.4, 0.5])
    assert lo < 0.3 < hi and hi - lo < 0.4
    assert E.bootstrap_ci([0.2] * 5) == (0.2, 0.2)
    assert all(np.isnan(E.bootstrap_ci([0.3])))


@pytest.mark.parametrize("wins, expected", [(5, "grounds"), (4, "grounds"), (3, "mixed"), (2, "mixed"),
                                            (1, "fails"), (0, "fails")])
def test_e1_rule_is_the_preregistered_one(wins, expected):
    rows = [{"hit": 0.3, "chance": 0.1}] * wins + [{"hit": 0.15, "chance": 0.1}] * (5 - wins)
    assert E.e1_decision(rows) == expected


def test_e2_rule_needs_the_ceiling():
    rows = [{"probe_ceiling": 0.7, "voxel_auroc": 0.9}] * 3
    assert E.e2_decision(rows).startswith("uninformative")
    rows = [{"probe_ceiling": 0.9, "voxel_auroc": v} for v in (0.8, 0.85, 0.9)]
    assert E.e2_decision(rows) == "grounds at the voxel level"
    rows = [{"probe_ceiling": 0.9, "voxel_auroc": v} for v in (0.4, 0.5, 0.6)]
    assert E.e2_decision(rows) == "at chance"


def test_driver_end_to_end_on_a_tiny_testbed(tmp_path, cache):
    from simcrop.data.synthetic import write_dataset

    data = write_dataset(tmp_path / "tb", n=10, seed=1, variant="testbed")
    out, work = tmp_path / "docs", tmp_path / "work"
    argv = ["--out", str(out), "--work", str(work), "--data", str(data), "--cache-dir", str(cache),
            "--experiments", "e1", "--variants", "soft", "--seeds", "0,1", "--steps", "2", "--no-compile", "--figures", "1"]
    assert E.main(argv) == 0
    res = json.loads((out / "evidence.json").read_text())
    assert set(res["summary"]) == {"soft"} and res["summary"]["soft"]["seeds"] == 2
    run = res["runs"]["soft"]["0"]
    assert 0 <= run["hit"] <= 1 and 0 < run["chance"] < 1 and 0 <= run["voxel_auroc"] <= 1
    assert run["n_lesion_sentences"] > 0 and 0 <= run["probe_ceiling"] <= 1
    cfg = json.loads((work / "e1" / "soft" / "seed0" / "run" / "config.json").read_text())
    assert cfg["model"]["align_within"] is False and cfg["model"]["w_align_soft"] == 1.0
    assert "| soft |" in (out / "evidence.md").read_text() and (out / "evidence.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "grounding_soft.png").read_bytes()[:4] == b"\x89PNG"  # one grounding picture per variant
    stamp = (work / "e1" / "soft" / "seed0" / "run" / "evidence.json").stat().st_mtime_ns
    assert E.main(argv) == 0  # resumable: nothing is redone
    assert (work / "e1" / "soft" / "seed0" / "run" / "evidence.json").stat().st_mtime_ns == stamp
