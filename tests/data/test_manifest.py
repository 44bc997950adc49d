"""Manifests that never fail silently (issue 13): BOM, case-insensitive columns and CT-RATE aliases, delimiter
sniffing, one-line header errors naming the file and the columns, file line numbers, zero/missing voxel size
(rejected or --assume-spacing), --no-progress silencing Hugging Face bars, the format in --help, and nothing in
--out rewritten by a failure."""
from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from simcrop.data.errors import DataError
from simcrop.data.manifest import read_manifest
from simcrop.data.prepare import SourceItem, _ctrate_volume, list_manifest
from simcrop.data.prepared import read_jsonl, read_prepared
from simcrop.data.readers import (
    read_dicom_series,
    read_nifti,
    read_nrrd,
    read_volume,
    spacing_of,
)
from simcrop.prepare import main

HU = np.random.default_rng(0).integers(-1000, 800, (24, 20, 16)).astype(np.int16)
AFFINE = np.diag([-2.0, 2.0, 4.0, 1.0])
FAST = ["--text-encoder", "none", "--no-progress", "--spacing", "4,4,8", "--min-slices", "4"]


def nifti_bytes(pixdim=None, qform_code=1, sform_code=0, array=HU, affine=AFFINE) -> bytes:
    """A NIfTI-1 file whose stored pixdim[1:4] is `pixdim` (nibabel itself refuses to save a zero pixdim)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(array.shape)
    hdr.set_data_dtype(array.dtype)
    hdr.set_qform(affine, code=qform_code)
    hdr.set_sform(affine, code=sform_code)
    raw = bytearray(nib.Nifti1Image(array, None, header=hdr).to_bytes())
    if pixdim is not None:
        raw[80:92] = struct.pack("<3f", *pixdim)  # pixdim[1..3]: float32 at byte 80 of the 348-byte header
    return bytes(raw)


def write_nifti(path: Path, **kw) -> Path:
    import gzip

    data = nifti_bytes(**kw)
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------------------------------------------
# header and keys
# ---------------------------------------------------------------------------------------------------------------
def test_excel_csv_utf8_with_bom_crlf_and_case_variants(tmp_path):
    text = "Volume,Findings,impressions,Split\r\na.nii.gz,Lungs clear.,Normal.,valid\r\n"
    (tmp_path / "m.csv").write_bytes(text.encode("utf-8-sig"))  # Excel "CSV UTF-8": BOM + CRLF
    [it] = list_manifest(tmp_path / "m.csv")
    assert it.error is None
    assert (it.source, it.findings, it.impression, it.split, it.name) == (
        str(tmp_path / "a.nii.gz"), "Lungs clear.", "Normal.", "valid", "a")


def test_ctrate_column_names_are_aliases(tmp_path):
    with open(tmp_path / "reports.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"])
        w.writerow(["train_1_a_1.nii.gz", "Cough.", "Non-contrast.", "Nodule, right upper lobe.", "Nodule."])
    [it] = list_manifest(tmp_path / "reports.csv")
    assert (it.name, it.findings, it.impression, it.error) == ("train_1_a_1", "Nodule, right upper lobe.", "Nodule.",
                                                               None)
    (tmp_path / "m.jsonl").write_text(json.dumps({"VOLUMENAME": "b.nrrd", "findings_en": "Clear.",
                                                  "Impressions_EN": "", "Labels": {"x": 1}, "Mask:lesion": "m.nrrd"})
                                      + "\n")
    [it] = list_manifest(tmp_path / "m.jsonl")
    assert (it.name, it.findings, it.labels, it.masks) == ("b", "Clear.", {"x": 1.0},
                                                           {"lesion": str(tmp_path / "m.nrrd")})


@pytest.mark.parametrize("delimiter, suffix", [(";", ".csv"), ("\t", ".csv"), ("\t", ".tsv")])
def test_delimiter_is_sniffed_from_the_header(tmp_path, delimiter, suffix):
    path = tmp_path / f"m{suffix}"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(["volume", "findings", "impression", "label:nodule"])
        w.writerow(["a.nii.gz", "Lungs clear, heart normal.", "Normal.", "1"])  # a comma inside a cell
    [it] = list_manifest(path)
    assert (it.findings, it.impression, it.labels, it.error) == ("Lungs clear, heart normal.", "Normal.",
                                                                 {"nodule": 1.0}, None)


@pytest.mark.parametrize("header, words", [
    ("volume,findings,impresion,notes", ["unknown column(s) 'impresion', 'notes'"]),
    ("file,findings", ["unknown column(s) 'file'", "missing column(s) volume"]),
    ("volume|findings|impression", ["no , ; or tab splits the header", "'volume|findings|impression'"]),
    ("volume;findings;Findings_EN", ["'findings' and 'Findings_EN' both give findings"]),
])
def test_a_header_not_understood_is_one_line_naming_file_and_columns(tmp_path, capsys, header, words):
    path = tmp_path / "m.csv"
    path.write_text(header + "\n" + ",".join(["a.nii.gz", "x", "y", "z"][: header.count(",") + 1]) + "\n")
    with pytest.raises(DataError) as exc:
        read_manifest(path)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(f"{path}:1: ")
    for w in words:
        assert w in msg, msg
    assert "columns found" in msg and "expected: volume (or path, VolumeName), findings (or Findings_EN)" in msg
    code, out, err = run(capsys, "--src", path, "--out", tmp_path / "out", *FAST)
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("simcrop.prepare: error: ")
    assert str(path) in err and not (tmp_path / "out").exists()


def test_jsonl_errors_name_file_and_line(tmp_path):
    path = tmp_path / "m.jsonl"
    good = json.dumps({"volume": "a.nii.gz", "findings": "x"})
    cases = {
        '{"volume": "b.nii.gz", "findings": "y",}': "m.jsonl:3: not JSON",
        '["b.nii.gz", "y"]': "m.jsonl:3: expected a JSON object",
        '{"volume": "b.nii.gz", "findngs": "y"}': "m.jsonl:3: unknown key(s) 'findngs'; missing key(s) findings",
        '{"volume": "b.nii.gz", "findings": "y", "findings": "z"}': "m.jsonl:3: duplicate key(s) 'findings'",
    }
    for line, words in cases.items():
        path.write_text(f"{good}\n\n{line}\n")  # the blank line 2 still counts
        with pytest.raises(DataError) as exc:
            read_manifest(path)
        assert words in str(exc.value) and "\n" not in str(exc.value), str(exc.value)


def test_not_utf8_names_the_line(tmp_path):
    (tmp_path / "m.csv").write_bytes("volume,findings\na.nii.gz,Épanchement\n".encode("cp1252"))
    with pytest.raises(DataError, match=r"m\.csv:2: not UTF-8 .*CSV UTF-8"):
        read_manifest(tmp_path / "m.csv")


def test_line_numbers_are_file_lines_where_the_record_starts(tmp_path):
    path = tmp_path / "m.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["volume", "findings", "name", "label:x", "split"])
        w.writerow(["a.nii.gz", "Line one.\nLine two.\nLine three.", "a", "1", ""])  # lines 2-4
        w.writerow(["b.nii.gz", "", "b", "", ""])  # line 5
        w.writerow(["c.nii.gz", "Multi\nline.", "a", "", ""])  # lines 6-7: duplicate of line 2
        w.writerow(["d.nii.gz", "Ok.", "d", "yes", ""])  # line 8
        w.writerow(["e.nii.gz", "Ok.", "e", "", "../up"])  # line 9
        f.write("f.nii.gz,Lungs clear, heart normal.,f,,\n")  # line 10: an unquoted comma
    items = {Path(it.source).name[0]: it for it in list_manifest(path)}
    assert items["a"].error is None and items["a"].findings == "Line one. Line two. Line three."
    assert items["b"].error == f"missing or empty report: {path}:5: findings are empty"
    assert items["c"].error == f"{path}:6: duplicate name 'a' (also line 2)"
    assert items["d"].error == f"{path}:8: label 'x': 'yes' is not a number"
    assert items["e"].error.startswith(f"{path}:9: split '../up' is not a plain name")
    assert items["f"].error.startswith(f"{path}:10: 6 cells where the header has 5")


# ---------------------------------------------------------------------------------------------------------------
# voxel size: zero or missing is never 1 mm
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_zero_or_nan_pixdim_is_missing_spacing(tmp_path, suffix):
    path = write_nifti(tmp_path / f"z{suffix}", pixdim=(0, 0, 0))
    assert nib.load(path).header.get_zooms() == (1, 1, 1)  # nibabel alone: silently 1 mm (the trap)
    with pytest.raises(DataError, match=r"missing spacing: the NIfTI header \(pixdim.*0 x 0 x 0 mm.*--assume-spacing"):
        read_nifti(path)
    vol = read_nifti(path, assume_spacing=(0.7, 0.8, 1.25))
    assert spacing_of(vol.affine) == pytest.approx((0.7, 0.8, 1.25)) and vol.assumed == (0, 1, 2)
    assert np.sign(vol.affine[0, 0]) == -1  # the qform's directions are kept
    nan = write_nifti(tmp_path / f"n{suffix}", pixdim=(2, float("nan"), 4))
    with pytest.raises(DataError, match=r"2 x nan x 4 mm \(y zero or not a number\)"):
        read_nifti(nan)
    vol = read_nifti(nan, assume_spacing=(9, 3, 9))
    assert spacing_of(vol.affine) == pytest.approx((2, 3, 4)) and vol.assumed == (1,)  # only y is assumed
    # no qform/sform at all (pixdim alone), zero z
    flat = write_nifti(tmp_path / f"f{suffix}", pixdim=(2, 2, 0), qform_code=0)
    with pytest.raises(DataError, match="no sform/qform.*z zero"):
        read_volume(flat)
    # a sform gives the voxel size whatever pixdim says
    sform = write_nifti(tmp_path / f"s{suffix}", pixdim=(0, 0, 0), qform_code=0, sform_code=2)
    assert spacing_of(read_nifti(sform).affine) == pytest.approx((2, 2, 4)) and read_nifti(sform).assumed == ()


def test_ctrate_header_without_spacing_takes_the_csv_spacing(tmp_path):
    path = write_nifti(tmp_path / "train_1_a_1.nii.gz", pixdim=(0, 0, 0))
    meta = {"slope": 1.0, "intercept": 0.0, "spacing": [0.7, 0.7, 1.5], "orientation": None, "position": None}
    vol = _ctrate_volume(SourceItem("train_1_a_1", "train", str(path), "x", ctrate=meta))
    assert spacing_of(vol.affine) == pytest.approx((0.7, 0.7, 1.5))


def test_nrrd_and_dicom_zero_or_missing_spacing(tmp_path):
    import nrrd

    nrrd.write(str(tmp_path / "s.nrrd"), HU, {"spacings": [2.0, 0.0, 4.0]})
    nrrd.write(str(tmp_path / "d.nrrd"), HU, {"space": "left-posterior-superior",
                                              "space directions": np.diag([2.0, 2.0, 0.0])})
    nrrd.write(str(tmp_path / "none.nrrd"), HU, {})
    with pytest.raises(DataError, match=r"s\.nrrd: missing spacing: the NRRD header \('spacings'\).*y zero"):
        read_nrrd(tmp_path / "s.nrrd")
    with pytest.raises(DataError, match=r"missing spacing: .*'space directions'.*z zero"):
        read_nrrd(tmp_path / "d.nrrd")
    with pytest.raises(DataError, match="missing spacing: .*neither 'space directions' nor 'spacings'"):
        read_nrrd(tmp_path / "none.nrrd")
    v = read_nrrd(tmp_path / "d.nrrd", assume_spacing=(1, 1, 3))
    assert spacing_of(v.affine) == pytest.approx((2, 2, 3)) and v.assumed == (2,)
    assert v.affine[2, 2] == pytest.approx(3)  # completed as the right-handed normal of x and y
    assert spacing_of(read_nrrd(tmp_path / "none.nrrd", assume_spacing=(1, 1, 3)).affine) == pytest.approx((1, 1, 3))

    writer = _test_readers().write_dicom_series
    writer(tmp_path / "dcm", HU[:, :, :3], spacing=(2.0, 2.0, 4.0))
    for f in (tmp_path / "dcm").iterdir():  # drop PixelSpacing from every slice
        import pydicom

        ds = pydicom.dcmread(f)
        del ds.PixelSpacing
        ds.save_as(f)
    with pytest.raises(DataError, match=r"dcm: missing spacing: the DICOM series \(PixelSpacing.*x, y zero"):
        read_dicom_series(tmp_path / "dcm")
    v = read_dicom_series(tmp_path / "dcm", assume_spacing=(0.5, 0.6, 9))
    assert spacing_of(v.affine) == pytest.approx((0.5, 0.6, 4.0)) and v.assumed == (0, 1)
    writer(tmp_path / "one", HU[:, :, :1], spacing=(2.0, 2.0, 4.0))  # one slice, no SliceThickness: no z step
    with pytest.raises(DataError, match=r"one: missing spacing: .*SliceThickness of its one slice.*z zero"):
        read_dicom_series(tmp_path / "one")


def _test_readers():
    spec = importlib.util.spec_from_file_location("_simcrop_test_readers2", Path(__file__).with_name("test_readers.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prepare_rejects_missing_spacing_unless_assumed(tmp_path, capsys):
    write_nifti(tmp_path / "ok.nii.gz")
    write_nifti(tmp_path / "zero.nii.gz", pixdim=(0, 0, 0))
    (tmp_path / "m.jsonl").write_text("".join(json.dumps({"volume": v, "findings": "Lungs clear."}) + "\n"
                                              for v in ("ok.nii.gz", "zero.nii.gz")))
    out = tmp_path / "out"
    code, stdout, _ = run(capsys, "--src", tmp_path / "m.jsonl", "--out", out, "--strict", *FAST)
    assert code == 1 and "rejected train/zero" in stdout
    [rej] = read_jsonl(out / "rejects.jsonl")
    assert rej["name"] == "zero" and rej["stage"] == "volume" and "missing spacing" in rej["reason"]
    assert [e["name"] for e in read_prepared(out)[1]] == ["ok"]
    assert main(["--src", str(tmp_path / "m.jsonl"), "--out", str(out), "--assume-spacing", "2,2,4", *FAST]) == 0
    capsys.readouterr()
    entries = {e["name"]: e for e in read_prepared(out)[1]}
    assert entries["zero"]["spacing_assumed"] == ["x", "y", "z"] and entries["zero"]["source_spacing"] == [2, 2, 4]
    assert "spacing_assumed" not in entries["ok"]
    np.testing.assert_array_equal(np.load(out / entries["zero"]["volume"]["file"]),  # the same image, stated size
                                  np.load(out / entries["ok"]["volume"]["file"]))
    assert read_jsonl(out / "rejects.jsonl") == []
    for bad in ("0,1,1", "nan,1,1", "1,1"):
        with pytest.raises(SystemExit):
            main(["--src", "x.csv", "--out", str(out), "--assume-spacing", bad])
    capsys.readouterr()


# ---------------------------------------------------------------------------------------------------------------
# the CLI: --help, --no-progress, and nothing rewritten by a failure
# ---------------------------------------------------------------------------------------------------------------
def test_help_lists_the_manifest_format(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    for words in ("VolumeName", "Findings_EN", "Impressions_EN", "label:<x>", "mask:<x>", "JSONL", "byte-order mark",
                  "--assume-spacing X,Y,Z", "exit codes"):
        assert words in out, words
    assert "\n    volume,findings,impression,split,label:nodule\n" in out  # the example keeps its lines
    assert '\n    scans/case001.nii.gz,"Nodule in the right upper lobe. Heart normal.",Nodule.,train,1\n' in out


def test_no_progress_silences_the_text_encoders_loading_bars(tmp_path, capfd):
    from simcrop.data.prepare import hf_progress_bars
    from simcrop.models.text import FrozenTextEncoder

    write_nifti(tmp_path / "a.nii.gz")
    (tmp_path / "m.csv").write_text("volume,findings\na.nii.gz,Lungs clear. Heart normal.\n")
    args = ["--src", str(tmp_path / "m.csv"), "--out", str(tmp_path / "out"), "--text-encoder", "minilm",
            "--preset", "tiny", "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--spacing", "4,4,8",
            "--min-slices", "4"]
    assert main([*args, "--no-progress"]) == 0
    err = capfd.readouterr().err
    assert "Loading" not in err and "it/s" not in err and "%|" not in err, err
    with hf_progress_bars(True):  # the control: the same load does draw a bar when bars are on
        FrozenTextEncoder("minilm", cache_dir=tmp_path / "cache")
    assert "Loading" in capfd.readouterr().err
    from transformers.utils import logging as tf_logging

    assert tf_logging.is_progress_bar_enabled()  # the state before the run was restored


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_bad_manifest_changes_nothing_already_prepared(tmp_path, capsys):
    write_nifti(tmp_path / "a.nii.gz")
    write_nifti(tmp_path / "b.nii.gz", array=HU[::-1].copy())
    good = tmp_path / "m.csv"
    good.write_text("volume,findings\na.nii.gz,Lungs clear.\nb.nii.gz,Small nodule.\n")
    out = tmp_path / "out"
    assert run(capsys, "--src", good, "--out", out, *FAST)[0] == 0
    before = _snapshot(out)
    assert {"prepare.json", "manifest.jsonl", "rejects.jsonl", "volumes/train/a.npy"} <= set(before)
    bad = {
        "unknown.csv": "volume,findings,notes\na.nii.gz,Lungs clear.,x\n",
        "semicolon.csv": "Volume;Befund\na.nii.gz;Lungs clear.\n",
        "latin1.csv": "volume,findings\na.nii.gz,Épanchement\n".encode("cp1252"),
        "broken.jsonl": '{"volume": "a.nii.gz", "findings": "x"}\n{"volume": "b.nii.gz" "findings": "y"}\n',
        "empty.csv": "",
    }
    for name, content in bad.items():
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        code, _, err = run(capsys, "--src", path, "--out", out, *FAST)
        assert code == 2 and err.count("\n") == 1 and str(path) in err, (name, err)
        assert _snapshot(out) == before, name


def test_jsonl_line_separator_inside_a_string_is_not_a_new_line(tmp_path):
    rows = [{"volume": "a.nii.gz", "findings": "One.\u2028Two."}, {"volume": "b.nii.gz", "findings": ""}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows),
                                      encoding="utf-8")
    a, b = list_manifest(tmp_path / "m.jsonl")
    assert a.error is None and b.error == f"missing or empty report: {tmp_path / 'm.jsonl'}:2: findings are empty"
