"""Volume readers: NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr) and DICOM series (a folder of slices).

Every reader returns a `Volume`: array [X, Y, Z] float32 in the file's own axis order (values after the file's
rescale: NIfTI scl_slope/scl_inter, DICOM RescaleSlope/RescaleIntercept per slice) and `affine` [4, 4] mapping
voxel indices (i, j, k) to world millimetres in RAS+ (DICOM and NRRD are LPS: x and y are negated).
`to_ras` then permutes/flips the axes so that they point Right, Anterior, Superior (exact, no resampling).
Bad input raises `DataError` naming the file and the problem (corrupt or truncated gzip, not 3D, unreadable DICOM).

Voxel size: a header whose spacing is zero, NaN or absent is never read as 1 mm (nibabel alone turns
a NIfTI pixdim of 0 into 1). Every reader raises DataError "missing spacing" for it, unless `assume_spacing`
(x, y, z mm) is given: then the missing axes take those values (the axes with a valid spacing keep theirs) and
`Volume.assumed` lists the axes that were filled.

Fast path (what `prepare` uses by default; the readers above stay the reference): `read_stored` returns a
`StoredVolume`, the voxels as stored (the file's dtype, a view of the decoded bytes: no float copy of the whole
volume) with `to_float(block)`, which gives any block exactly the float32 values the reference reader's
`Volume.array` holds there. gzip is decoded by `gunzip`: python-isal (about 2x zlib) when installed, else zlib;
SIMCROP_GZIP=zlib|isal forces one (both check the CRC, both give the same bytes).
"""
from __future__ import annotations

import gzip
import io
import os
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simcrop.data.errors import DataError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_NRRD_SPACES = {  # NRRD "space" -> world-to-RAS sign flips
    "right-anterior-superior": (1, 1, 1), "ras": (1, 1, 1),
    "left-anterior-superior": (-1, 1, 1), "las": (-1, 1, 1),
    "left-posterior-superior": (-1, -1, 1), "lps": (-1, -1, 1),
}


#: a voxel size (mm) at or below this, or not finite, counts as missing
MIN_SPACING = 1e-6
_AXES = "xyz"


@dataclass
class Volume:
    array: np.ndarray  # [X, Y, Z] float32
    affine: np.ndarray  # [4, 4] voxel index -> RAS+ mm
    path: Path
    assumed: tuple[int, ...] = ()  # array axes whose spacing came from assume_spacing (the header had none)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return spacing_of(self.affine)


def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size (mm) along each array axis: the norms of the affine's first three columns."""
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))


def _usable(value) -> bool:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return False
    return np.isfinite(v) and v > MIN_SPACING


def _mm(values) -> str:
    out = []
    for v in values:
        try:
            out.append(f"{float(v):g}")
        except (TypeError, ValueError):
            out.append("none")
    return " x ".join(out)


def settle_spacing(path, what: str, spacing: Sequence, assume_spacing=None) -> tuple[list[float], tuple[int, ...]]:
    """Per-axis voxel sizes from a header (None, 0 or NaN = missing) -> (sizes, the axes filled from
    assume_spacing). DataError "missing spacing" naming the file and `what` when one is missing and nothing is
    assumed."""
    missing = tuple(k for k in range(3) if k >= len(spacing) or not _usable(spacing[k]))
    if not missing:
        return [float(v) for v in spacing[:3]], ()
    if assume_spacing is None:
        axes = ", ".join(_AXES[k] for k in missing)
        raise DataError(f"{path}: missing spacing: {what} gives a voxel size of {_mm((list(spacing) + [None] * 3)[:3])} mm "
                        f"({axes} zero or not a number); pass --assume-spacing X,Y,Z (assume_spacing=) to accept "
                        f"it at a stated size")
    return [float(assume_spacing[k]) if k in missing else float(spacing[k]) for k in range(3)], missing


def settle_affine(path, what: str, affine: np.ndarray, assume_spacing=None) -> tuple[np.ndarray, tuple[int, ...]]:
    """An affine whose columns (one voxel step per array axis) may be zero or NaN -> (affine, filled axes).

    A missing column keeps its direction when it has one, else takes the right-handed normal of the other two
    axes (or the k-th unit vector when they are missing too), scaled to assume_spacing[k]. DataError without
    assume_spacing (settle_spacing), or when the origin is not finite.
    """
    affine = np.array(affine, dtype=np.float64)
    if not np.all(np.isfinite(affine[:3, 3])):
        raise DataError(f"{path}: {what} gives a non-finite origin {affine[:3, 3].tolist()}")
    cols = affine[:3, :3]  # [3 world, 3 axes]
    norms = np.linalg.norm(cols, axis=0)  # NaN for a NaN column
    spacing, missing = settle_spacing(path, what, norms, assume_spacing)
    for k in missing:
        col = cols[:, k]
        if np.all(np.isfinite(col)) and np.linalg.norm(col) > 0:
            d = col / np.linalg.norm(col)
        else:
            i, j = (k + 1) % 3, (k + 2) % 3
            d = np.cross(cols[:, i], cols[:, j]) if i not in missing and j not in missing else np.eye(3)[k]
            d = d / np.linalg.norm(d)
        cols[:, k] = d * spacing[k]
    return affine, missing


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


def _not_pixdim_fix(record) -> bool:
    """Drops nibabel's "pixdim[1,2,3] should be non-zero; setting 0 dims to 1": the spacing rule decides instead."""
    return "setting 0 dims to 1" not in record.getMessage()


def _load_nifti(path: Path, keep_bytes: bool = False):
    """(nibabel image, the header's first 540 bytes as stored[, the decoded file]); a .gz file is decompressed whole
    first so that its CRC is checked (nibabel alone reads only the bytes it needs and can return silently corrupted
    voxels)."""
    from nibabel.imageglobals import logger

    logger.addFilter(_not_pixdim_fix)
    try:
        return _load_nifti_quiet(path, keep_bytes)
    finally:
        logger.removeFilter(_not_pixdim_fix)


def gzip_decoder() -> str:
    """The gzip decoder in use: SIMCROP_GZIP (`isal` | `zlib`), else `isal` when python-isal imports, else `zlib`.
    An explicit `isal` that cannot import raises (never a silent fallback)."""
    choice = os.environ.get("SIMCROP_GZIP", "auto").strip().lower() or "auto"
    if choice not in ("auto", "isal", "zlib"):
        raise DataError(f"SIMCROP_GZIP={choice!r}: expected auto, isal or zlib")
    if choice == "zlib":
        return "zlib"
    try:
        import isal.igzip  # noqa: F401
    except ImportError:
        if choice == "isal":
            raise DataError("SIMCROP_GZIP=isal but python-isal is not installed (pip install isal)") from None
        return "zlib"
    return "isal"


def gunzip(data: bytes, path: Path) -> bytes:
    """The decompressed bytes of a whole gzip file (every member; CRC and length checked), decoder `gzip_decoder()`.
    DataError "corrupt or truncated gzip" for a bad stream, whichever decoder."""
    try:
        if gzip_decoder() == "isal":
            from isal import igzip

            return igzip.decompress(data)
        return gzip.decompress(data)
    except DataError:
        raise
    except Exception as exc:  # zlib.error, EOFError, gzip.BadGzipFile, isal's IsalError
        raise DataError(f"{path}: corrupt or truncated gzip ({type(exc).__name__}: {exc})") from exc


def _load_nifti_quiet(path: Path, keep_bytes: bool = False):
    """(image, stored header bytes[, the whole decoded file]); keep_bytes reads an uncompressed file whole too."""
    import nibabel as nib

    if not path.name.lower().endswith(".gz"):
        if keep_bytes:
            data = path.read_bytes()
        else:
            with open(path, "rb") as f:
                head = f.read(540)
            return nib.load(str(path)), head
    else:
        data = gunzip(path.read_bytes(), path)
    try:
        img = nib.Nifti1Image.from_bytes(data)
    except Exception:
        img = nib.Nifti2Image.from_bytes(data)
    return (img, data[:540], data) if keep_bytes else (img, data[:540])


def _nifti_affine(img, head: bytes, path: Path, assume_spacing) -> tuple[np.ndarray, tuple[int, ...]]:
    """The header's affine (sform, else qform, else pixdim alone: nibabel's choice) with the spacing rule.

    nibabel fixes a pixdim[1:4] of 0 to 1 while loading, so pixdim is read from the stored bytes. With a sform
    (sform_code != 0) the voxel size is its column norms, whatever pixdim says."""
    hdr = img.header
    if int(hdr["sform_code"]) != 0:
        return settle_affine(path, "the NIfTI sform", img.affine, assume_spacing)
    raw = type(hdr).from_fileobj(io.BytesIO(head), check=False)  # as stored, before nibabel's fixes
    stored = [float(v) for v in raw["pixdim"][1:4]]
    what = f"the NIfTI header (pixdim[1:4], {'qform' if int(hdr['qform_code']) else 'no sform/qform'})"
    spacing, missing = settle_spacing(path, what, [abs(v) for v in stored], assume_spacing)
    if not missing:
        return settle_affine(path, what, img.affine, None)
    fixed = hdr.copy()
    fixed["pixdim"][1:4] = spacing
    return settle_affine(path, what, fixed.get_best_affine(), assume_spacing)[0], missing


def read_nifti(path: str | Path, scaled: bool = True, assume_spacing: Sequence[float] | None = None) -> Volume:
    """A .nii / .nii.gz file -> Volume. scaled=False returns the raw stored values (ignores scl_slope/inter),
    for datasets whose rescale comes from elsewhere (CT-RATE's metadata CSV). The affine is the sform (or
    qform) of the header, already RAS+ (NIfTI's world space). A zero/NaN voxel size: DataError "missing
    spacing", or the axes filled from assume_spacing (module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        img, head = _load_nifti(path)
        shape = img.shape
        if len(shape) < 3 or any(n != 1 for n in shape[3:]):
            raise DataError(f"{path}: not a 3D volume (shape {tuple(shape)})")
        affine, assumed = _nifti_affine(img, head, path, assume_spacing)
        proxy = img.dataobj
        raw = proxy.get_unscaled() if (not scaled and hasattr(proxy, "get_unscaled")) else np.asarray(proxy)
        array = np.asarray(raw, dtype=np.float32)
    except DataError:
        raise
    except Exception as exc:  # nibabel raises many types for broken files
        raise _decode_error(path, exc, "NIfTI") from exc
    return Volume(as_3d(array, path), affine, path, assumed)


def read_nrrd(path: str | Path, assume_spacing: Sequence[float] | None = None) -> Volume:
    """A .nrrd / .nhdr file -> Volume. World space from the header's 'space' (LPS, RAS or LAS), 'space
    directions' and 'space origin'; without them: 'spacings' on the index axes, LPS assumed (ITK's default).
    A zero/NaN direction or spacing, or neither field: DataError "missing spacing", or assume_spacing."""
    array, affine, assumed = _read_nrrd_stored(path, assume_spacing)
    return Volume(array.astype(np.float32, copy=False), affine, Path(path), assumed)


def _read_nrrd_stored(path: str | Path, assume_spacing=None) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """(array [X, Y, Z] as stored, RAS+ affine, assumed axes) of a .nrrd / .nhdr file (read_nrrd's rules)."""
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
        cols, assumed = dirs.T, ()  # columns = world step of one voxel along each index axis
        what = "the NRRD header ('space directions')"
    else:
        spacings = header.get("spacings")
        what = "the NRRD header ('spacings')" if spacings is not None else \
            "the NRRD header (neither 'space directions' nor 'spacings')"
        sizes, assumed = settle_spacing(path, what, list(spacings if spacings is not None else [])[:3],
                                        assume_spacing)
        cols = np.diag(sizes)
    origin = np.asarray(header.get("space origin", np.zeros(3)), dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = cols, origin
    affine, filled = settle_affine(path, what, affine, assume_spacing)
    assumed = assumed or filled
    affine = np.diag([*_NRRD_SPACES[space], 1.0]) @ affine
    return array, affine, assumed


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
        for tag in ("ImagePositionPatient", "ImageOrientationPatient"):  # PixelSpacing: the spacing rule
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


def _dicom_number(ds, tag: str, index: int | None = None):
    try:
        value = getattr(ds, tag, None)
        return None if value is None else float(value if index is None else value[index])
    except (TypeError, ValueError, IndexError):
        return None


def read_dicom_series(folder: str | Path, assume_spacing: Sequence[float] | None = None) -> Volume:
    """A folder of DICOM slices of one series -> Volume.

    Slices are sorted by ImagePositionPatient projected on the slice normal (row x column direction), each
    rescaled with its own RescaleSlope/RescaleIntercept. Array axes: X = column index (along IOP[0:3], spacing
    PixelSpacing[1]), Y = row index (along IOP[3:6], spacing PixelSpacing[0]), Z = slice order (the step between
    consecutive ImagePositionPatient; one slice: SpacingBetweenSlices, else SliceThickness). Non-uniform slice steps
    (a missing slice) raise DataError; a missing or zero PixelSpacing (or slice step): "missing spacing", or
    assume_spacing.
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
    # PixelSpacing = (between rows, between columns): x (along a row) is its [1], y its [0]
    sx, sy = _dicom_number(ds0, "PixelSpacing", 1), _dicom_number(ds0, "PixelSpacing", 0)
    if len(pos) > 1:
        step = (pos[-1] - pos[0]) / (len(pos) - 1)
        sz, what_z = float(np.linalg.norm(step)), "ImagePositionPatient"
    else:
        sz = _dicom_number(ds0, "SpacingBetweenSlices")
        sz = sz if _usable(sz) else _dicom_number(ds0, "SliceThickness")
        step, what_z = normal, "SpacingBetweenSlices/SliceThickness of its one slice"
    what = f"the DICOM series (PixelSpacing, {what_z})"
    (sx, sy, sz), assumed = settle_spacing(folder, what, [sx, sy, sz], assume_spacing)
    if 2 in assumed or len(pos) == 1:
        step = normal / np.linalg.norm(normal) * sz
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2], affine[:3, 3] = row * sx, col * sy, step, pos[0]
    return Volume(array, LPS_TO_RAS @ affine, folder, assumed)


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


def read_volume(path: str | Path, assume_spacing: Sequence[float] | None = None) -> Volume:
    """Any supported volume (by suffix; a folder = DICOM series) -> Volume (not yet reoriented)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    kind = volume_kind(path)
    reader = {"nifti": read_nifti, "nrrd": read_nrrd, "dicom": read_dicom_series}[kind]
    return reader(path, assume_spacing=assume_spacing)


# ---------------------------------------------------------------------------------------------------------------
# the fast path: voxels as stored, converted to float32 block by block
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class StoredVolume:
    """A volume as stored: `raw` [X, Y, Z] in the file's dtype and memory order (for NIfTI a read-only view of
    the decoded bytes, no copy), and the conversion to the reference reader's float32 values.

    `to_float(block)` of any block (a slice or view of `raw`) equals the same block of `Volume.array` of the
    matching reader (read_nifti / read_nrrd / read_dicom_series), bit for bit: the same scaling code, elementwise.
    """

    raw: np.ndarray  # [X, Y, Z] stored values (any dtype, any strides)
    affine: np.ndarray  # [4, 4] voxel index -> RAS+ mm
    path: Path
    assumed: tuple[int, ...] = ()
    scaling: Callable[[np.ndarray], np.ndarray] | None = None  # stored -> scaled (nibabel's rule); None: as is
    rescale: tuple[float, float] | None = None  # then float32 x slope + intercept (CT-RATE's metadata)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return spacing_of(self.affine)

    def to_float(self, block: np.ndarray) -> np.ndarray:
        """Stored values -> float32 (a new array unless block already is float32 and nothing is applied)."""
        out = self.scaling(block) if self.scaling is not None else block
        out = np.asarray(out, dtype=np.float32)
        if self.rescale is not None:
            out = out * np.float32(self.rescale[0]) + np.float32(self.rescale[1])
        return out

    def to_float_into(self, out: np.ndarray, block: np.ndarray) -> None:
        """out[...] = to_float(block), in one pass (convert + any layout) when nothing is applied but the cast."""
        if self.scaling is None and self.rescale is None:
            np.copyto(out, block, casting="unsafe")
        else:
            out[...] = self.to_float(block)

    def value_range(self) -> tuple[float, float]:
        """(min, max) of to_float(raw) without converting the volume: the extremes of the stored values mapped
        (every conversion is monotone and elementwise). NaN when a stored float is NaN."""
        lo, hi = self.raw.min(), self.raw.max()
        if self.raw.dtype.kind == "f" and not (np.isfinite(lo) and np.isfinite(hi)):
            bad = np.float32(np.nan) if (np.isnan(lo) or np.isnan(hi)) else np.float32(np.inf)
            return float(bad), float(bad)
        ends = self.to_float(np.array([lo, hi], dtype=self.raw.dtype))
        return float(ends.min()), float(ends.max())

    def volume(self) -> Volume:
        """The reference reader's Volume (the whole volume in float32)."""
        return Volume(self.to_float(self.raw), self.affine, self.path, self.assumed)


def _nibabel_scaling(proxy) -> Callable[[np.ndarray], np.ndarray] | None:
    """nibabel's ArrayProxy._get_scaled(dtype=None) for a block (what np.asarray(img.dataobj) applies); None for
    (1, 0), which apply_read_scaling returns unchanged."""
    from nibabel.volumeutils import apply_read_scaling

    if (proxy.slope, proxy.inter) == (1, 0):
        return None
    slope, inter = np.asanyarray(proxy.slope), np.asanyarray(proxy.inter)
    use = slope.dtype
    if np.can_cast(slope, use):
        slope = slope.astype(use)
    if np.can_cast(inter, use):
        inter = inter.astype(use)
    return lambda block: apply_read_scaling(block, slope, inter)


def read_nifti_stored(path: str | Path, scaled: bool = True,
                      assume_spacing: Sequence[float] | None = None) -> StoredVolume:
    """read_nifti's fast twin: the same header rules, affine and errors; the voxels stay as stored (a view of the
    decoded file) and `to_float` gives read_nifti's float32 values (scaled: nibabel's scl_slope/scl_inter)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        img, head, data = _load_nifti(path, keep_bytes=True)
        shape = img.shape
        if len(shape) < 3 or any(n != 1 for n in shape[3:]):
            raise DataError(f"{path}: not a 3D volume (shape {tuple(shape)})")
        affine, assumed = _nifti_affine(img, head, path, assume_spacing)
        proxy = img.dataobj
        count = int(np.prod(proxy.shape))
        raw = np.frombuffer(data, dtype=proxy.dtype, count=count, offset=int(proxy.offset))
        raw = raw.reshape(proxy.shape, order=getattr(proxy, "_order", "F"))
        scaling = _nibabel_scaling(proxy) if scaled else None
    except DataError:
        raise
    except Exception as exc:
        raise _decode_error(path, exc, "NIfTI") from exc
    return StoredVolume(as_3d(raw, path), affine, path, assumed, scaling)


def read_stored(path: str | Path, assume_spacing: Sequence[float] | None = None) -> StoredVolume:
    """read_volume's fast twin (by suffix; a folder = DICOM series): NIfTI and NRRD keep their stored dtype;
    a DICOM series is read by read_dicom_series (already float32, per-slice rescale)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    kind = volume_kind(path)
    if kind == "nifti":
        return read_nifti_stored(path, assume_spacing=assume_spacing)
    if kind == "nrrd":
        array, affine, assumed = _read_nrrd_stored(path, assume_spacing)
        return StoredVolume(array, affine, path, assumed)
    vol = read_dicom_series(path, assume_spacing)
    return StoredVolume(vol.array, vol.affine, vol.path, vol.assumed)


def to_ras(vol: Volume) -> Volume:
    """Permute/flip the array axes so that they point (closest to) Right, Anterior, Superior; the affine is
    updated so that every voxel keeps its world position (nibabel's as_closest_canonical on arrays)."""
    from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation

    ornt = io_orientation(vol.affine)
    if np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]]):
        return vol
    array = np.ascontiguousarray(apply_orientation(vol.array, ornt))
    affine = vol.affine @ inv_ornt_aff(ornt, vol.array.shape)
    assumed = tuple(sorted(int(ornt[k, 0]) for k in vol.assumed))  # source axis k lands on axis ornt[k, 0]
    return Volume(array, affine, vol.path, assumed)


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
