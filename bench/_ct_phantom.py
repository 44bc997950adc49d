"""Chest CT at real geometry for the data benchmarks (bench_prepare.py, bench_loader.py), made or fetched once.

- `phantom_nifti(shape, spacing)`: a .nii.gz chest phantom in HU (int16), generated slice by slice: reconstruction
  circle (-1024 outside), air with noise, a table, a body ellipse (skin, fat, muscle), two lungs at about -850 HU
  with a vessel tree, mediastinum, heart, aorta, spine and ribs (bone up to 1400 HU, so the clip to 1000 matters),
  and CT-like noise (Gaussian, sigma 12 HU in tissue, 25 HU in air, smoothed over ~1 voxel like a reconstruction
  kernel). Stored LPS-style (affine diag(-sx, -sy, sz), as CT-RATE's IOP [1,0,0,0,1,0]) so that `prepare` must
  flip x and y to reach RAS. gzip level 6 (what dcm2niix writes). At 512 x 512 x 300 the file is ~75 MB, a
  compression ratio of ~2.1 from 157 MB of int16: inside the 60-120 MB of real CT-RATE volumes of that size.
- `real_chest_ct()`: the folder holding lung{1,2}_{image,label}.nrrd of the pyradiomics 3.0.1 sdist (the same
  cache folder tests/data/test_real_ct.py fills, so the download happens once for both).
- `bench_ct_size()`: SIMCROP_BENCH_CT=real (default: 512 x 512 x 300 at 0.7 x 0.7 x 1.25 mm) or small
  (128 x 128 x 60 at 2.8 x 2.8 x 6.25 mm: same field of view, for development on a busy machine).
Everything is cached under $SIMCROP_CACHE (or ~/.cache/simcrop)/bench/. Not a benchmark itself.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

from simcrop.paths import cache_root

PHANTOM_VERSION = 1  # bump when the phantom changes (the cached files are keyed by it)
SIZES = {  # SIMCROP_BENCH_CT -> (shape [X, Y, Z], spacing mm)
    "real": ((512, 512, 300), (0.7, 0.7, 1.25)),
    "small": ((128, 128, 60), (2.8, 2.8, 6.25)),
}
PYRADIOMICS = "pyradiomics==3.0.1"
LUNG_FILES = ("lung1_image.nrrd", "lung1_label.nrrd", "lung2_image.nrrd", "lung2_label.nrrd")


def bench_ct_size() -> str:
    size = os.environ.get("SIMCROP_BENCH_CT", "real")
    if size not in SIZES:
        raise ValueError(f"SIMCROP_BENCH_CT={size!r}: expected one of {sorted(SIZES)}")
    return size


def bench_cache() -> Path:
    return (cache_root() / "bench").resolve()


def _smooth_field(shape, cells, rng) -> torch.Tensor:  # noqa: F821  (imported inside)
    """A smooth random field [X, Y, Z] in ~[-1, 1]: uniform noise on a coarse grid, trilinearly upsampled."""
    import torch
    import torch.nn.functional as F

    coarse = torch.from_numpy(rng.uniform(-1, 1, size=cells).astype(np.float32))[None, None]
    return F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)[0, 0]


def _slice(nx, ny, z, sx, sy, vessels, rng) -> np.ndarray:
    """One axial slice [X, Y] in HU (float32); z in [0, 1] from feet to head; x runs right -> left (LPS)."""
    fov = nx * sx  # mm
    x = (np.arange(nx, dtype=np.float32) + 0.5) * sx - fov / 2  # [X] mm, 0 at the centre
    y = (np.arange(ny, dtype=np.float32) + 0.5) * sy - ny * sy / 2  # [Y] mm, posterior positive (LPS rows)
    X, Y = np.meshgrid(x, y, indexing="ij")  # [X, Y]
    hu = np.full((nx, ny), -1000.0, np.float32)  # air
    noise_sigma = np.full((nx, ny), 60.0, np.float32)  # before the kernel: 22 HU after
    # table under the patient (posterior), a curved slab of plastic + foam
    table = (Y > 0.36 * fov) & (Y < 0.36 * fov + 12 + 0.002 * X**2 / fov * 100)
    hu[table] = -300 + 200 * (np.abs(X[table]) % 20 < 3)
    # body: an ellipse whose size changes with z (shoulders wider at the top, abdomen at the bottom)
    a = 0.42 * fov * (0.85 + 0.15 * np.sin(np.pi * z))  # half width (x)
    b = 0.30 * fov * (0.9 + 0.1 * np.cos(2 * np.pi * z))  # half depth (y)
    r = (X / a) ** 2 + (Y / b) ** 2
    body = r < 1
    hu[body] = -100  # subcutaneous fat
    noise_sigma[body] = 40  # 15 HU after the kernel
    muscle = r < (1 - 18 / a) ** 2
    hu[muscle] = 45
    # lungs: two ellipses, present over the upper 75 % of the volume, largest in the middle
    lz = np.clip(np.sin(np.pi * np.clip((z - 0.2) / 0.8, 0, 1)), 0, 1) ** 0.5
    for side in (-1, 1):
        la, lb = 0.33 * a * lz, 0.72 * b * lz
        if la < 2:
            continue
        lung = ((X - side * 0.45 * a) / max(la, 1e-3)) ** 2 + ((Y + 0.05 * b) / max(lb, 1e-3)) ** 2 < 1
        v = vessels[lung]  # smooth field in [0, 1]: vessels on one of its level sets, parenchyma varies with it
        hu[lung] = np.where(np.abs(v - 0.5) < 0.02, 40.0, -860 + 80 * (v - 0.5))
    # mediastinum + heart (lower half of the lungs), aorta
    heart = ((X + 0.08 * a) / (0.3 * a)) ** 2 + ((Y + 0.25 * b) / (0.35 * b)) ** 2 < (1 if 0.25 < z < 0.6 else 0)
    hu[heart] = 40
    aorta = (X + 0.05 * a) ** 2 + (Y - 0.35 * b) ** 2 < (0.09 * b) ** 2
    hu[aorta & body] = 50
    # spine: vertebral body (cancellous 300, cortical shell 1400); discs every ~25 mm
    sy0 = 0.62 * b
    sr = np.sqrt(X**2 + (Y - sy0) ** 2)
    disc = (z * 375) % 25 < 5
    hu[sr < 18] = 80 if disc else 300
    if not disc:
        hu[(sr >= 15) & (sr < 18)] = 1400
    # ribs: a ring just inside the body wall, segmented every 25 mm in z
    if (z * 375) % 25 < 10:
        ring = (r > (1 - 24 / a) ** 2) & (r < (1 - 16 / a) ** 2) & (Y > -0.5 * b)
        hu[ring] = 900
    hu += noise_sigma * rng.standard_normal((nx, ny), dtype=np.float32)
    # reconstruction kernel: a light 3-tap smoothing per axis (correlated noise, as in real CT)
    hu[1:-1] = 0.25 * hu[:-2] + 0.5 * hu[1:-1] + 0.25 * hu[2:]
    hu[:, 1:-1] = 0.25 * hu[:, :-2] + 0.5 * hu[:, 1:-1] + 0.25 * hu[:, 2:]
    hu[X**2 + Y**2 > (fov / 2) ** 2] = -1024  # outside the reconstruction circle
    return hu


def phantom_volume(shape=(512, 512, 300), spacing=(0.7, 0.7, 1.25), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(HU int16 [X, Y, Z] in Fortran order, as nibabel stores it; affine [4, 4], LPS-style diag(-sx, -sy, sz))."""
    nx, ny, nz = shape
    sx, sy, sz = spacing
    rng = np.random.default_rng(seed)
    # lung texture and vessels (a level set of the field: thin branching curves in each slice), ~8 mm cells
    cells = tuple(max(4, int(n * s / 8)) for n, s in zip(shape, spacing))
    field = _smooth_field(shape, cells, rng)  # [X, Y, Z]
    field = (field - field.min()) / (field.max() - field.min())
    out = np.empty(shape, dtype=np.int16, order="F")
    for k in range(nz):
        hu = _slice(nx, ny, (k + 0.5) / nz, sx, sy, field[:, :, k].numpy(), rng)
        out[:, :, k] = np.clip(np.rint(hu), -1024, 3071)
    affine = np.diag([-sx, -sy, sz, 1.0])
    affine[:3, 3] = [nx * sx / 2, ny * sy / 2, -nz * sz / 2]  # LPS-style: origin at the patient's right-anterior
    return out, affine


def write_nifti_gz(path: Path, array: np.ndarray, affine: np.ndarray, level: int = 6) -> Path:
    """array -> path (.nii.gz), gzip `level`, written atomically."""
    import gzip

    import nibabel as nib

    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm")
    img.header.set_sform(affine, code=1)
    img.header.set_qform(affine, code=1)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_bytes(gzip.compress(img.to_bytes(), compresslevel=level, mtime=0))
    os.replace(tmp, path)
    return path


def phantom_nifti(size: str | None = None, seed: int = 0) -> Path:
    """The cached phantom .nii.gz of SIZES[size] (default: bench_ct_size()); generated on first use."""
    size = size or bench_ct_size()
    shape, spacing = SIZES[size]
    folder = bench_cache() / f"phantom-v{PHANTOM_VERSION}"
    path = folder / f"chest_{'x'.join(map(str, shape))}_seed{seed}.nii.gz"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        array, affine = phantom_volume(shape, spacing, seed)
        write_nifti_gz(path, array, affine)
    return path


def real_chest_ct() -> Path | None:
    """Folder with lung{1,2}_{image,label}.nrrd (pyradiomics 3.0.1 sdist, fetched once), None when PyPI is out of
    reach. Shares tests/data/test_real_ct.py's cache folder."""
    base = (cache_root() / "pyradiomics-3.0.1").resolve()
    folder = base / "data"
    if all((folder / f).is_file() for f in LUNG_FILES):
        return folder
    base.mkdir(parents=True, exist_ok=True)
    dl = base / f"download-{os.getpid()}"
    try:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                               PYRADIOMICS, "-d", str(dl), "-q", "--disable-pip-version-check"],
                              capture_output=True, text=True, timeout=600)
        sdists = sorted(dl.glob("pyradiomics-3.0.1.tar.gz"))
        if proc.returncode != 0 or not sdists:
            return None
        tmp = base / f"data.tmp-{os.getpid()}"
        tmp.mkdir(exist_ok=True)
        with tarfile.open(sdists[0]) as tar:
            for f in LUNG_FILES:
                (tmp / f).write_bytes(tar.extractfile(tar.getmember(f"pyradiomics-3.0.1/data/{f}")).read())
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except subprocess.TimeoutExpired:
        return None
    finally:
        shutil.rmtree(dl, ignore_errors=True)
    return folder
