"""Tests of the built-in synthetic chest-CT / report dataset (simcrop.data.synthetic). Small and fast."""

from __future__ import annotations

import csv
import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from simcrop.data import synthetic as syn

REPO = Path(__file__).resolve().parents[2]
N_MEM = 24  # in-memory cases (~20 ms each at the default shape)

KEYWORDS = {
    "nodule": "nodule",
    "mass": "mass",
    "ground_glass_opacity": "ground-glass",
    "consolidation": "consolidation",
    "pleural_effusion": "pleural effusion",
    "cardiomegaly": ("cardiomegaly", "heart is enlarged"),
}


def split_sentences(text: str) -> list[str]:
    """SPEC rule: split on '.' except where a neighbouring character is a digit ("1.5 cm" stays whole)."""
    out, cur = [], ""
    for i, ch in enumerate(text):
        cur += ch
        if ch == ".":
            prev = text[i - 1] if i > 0 else ""
            nxt = text[i + 1] if i + 1 < len(text) else ""
            if not (prev.isdigit() or nxt.isdigit()):
                out.append(cur.strip())
                cur = ""
    if cur.strip():
        out.append(cur.strip())
    return out


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="", encoding="utf-8") as fh:
        r = csv.DictReader(fh)
        return list(r.fieldnames or []), list(r)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cases():
    return [syn.generate_case(i, seed=0) for i in range(N_MEM)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    # val_fraction 0.34 with n = 6: cases 2 and 5 go to valid, so both splits are exercised.
    out = tmp_path_factory.mktemp("synth") / "ds"
    syn.write_dataset(out, n=6, seed=0, val_fraction=0.34)
    return out


# ------------------------------------------------------------------------------------------------ determinism
def test_generate_case_deterministic_and_seed_dependent():
    a, b = syn.generate_case(3, seed=11), syn.generate_case(3, seed=11)
    assert np.array_equal(a.hu, b.hu) and np.array_equal(a.anatomy, b.anatomy)
    assert np.array_equal(a.lesions, b.lesions)
    assert a.findings == b.findings and a.impression == b.impression and a.sentences == b.sentences
    c = syn.generate_case(3, seed=12)
    assert not np.array_equal(a.hu, c.hu)
    d = syn.generate_case(4, seed=11)
    assert not np.array_equal(a.hu, d.hu)


def test_dataset_bytes_deterministic_and_independent_of_n(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    syn.write_dataset(a, n=3, seed=5)
    syn.write_dataset(b, n=3, seed=5)
    syn.write_dataset(c, n=5, seed=5)
    ta, tb, tc = tree_bytes(a), tree_bytes(b), tree_bytes(c)
    assert ta == tb  # same bytes twice
    # Case i is identical whether n = 3 or n = 5 (split rule is per case: 0..3 train, 4 valid at f = 0.2).
    for p in range(1, 4):
        name = f"train_{p}_a_1.nii.gz"
        for rel in (f"dataset/train/train_{p}/train_{p}_a/{name}",
                    f"dataset/synthetic_ground_truth/train/{name}_anatomy.nii.gz",
                    f"dataset/synthetic_ground_truth/train/{name}_lesions.nii.gz"):
            assert ta[rel] == tc[rel], rel
    rows_a = read_csv(a / "dataset/radiology_text_reports/train_reports.csv")[1]
    rows_c = read_csv(c / "dataset/radiology_text_reports/train_reports.csv")[1]
    assert rows_a == rows_c[:3]
    lines_a = (a / "dataset/synthetic_ground_truth/train_sentences.jsonl").read_text().splitlines()
    lines_c = (c / "dataset/synthetic_ground_truth/train_sentences.jsonl").read_text().splitlines()
    assert lines_a == lines_c[:3]
    assert "dataset/valid/valid_1/valid_1_a/valid_1_a_1.nii.gz" in tc
    assert not any(k.startswith("dataset/valid/valid_") for k in ta)


# ------------------------------------------------------------------------------------------------ volumes
def test_hu_ranges_per_tissue(cases):
    for c in cases[:8]:
        assert c.hu.dtype == np.int16 and c.hu.shape == syn.DEFAULT_SHAPE
        assert c.anatomy.dtype == np.uint8 and c.anatomy.shape == c.hu.shape == c.lesions.shape
        assert c.hu.min() >= syn.HU_MIN and c.hu.max() <= syn.HU_MAX
        lung = np.isin(c.anatomy, syn.LUNG_LABELS) & (c.lesions == 0)
        assert -900 <= c.hu[lung].mean() <= -750
        for lab in (7, 8):  # heart, mediastinum
            assert 0 <= c.hu[c.anatomy == lab].mean() <= 80, lab
        for lab in syn.BONE_LABELS:
            assert c.hu[c.anatomy == lab].mean() > 200, lab
        outside = c.anatomy == 0
        assert outside.sum() > 0 and np.all(c.hu[outside] == -1000)
        assert c.hu[c.anatomy == 9].mean() < -900  # airway lumen is air
        # Noise inside the body: soft tissue is not constant.
        assert 5 < c.hu[c.anatomy == 7].std() < 40
        for lab in syn.ANATOMY_LABELS:  # every compartment is drawn at the default field of view
            assert (c.anatomy == lab).any(), syn.ANATOMY_LABELS[lab]


def test_anatomy_orientation_ras(cases):
    """+x = patient Right, +y = Anterior, +z = Superior (affine diag > 0)."""
    c = cases[0]
    idx = lambda m: np.argwhere(m).mean(axis=0)  # noqa: E731  mean voxel index (i, j, k)
    right = idx(np.isin(c.anatomy, syn.RIGHT_LUNG_LABELS))
    left = idx(np.isin(c.anatomy, syn.LEFT_LUNG_LABELS))
    heart, spine = idx(c.anatomy == 7), idx(c.anatomy == 10)
    centre = (np.array(c.shape) - 1) / 2
    assert right[0] > centre[0] > left[0]  # right lung at high i
    assert heart[0] < centre[0] and heart[1] > centre[1]  # heart left and anterior
    assert spine[1] < centre[1] and spine[1] < heart[1]  # spine posterior
    upper, lower = idx(c.anatomy == 2), idx(c.anatomy == 4)
    assert upper[2] > lower[2] and upper[1] > lower[1]  # upper lobe above and in front of lower lobe
    assert nib.aff2axcodes(c.affine) == ("R", "A", "S")


def test_other_shape_and_spacing():
    c = syn.generate_case(1, seed=0, shape=(48, 40, 30), spacing=(6.5, 8.0, 10.0))
    assert c.hu.shape == (48, 40, 30) and np.allclose(np.diag(c.affine)[:3], (6.5, 8.0, 10.0))
    assert np.allclose(c.affine[:3, 3], [-(48 - 1) / 2 * 6.5, -(40 - 1) / 2 * 8.0, -(30 - 1) / 2 * 10.0])
    lung = np.isin(c.anatomy, syn.LUNG_LABELS) & (c.lesions == 0)
    assert -900 <= c.hu[lung].mean() <= -750
    # Findings and report text depend on (seed, index) only.
    d = syn.generate_case(1, seed=0)
    assert [(L["finding"], L["location"], L["size_mm"]) for L in c.lesion_info] == [
        (L["finding"], L["location"], L["size_mm"]) for L in d.lesion_info]


# ------------------------------------------------------------------------------------------------ findings
def test_every_finding_placed_is_reported_and_labelled(cases):
    seen = set()
    for c in cases:
        placed = {L["finding"] for L in c.lesion_info}
        seen |= placed
        assert c.labels == {f: int(f in placed) for f in syn.FINDINGS}
        ids = set(np.unique(c.lesions).tolist()) - {0}
        assert ids == {L["id"] for L in c.lesion_info}
        for L in c.lesion_info:
            sents = [s for s in c.sentences if L["id"] in s["lesion_ids"]]
            assert len(sents) == 1 and sents[0]["finding"] == L["finding"]
            text = sents[0]["text"].lower()
            kw = KEYWORDS[L["finding"]]
            assert any(k in text for k in ((kw,) if isinstance(kw, str) else kw)), text
            if L["finding"] in syn.LUNG_FINDINGS or L["finding"] == "pleural_effusion":
                assert L["location"] in text, (L, text)
            if L["finding"] in ("nodule", "mass"):
                mm = re.search(r"(\d+(?:\.\d)?) (mm|cm)", text)
                assert mm and float(mm.group(1)) * (10 if mm.group(2) == "cm" else 1) == pytest.approx(L["size_mm"])
        # Normal statements only when they are true.
        f = c.findings
        lung_pos = placed & set(syn.LUNG_FINDINGS)
        if re.search(r"lungs are clear|lung parenchyma is clear", f):
            assert not lung_pos
        if re.search(r"[Nn]o (focal )?consolidation", f):
            assert "consolidation" not in placed
        if "no pleural effusion" in f.lower():
            assert "pleural_effusion" not in placed
        if re.search(r"Heart size is normal|normal in size|within normal limits", f):
            assert "cardiomegaly" not in placed
        if placed:
            assert c.impression == "" or "No acute" not in c.impression
        else:
            assert not c.lesion_info and c.lesions.max() == 0
    assert seen == set(syn.FINDINGS)  # all findings exercised by these cases
    assert any(not c.lesion_info for c in cases)  # and some normal cases


def test_lesions_confined_to_their_compartment(cases):
    for c in cases:
        for L in c.lesion_info:
            m = c.lesions == L["id"]
            assert m.sum() == L["n_voxels"] > 0
            labs = set(np.unique(c.anatomy[m]).tolist())
            if L["finding"] in syn.LUNG_FINDINGS:
                assert labs == {syn.ANATOMY_IDS[L["location"].replace(" ", "_")]}, (L, labs)
            elif L["finding"] == "pleural_effusion":
                side = syn.RIGHT_LUNG_LABELS if L["location"] == "right" else syn.LEFT_LUNG_LABELS
                assert labs <= set(side)
                assert 0 <= c.hu[m].mean() <= 30  # fluid
            elif L["finding"] == "cardiomegaly":
                assert labs == {7} and np.array_equal(m, c.anatomy == 7)
            if L["finding"] in ("nodule", "mass", "consolidation"):
                assert c.hu[m].mean() > -300  # dense (air bronchograms allowed inside consolidation)
            if L["finding"] == "ground_glass_opacity":
                assert -800 < c.hu[m].mean() < -300


def test_cardiomegaly_enlarges_heart(cases):
    big = [c for c in cases if c.labels["cardiomegaly"]]
    normal = [c for c in cases if not c.labels["cardiomegaly"]]
    assert big and normal
    vb = np.mean([(c.anatomy == 7).sum() for c in big])
    vn = np.mean([(c.anatomy == 7).sum() for c in normal])
    assert vb > 1.5 * vn


def test_sentences_regions_and_report_structure(cases):
    impressions_absent = 0
    for c in cases:
        assert 4 <= len(c.sentences) <= 12
        assert c.findings == " ".join(s["text"] for s in c.sentences)
        assert split_sentences(c.findings) == [s["text"] for s in c.sentences]
        for j, s in enumerate(c.sentences):
            assert s["text"].endswith(".") and s["finding"] in (*syn.FINDINGS, "normal")
            assert set(s) == {"text", "finding", "anatomy_labels", "lesion_ids"}
            assert s["anatomy_labels"] or s["lesion_ids"]
            assert c.sentence_mask(j).any(), s
        impressions_absent += c.impression == ""
        if c.impression:
            assert all(t.endswith(".") for t in split_sentences(c.impression))
    assert impressions_absent < len(cases) // 2
    # Sizes with decimals occur and stay inside their sentence.
    assert any(re.search(r"\d\.\d", c.findings) for c in cases)


# ------------------------------------------------------------------------------------------------ on disk
def test_ctrate_csv_columns_exact(dataset):
    ds = dataset / "dataset"
    expected = {
        "radiology_text_reports/{s}_reports.csv": list(syn.REPORT_COLUMNS),
        "metadata/{s}_metadata.csv": ["VolumeName", "XYSpacing", "ZSpacing", "RescaleSlope", "RescaleIntercept",
                                      "ImagePositionPatient", "ImageOrientationPatient"],
        "multi_abnormality_labels/{s}_predicted_labels.csv": ["VolumeName", *syn.CTRATE_LABELS],
        "synthetic_ground_truth/{s}_labels.csv": ["VolumeName", *syn.FINDINGS],
    }
    assert syn.REPORT_COLUMNS == ("VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN",
                                  "Impressions_EN")
    assert len(syn.CTRATE_LABELS) == 18 and syn.CTRATE_LABELS[0] == "Medical material"
    assert syn.CTRATE_LABELS[-1] == "Interlobular septal thickening"
    n_rows = {"train": 4, "valid": 2}
    for split in ("train", "valid"):
        names = None
        for pattern, cols in expected.items():
            header, rows = read_csv(ds / pattern.format(s=split))
            assert header == cols, pattern
            assert len(rows) == n_rows[split]
            got = [r["VolumeName"] for r in rows]
            names = names or got
            assert got == names == [f"{split}_{p}_a_1.nii.gz" for p in range(1, n_rows[split] + 1)]
        # CT-RATE labels follow the synthetic ground truth.
        gt = {r["VolumeName"]: r for r in read_csv(ds / f"synthetic_ground_truth/{split}_labels.csv")[1]}
        for r in read_csv(ds / f"multi_abnormality_labels/{split}_predicted_labels.csv")[1]:
            g = {k: int(v) for k, v in gt[r["VolumeName"]].items() if k != "VolumeName"}
            assert int(r["Lung nodule"]) == int(g["nodule"] or g["mass"])
            assert int(r["Lung opacity"]) == int(g["ground_glass_opacity"] or g["consolidation"])
            assert int(r["Consolidation"]) == g["consolidation"]
            assert int(r["Pleural effusion"]) == g["pleural_effusion"]
            assert int(r["Cardiomegaly"]) == g["cardiomegaly"]
            assert int(r["Emphysema"]) == 0 and int(r["Medical material"]) == 0
    info = json.loads((dataset / "SYNTHETIC_INFO.json").read_text())
    assert info["generator_version"] == syn.GENERATOR_VERSION and info["n"] == 6
    assert info["findings"] == list(syn.FINDINGS) and info["shape"] == list(syn.DEFAULT_SHAPE)


def test_nifti_readable_with_metadata_spacing_and_rescale(dataset):
    ds = dataset / "dataset"
    info = json.loads((dataset / "SYNTHETIC_INFO.json").read_text())
    index = {c["VolumeName"]: c["case_index"] for c in info["cases"]}
    for split in ("train", "valid"):
        for m in read_csv(ds / f"metadata/{split}_metadata.csv")[1]:
            name = m["VolumeName"]
            stem = name[: -len(".nii.gz")]
            p = stem.rsplit("_", 2)[0]  # "<split>_<patient>"
            img = nib.load(str(ds / split / p / f"{p}_a" / name))
            xy = json.loads(m["XYSpacing"])
            spacing = (xy[0], xy[1], float(m["ZSpacing"]))
            assert np.allclose(img.header.get_zooms()[:3], spacing)
            assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
            assert img.get_data_dtype() == np.int16
            # scl_slope / scl_inter (header bytes 112..120) are NaN in the file itself: raw values come back.
            with gzip.open(ds / split / p / f"{p}_a" / name, "rb") as fh:
                assert np.isnan(np.frombuffer(fh.read(348)[112:120], "<f4")).all()
            raw = np.asarray(img.dataobj)
            assert raw.dtype == np.int16 and raw.min() >= 0  # stored = HU + 1024
            hu = raw * float(m["RescaleSlope"]) + float(m["RescaleIntercept"])
            case = syn.generate_case(index[name], seed=0)
            assert np.array_equal(hu, case.hu) and np.allclose(img.affine, case.affine)
            # DICOM (LPS) position of voxel 0 and direction cosines match the RAS+ affine.
            ipp = json.loads(m["ImagePositionPatient"])
            iop = json.loads(m["ImageOrientationPatient"])
            assert np.allclose(ipp, [-img.affine[0, 3], -img.affine[1, 3], img.affine[2, 3]])
            assert iop == [-1.0, 0.0, 0.0, 0.0, -1.0, 0.0]
            for kind, arr in (("anatomy", case.anatomy), ("lesions", case.lesions)):
                gt = nib.load(str(ds / "synthetic_ground_truth" / split / f"{name}_{kind}.nii.gz"))
                assert np.allclose(gt.affine, img.affine)
                assert np.array_equal(np.asarray(gt.dataobj), arr)


def test_jsonl_sentences_match_findings(dataset):
    ds = dataset / "dataset"
    for split in ("train", "valid"):
        reports = {r["VolumeName"]: r for r in read_csv(ds / f"radiology_text_reports/{split}_reports.csv")[1]}
        lines = (ds / f"synthetic_ground_truth/{split}_sentences.jsonl").read_text().splitlines()
        assert len(lines) == len(reports)
        for line in lines:
            d = json.loads(line)
            texts = [s["text"] for s in d["sentences"]]
            findings = reports[d["VolumeName"]]["Findings_EN"]
            assert " ".join(texts) == findings
            assert split_sentences(findings) == texts
            les = nib.load(str(ds / "synthetic_ground_truth" / split / f"{d['VolumeName']}_lesions.nii.gz"))
            ids = set(np.unique(np.asarray(les.dataobj)).tolist()) - {0}
            assert ids == {L["id"] for L in d["lesions"]}
            for L in d["lesions"]:
                assert set(L) >= {"id", "finding", "location", "size_mm"} and L["finding"] in syn.FINDINGS


# ------------------------------------------------------------------------------------------------ CLI, safety, cache
def test_cli_runs_and_refuses_existing(tmp_path):
    out = tmp_path / "cli"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "simcrop.data.synthetic", "--out", str(out), "--n", "3", "--seed", "1",
           "--val-fraction", "0.5", "--shape", "40", "40", "20", "--spacing", "8", "8", "16"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    ds = out / "dataset"
    assert (ds / "train/train_1/train_1_a/train_1_a_1.nii.gz").is_file()
    assert (ds / "valid/valid_1/valid_1_a/valid_1_a_1.nii.gz").is_file()  # case 1 is valid at f = 0.5
    img = nib.load(str(ds / "train/train_2/train_2_a/train_2_a_1.nii.gz"))
    assert img.shape == (40, 40, 20) and np.allclose(img.header.get_zooms(), (8, 8, 16))
    assert json.loads((out / "SYNTHETIC_INFO.json").read_text())["seed"] == 1
    assert not list(tmp_path.glob("cli.tmp-*"))
    before = tree_bytes(out)
    r2 = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r2.returncode != 0 and "non-empty" in r2.stderr
    assert tree_bytes(out) == before


def test_write_refuses_nonempty_dir_and_leaves_it_untouched(tmp_path):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="non-empty"):
        syn.write_dataset(out, n=2)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]  # no temporary directory left behind
    # An existing empty directory is fine; overwrite=True replaces a non-empty one.
    empty = tmp_path / "empty"
    empty.mkdir()
    syn.write_dataset(empty, n=1)
    assert (empty / "SYNTHETIC_INFO.json").is_file()
    syn.write_dataset(out, n=1, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "SYNTHETIC_INFO.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "existing"]


def test_ensure_default_dataset_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("SIMCROP_CACHE", str(tmp_path / "cache"))
    p = syn.ensure_default_dataset(n=3, seed=2)
    assert p == tmp_path / "cache" / f"synthetic-v{syn.GENERATOR_VERSION}-n3-s2-80x80x40"
    info = p / "SYNTHETIC_INFO.json"
    assert info.is_file() and json.loads(info.read_text())["n"] == 3
    stamp = info.stat().st_mtime_ns
    assert syn.ensure_default_dataset(n=3, seed=2) == p  # second call reuses the cache
    assert info.stat().st_mtime_ns == stamp
    q = syn.ensure_default_dataset(cache_dir=tmp_path / "other", n=2, seed=0, shape=(32, 32, 16),
                                   spacing=(10.0, 10.0, 20.0))
    assert q.parent == tmp_path / "other" and q.name.startswith(f"synthetic-v{syn.GENERATOR_VERSION}-n2-s0-32x32x16")
    assert q != p and (q / "SYNTHETIC_INFO.json").is_file()
    assert not list((tmp_path / "cache").glob("*.tmp-*"))
