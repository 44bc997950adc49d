"""Volume readers: NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr) and DICOM series (a folder of slices).

Every reader returns a `Volume`: array [X, Y, Z] float32 in the file's own axis order (values after the file's
rescale: NIfTI scl_slope/scl_inter, DICOM RescaleSlope/RescaleIntercept per slice) and `affine` [4, 4] mapping
voxel indices (i, j, k) to world millimetres in RAS+ (DICOM and NRRD are LPS: x and y are negated).
`to_ras` then permutes/flips the axes so that they point Right, Anterior, Superior (exact, no resampling).
Bad input raises `DataError` naming the file and the problem (corrupt or truncated gzip, not 3D, unreadable DICOM).
"""
from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simcrop.data.ctrate import DataError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_NRRD_SPACES = {  # NRRD "space" -> world-to-RAS sign flips
    "right-anterior-superior": (1, 1, 1), "ras": (1, 1, 1),
    "left-anterior-superior": (-1, 1, 1), "las": (-1, 1, 1),
    "left-posterior-superior": (-1, -1, 1), "lps": (-1, -1, 1),
}


@dataclass
class Volume:
    array: np.ndarray  # [X, Y, Z] float32
    affine: np.ndarray  # [4, 4] voxel index -> RAS+ mm
    path: Path

    @property
    def spacing(self) -> tuple[float, float, float]:
        return spacing_of(self.affine)


def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size (mm) along each array axis: the norms of the affine's first three columns."""
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))


def _is_gzip_error(exc: BaseException) -> bool:
    if isinstance(exc, (EOFError, zlib.error, gzip.BadGzipFile)):
        return True
    text = str(exc).lower()
    return any(s in text for s in ("gzip", "compressed file ended", "crc check", "end-of-stream"))


def _decode_error(path: Path, exc: BaseException, what: str) -> DataError:
    if _is_gzip_error(exc):
        return DataError(f"{path}: corrupt or truncated gzip ({type(exc).__name__}: {exc})")
    return DataError(f"{path}: cannot decode {what} ({type(exc).__name__}: {exc})")


def as_3d(array: np.ndarray, path: Path) -> np.ndarray:
    """Drop trailing singleton axes ([X, Y, Z, 1] -> [X, Y, Z]); DataError when the result is not 3D."""
    shape = array.shape
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise DataError(f"{path}: not a 3D volume (shape {tuple(shape)})")
    if min(array.shape) < 1:
        raise DataError(f"{path}: empty volume (shape {tuple(shape)})")
    return array


def _load_nifti(path: Path):
    """nibabel image; a .gz file is decompressed whole first so that its CRC is checked (nibabel alone reads
    only the bytes it needs and can return silently corrupted voxels)."""
    import nibabel as nib

    if not path.name.lower().endswith(".gz"):
        return nib.load(str(path))
    try:
        data = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: corrupt or truncated gzip ({type(exc).__name__}: {exc})") from exc
    try:
        return nib.Nifti1Image.from_bytes(data)
    except Exception:
        return nib.Nifti2Image.from_bytes(data)


def read_nifti(path: str | Path, scaled: bool = True) -> Volume:
    """A .nii / .nii.gz file -> Volume. scaled=False returns the raw stored values (ignores scl_slope/inter),
    for datasets whose rescale comes from elsewhere (CT-RATE's metadata CSV). The affine is the sform (or
    qform) of the header, already RAS+ (NIfTI's world space)."""
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        img = _load_nifti(path)
        shape = img.shape
        if len(shape) < 3 or any(n != 1 for n in shape[3:]):
            raise DataError(f"{path}: not a 3D volume (shape {tuple(shape)})")
        proxy = img.dataobj
        raw = proxy.get_unscaled() if (not scaled and hasattr(proxy, "get_unscaled")) else np.asarray(proxy)
        array = np.asarray(raw, dtype=np.float32)
        affine = np.asarray(img.affine, dtype=np.float64)
    except DataError:
        raise
    except Exception as exc:  # nibabel raises many types for broken files
        raise _decode_error(path, exc, "NIfTI") from exc
    return Volume(as_3d(array, path), affine, path)


def read_nrrd(path: str | Path) -> Volume:
    """A .nrrd / .nhdr file -> Volume. World space from the header's 'space' (LPS, RAS or LAS), 'space
    directions' and 'space origin'; without them: 'spacings' on the index axes, LPS assumed (ITK's default)."""
    import nrrd

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        data, header = nrrd.read(str(path))  # index order 'F': data[i, j, k] with i the fastest header axis
    except Exception as exc:
        raise _decode_error(path, exc, "NRRD") from exc
    array = as_3d(np.asarray(data), path)
    space = str(header.get("space", "left-posterior-superior")).lower()
    if space not in _NRRD_SPACES:
        raise DataError(f"{path}: unsupported NRRD space {space!r} (expected RAS, LAS or LPS)")
    dirs = header.get("space directions")
    if dirs is not None:
        dirs = np.asarray([d for d in np.asarray(dirs, dtype=np.float64) if np.all(np.isfinite(d))])
        if dirs.shape != (3, 3):
            raise DataError(f"{path}: NRRD 'space directions' do not describe 3 spatial axes ({dirs.tolist()})")
        cols = dirs.T  # columns = world step of one voxel along each index axis
    else:
        spacings = header.get("spacings")
        if spacings is None or len(spacings) < 3 or not np.all(np.isfinite(spacings[:3])):
            raise DataError(f"{path}: NRRD header has neither 'space directions' nor 'spacings' (no voxel size)")
        cols = np.diag(np.asarray(spacings[:3], dtype=np.float64))
    origin = np.asarray(header.get("space origin", np.zeros(3)), dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = cols, origin
    affine = np.diag([*_NRRD_SPACES[space], 1.0]) @ affine
    return Volume(array.astype(np.float32, copy=False), affine, path)


def _dicom_slices(folder: Path) -> list:
    import pydicom
    from pydicom.errors import InvalidDicomError

    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name.upper() != "DICOMDIR")
    slices, bad = [], []
    for f in files:
        try:
            ds = pydicom.dcmread(str(f))
        except InvalidDicomError:
            continue  # not a DICOM file (a README, a thumbnail): ignored
        except Exception as exc:
            raise DataError(f"{f}: unreadable DICOM ({type(exc).__name__}: {exc})") from exc
        if "PixelData" not in ds:
            continue
        for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            if tag not in ds:
                bad.append(f"{f.name} lacks {tag}")
        slices.append((f, ds))
    if bad:
        raise DataError(f"{folder}: unreadable DICOM series: {'; '.join(bad[:3])}")
    if not slices:
        raise DataError(f"{folder}: unreadable DICOM: no DICOM image slice in the folder")
    series = {str(getattr(ds, "SeriesInstanceUID", "")) for _, ds in slices}
    if len(series) > 1:
        raise DataError(f"{folder}: holds {len(series)} DICOM series; give one series per folder")
    return slices


def read_dicom_series(folder: str | Path) -> Volume:
    """A folder of DICOM slices of one series -> Volume.

    Slices are sorted by ImagePositionPatient projected on the slice normal (row x column direction), each
    rescaled with its own RescaleSlope/RescaleIntercept. Array axes: X = column index (along IOP[0:3], spacing
    PixelSpacing[1]), Y = row index (along IOP[3:6], spacing PixelSpacing[0]), Z = slice order (the step between
    consecutive ImagePositionPatient). Non-uniform slice steps (a missing slice) raise DataError.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: DICOM series folder not found")
    slices = _dicom_slices(folder)
    f0, ds0 = slices[0]
    iop = np.asarray(ds0.ImageOrientationPatient, dtype=np.float64)
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    pos = np.asarray([np.asarray(ds.ImagePositionPatient, dtype=np.float64) for _, ds in slices])  # [Z, 3]
    order = np.argsort(pos @ normal, kind="stable")
    slices, pos = [slices[i] for i in order], pos[order]
    dist = np.diff(pos @ normal)  # [Z-1]
    if len(dist) and np.min(np.abs(dist)) < 1e-3:
        raise DataError(f"{folder}: unreadable DICOM series: two slices share one ImagePositionPatient")
    if len(dist) and np.max(np.abs(dist - np.median(dist))) > 0.1 * np.median(dist):
        raise DataError(f"{folder}: unreadable DICOM series: non-uniform slice spacing "
                        f"({np.min(dist):.3g}..{np.max(dist):.3g} mm; a slice is missing?)")
    planes = []
    for f, ds in slices:
        try:
            px = np.asarray(ds.pixel_array, dtype=np.float32)  # [rows, cols]
        except Exception as exc:
            raise DataError(f"{f}: unreadable DICOM pixel data ({type(exc).__name__}: {exc})") from exc
        if px.ndim != 2 or px.shape != (int(ds0.Rows), int(ds0.Columns)):
            raise DataError(f"{f}: DICOM slice of shape {px.shape}, expected ({ds0.Rows}, {ds0.Columns})")
        slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
        planes.append(px.T * np.float32(slope) + np.float32(float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)))
    array = np.stack(planes, axis=-1)  # [cols, rows, slices] = [X, Y, Z]
    ps = [float(v) for v in ds0.PixelSpacing]  # (between rows, between columns)
    if len(pos) > 1:
        step = (pos[-1] - pos[0]) / (len(pos) - 1)
    else:
        step = normal * float(getattr(ds0, "SpacingBetweenSlices", 0) or getattr(ds0, "SliceThickness", 1) or 1)
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2], affine[:3, 3] = row * ps[1], col * ps[0], step, pos[0]
    return Volume(array, LPS_TO_RAS @ affine, folder)


def volume_kind(path: str | Path) -> str:
    """'nifti' | 'nrrd' | 'dicom' from the path (a folder is a DICOM series)."""
    p = Path(path)
    name = p.name.lower()
    if p.is_dir():
        return "dicom"
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if name.endswith((".nrrd", ".nhdr")):
        return "nrrd"
    if name.endswith(".dcm"):
        raise DataError(f"{p}: a single DICOM file; give the folder of the series instead")
    raise DataError(f"{p}: unknown volume format (expected .nii, .nii.gz, .nrrd, .nhdr or a DICOM folder)")


def read_volume(path: str | Path) -> Volume:
    """Any supported volume (by suffix; a folder = DICOM series) -> Volume (not yet reoriented)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    kind = volume_kind(path)
    return {"nifti": read_nifti, "nrrd": read_nrrd, "dicom": read_dicom_series}[kind](path)


def to_ras(vol: Volume) -> Volume:
    """Permute/flip the array axes so that they point (closest to) Right, Anterior, Superior; the affine is
    updated so that every voxel keeps its world position (nibabel's as_closest_canonical on arrays)."""
    from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation

    ornt = io_orientation(vol.affine)
    if np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]]):
        return vol
    array = np.ascontiguousarray(apply_orientation(vol.array, ornt))
    affine = vol.affine @ inv_ornt_aff(ornt, vol.array.shape)
    return Volume(array, affine, vol.path)


def axcodes(affine: np.ndarray) -> tuple[str, ...]:
    import nibabel as nib

    return tuple(nib.aff2axcodes(affine))


def affine_from_dicom_geometry(orientation, position, spacing) -> np.ndarray:
    """DICOM-style geometry -> RAS+ affine [4, 4] of an array [X, Y, Z].

    orientation: ImageOrientationPatient (6 LPS direction cosines: array axis 0, then axis 1); position:
    ImagePositionPatient (LPS mm of voxel [0, 0, 0]); spacing: (sx, sy, sz) mm. Axis 2 runs along the slice
    normal axis0 x axis1 (the convention of CT-RATE's metadata, see docs/data.md).
    """
    iop = np.asarray(orientation, dtype=np.float64).ravel()
    ipp = np.asarray(position, dtype=np.float64).ravel()
    if iop.shape != (6,) or ipp.shape != (3,) or not (np.all(np.isfinite(iop)) and np.all(np.isfinite(ipp))):
        raise ValueError(f"orientation needs 6 numbers and position 3, got {iop.tolist()} and {ipp.tolist()}")
    row, col = iop[:3], iop[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-2 or abs(np.linalg.norm(col) - 1) > 1e-2 or abs(row @ col) > 1e-2:
        raise ValueError(f"orientation {iop.tolist()} is not two orthonormal direction cosines")
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1] = row * spacing[0], col * spacing[1]
    affine[:3, 2], affine[:3, 3] = np.cross(row, col) * spacing[2], ipp
    return LPS_TO_RAS @ affine
