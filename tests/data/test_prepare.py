"""python -m simcrop.prepare: CT-RATE layout and manifests, rejects with reasons, --strict, resume (verify + redo),
atomic files, cached text features (rebuilt when the encoder changes), spawn workers."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from simcrop.config import make_config
from simcrop.data.pretrain import SampleSpec
from simcrop.data.prepare import Settings, run_prepare
from simcrop.data.prepared import PreparedPretrainDataset, prepared_corpus, read_jsonl, read_prepared, sha256_file
from simcrop.data.readers import axcodes, spacing_of
from simcrop.data.synthetic import write_dataset
from simcrop.prepare import main

SPACING = "3,3,6"  # coarser than the default 1.5,1.5,3 to keep the tests fast (tests/data/test_real_ct.py: default)
BAD = {  # name -> expected words of the reason
    "train_1267_a_4": "corrupt or truncated gzip",
    "train_90_a_1": "constant volume",
    "train_91_a_1": "NaN",
    "train_92_a_1": "too few slices",
    "train_93_a_1": "missing or empty report",
    "train_94_a_1": "missing spacing",
    "train_95_a_1": "missing report",
    "train_96_a_1": "not a 3D volume",
    "train_97_a_1": "file not found",
}


def _append(csv_path: Path, row: dict) -> None:
    with open(csv_path, newline="", encoding="utf-8") as f:
        columns = next(csv.reader(f))
    with open(csv_path, "a", newline="", encoding="utf-8") as f:
        csv.DictWriter(f, fieldnames=columns).writerow({c: row.get(c, "") for c in columns})


def _add_item(ds: Path, name: str, data: np.ndarray | bytes | None, report=True, meta=True, findings="Lungs clear."):
    p = name.split("_")
    folder = ds / "train" / f"train_{p[1]}" / f"train_{p[1]}_{p[2]}"
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        (folder / f"{name}.nii.gz").write_bytes(data)
    elif data is not None:
        nib.save(nib.Nifti1Image(data, np.diag([4.0, 4.0, 8.0, 1.0])), folder / f"{name}.nii.gz")
    if report:
        _append(ds / "radiology_text_reports" / "train_reports.csv",
                {"VolumeName": f"{name}.nii.gz", "Findings_EN": findings, "Impressions_EN": "Normal."})
    if meta:
        _append(ds / "metadata" / "train_metadata.csv",
                {"VolumeName": f"{name}.nii.gz", "XYSpacing": "[4.0, 4.0]", "ZSpacing": "8.0", "RescaleSlope": "1",
                 "RescaleIntercept": "-1024", "ImagePositionPatient": "[158.0, 158.0, -156.0]",
                 "ImageOrientationPatient": "[-1, 0, 0, 0, -1, 0]"})


@pytest.fixture(scope="module")
def ctrate(tmp_path_factory) -> Path:
    """Synthetic CT-RATE (5 train + 1 valid) plus one bad train item per reject reason."""
    root = write_dataset(tmp_path_factory.mktemp("src") / "ctrate", n=6, seed=5)
    ds = root / "dataset"
    good = (ds / "train" / "train_1" / "train_1_a" / "train_1_a_1.nii.gz").read_bytes()
    _add_item(ds, "train_1267_a_4", good[: len(good) // 2])
    _add_item(ds, "train_90_a_1", np.full((40, 40, 30), 1024, np.int16))
    nan = np.zeros((40, 40, 30), np.float32)
    nan[3, 3, 3] = np.nan
    _add_item(ds, "train_91_a_1", nan)
    _add_item(ds, "train_92_a_1", np.random.default_rng(0).integers(0, 2000, (40, 40, 3)).astype(np.int16))
    _add_item(ds, "train_93_a_1", good, findings="")
    _add_item(ds, "train_94_a_1", good, meta=False)
    _add_item(ds, "train_95_a_1", good, report=False, meta=False)
    _add_item(ds, "train_96_a_1", np.zeros((40, 40), np.int16))
    _add_item(ds, "train_97_a_1", None)
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def args(src, out, cache, *extra):
    return ["--src", str(src), "--out", str(out), "--spacing", SPACING, "--text-encoder", "tiny-bert",
            "--preset", "tiny", "--cache-dir", str(cache), "--no-progress", *extra]


@pytest.fixture(scope="module")
def prepared(ctrate, cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prep") / "out"
    assert main(args(ctrate, out, cache)) == 0  # rejects do not fail a run without --strict
    return out


def test_ctrate_items_and_rejects(prepared, ctrate, cache, tmp_path):
    info, entries = read_prepared(prepared)
    names = sorted(e["name"] for e in entries)
    assert names == ["train_1_a_1", "train_2_a_1", "train_3_a_1", "train_4_a_1", "train_5_a_1", "valid_1_a_1"]
    rejects = {r["name"]: r for r in read_jsonl(prepared / "rejects.jsonl")}
    assert set(rejects) == set(BAD)
    for name, words in BAD.items():
        assert words in rejects[name]["reason"], (name, rejects[name]["reason"])
    assert "known undecodable" in rejects["train_1267_a_4"]["reason"]
    assert "train_1267_a_4.nii.gz" in rejects["train_1267_a_4"]["reason"]  # the file is named
    assert info["counts"] == {"items": 6, "kept": 0, "prepared": 6, "rejected": len(BAD)}
    e = next(x for x in entries if x["name"] == "train_2_a_1")
    vol = np.load(prepared / e["volume"]["file"])
    assert vol.dtype == np.int16 and vol.flags.c_contiguous and list(vol.shape) == e["volume"]["shape"]
    assert vol.shape == (106, 106, 53)  # 80 x 80 x 40 at 4 x 4 x 8 mm -> 3 x 3 x 6 mm
    assert -1000 <= vol.min() and vol.max() <= 1000
    assert axcodes(np.array(e["affine"])) == ("R", "A", "S") and spacing_of(np.array(e["affine"])) == (3, 3, 6)
    # the synthetic header and the metadata CSV agree: the volume matches the source resampled by hand
    src = nib.load(e["source"])
    assert np.allclose(np.array(e["affine"])[:3, 3], src.affine[:3, 3] + 0.5 * (np.array([3, 3, 6]) - [4, 4, 8]))
    assert e["labels"]["Cardiomegaly"] in (0.0, 1.0) and e["findings"]
    # --strict turns rejects into exit code 1 (a rerun: everything is kept)
    assert main(args(ctrate, prepared, cache, "--strict")) == 1
    assert main(args(tmp_path / "nowhere", tmp_path / "o", cache)) == 2


def test_resume_keeps_verified_items_and_redoes_broken_ones(prepared, ctrate, cache, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(prepared, out)
    _, entries = read_prepared(out)
    files = {e["name"]: out / e["volume"]["file"] for e in entries}
    digests = {n: sha256_file(p) for n, p in files.items()}
    mtimes = {n: p.stat().st_mtime_ns for n, p in files.items()}
    res = run_prepare(ctrate, out, settings=_settings(cache), progress=False, log=lambda *a: None)
    assert (res["kept"], res["prepared"]) == (6, 0)
    assert {n: p.stat().st_mtime_ns for n, p in files.items()} == mtimes
    # a damaged file (same size), an item missing from the manifest (killed before the manifest was rewritten),
    # a half-written temporary file
    raw = bytearray(files["train_2_a_1"].read_bytes())
    raw[-100:] = bytes(100)
    files["train_2_a_1"].write_bytes(bytes(raw))
    rows = [r for r in read_jsonl(out / "manifest.jsonl") if r["name"] != "train_3_a_1"]
    (out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp = files["train_4_a_1"].with_name("train_4_a_1.npy.tmp-999")
    tmp.write_bytes(b"half")
    res = run_prepare(ctrate, out, settings=_settings(cache), progress=False, log=lambda *a: None)
    assert (res["kept"], res["prepared"]) == (4, 2)
    assert not tmp.exists()
    assert {n: sha256_file(p) for n, p in files.items()} == digests  # deterministic redo
    assert all(e["text"] and e["feats"] for e in read_prepared(out)[1])


def _settings(cache, **kw) -> Settings:
    base = dict(spacing=(3.0, 3.0, 6.0), text_encoder="tiny-bert", findings_max_len=112, report_max_len=128,
                max_sentences=16, cache_dir=str(cache))
    return Settings(**{**base, **kw})


def test_cached_text_matches_the_encoder_and_is_rebuilt_when_it_changes(prepared, ctrate, cache, tmp_path):
    from simcrop.models.text import FrozenTextEncoder
    from simcrop.models.text import TextFeatures

    info, entries = read_prepared(prepared)
    enc = FrozenTextEncoder("tiny-bert", cache_dir=cache, corpus=prepared_corpus(prepared))
    assert info["text"]["encoder_id"] == enc.name
    cfg = make_config("tiny", text_encoder="tiny-bert")
    ds = PreparedPretrainDataset(prepared, enc.tokenizer, SampleSpec.from_config(cfg), train=True,
                                 encoder_name=enc.name)
    assert ds.use_cache
    batch = torch.utils.data.default_collate([ds[(i, 0)] for i in range(3)])
    ref = TextFeatures(enc).encode(batch["findings_ids"], batch["findings_mask"])  # [B, Lf, H]
    m = batch["findings_mask"][..., None]
    assert batch["findings_feats"].shape == ref.shape and batch["findings_feats"].dtype == torch.float32
    torch.testing.assert_close(batch["findings_feats"] * m, ref * m, atol=2e-3 * ref.abs().max(), rtol=1e-3)
    # tokens from the cache == tokens made by the reference path
    ref_ds = PreparedPretrainDataset(prepared, enc.tokenizer, SampleSpec.from_config(cfg), use_cache="off")
    assert not ref_ds.use_cache
    for i in range(3):
        a, b = ds[(i, 1)], ref_ds[(i, 1)]
        assert set(a) - set(b) == {"findings_feats"}
        for k in b:
            assert torch.equal(a[k], b[k]), k
    # another encoder: volumes kept, text rebuilt (and the stale cache not used by the dataset meanwhile)
    out = tmp_path / "copy"
    shutil.copytree(prepared, out)
    res = run_prepare(ctrate, out, settings=_settings(cache, text_encoder="minilm"), progress=False,
                      log=lambda *a: None)
    assert (res["kept"], res["prepared"]) == (6, 0)
    info2, entries2 = read_prepared(out)
    assert info2["text"]["encoder_id"] != info["text"]["encoder_id"] and info2["text"]["hidden_size"] == 384
    assert all(e["feats"]["shape"][1] == 384 for e in entries2)
    assert not (out / "text_corpus.json").exists()
    why = PreparedPretrainDataset(out, enc.tokenizer, SampleSpec.from_config(cfg), encoder_name=enc.name)
    assert not why.use_cache


def _manifest_inputs(tmp: Path) -> list[dict]:
    """A NIfTI (non-RAS affine), an NRRD (LPS) and a DICOM folder, with masks, plus bad rows."""
    import nrrd

    write_dicom_series = _test_readers().write_dicom_series
    rng = np.random.default_rng(0)
    hu = rng.integers(-1000, 800, (48, 40, 20)).astype(np.int16)
    mask = np.zeros(hu.shape, np.uint8)
    mask[20:30, 15:25, 8:14] = 1
    aff = np.array([[0, -2.0, 0, 50], [-2.0, 0, 0, 60], [0, 0, 4.0, -30], [0, 0, 0, 1.0]])
    nib.save(nib.Nifti1Image(hu, aff), tmp / "a.nii.gz")
    nib.save(nib.Nifti1Image(mask, aff), tmp / "a_mask.nii.gz")
    hdr = {"space": "left-posterior-superior", "space directions": np.diag([2.0, 2.0, 4.0]),
           "space origin": np.array([10.0, 20.0, 30.0])}
    nrrd.write(str(tmp / "b.nrrd"), hu, hdr)
    nrrd.write(str(tmp / "b_label.nrrd"), mask, hdr)
    write_dicom_series(tmp / "c_dicom", hu, spacing=(2.0, 2.0, 4.0))
    return [
        {"volume": "a.nii.gz", "findings": "Nodule in the right upper lobe. Heart normal.", "impression": "Nodule.",
         "labels": {"nodule": 1}, "masks": {"lesion": "a_mask.nii.gz"}},
        {"volume": "b.nrrd", "name": "b", "findings": "Lungs clear.", "impression": "", "split": "valid",
         "masks": {"lesion": "b_label.nrrd"}},
        {"volume": "c_dicom", "findings": "Small effusion on the left. No nodule.", "impression": "Effusion."},
        {"volume": "", "findings": "no volume"},
        {"volume": "a.nii.gz", "findings": "Duplicate."},
        {"volume": "missing.nii.gz", "findings": "Missing file."},
        {"volume": "b.nrrd", "name": "b2", "findings": "  "},
    ]


def _test_readers():
    """tests/data/test_readers.py as a module (its DICOM writer)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_simcrop_test_readers", Path(__file__).with_name("test_readers.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_manifest_csv_and_jsonl_with_workers(tmp_path, cache):
    rows = _manifest_inputs(tmp_path)
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with open(tmp_path / "m.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["volume", "name", "split", "findings", "impression", "label:nodule",
                                          "mask:lesion"])
        w.writeheader()
        for r in rows:
            w.writerow({"volume": r["volume"], "name": r.get("name", ""), "split": r.get("split", ""),
                        "findings": r["findings"], "impression": r.get("impression", ""),
                        "label:nodule": r.get("labels", {}).get("nodule", ""),
                        "mask:lesion": r.get("masks", {}).get("lesion", "")})
    outs = {}
    for fmt, workers in (("jsonl", 2), ("csv", 0)):  # 2 spawned worker processes, and in-process
        out = tmp_path / f"out_{fmt}"
        code = main(["--src", str(tmp_path / f"m.{fmt}"), "--out", str(out), "--text-encoder", "none",
                     "--workers", str(workers), "--no-progress", "--min-slices", "8"])
        assert code == 0
        info, entries = read_prepared(out)
        assert info["text"] is None
        outs[fmt] = {e["name"]: e for e in entries}
        rejects = {r["reason"].split(":")[-1].strip()[:20] for r in read_jsonl(out / "rejects.jsonl")}
        assert len(read_jsonl(out / "rejects.jsonl")) == 4, rejects
    a, b = outs["jsonl"], outs["csv"]
    assert sorted(a) == ["a", "b", "c_dicom"] and a["b"]["split"] == "valid"
    for name in a:
        assert a[name]["volume"]["sha256"] == b[name]["volume"]["sha256"]  # workers or not, JSONL or CSV
    assert a["a"]["labels"] == {"nodule": 1.0} == b["a"]["labels"]
    # the three encodings of one image give one prepared volume where their geometry agrees (NRRD/DICOM: LPS)
    out = tmp_path / "out_jsonl"
    vb, vc = (np.load(out / a[n]["volume"]["file"]) for n in ("b", "c_dicom"))
    np.testing.assert_array_equal(vb, vc)
    for e in a.values():
        assert axcodes(np.array(e["affine"])) == ("R", "A", "S")
        assert spacing_of(np.array(e["affine"])) == pytest.approx((1.5, 1.5, 3.0))
    # a rerun after a report changed: volumes kept, the manifest carries the new text
    rows[0]["findings"] = "A new finding."
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = run_prepare(tmp_path / "m.jsonl", out, settings=Settings(text_encoder="none", min_slices=8),
                      progress=False, log=lambda *x: None)
    assert (res["kept"], res["prepared"]) == (3, 0)
    assert {e["name"]: e for e in read_prepared(out)[1]}["a"]["findings"] == "A new finding."
    for n in ("a", "b"):
        m = a[n]["masks"]["lesion"]
        mask = np.load(out / m["file"])
        assert mask.dtype == np.uint8 and list(mask.shape) == a[n]["volume"]["shape"]
        assert m["voxels"] * 1.5 * 1.5 * 3.0 == pytest.approx(m["source_voxels"] * 2 * 2 * 4, rel=0.15)
