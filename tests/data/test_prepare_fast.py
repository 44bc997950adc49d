"""prepare's fast volume engine against its reference: gzip decoders, stored-dtype readers (to_float = the reference
reader's float32 values, bit for bit), resample_stored = clip -> to_ras -> resample (trilinear within float32
rounding, <= 1 HU after int16 rounding; nearest exact), and whole runs giving the same files and rejects."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from simcrop.data.errors import DataError
from simcrop.data.prepare import HU_CLIP, Settings, resample, resample_stored, run_prepare
from simcrop.data.prepared import read_jsonl
from simcrop.data.readers import Volume, gunzip, read_nifti, read_nifti_stored, read_nrrd, read_stored, to_ras

ENGINES = ("fast", "reference")


def _nifti(path: Path, array: np.ndarray, affine: np.ndarray, slope=None, inter=None) -> Path:
    img = nib.Nifti1Image(array, affine)
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    data = img.to_bytes()
    path.write_bytes(gzip.compress(data, compresslevel=1) if path.name.endswith(".gz") else data)
    return path


def _affine(perm=(0, 1, 2), signs=(1, 1, 1), spacing=(0.7, 0.8, 1.25)) -> np.ndarray:
    """Voxel axis k runs along world axis perm[k] with sign signs[k] (RAS+ world)."""
    a = np.eye(4)
    a[:3, :3] = 0
    for k, (w, s) in enumerate(zip(perm, signs)):
        a[w, k] = s * spacing[k]
    a[:3, 3] = [-40.0, 25.0, -70.0]
    return a


# ---------------------------------------------------------------------------------------------------------------
# gzip
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("decoder", ["zlib", "isal"])
def test_gunzip_decoders_same_bytes_and_errors(decoder, monkeypatch, tmp_path):
    if decoder == "isal":
        pytest.importorskip("isal")
    monkeypatch.setenv("SIMCROP_GZIP", decoder)
    payload = np.random.default_rng(0).integers(-1000, 1000, 200_000).astype(np.int16).tobytes()
    blob = gzip.compress(payload)
    assert gunzip(blob, tmp_path / "x.gz") == payload
    assert gunzip(blob + gzip.compress(b"tail"), tmp_path / "x.gz") == payload + b"tail"  # two members
    bad_crc = bytearray(blob)
    bad_crc[-8] ^= 0xFF
    for broken in (blob[: len(blob) // 2], bytes(bad_crc), b"not gzip at all"):
        with pytest.raises(DataError, match="corrupt or truncated gzip"):
            gunzip(broken, tmp_path / "x.gz")


def test_gzip_decoder_switch_is_explicit(monkeypatch, tmp_path):
    monkeypatch.setenv("SIMCROP_GZIP", "brotli")
    with pytest.raises(DataError, match="SIMCROP_GZIP"):
        gunzip(gzip.compress(b"x"), tmp_path / "x.gz")


# ---------------------------------------------------------------------------------------------------------------
# stored readers: to_float(raw) == the reference reader's array, bit for bit
# ---------------------------------------------------------------------------------------------------------------
CASES = {
    "int16": (np.int16, None, None),
    "int16-scaled": (np.int16, 2.5, -1024.0),
    "uint16-inter": (np.uint16, 1.0, -1024.0),
    "uint8": (np.uint8, None, None),
    "float32": (np.float32, None, None),
    "float64-scaled": (np.float64, 0.5, 3.0),
    "int16-bigendian": (np.dtype(">i2"), None, None),
}


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
@pytest.mark.parametrize("case", list(CASES))
def test_nifti_stored_equals_read_nifti(case, suffix, tmp_path):
    dtype, slope, inter = CASES[case]
    rng = np.random.default_rng(1)
    hi = 255 if np.dtype(dtype).itemsize == 1 else 3000
    array = (rng.uniform(0, hi, (13, 11, 7)) if np.dtype(dtype).kind != "i" else
             rng.uniform(-1024, hi, (13, 11, 7))).astype(dtype)
    path = _nifti(tmp_path / f"v{suffix}", array, _affine(signs=(-1, -1, 1)), slope, inter)
    for scaled in (True, False):
        ref = read_nifti(path, scaled=scaled)
        st = read_nifti_stored(path, scaled=scaled)
        got = st.to_float(st.raw)
        assert got.dtype == np.float32 and got.shape == ref.array.shape
        np.testing.assert_array_equal(got, ref.array)
        np.testing.assert_array_equal(st.affine, ref.affine)
        assert st.value_range() == (float(ref.array.min()), float(ref.array.max()))
        np.testing.assert_array_equal(st.to_float(st.raw[:, 3:5, 2]), ref.array[:, 3:5, 2])  # any block
        plane = np.full((13, 11), np.nan, np.float32)
        st.to_float_into(plane, st.raw[::-1, :, 4])  # a flipped view, into a C-order slice
        np.testing.assert_array_equal(plane, ref.array[::-1, :, 4])


def test_stored_4d_singleton_nan_and_nrrd(tmp_path):
    array = np.random.default_rng(2).integers(-1000, 1000, (9, 8, 6, 1)).astype(np.int16)
    path = _nifti(tmp_path / "v4.nii.gz", array, _affine())
    st = read_stored(path)
    assert st.raw.shape == (9, 8, 6)
    np.testing.assert_array_equal(st.to_float(st.raw), read_nifti(path).array)

    nan = np.zeros((9, 8, 6), np.float32)
    nan[1, 2, 3] = np.nan
    lo, hi = read_stored(_nifti(tmp_path / "nan.nii.gz", nan, _affine())).value_range()
    assert np.isnan(lo) and np.isnan(hi)

    import nrrd

    data = np.random.default_rng(3).integers(-1000, 1000, (10, 9, 5)).astype(np.int16)
    nrrd.write(str(tmp_path / "v.nrrd"), data, {"space": "left-posterior-superior", "encoding": "gzip",
                                               "space directions": np.diag([0.6, 0.6, 2.5]),
                                               "space origin": [1.0, 2.0, 3.0]})
    st, ref = read_stored(tmp_path / "v.nrrd"), read_nrrd(tmp_path / "v.nrrd")
    np.testing.assert_array_equal(st.to_float(st.raw), ref.array)
    np.testing.assert_array_equal(st.affine, ref.affine)


# ---------------------------------------------------------------------------------------------------------------
# resample_stored == clip -> to_ras -> resample
# ---------------------------------------------------------------------------------------------------------------
ORIENTATIONS = {
    "RAS": ((0, 1, 2), (1, 1, 1)),
    "LPS": ((0, 1, 2), (-1, -1, 1)),
    "LPI": ((0, 1, 2), (-1, -1, -1)),
    "sagittal": ((1, 2, 0), (1, -1, 1)),  # voxel axes along A, S, R: a permutation
    "coronal": ((0, 2, 1), (-1, 1, -1)),
}


def _reference(vol: Volume, spacing, mode):
    arr = vol.array.copy()
    if mode == "trilinear":
        np.clip(arr, *HU_CLIP, out=arr)
    ras = to_ras(Volume(arr, vol.affine, vol.path))
    return resample(ras.array, ras.affine, spacing, mode)


@pytest.mark.parametrize("orient", list(ORIENTATIONS))
@pytest.mark.parametrize("spacing", [(1.5, 1.5, 3.0), (0.45, 0.9, 0.7)])  # down- and (partly) up-sampling
def test_resample_stored_matches_reference(orient, spacing, tmp_path):
    perm, signs = ORIENTATIONS[orient]
    rng = np.random.default_rng(4)
    array = rng.integers(-1100, 1600, (37, 29, 23)).astype(np.int16)  # odd sizes; values beyond the clip
    path = _nifti(tmp_path / "v.nii.gz", array, _affine(perm, signs), 1.0, -24.0)
    ref = read_nifti(path)
    st = read_stored(path)
    want, want_aff = _reference(ref, spacing, "trilinear")
    got, got_aff = resample_stored(st, spacing, "trilinear", clip=HU_CLIP, batch=5)
    assert got.shape == want.shape and got.flags.c_contiguous and got.dtype == np.float32
    np.testing.assert_array_equal(got_aff, want_aff)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-3)  # float32 rounding of a few 1000 HU: ~1e-4
    assert np.abs(np.rint(got) - np.rint(want)).max() <= 1

    labels = rng.integers(0, 4, (37, 29, 23)).astype(np.uint8)
    mpath = _nifti(tmp_path / "m.nii.gz", labels, _affine(perm, signs))
    want_m, _ = _reference(read_nifti(mpath), spacing, "nearest-exact")
    got_m, _ = resample_stored(read_stored(mpath), spacing, "nearest-exact", batch=3)
    np.testing.assert_array_equal(got_m, want_m)  # nearest: exact


# ---------------------------------------------------------------------------------------------------------------
# whole runs: the two engines give the same files, entries and rejects
# ---------------------------------------------------------------------------------------------------------------
def _run(src, out, engine, **kw):
    return run_prepare(src, out, settings=Settings(text_encoder="none", volume_engine=engine, **kw), progress=False,
                       log=lambda *a: None)


def test_engines_same_files_and_rejects(tmp_path):
    from simcrop.data.synthetic import write_dataset

    src = write_dataset(tmp_path / "ct", n=4, seed=7)  # CT-RATE layout: metadata rescale + IOP/IPP geometry
    rng = np.random.default_rng(5)
    scans = tmp_path / "scans"
    scans.mkdir()
    vol = rng.integers(-1024, 1500, (41, 37, 19)).astype(np.int16)
    mask = (rng.uniform(size=vol.shape) > 0.7).astype(np.uint8)
    aff = _affine((0, 1, 2), (-1, -1, 1), (2.1, 2.3, 4.0))
    _nifti(scans / "a.nii.gz", vol, aff, 1.0, -20.0)
    _nifti(scans / "a_mask.nii.gz", mask, aff)
    _nifti(scans / "const.nii.gz", np.full((20, 20, 20), 7, np.int16), aff)
    nan = np.zeros((20, 20, 20), np.float32)
    nan[3, 3, 3] = np.inf
    _nifti(scans / "inf.nii.gz", nan, aff)
    (scans / "broken.nii.gz").write_bytes((scans / "a.nii.gz").read_bytes()[:300])
    rows = [{"volume": "scans/a.nii.gz", "findings": "Nodule.", "masks": {"lesion": "scans/a_mask.nii.gz"}}] + [
        {"volume": f"scans/{n}.nii.gz", "findings": "Normal."} for n in ("const", "inf", "broken")]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    for name, source in (("ctrate", src), ("manifest", tmp_path / "m.jsonl")):
        outs = {e: tmp_path / f"{name}-{e}" for e in ENGINES}
        res = {e: _run(source, outs[e], e) for e in ENGINES}
        assert res["fast"]["items"] == res["reference"]["items"] > 0
        assert [(r["name"], r["reason"]) for r in res["fast"]["rejects"]] == \
            [(r["name"], r["reason"]) for r in res["reference"]["rejects"]]
        entries = {e: read_jsonl(outs[e] / "manifest.jsonl") for e in ENGINES}
        for ef, er in zip(entries["fast"], entries["reference"]):
            strip = lambda e: {k: v for k, v in e.items() if k != "volume"}
            assert strip(ef) == strip(er)  # geometry, hu range, masks (byte for byte: same sha256)
            a = np.load(outs["fast"] / ef["volume"]["file"]).astype(np.int32)
            b = np.load(outs["reference"] / er["volume"]["file"]).astype(np.int32)
            assert a.shape == b.shape and np.abs(a - b).max() <= 1 and np.mean(a != b) < 1e-4
    reasons = {r["name"]: r["reason"] for r in res["fast"]["rejects"]}
    assert "constant volume" in reasons["const"] and "NaN or infinite" in reasons["inf"]
    assert "corrupt or truncated gzip" in reasons["broken"]


def test_engine_switch_validated_and_not_in_the_resume_key(tmp_path, monkeypatch):
    from simcrop.data.synthetic import write_dataset

    src = write_dataset(tmp_path / "ct", n=2, seed=8)
    with pytest.raises(DataError, match="volume engine"):
        _run(src, tmp_path / "out", "turbo")
    first = _run(src, tmp_path / "out", "reference")
    again = _run(src, tmp_path / "out", "fast")  # same settings key: everything is kept
    assert again["kept"] == first["prepared"] and again["prepared"] == 0
    monkeypatch.setenv("SIMCROP_PREPARE_ENGINE", "reference")
    assert Settings().volume_engine == "reference"
