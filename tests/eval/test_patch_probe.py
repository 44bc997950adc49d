"""Telling "cannot see" from "does not align": the per-patch probe, region -> sentence retrieval, the position
share and the lesion pointing summary, on hand-built inputs with known scores, then from the command line on
the tiny checkpoint (realistic phantoms) and on a tiny testbed checkpoint."""
import json

import numpy as np
import pytest
import torch

from simcrop.eval.cli import main
from simcrop.eval.data import SentenceRegion
from simcrop.eval.grounding import PositionShare, aggregate, position_share
from simcrop.eval.patch_probe import fit_logistic, patch_targets, probe_type, raw_patch_features
from simcrop.eval.region_retrieval import region_sentence_scores


# -- position share --------------------------------------------------------------------------------------------
def test_position_share_is_one_for_position_only_and_zero_for_content_only_features():
    C, N, D = 5, 7, 8
    pos = torch.randn(N, D)
    assert position_share(pos.expand(C, N, D)) == pytest.approx(1.0)  # every case the same vector at a position
    content = torch.randn(C, 1, D)
    assert abs(position_share(content.expand(C, N, D))) < 1e-9  # one vector per case at every position
    V = torch.randn(C, N, D, dtype=torch.float64)
    acc = PositionShare()
    for v in V:
        acc.add(v)
    total = ((V - V.mean((0, 1))) ** 2).sum(-1).mean()  # the formula of the grounding diagnostic
    assert acc.value() == pytest.approx(float(1 - ((V - V.mean(0)) ** 2).sum(-1).mean() / total), rel=1e-9)
    one = PositionShare()
    one.add(V[0])
    assert np.isnan(one.value())


# -- per-patch probe -------------------------------------------------------------------------------------------
def test_patch_targets_follow_the_grounding_rule():
    size, patch = (4, 4, 2), (2, 2, 1)  # 2 x 2 x 2 patches of 4 voxels; n = (ix * gy + iy) * gz + iz
    a = np.zeros(size, bool)
    a[0:2, 0:2, 0] = True  # patch 0 full
    a[0, 0, 1] = True  # one voxel of patch 1
    b = np.zeros(size, bool)
    b[2, 2, 1] = True  # one voxel of patch 7: too small for the half rule -> 'any'
    normal = np.ones(size, bool)
    t = patch_targets([SentenceRegion("a", "x", a), SentenceRegion("n", "normal", normal),
                       SentenceRegion("b", "y", b)], size, patch)
    assert set(t) == {"x", "y", "any"}
    pos, neg = t["x"]
    assert pos.tolist() == [True] + [False] * 7
    assert neg.tolist() == [False, False] + [True] * 6  # patch 1 is partly filled: left out
    pos, neg = t["y"]
    assert pos.tolist() == [False] * 7 + [True] and neg.tolist() == [True] * 7 + [False]
    pos, neg = t["any"]
    assert pos.tolist() == [True] + [False] * 6 + [True] and neg.tolist() == [False, False] + [True] * 5 + [False]


def test_raw_patch_features_are_voxels_and_histogram():
    vol = torch.linspace(-1, 1, 4 * 4 * 2).reshape(1, 4, 4, 2)
    f = raw_patch_features(vol, (2, 2, 1), bins=4)
    assert f.shape == (8, 4 + 4)
    torch.testing.assert_close(f[:, 4:].sum(1), torch.ones(8))
    assert torch.equal(f[0, :4], vol[0, 0:2, 0:2, 0].reshape(-1))


def _cases(rng, n_cases, informative: bool):
    """Per case 40 patches, 4 positives of type 't'; features = label (+ noise) or pure noise."""
    out = []
    for _ in range(n_cases):
        y = np.zeros(40, bool)
        y[rng.choice(40, 4, replace=False)] = True
        x = torch.from_numpy(rng.normal(size=(40, 6))).float()
        if informative:
            x[:, 0] += 3.0 * torch.from_numpy(y).float()
        out.append((x, {"t": (y, ~y)}))
    return out


def test_probe_scores_a_visible_type_near_one_and_an_invisible_one_near_chance():
    rng = np.random.default_rng(0)
    good = probe_type(_cases(rng, 20, True), _cases(rng, 20, True), "t", 1e-3)
    assert good["auroc"] > 0.95 and good["within_ct_auroc"] > 0.95 and good["within_ct_n"] == 20
    assert good["n_test_pos"] == 80 and good["n_test_neg"] == 720
    bad = probe_type(_cases(rng, 20, False), _cases(rng, 20, False), "t", 1e-3)
    assert 0.35 < bad["auroc"] < 0.65
    absent = probe_type(_cases(rng, 2, True), [(torch.zeros(3, 6), {})], "u", 1e-3)  # no positive to train on
    assert np.isnan(absent["auroc"])


def test_fit_logistic_separates_separable_data():
    x = torch.cat([torch.randn(50, 3) - 2, torch.randn(50, 3) + 2])
    y = torch.cat([torch.zeros(50), torch.ones(50)]).long()
    score = fit_logistic(x, y)(x)
    assert score[:50].max() < score[50:].min()


# -- region -> sentence retrieval ------------------------------------------------------------------------------
def _retrieval_inputs():
    S = torch.eye(4)[:3]  # 3 orthogonal sentences in 4 dims
    regions = [np.zeros(12, bool) for _ in range(3)]
    regions[0][[0, 1]] = True
    regions[1][[4, 5, 6]] = True
    regions[2][[8]] = True
    return S, regions, ["lesion", "lesion", "normal"]


def test_region_retrieval_correct_map_hits_and_wrong_map_misses():
    S, regions, groups = _retrieval_inputs()
    bg = torch.eye(4)[3]
    right = bg.repeat(12, 1)
    for j, r in enumerate(regions):
        right[torch.from_numpy(r)] = S[j]
    recs = region_sentence_scores(right, S, regions, groups, np.random.default_rng(0), draws=4)
    assert [r["hit"] for r in recs] == [1.0, 1.0, 1.0] and [r["rank"] for r in recs] == [1, 1, 1]
    assert all(r["chance"] == pytest.approx(1 / 3) for r in recs)
    assert recs[0]["shuffled_hit"] == 0.0 and recs[1]["shuffled_hit"] == 0.0  # the other lesion's region
    assert recs[0]["n_shuffled"] == 1 and np.isnan(recs[2]["shuffled_hit"])  # no other normal region
    assert all(r["random_hit"] <= r["hit"] for r in recs)
    wrong = right.clone()  # the two lesion regions swapped: each region points to the other sentence
    wrong[torch.from_numpy(regions[0])] = S[1]
    wrong[torch.from_numpy(regions[1])] = S[0]
    recs = region_sentence_scores(wrong, S, regions, groups, np.random.default_rng(0), draws=4)
    assert [r["hit"] for r in recs] == [0.0, 0.0, 1.0]
    assert recs[0]["shuffled_hit"] == 1.0 and recs[1]["shuffled_hit"] == 1.0
    flat = bg.repeat(12, 1)  # a map that shows nothing: every sentence ties, ties count against
    recs = region_sentence_scores(flat, S, regions, groups, np.random.default_rng(0), draws=2)
    assert [r["hit"] for r in recs] == [0.0, 0.0, 0.0] and [r["rank"] for r in recs] == [3, 3, 3]


# -- lesion-only pointing ----------------------------------------------------------------------------------------
def test_lesion_pointing_reports_hit_against_chance_and_the_ct_mean_control():
    base = dict(topk_share=0.5, patch_auroc=0.5, background_share=0.0, background_chance=0.1, control_share=0.5,
                control_auroc=0.5, rule="half", k=4)
    records = [
        {**base, "volume": "a", "sentence": "s1", "finding": "solid", "group": "lesion", "hit": 1.0, "chance": 0.1,
         "control_hit": 0.0},
        {**base, "volume": "b", "sentence": "s2", "finding": "fluid", "group": "lesion", "hit": 0.0, "chance": 0.2,
         "control_hit": 1.0},
        {**base, "volume": "b", "sentence": "s3", "finding": "normal", "group": "normal", "hit": 1.0, "chance": 0.5,
         "control_hit": 1.0},
        {"volume": "c", "sentence": "s4", "finding": "solid", "group": "lesion", "rule": "none", "skipped": "x"},
    ]
    res = aggregate(records)
    p = res["lesion_pointing"]
    assert p["n"] == 2 and p["n_cases"] == 2
    assert p["hit"]["mean"] == 0.5 and p["chance"]["mean"] == pytest.approx(0.15)
    assert p["hit_minus_chance"]["mean"] == pytest.approx(0.35) and p["hit_minus_control"]["mean"] == 0.0
    g = res["groups"]["lesion"]
    assert g["hit_minus_chance"]["mean"] == pytest.approx(0.35) and res["skipped"] == 1


# -- command line ------------------------------------------------------------------------------------------------
def _run(task, ckpt, data, cache, out, *extra):
    assert main([task, "--checkpoint", str(ckpt), "--data", str(data), "--cache-dir", str(cache), "--out", str(out),
                 "--quiet", *extra]) == 0
    assert (out / f"{task}.md").read_text().startswith("#")
    return json.loads((out / f"{task}.json").read_text())


def _check(probe, retrieval):
    for rep in ("tokens", "raw"):
        assert "any" in probe[rep]["per_type"]
        for t, r in probe[rep]["per_type"].items():
            assert r["auroc"] is None or 0 <= r["auroc"] <= 1, (rep, t)  # None: no positive (tiny lesions)
    assert set(probe["position_share"]) >= {"raw", "raw_unnormalised", "tokens", "gv"}
    assert all(v is not None and 0 <= v <= 1 for v in probe["position_share"].values())
    g = retrieval["groups"]["all"]
    assert g["n"] > 0 and 0 < g["chance"]["mean"] < 1 and 0 <= g["hit"]["mean"] <= 1
    for rec in retrieval["sentences"]:
        assert rec["rank"] >= 1 and rec["chance"] == pytest.approx(1 / rec["m"]) and rec["n_patches"] >= 1


def test_tasks_on_the_tiny_checkpoint(tiny_checkpoint, eval_data, eval_cache, tmp_path):
    probe = _run("patch-probe", tiny_checkpoint, eval_data, eval_cache, tmp_path, "--max-train-cases", "6")
    assert probe["n_train_cases"] == 6 and probe["n_test_cases"] == 2 and probe["train_split"] == "train"
    retrieval = _run("region-retrieval", tiny_checkpoint, eval_data, eval_cache, tmp_path, "--draws", "2")
    _check(probe, retrieval)
    halves = _run("patch-probe", tiny_checkpoint, eval_data, eval_cache, tmp_path / "h", "--train-split", "valid")
    assert halves["n_train_cases"] == 1 and halves["n_test_cases"] == 1


@pytest.fixture(scope="module")
def testbed_run(tmp_path_factory, eval_cache, train_args):
    from simcrop.data.synthetic import write_dataset
    from simcrop.train import main as train

    data = write_dataset(tmp_path_factory.mktemp("testbed") / "ds", n=10, seed=3, variant="testbed")
    out = tmp_path_factory.mktemp("testbed_run") / "run"
    assert train(train_args(out, "--preset", "testbed", "--steps", "2", data=data, cache_dir=eval_cache)) == 0
    return out, data


def test_tasks_on_a_testbed_checkpoint(testbed_run, eval_cache, tmp_path):
    run, data = testbed_run
    probe = _run("patch-probe", run, data, eval_cache, tmp_path)
    assert probe["n_train_cases"] == 6 and probe["n_test_cases"] == 4
    assert probe["raw_features"].startswith("256 voxels")  # 8 x 8 x 4 patches
    assert set(probe["types"]) <= {"solid", "ground_glass", "fluid", "calcified", "any"}
    retrieval = _run("region-retrieval", run, data, eval_cache, tmp_path)
    _check(probe, retrieval)
    gr = _run("grounding", run, data, eval_cache, tmp_path, "--figures", "0", "--diagnose", "1")
    assert gr["k"] == 6 and gr["lesion_pointing"]["n"] == gr["groups"]["lesion"]["n"] > 0
    d = gr["diagnostic"]
    for key in ("position_share", "position_share_raw", "position_share_raw_unnormalised", "position_share_tokens"):
        assert 0 <= d[key] <= 1, key
