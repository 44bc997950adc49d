"""The grounding testbed (simcrop.data.synthetic.testbed): deterministic by seed, CT-RATE layout, lesions of four
looks placed across lobes and sides, named in the report, and VISIBLE in the raw input patches."""
from __future__ import annotations

import collections
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from simcrop.data import synthetic as syn
from simcrop.data.synthetic import testbed as tb

REPO = Path(__file__).resolve().parents[2]
KEYWORDS = {"solid": "solid", "ground_glass": "ground-glass", "fluid": ("fluid", "cyst"), "calcified": "calcified"}


def tree_bytes(root: Path) -> dict[str, bytes]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            out[str(p.relative_to(root))] = gzip.decompress(data) if p.name.endswith(".gz") else data
    return out


@pytest.fixture(scope="module")
def cases():
    return [tb.generate_testbed_case(i, seed=0) for i in range(24)]


def test_deterministic_by_seed_and_unlike_the_realistic_phantoms():
    a, b = tb.generate_testbed_case(3, seed=1), tb.generate_testbed_case(3, seed=1)
    assert np.array_equal(a.hu, b.hu) and np.array_equal(a.lesions, b.lesions) and np.array_equal(a.anatomy, b.anatomy)
    assert a.findings == b.findings and a.sentences == b.sentences and a.lesion_info == b.lesion_info
    assert not np.array_equal(a.hu, tb.generate_testbed_case(3, seed=2).hu)
    assert not np.array_equal(a.hu, tb.generate_testbed_case(4, seed=1).hu)
    realistic = syn.generate_case(3, seed=1, shape=tb.TESTBED_SHAPE)
    assert not np.array_equal(a.hu, realistic.hu)  # salted streams: not the phantoms' case 3


def test_lesions_types_sizes_places_and_sentences(cases):
    start = [(s - c) // 2 for s, c in zip(tb.TESTBED_SHAPE, tb.TESTBED_CROP)]
    seen = collections.Counter()
    for c in cases:
        assert c.hu.shape == tb.TESTBED_SHAPE and c.spacing == tb.TESTBED_SPACING
        types = [L["finding"] for L in c.lesion_info]
        assert len(types) == len(set(types)) <= 3  # one lesion per type in a CT
        assert len({L["location"] for L in c.lesion_info}) == len(types)  # and per lobe
        assert c.labels == {t: int(t in types) for t in tb.TESTBED_TYPES}
        lesion_sentences = [s for s in c.sentences if s["finding"] != "normal"]
        assert len(lesion_sentences) == len(types)
        for L in c.lesion_info:
            seen[L["finding"]] += 1
            m = c.lesions == L["id"]
            side = syn.RIGHT_LUNG_LABELS if L["side"] == "right" else syn.LEFT_LUNG_LABELS
            assert np.isin(c.anatomy[m], side).all()  # inside the lung of its side
            idx = np.argwhere(m)
            assert (idx.min(0) >= start).all() and (idx.max(0) < np.add(start, tb.TESTBED_CROP)).all()  # in the crop
            assert 48 <= L["size_mm"] <= 80 and max(L["extent_mm"]) >= 40 and L["lobe_share"] >= 0.5
            s = next(s for s in lesion_sentences if s["lesion_ids"] == [L["id"]])
            assert s["finding"] == L["finding"] and L["location"] in s["text"]  # type + lobe and side named
            kw = KEYWORDS[L["finding"]]
            assert any(k in s["text"].lower() for k in (kw if isinstance(kw, tuple) else (kw,))), s["text"]
            q25, q50, q75 = np.percentile(c.hu[m].astype(np.float64), [25, 50, 75])
            assert abs(q50 - tb.TESTBED_LOOKS[L["finding"]]["hu"]) < 50, L  # its intensity
            iqr = q75 - q25  # its texture: fluid homogeneous (scanner noise only), solid / calcified coarse
            assert iqr < 40 if L["finding"] == "fluid" else True, L
            assert iqr > 50 if L["finding"] in ("solid", "calcified") else True, L
        if not types:
            assert any("clear" in s["text"] for s in c.sentences)
        for s in c.sentences:  # every normal sentence has a region in the volume
            assert s["lesion_ids"] or np.isin(c.anatomy, s["anatomy_labels"]).any()
    assert set(seen) == set(tb.TESTBED_TYPES)


def test_lobes_sides_sizes_and_counts_are_uniform():
    plans = [tb.sample_lesions(np.random.default_rng(i)) for i in range(3000)]
    flat = [p for ps in plans for p in ps]
    sides = collections.Counter(p["side"] for p in flat)
    assert abs(sides["right"] / len(flat) - 0.5) < 0.03
    for side, lobes in (("right", syn.RIGHT_LUNG_LABELS), ("left", syn.LEFT_LUNG_LABELS)):
        n = collections.Counter(p["lobe"] for p in flat if p["side"] == side)
        for lobe in lobes:
            assert abs(n[syn.ANATOMY_LABELS[lobe]] / sides[side] - 1 / len(lobes)) < 0.04, (side, n)
    types = collections.Counter(p["finding"] for p in flat)
    assert all(abs(types[t] / len(flat) - 0.25) < 0.03 for t in tb.TESTBED_TYPES)
    sizes = np.array([p["size_mm"] for p in flat])
    assert sizes.min() == 48 and sizes.max() == 80 and abs(sizes.mean() - 64) < 1.0
    counts = collections.Counter(len(ps) for ps in plans)
    assert abs(counts[0] / len(plans) - 0.1) < 0.03 and abs(counts[2] / len(plans) - 0.4) < 0.03


def test_written_testbed_layout_is_read_by_the_loaders_and_deterministic(tmp_path):
    from simcrop.data.ctrate import read_split
    from simcrop.eval.data import read_grounding_cases, synthetic_finding_names

    a = syn.write_dataset(tmp_path / "a", n=5, seed=0, variant="testbed")
    b = syn.write_dataset(tmp_path / "b", n=5, seed=0, variant="testbed")
    assert tree_bytes(a) == tree_bytes(b)
    info = json.loads((a / "SYNTHETIC_INFO.json").read_text())
    assert info["variant"] == "testbed" and info["findings"] == list(tb.TESTBED_TYPES)
    assert info["shape"] == list(tb.TESTBED_SHAPE) and info["n_valid"] == 2  # val fraction 0.4
    assert synthetic_finding_names(a, "train") == list(tb.TESTBED_TYPES)
    items = read_split(a, "train")
    assert len(items) == 3 and items[0].spacing == tuple(tb.TESTBED_SPACING)
    gcases = read_grounding_cases(a, "train")
    direct = tb.generate_testbed_case(0, seed=0)
    assert [s.text for s in gcases[0].sentences] == [s["text"] for s in direct.sentences]
    for j, s in enumerate(gcases[0].sentences):
        assert np.array_equal(s.mask, direct.sentence_mask(j))
    assert not any(k.startswith("dataset/valid/valid_3") for k in tree_bytes(a))


def test_ensure_testbed_dataset_and_cli(tmp_path, monkeypatch):
    monkeypatch.setenv("SIMCROP_CACHE", str(tmp_path / "cache"))
    p = syn.ensure_testbed_dataset(n=3, seed=1)
    assert p == tmp_path / "cache" / f"testbed-v{tb.TESTBED_VERSION}-n3-s1-72x72x36"
    assert syn.ensure_default_dataset(n=3, seed=1, variant="testbed") == p
    assert syn.dataset_dirname(variant="testbed") == "testbed-v1-n1280-s0-72x72x36"
    assert syn.dataset_dirname() == "synthetic-v1-n320-s0-80x80x40"  # the realistic phantoms' name is unchanged
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "simcrop.data.synthetic", "--variant", "testbed", "--n", "3", "--seed", "1",
           "--cache-dir", str(tmp_path / "cache")]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(p)  # reused, path on stdout
    out = tmp_path / "cli"
    r = subprocess.run(cmd[:-2] + ["--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert tree_bytes(out) == tree_bytes(p)


def test_testbed_preset_geometry():
    from simcrop.config import make_config
    from simcrop.ops.reference import num_visible, patch_grid

    cfg = make_config("testbed")
    m = cfg.model
    assert tuple(p * s for p, s in zip(m.patch_size, tb.TESTBED_SPACING)) == (32.0, 32.0, 32.0)  # 32 mm cubes
    assert tuple(m.img_size) == tb.TESTBED_CROP and patch_grid(m.img_size, m.patch_size) == (8, 8, 8)
    visible = num_visible(512, m.mask_ratio)
    assert abs(m.topk / visible - 32 / 686) < 0.002  # the paper's share of pooled patches
    assert cfg.data.flip_prob == 0.0
    assert all(c * cfg.data.crop_scale_min >= w for c, w in zip(tb.TESTBED_SHAPE, m.img_size))  # never padded


def test_raw_patch_probe_separates_lesion_patches_from_the_other_patches_of_the_same_ct():
    """The issue's visibility check: a supervised per-patch probe (logistic regression on the raw input patch:
    voxels + intensity histogram) trained on some CTs finds the lesion patches of other CTs among those CTs'
    own patches."""
    from simcrop.data.augment import center_crop_pad, hu_to_unit
    from simcrop.eval.data import SentenceRegion
    from simcrop.eval.patch_probe import _sample, patch_targets, probe_type, raw_patch_features

    size, patch = tb.TESTBED_CROP, (8, 8, 4)

    def case_data(i):
        c = tb.generate_testbed_case(i, seed=7)
        vol = center_crop_pad(hu_to_unit(torch.from_numpy(c.hu.astype(np.float32))), size)[None]  # [1, X, Y, Z]
        x = raw_patch_features(vol, patch)  # [N, P + bins]
        sents = [SentenceRegion(s["text"], s["finding"], c.sentence_mask(j)) for j, s in enumerate(c.sentences)]
        targets = patch_targets(sents, size, patch)
        keep = _sample(targets, len(x), 128, np.random.default_rng(i))
        return x[torch.from_numpy(keep)], {t: (p[keep], q[keep]) for t, (p, q) in targets.items()}

    train = [case_data(i) for i in range(40)]
    test = [case_data(i) for i in range(40, 64)]
    for t in (*tb.TESTBED_TYPES, "any"):
        r = probe_type(train, test, t, l2=1e-3)
        assert r["n_test_pos"] >= 10, (t, r)
        assert r["auroc"] >= 0.9 and r["within_ct_auroc"] >= 0.9, (t, r)
