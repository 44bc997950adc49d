"""Volume readers (NIfTI, NRRD, DICOM series): HU values, RAS+ geometry, clear errors; resampling geometry."""
from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from simcrop.data.errors import DataError
from simcrop.data.prepare import resample
from simcrop.data.readers import (affine_from_dicom_geometry, axcodes, read_dicom_series, read_nifti, read_nrrd,
                                  read_volume, spacing_of, to_ras)

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def world(affine, ijk):
    return (affine @ np.r_[np.asarray(ijk, dtype=float), 1.0])[:3]


def hu_volume(shape=(12, 10, 7), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1000, 1500, size=shape).astype(np.int16)


def write_dicom_series(folder: Path, hu: np.ndarray, spacing=(0.7, 0.8, 2.5), origin_lps=(-100.0, -120.0, 30.0),
                       slope=1.0, intercept=-1024.0, shuffle=True) -> np.ndarray:
    """hu [X, Y, Z] -> one file per slice (axial, IOP row = +x LPS, col = +y LPS); returns the LPS affine."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series, study = generate_uid(), generate_uid()
    order = np.random.default_rng(1).permutation(hu.shape[2]) if shuffle else range(hu.shape[2])
    for n, k in enumerate(order):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.Modality = series, study, "CT"
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[0]
        ds.PixelSpacing = [spacing[1], spacing[0]]  # (between rows, between columns)
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [origin_lps[0], origin_lps[1], origin_lps[2] + k * spacing[2]]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        stored = np.round((hu[:, :, k].astype(np.float64) - intercept) / slope).astype(np.int16)
        ds.PixelData = np.ascontiguousarray(stored.T).tobytes()  # [rows, cols]
        ds.save_as(folder / f"IM{n:04d}.dcm", enforce_file_format=True)
    aff = np.eye(4)
    aff[:3, :3], aff[:3, 3] = np.diag(spacing), origin_lps
    return aff


def test_nifti_gz_and_nii_read_hu_and_reorient_to_ras(tmp_path):
    hu = hu_volume()
    # an LPS-like, axis-permuted affine: array axis 0 runs posterior, axis 1 left, axis 2 superior
    aff = np.array([[0, -0.8, 0, 50], [-0.7, 0, 0, 60], [0, 0, 2.5, -30], [0, 0, 0, 1.0]])
    for name in ("a.nii.gz", "a.nii"):
        img = nib.Nifti1Image(hu, aff)
        img.header.set_slope_inter(2.0, -1024.0)
        nib.save(img, tmp_path / name)
        vol = read_volume(tmp_path / name)
        assert vol.array.shape == hu.shape and vol.array.dtype == np.float32
        np.testing.assert_allclose(vol.array, hu * 2.0 - 1024)
        raw = read_nifti(tmp_path / name, scaled=False)
        np.testing.assert_array_equal(raw.array, hu)
        ras = to_ras(vol)
        assert axcodes(ras.affine) == ("R", "A", "S")
        assert ras.array.shape == (10, 12, 7)
        np.testing.assert_allclose(ras.spacing, (0.8, 0.7, 2.5))
        # every voxel keeps its world position: find voxel (3, 4, 5) of the input in the output
        target = world(vol.affine, (3, 4, 5))
        ijk = np.round(np.linalg.solve(ras.affine, np.r_[target, 1])[:3]).astype(int)
        assert ras.array[tuple(ijk)] == vol.array[3, 4, 5]


def test_nrrd_lps_is_converted_to_ras(tmp_path):
    import nrrd

    hu = hu_volume()
    dirs = np.diag([0.7, 0.8, 2.5])
    nrrd.write(str(tmp_path / "a.nrrd"), hu, {"space": "left-posterior-superior", "space directions": dirs,
                                              "space origin": np.array([-100.0, -120.0, 30.0]), "encoding": "gzip"})
    vol = read_nrrd(tmp_path / "a.nrrd")
    np.testing.assert_array_equal(vol.array, hu)
    lps = np.eye(4)
    lps[:3, :3], lps[:3, 3] = dirs, (-100, -120, 30)
    np.testing.assert_allclose(vol.affine, LPS @ lps)
    assert axcodes(vol.affine) == ("L", "P", "S")
    ras = to_ras(vol)
    assert axcodes(ras.affine) == ("R", "A", "S")
    np.testing.assert_array_equal(ras.array, hu[::-1, ::-1, :])
    np.testing.assert_allclose(world(ras.affine, (0, 0, 0)), world(vol.affine, (11, 9, 0)))


def test_dicom_series_sorted_by_position_and_rescaled(tmp_path):
    hu = hu_volume((9, 8, 6))
    lps = write_dicom_series(tmp_path / "series", hu, slope=2.0, intercept=-1000.0)
    (tmp_path / "series" / "README.txt").write_text("not a DICOM file")
    vol = read_volume(tmp_path / "series")
    np.testing.assert_allclose(vol.array, np.round((hu + 1000.0) / 2) * 2 - 1000)
    np.testing.assert_allclose(vol.affine, LPS @ lps, atol=1e-6)
    assert spacing_of(vol.affine) == pytest.approx((0.7, 0.8, 2.5))
    # the same geometry through CT-RATE's metadata convention (IOP / IPP / spacing)
    np.testing.assert_allclose(affine_from_dicom_geometry([1, 0, 0, 0, 1, 0], lps[:3, 3], (0.7, 0.8, 2.5)),
                               vol.affine, atol=1e-6)


def test_dicom_errors_name_the_problem(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="no DICOM image slice"):
        read_dicom_series(folder)
    bad = tmp_path / "bad"
    write_dicom_series(bad, hu_volume((6, 6, 4)), shuffle=False)
    victim = bad / "IM0002.dcm"
    victim.write_bytes(victim.read_bytes()[:400])  # truncated inside the header
    with pytest.raises(DataError, match="IM0002.dcm.*unreadable DICOM|unreadable DICOM"):
        read_dicom_series(bad)
    gap = tmp_path / "gap"
    write_dicom_series(gap, hu_volume((6, 6, 5)), shuffle=False)
    (gap / "IM0002.dcm").unlink()
    with pytest.raises(DataError, match="non-uniform slice spacing"):
        read_dicom_series(gap)


def test_corrupt_and_truncated_gzip_and_not_3d(tmp_path):
    nib.save(nib.Nifti1Image(hu_volume((30, 30, 20)), np.eye(4)), tmp_path / "ok.nii.gz")
    data = (tmp_path / "ok.nii.gz").read_bytes()
    (tmp_path / "truncated.nii.gz").write_bytes(data[: len(data) // 2])
    flipped = bytearray(data)
    flipped[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    (tmp_path / "corrupt.nii.gz").write_bytes(bytes(flipped))
    for name in ("truncated.nii.gz", "corrupt.nii.gz"):
        with pytest.raises(DataError, match=rf"{name}: corrupt or truncated gzip"):
            read_volume(tmp_path / name)
    (tmp_path / "garbage.nrrd").write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 4 4 4\nencoding: gzip\n\n"
                                            + gzip.compress(bytes(200))[:20])
    with pytest.raises(DataError, match="garbage.nrrd"):
        read_volume(tmp_path / "garbage.nrrd")
    nib.save(nib.Nifti1Image(np.zeros((5, 5), np.int16), np.eye(4)), tmp_path / "flat.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5, 2), np.int16), np.eye(4)), tmp_path / "4d.nii.gz")
    for name in ("flat.nii.gz", "4d.nii.gz"):
        with pytest.raises(DataError, match=rf"{name}: not a 3D volume"):
            read_volume(tmp_path / name)
    nib.save(nib.Nifti1Image(np.ones((5, 5, 5, 1), np.int16), np.eye(4)), tmp_path / "4d1.nii.gz")
    assert read_volume(tmp_path / "4d1.nii.gz").array.shape == (5, 5, 5)
    (tmp_path / "slice.png").write_bytes(b"png")
    with pytest.raises(DataError, match="slice.png: unknown volume format"):
        read_volume(tmp_path / "slice.png")


def test_resample_exact_spacing_keeps_world_positions():
    x = np.zeros((40, 30, 12), np.float32)
    x[18:22, 10:14, 5:7] = 1000.0  # a block
    aff = np.diag([0.75, 0.8, 5.0, 1.0])
    aff[:3, 3] = (-10, 20, 30)
    y, a2 = resample(x, aff, (1.5, 1.5, 3.0))
    assert spacing_of(a2) == pytest.approx((1.5, 1.5, 3.0))
    assert y.shape == (20, 16, 20)  # floor(n * old / new)
    # the block's centre of mass stays in place (world mm)
    com = lambda v, a: world(a, np.array(np.nonzero(v > 500)).mean(axis=1))  # noqa: E731
    np.testing.assert_allclose(com(y, a2), com(x, aff), atol=0.8)
    # nearest keeps labels exactly and the volume approximately
    m = (x > 0).astype(np.float32)
    mr, a3 = resample(m, aff, (1.5, 1.5, 3.0), "nearest-exact")
    np.testing.assert_allclose(a3, a2)
    assert set(np.unique(mr)) <= {0.0, 1.0}
    assert mr.sum() * 1.5 * 1.5 * 3.0 == pytest.approx(m.sum() * 0.75 * 0.8 * 5.0, rel=0.35)
