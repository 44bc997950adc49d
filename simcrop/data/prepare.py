"""Raw CT + reports -> the prepared format (simcrop/data/prepared.py, docs/data.md); CLI in simcrop/prepare.py.

Inputs: CT-RATE's layout (spacing, rescale, origin and direction from the metadata CSV; the file headers were
unreliable) or a manifest (simcrop/data/manifest.py; CSV or JSONL: volume, findings, impression; optional name,
split, labels, masks). A header without a voxel size is rejected unless Settings.assume_spacing states one.
Per volume (a worker process): read -> HU -> reorient to RAS+ -> clip to [-1000, 1000] -> resample to the target
spacing (trilinear; masks nearest) -> int16 .npy; Settings.volume_engine 'fast' (default: stored dtype, slice by
slice, no whole-volume float or reorienting copy; resample_stored) or 'reference' (the steps as written).
Per report (main process, batched): tokens + sentence ids and the frozen text encoder's token features of the
findings. Resumable: an item whose files match the manifest's
size + sha256 and whose inputs/settings are unchanged is kept; everything else is redone. Every file is written
atomically (tmp + os.replace); every bad input ends in rejects.jsonl with its reason.
"""
from __future__ import annotations

import collections
import contextlib
import fcntl
import gc
import hashlib
import io
import itertools
import json
import math
import multiprocessing
import os
import re
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from simcrop.checkpoint import atomic_write_bytes
from simcrop.paths import cache_root
from simcrop.data.ctrate import (METADATA_COLUMNS, REPORT_COLUMNS, _float, _xy_spacing, dataset_dir, read_csv, volume_path)
from simcrop.data.errors import DataError
from simcrop.data.manifest import read_manifest
from simcrop.data.prepared import (CORPUS_FILE, FORMAT, FORMAT_VERSION, INFO_FILE, MANIFEST_FILE, REJECTS_FILE,
                                   read_jsonl, verify_file)
from simcrop.data.readers import (StoredVolume, Volume, affine_from_dicom_geometry, read_nifti, read_nifti_stored,
                                   read_stored, read_volume, spacing_of, to_ras)

HU_CLIP = (-1000.0, 1000.0)
#: CT-RATE volumes that public loaders skip because they do not decode; they are rejected like any broken file.
CTRATE_KNOWN_UNDECODABLE = frozenset({"train_1267_a_4", "train_11755_a_3", "train_11755_a_4"})
_SUBDIRS = ("volumes", "masks", "text", "feats")


@dataclass(frozen=True)
class Settings:
    spacing: tuple[float, float, float] = (1.5, 1.5, 3.0)  # mm (x, y, z) of the prepared volumes
    min_slices: int = 16  # fewer slices (Z) after resampling -> rejected
    text_encoder: str = "minilm"  # '' or 'none': volumes only
    findings_max_len: int = 512
    report_max_len: int = 512
    max_sentences: int = 32
    feats_dtype: str = "float16"  # cached findings features: float16 | float32
    trust_remote_code: bool = False
    cache_dir: str = ""  # where tiny-bert is built ('' = $SIMCROP_CACHE or ~/.cache/simcrop)
    # voxel size (x, y, z mm) for the axes whose header spacing is zero or missing; None: such volumes are rejected
    assume_spacing: tuple[float, float, float] | None = None
    # per-volume engine: 'fast' (stored dtype, plane by plane: no whole-volume float copy, no reorienting copy) or
    # 'reference' (read_volume -> to_ras -> resample); same files within 1 HU (tests/data/test_prepare_fast.py).
    # Not part of the resume key. Default from SIMCROP_PREPARE_ENGINE, else 'fast'.
    volume_engine: str = field(default_factory=lambda: os.environ.get("SIMCROP_PREPARE_ENGINE", "fast"))

    def volume_dict(self) -> dict:
        d = {"spacing": list(self.spacing), "hu_clip": list(HU_CLIP), "min_slices": self.min_slices,
             "image": "clip, then trilinear (torch F.interpolate, align_corners=False, exact scale)",
             "mask": "nearest (F.interpolate 'nearest-exact', same grid)", "dtype": "int16",
             "layout": "[X, Y, Z] RAS+, C-order"}
        if self.assume_spacing is not None:  # only when set: the keys of folders prepared without it stay valid
            d["assume_spacing"] = list(self.assume_spacing)
        return d


@dataclass
class SourceItem:
    """One input volume with its report; `error` is set when it is known to be bad before decoding."""

    name: str
    split: str
    source: str  # volume path (a folder for DICOM)
    findings: str = ""
    impression: str = ""
    labels: dict = field(default_factory=dict)
    masks: dict = field(default_factory=dict)  # mask name -> path (same grid as the volume)
    ctrate: dict | None = None  # slope, intercept, spacing, orientation, position (CT-RATE metadata)
    error: str | None = None


# ---------------------------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------------------------
def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name).strip("._") or "item"


def _stem(path: str) -> str:
    name = Path(path.rstrip("/")).name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _text(value) -> str:
    if not isinstance(value, str):
        return ""
    value = " ".join(value.split())
    return "" if value.lower() in ("nan", "none") else value


def _number_list(text: str) -> list[float] | None:
    nums = re.findall(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?", text or "")
    return [float(v) for v in nums] or None


def list_ctrate(src: Path, splits: Iterable[str] | None = None) -> list[SourceItem]:
    """CT-RATE's layout -> SourceItems of the splits (default: those with a reports CSV), bad rows flagged."""
    ds = dataset_dir(src)
    splits = list(splits or [s for s in ("train", "valid")
                             if (ds / "radiology_text_reports" / f"{s}_reports.csv").is_file()])
    if not splits:
        raise DataError(f"{ds / 'radiology_text_reports'}: no train_reports.csv or valid_reports.csv")
    items = []
    for split in splits:
        rep_csv = ds / "radiology_text_reports" / f"{split}_reports.csv"
        meta_csv = ds / "metadata" / f"{split}_metadata.csv"
        lab_csv = ds / "multi_abnormality_labels" / f"{split}_predicted_labels.csv"
        reports = read_csv(rep_csv, REPORT_COLUMNS)
        meta = read_csv(meta_csv, METADATA_COLUMNS) if meta_csv.is_file() else {}
        labels = read_csv(lab_csv, ("VolumeName",)) if lab_csv.is_file() else {}
        for vname, row in reports.items():
            item = SourceItem(safe_name(_stem(vname)), split, "", _text(row.get("Findings_EN")),
                              _text(row.get("Impressions_EN")))
            try:
                item.source = str(volume_path(ds, split, vname))
                item.labels = {k: _float(lab_csv, vname, k, v) for k, v in labels.get(vname, {}).items()
                               if k != "VolumeName"}
                if not item.findings:
                    raise DataError(f"missing or empty report: {rep_csv}: Findings_EN is empty")
                if vname not in meta:
                    raise DataError(f"missing spacing: no row for {vname} in {meta_csv}")
                m = meta[vname]
                try:
                    sx, sy = _xy_spacing(meta_csv, vname, m["XYSpacing"])
                    sz = _float(meta_csv, vname, "ZSpacing", m["ZSpacing"])
                    if sz <= 0:
                        raise DataError(f"{meta_csv}: {vname}: ZSpacing {sz} is not positive")
                except DataError as exc:
                    raise DataError(f"missing spacing: {exc}") from None
                item.ctrate = {
                    "slope": _float(meta_csv, vname, "RescaleSlope", m["RescaleSlope"]),
                    "intercept": _float(meta_csv, vname, "RescaleIntercept", m["RescaleIntercept"]),
                    "spacing": [sx, sy, sz],
                    "orientation": _number_list(m.get("ImageOrientationPatient", "")),
                    "position": _number_list(m.get("ImagePositionPatient", "")),
                }
            except DataError as exc:
                item.error = str(exc)
            items.append(item)
        listed = {it.source for it in items}
        for path in sorted((ds / split).rglob("*.nii*")) if (ds / split).is_dir() else []:
            if str(path) not in listed and path.name.endswith((".nii", ".nii.gz")):
                items.append(SourceItem(safe_name(_stem(path.name)), split, str(path),
                                        error=f"missing report: no row for {path.name} in {rep_csv}"))
    return items


def list_manifest(path: Path) -> list[SourceItem]:
    """A CSV/JSONL manifest (simcrop/data/manifest.py) -> SourceItems (relative paths are relative to the
    manifest's folder); bad rows flagged with their file line. DataError (one line) for a header/key or JSON
    syntax it does not understand, before anything is written."""
    base, items, seen = path.parent, [], {}
    for row in read_manifest(path):
        n, vol = row.line, row.volume.strip()
        item = SourceItem(
            safe_name(row.name or _stem(vol) or f"line{n}"), row.split or "train", str(base / vol) if vol else "",
            _text(row.findings), _text(row.impression), dict(row.labels),
            {k: str(base / v) for k, v in row.masks.items()},
        )
        key = (item.split, item.name)
        if row.error:
            item.error = row.error
        elif not vol:
            item.error = f"{path}:{n}: no volume path"
        elif not item.findings:
            item.error = f"missing or empty report: {path}:{n}: findings are empty"
        elif key in seen:
            item.error = f"{path}:{n}: duplicate name {item.name!r} (also line {seen[key]})"
        seen.setdefault(key, n)
        items.append(item)
    return items


def detect_format(src: Path) -> str:
    if src.is_file():
        return "manifest"
    if (src / "dataset").is_dir() or (src / "radiology_text_reports").is_dir():
        return "ctrate"
    raise DataError(f"{src}: neither CT-RATE's layout (dataset/...) nor a manifest file (.csv/.jsonl)")


# ---------------------------------------------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------------------------------------------
def target_grid(shape, affine: np.ndarray, spacing) -> tuple[list[int], np.ndarray, np.ndarray]:
    """resample()'s output grid: (shape [X', Y', Z'], scale = old / new spacing per axis, affine')."""
    old = np.asarray(spacing_of(affine))
    new = np.asarray(spacing, dtype=np.float64)
    scale = old / new
    out_shape = [int(math.floor(n * s)) for n, s in zip(shape, scale)]
    if min(out_shape) < 1:
        raise DataError(f"volume of shape {tuple(shape)} at {old.tolist()} mm has no voxel at {new.tolist()} mm")
    dirs = affine[:3, :3] / old  # unit direction of each array axis
    out = np.eye(4)
    out[:3, :3] = dirs * new
    out[:3, 3] = affine[:3, 3] + dirs @ (0.5 * (new - old))  # centre of the new first voxel
    return out_shape, scale, out


def resample(array: np.ndarray, affine: np.ndarray, spacing, mode: str = "trilinear") -> tuple[np.ndarray, np.ndarray]:
    """[X, Y, Z] -> ([X', Y', Z'] float32, affine') at exactly `spacing` mm along the array axes.

    torch F.interpolate with scale_factor = old / new spacing (not recomputed), align_corners=False: the first
    voxel's outer edge stays put, X' = floor(X * scale), and output voxel j samples input coordinate
    (j + 0.5) / scale - 0.5. mode 'trilinear' for images, 'nearest-exact' for label masks (the same grid).
    """
    import torch
    import torch.nn.functional as F

    _, scale, out = target_grid(array.shape, affine, spacing)
    x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]  # [1, 1, X, Y, Z]
    kw = {"align_corners": False} if mode == "trilinear" else {}
    y = F.interpolate(x, scale_factor=tuple(float(s) for s in scale), mode=mode, recompute_scale_factor=False, **kw)
    return y[0, 0].numpy(), out


def _linear_taps(n_in: int, n_out: int, scale_factor: float):
    """torch's linear taps along one axis (UpSampleKernel: align_corners=False, the given scale): output j reads
    i0[j], i1[j] with weights w0[j], w1[j] (float32). src = float32(1 / scale_factor) * (j + 0.5) - 0.5 in one
    rounding (the compiled kernel fuses the multiply-add), clamped at 0; i1 = i0 + 1 except at the last voxel."""
    scale = np.float32(1.0 / scale_factor)
    j = (np.arange(n_out, dtype=np.float32) + np.float32(0.5)).astype(np.float64)
    src = np.maximum((np.float64(scale) * j - 0.5).astype(np.float32), np.float32(0))  # [n_out]
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    w1 = np.minimum(np.maximum(src - i0.astype(np.float32), np.float32(0)), np.float32(1))
    return i0, np.where(i0 < n_in - 1, i0 + 1, i0), np.float32(1) - w1, w1


def _nearest_taps(n_in: int, n_out: int, scale_factor: float) -> np.ndarray:
    """torch's 'nearest-exact' source index: min(floorf((j + 0.5) * float32(1 / scale_factor)), n_in - 1)."""
    scale = np.float64(np.float32(1.0 / scale_factor))
    src = ((np.arange(n_out, dtype=np.float64) + 0.5) * scale).astype(np.float32)
    return np.minimum(np.floor(src).astype(np.int64), n_in - 1)


def _blend(p0: np.ndarray, w0: np.float32, p1: np.ndarray, w1: np.float32) -> np.ndarray:
    """float32 p0 * w0 + p1 * w1 rounded as torch's linear kernel does (p1 * w1 rounded, then one fused
    multiply-add of p0 * w0: emulated in float64)."""
    out = p0.astype(np.float64)
    out *= np.float64(w0)
    out += p1 * w1
    return out.astype(np.float32)


def resample_stored(vol: StoredVolume, spacing, mode: str = "trilinear", clip: tuple[float, float] | None = None,
                    batch: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """The fast twin of `clip -> to_ras -> resample`: ([X', Y', Z'] float32 C-order, affine') on the same grid.

    No whole-volume copy: the RAS+ orientation is a view of the stored voxels; for each output slice (RAS z) the
    two source slices it reads are converted to float32 (vol.to_float, then clipped: clip-then-interpolate, as the
    reference), blended along z with torch's taps and rounding, and `batch` slices at a time are resized in
    (x, y) by torch F.interpolate (bilinear / nearest-exact, the same scale factors). Trilinear = the three 1D
    interpolations in torch's nesting order (z innermost), so the result equals `resample` up to float32
    rounding in the last bit (in most geometries bit for bit; after rounding to int16 HU at most 1 apart, on
    about 1e-5 of the voxels); 'nearest-exact' is exact.
    """
    import torch
    import torch.nn.functional as F
    from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation

    ornt = io_orientation(vol.affine)
    if np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]]):  # as to_ras: the same affine object, no product
        view, affine = vol.raw, vol.affine
    else:
        view = apply_orientation(vol.raw, ornt)  # [X, Y, Z] RAS+: a view (flips + transpose), no copy
        affine = vol.affine @ inv_ornt_aff(ornt, vol.raw.shape)
    (mx, my, mz), scale, out_affine = target_grid(view.shape, affine, spacing)
    nx, ny, nz = view.shape
    cache: dict[int, np.ndarray] = {}

    def source_slice(k: int) -> np.ndarray:  # [X, Y] float32 C-order, clipped
        if k not in cache:
            if len(cache) > 2:
                cache.pop(min(cache))
            p = np.empty((nx, ny), dtype=np.float32)
            vol.to_float_into(p, view[:, :, k])
            if clip is not None:
                np.clip(p, clip[0], clip[1], out=p)
            cache[k] = p
        return cache[k]

    if mode == "trilinear":
        i0, i1, w0, w1 = _linear_taps(nz, mz, float(scale[2]))
        kw = {"mode": "bilinear", "align_corners": False}
    elif mode == "nearest-exact":
        i0 = _nearest_taps(nz, mz, float(scale[2]))
        kw = {"mode": "nearest-exact"}
    else:
        raise ValueError(f"mode {mode!r}: expected 'trilinear' or 'nearest-exact'")
    out = np.empty((mx, my, mz), dtype=np.float32)  # [X', Y', Z']
    planes = np.empty((min(batch, mz), 1, nx, ny), dtype=np.float32)  # [B, 1, X, Y] z-interpolated slices
    for k0 in range(0, mz, batch):
        ks = range(k0, min(k0 + batch, mz))
        for b, k in enumerate(ks):
            if mode == "trilinear":
                planes[b, 0] = _blend(source_slice(int(i0[k])), w0[k], source_slice(int(i1[k])), w1[k])
            else:
                planes[b, 0] = source_slice(int(i0[k]))
        xy = F.interpolate(torch.from_numpy(planes[: len(ks)]), scale_factor=(float(scale[0]), float(scale[1])),
                           recompute_scale_factor=False, **kw)  # [B, 1, X', Y']
        out[:, :, k0 : k0 + len(ks)] = xy[:, 0].permute(1, 2, 0).numpy()
    return out, out_affine


def _ctrate_affine(meta: dict, header_affine: np.ndarray) -> np.ndarray:
    sp = np.asarray(meta["spacing"], dtype=np.float64)
    try:
        return affine_from_dicom_geometry(meta["orientation"], meta["position"], sp)
    except (TypeError, ValueError):
        affine = header_affine.copy()
        affine[:3, :3] = affine[:3, :3] / np.asarray(spacing_of(header_affine)) * sp
        return affine


def _ctrate_volume(item: SourceItem) -> Volume:
    """Raw stored values x slope + intercept; geometry from the metadata CSV (direction from the NIfTI header
    only when the CSV has no ImageOrientationPatient / ImagePositionPatient)."""
    meta = item.ctrate
    # the CSV's spacing is the truth; it also completes a header whose own spacing is zero (directions kept)
    vol = read_nifti(item.source, scaled=False, assume_spacing=meta["spacing"])
    hu = vol.array * np.float32(meta["slope"]) + np.float32(meta["intercept"])
    return Volume(hu, _ctrate_affine(meta, vol.affine), vol.path)


def _ctrate_stored(item: SourceItem) -> StoredVolume:
    """_ctrate_volume's fast twin: the stored voxels, to_float = float32 x slope + intercept, the same affine."""
    meta = item.ctrate
    vol = read_nifti_stored(item.source, scaled=False, assume_spacing=meta["spacing"])
    return StoredVolume(vol.raw, _ctrate_affine(meta, vol.affine), vol.path, (), None,
                        (float(meta["slope"]), float(meta["intercept"])))


def _source_stat(path: str) -> list:
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file())
        return [len(files), sum(f.stat().st_size for f in files), max((f.stat().st_mtime_ns for f in files), default=0)]
    st = p.stat()
    return [st.st_size, st.st_mtime_ns]


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def write_file(root: Path, rel: str, data: bytes, **extra) -> dict:
    """Atomically write root/rel; its manifest record {file, bytes, sha256, **extra}."""
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)
    return {"file": rel, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), **extra}


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------
# one volume (runs in a worker process: top-level, picklable arguments, spawn-safe)
# ---------------------------------------------------------------------------------------------------------------
def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def process_volume(job: dict) -> dict:
    """{'item', 'out', 'settings', 'previous', 'verify'} -> {'status': 'kept'|'done', 'entry'} or
    {'status': 'rejected', 'reason'}. Never raises for bad input."""
    item, root = SourceItem(**job["item"]), Path(job["out"])
    try:
        return _process_volume(item, root, job["settings"], job.get("previous"), job.get("verify", "sha256"))
    except DataError as exc:
        reason = str(exc)
    except MemoryError:
        reason = "out of memory while decoding/resampling"
    except Exception as exc:  # any decoder failure is the input's problem, reported with its type
        reason = f"{item.source}: cannot process ({type(exc).__name__}: {exc})"
    if item.name in CTRATE_KNOWN_UNDECODABLE and item.ctrate is not None:
        reason += " (a known undecodable CT-RATE volume)"
    return {"status": "rejected", "reason": reason}


VOLUME_ENGINES = ("fast", "reference")


def _engine(settings: dict) -> str:
    engine = settings.get("volume_engine", "fast")
    if engine not in VOLUME_ENGINES:
        raise ValueError(f"volume_engine {engine!r}: expected one of {', '.join(VOLUME_ENGINES)}")
    return engine


def _process_volume(item: SourceItem, root: Path, settings: dict, previous: dict | None, verify: str) -> dict:
    if not Path(item.source).exists():
        raise DataError(f"{item.source}: file not found")
    key = _key({"settings": Settings(**settings).volume_dict(), "ctrate": item.ctrate,
                "stat": _source_stat(item.source), "masks": {k: [v, _source_stat(v)] if Path(v).exists() else v
                                                             for k, v in item.masks.items()}})
    if previous and previous.get("key") == key:
        records = [previous["volume"], *previous.get("masks", {}).values()]
        if all(verify_file(root, r, full=verify == "sha256") is None for r in records):
            report = {"source": item.source, "findings": item.findings, "impression": item.impression,
                      "labels": item.labels}  # may have changed without the volume changing
            return {"status": "kept", "entry": {**previous, **report}}
    assume = settings.get("assume_spacing")
    target = tuple(settings["spacing"])
    fast = _engine(settings) == "fast"
    if fast:  # stored dtype, plane by plane (resample_stored); same checks, same messages
        vol = _ctrate_stored(item) if item.ctrate is not None else read_stored(item.source, assume)
        src_shape, src_spacing, src_affine = vol.raw.shape, vol.spacing, vol.affine
        lo, hi = vol.value_range()
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise DataError(f"{item.source}: volume contains NaN or infinite values")
    else:  # the reference: the whole volume in float32, reoriented by a copy, then resampled
        vol = _ctrate_volume(item) if item.ctrate is not None else read_volume(item.source, assume)
        src_shape, src_spacing, src_affine = vol.array.shape, vol.spacing, vol.affine
        if not np.all(np.isfinite(vol.array)):
            raise DataError(f"{item.source}: volume contains NaN or infinite values")
        lo, hi = float(vol.array.min()), float(vol.array.max())
    if lo == hi:
        raise DataError(f"{item.source}: constant volume (every voxel is {lo:g})")
    if fast:
        hu, affine = resample_stored(vol, target, "trilinear", clip=HU_CLIP)
    else:
        np.clip(vol.array, *HU_CLIP, out=vol.array)
        ras = to_ras(vol)
        hu, affine = resample(ras.array, ras.affine, target, "trilinear")
        ras_affine = ras.affine
        del ras
    assumed = vol.assumed
    del vol  # the decoded source is not needed any more (masks are read one at a time below)
    if hu.shape[2] < settings["min_slices"]:
        raise DataError(f"{item.source}: too few slices: {hu.shape[2]} after resampling to {target[2]} mm "
                        f"(minimum {settings['min_slices']}; source {src_shape[2] if len(src_shape) > 2 else '?'} "
                        f"slices of {src_spacing[2]:.3g} mm)")
    np.clip(hu, *HU_CLIP, out=hu)
    hu = np.rint(hu, out=hu).astype(np.int16)  # [X, Y, Z] RAS+
    entry = {
        "name": item.name, "split": item.split, "source": item.source, "key": key,
        "volume": write_file(root, f"volumes/{item.split}/{item.name}.npy", _npy_bytes(hu),
                             shape=list(hu.shape), dtype="int16"),
        "spacing": list(target), "affine": np.round(affine, 6).tolist(),
        "source_shape": list(src_shape), "source_spacing": [round(s, 6) for s in src_spacing],
        "hu_range": [int(hu.min()), int(hu.max())],
        "findings": item.findings, "impression": item.impression, "labels": item.labels,
    }
    if assumed and item.ctrate is None:  # source axes whose spacing came from --assume-spacing
        entry["spacing_assumed"] = ["xyz"[k] for k in assumed]
    masks = {}
    for mname, mpath in item.masks.items():
        m = read_stored(mpath, assume) if fast else read_volume(mpath, assume)
        m_shape = m.raw.shape if fast else m.array.shape
        if m_shape != src_shape or not np.allclose(m.affine, src_affine, atol=1e-3 * max(src_spacing)):
            raise DataError(f"{mpath}: mask geometry {m_shape} differs from the volume's {src_shape} "
                            f"(or its affine does)")
        if fast:  # on the volume's grid (its affine), as the reference resamples with the volume's RAS affine
            grid = StoredVolume(m.raw, src_affine, m.path, m.assumed, m.scaling, m.rescale)
            mr, _ = resample_stored(grid, target, "nearest-exact")
            source_voxels = sum(int(np.count_nonzero(m.to_float(m.raw[:, :, k]))) for k in range(m_shape[2]))
        else:
            mr, _ = resample(to_ras(m).array, ras_affine, target, "nearest-exact")
            source_voxels = int(np.count_nonzero(m.array))
        dtype = np.uint8 if mr.min() >= 0 and mr.max() <= 255 else np.int16
        rel = f"masks/{item.split}/{item.name}.{safe_name(mname)}.npy"
        masks[mname] = write_file(root, rel, _npy_bytes(mr.astype(dtype)), shape=list(mr.shape),
                                  dtype=np.dtype(dtype).name, voxels=int(np.count_nonzero(mr)),
                                  source_voxels=source_voxels)
    if masks:
        entry["masks"] = masks
    return {"status": "done", "entry": entry}


# ---------------------------------------------------------------------------------------------------------------
# reports: tokens and cached findings features (main process, the encoder loaded once)
# ---------------------------------------------------------------------------------------------------------------
def _text_key(encoder_id: str, s: Settings, e: dict) -> str:
    return _key([encoder_id, s.findings_max_len, s.report_max_len, s.max_sentences, s.feats_dtype,
                 e["findings"], e["impression"]])


def _tokens(tokenizer, e: dict, s: Settings) -> dict[str, np.ndarray]:
    from simcrop.data.text import tokenize_findings, tokenize_report

    f = tokenize_findings(tokenizer, e["findings"], s.findings_max_len, s.max_sentences)
    r = tokenize_report(tokenizer, e["findings"], e["impression"], s.report_max_len)
    n, m = int(f["attention_mask"].sum()), int(r["attention_mask"].sum())
    return {"findings_ids": f["input_ids"][:n].numpy().astype(np.int32),  # [n]
            "sentence_ids": f["sentence_ids"][:n].numpy().astype(np.int32),  # [n]
            "report_ids": r["input_ids"][:m].numpy().astype(np.int32)}  # [m]


def prepare_text(root: Path, entries: dict, s: Settings, device: str, progress: bool, log: Callable,
                 flush: Callable, batch_size: int = 32) -> tuple[dict | None, list[dict]]:
    """Tokens + findings features for every entry that lacks valid ones; returns (text info, rejects)."""
    import torch

    from simcrop.models.text import FrozenTextEncoder, resolve_text_encoder, text_encoder_id

    if s.text_encoder.lower() in ("", "none") or not entries:
        for e in entries.values():
            e.pop("text", None), e.pop("feats", None)
        return None, []
    cache = cache_root(s.cache_dir)
    corpus = None
    if s.text_encoder == "tiny-bert":
        corpus = [f"{e['findings']} {e['impression']}".strip() for e in _ordered(entries) if e["split"] == "train"]
        atomic_write_bytes(root / CORPUS_FILE, json.dumps(corpus).encode())
    elif (root / CORPUS_FILE).exists():
        (root / CORPUS_FILE).unlink()
    encoder_id = text_encoder_id(s.text_encoder, resolve_text_encoder(s.text_encoder, cache, corpus))
    todo = []
    for e in _ordered(entries):
        tk = _text_key(encoder_id, s, e)
        ok = (e.get("text", {}).get("key") == tk and e.get("feats", {}).get("key") == tk
              and verify_file(root, e["text"]) is None and verify_file(root, e["feats"]) is None)
        if not ok:
            todo.append((e, tk))
    if not todo:
        return {"encoder": s.text_encoder, "encoder_id": encoder_id, "hidden_size": _hidden(root, entries),
                **_lens(s)}, []
    enc = FrozenTextEncoder(s.text_encoder, cache_dir=cache, corpus=corpus, trust_remote_code=s.trust_remote_code)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    enc.to(dev)
    if enc.name != encoder_id:
        raise DataError(f"text encoder {s.text_encoder!r} loaded as {enc.name!r}, resolved as {encoder_id!r}")
    log(f"text: {len(todo)} report(s) to tokenise and encode with {enc.name} on {dev}")
    rejects, tokens = [], []
    for e, tk in todo:
        try:
            tokens.append((e, tk, _tokens(enc.tokenizer, e, s)))
        except ValueError as exc:
            rejects.append({"name": e["name"], "split": e["split"], "source": e["source"], "stage": "text",
                            "reason": f"{e['source']}: report: {exc}"})
            entries.pop((e["split"], e["name"]))
    tokens.sort(key=lambda t: len(t[2]["findings_ids"]))
    from tqdm import tqdm

    bar = tqdm(total=len(tokens), desc="text", disable=not progress, dynamic_ncols=True, file=sys.stderr)
    last = time.monotonic()
    for b in range(0, len(tokens), batch_size):
        chunk = tokens[b : b + batch_size]
        L = max(len(t[2]["findings_ids"]) for t in chunk)
        ids = torch.full((len(chunk), L), int(enc.pad_token_id), dtype=torch.long)  # [B, L]
        mask = torch.zeros(len(chunk), L, dtype=torch.long)
        for i, (_, _, tok) in enumerate(chunk):
            ids[i, : len(tok["findings_ids"])] = torch.from_numpy(tok["findings_ids"].astype(np.int64))
            mask[i, : len(tok["findings_ids"])] = 1
        feats = enc(ids.to(dev), mask.to(dev)).float().cpu().numpy()  # [B, L, H]
        for i, (e, tk, tok) in enumerate(chunk):
            n = len(tok["findings_ids"])
            buf = io.BytesIO()
            np.savez(buf, **tok)
            e["text"] = write_file(root, f"text/{e['split']}/{e['name']}.npz", buf.getvalue(), key=tk,
                                   findings_len=n, report_len=len(tok["report_ids"]),
                                   n_sentences=int(tok["sentence_ids"].max()))
            f = feats[i, :n].astype(s.feats_dtype)  # [n, H]
            e["feats"] = write_file(root, f"feats/{e['split']}/{e['name']}.npy", _npy_bytes(f), key=tk,
                                    shape=list(f.shape), dtype=s.feats_dtype, encoder=enc.name)
        bar.update(len(chunk))
        if time.monotonic() - last > 30:
            flush()
            last = time.monotonic()
    bar.close()
    return {"encoder": s.text_encoder, "encoder_id": encoder_id, "hidden_size": enc.hidden_size, **_lens(s)}, rejects


@contextlib.contextmanager
def hf_progress_bars(enabled: bool):
    """enabled=False: within, Hugging Face's own bars (transformers' "Loading weights", huggingface_hub's
    downloads) are off, and their previous state is restored after; enabled=True leaves them as they are."""
    if enabled:
        yield
        return
    import warnings

    import huggingface_hub.utils as hub
    from transformers.utils import logging as tf_logging

    was_tf, was_hub_off = tf_logging.is_progress_bar_enabled(), hub.are_progress_bars_disabled()
    tf_logging.disable_progress_bar()  # also disables huggingface_hub's
    try:
        yield
    finally:
        if was_tf:
            with warnings.catch_warnings():  # hub warns when HF_HUB_DISABLE_PROGRESS_BARS forbids enabling
                warnings.simplefilter("ignore")
                tf_logging.enable_progress_bar()
        if not was_hub_off:
            hub.enable_progress_bars()
        elif not hub.are_progress_bars_disabled():
            hub.disable_progress_bars()


def _lens(s: Settings) -> dict:
    return {"findings_max_len": s.findings_max_len, "report_max_len": s.report_max_len,
            "max_sentences": s.max_sentences, "feats_dtype": s.feats_dtype}


def _hidden(root: Path, entries: dict) -> int | None:
    for e in entries.values():
        return int(e["feats"]["shape"][1])
    return None


def _ordered(entries: dict) -> list[dict]:
    return [entries[k] for k in sorted(entries)]


# ---------------------------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------------------------
def _atomic_write_jsonl(path: Path, rows: Iterable[dict], chunk: int = 4096) -> None:
    """Write one JSON object per line to `path` through a temporary file + fsync + rename (as
    atomic_write_bytes), `chunk` rows at a time: no copy of the whole file in memory (50,000 manifest entries are
    ~30 MB of text, held twice by a join + encode)."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    rows = iter(rows)
    with open(tmp, "wb") as f:
        while block := list(itertools.islice(rows, chunk)):
            f.write(_jsonl_bytes(block))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _jsonl_bytes(rows: Iterable[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def _lock(root: Path):
    fh = open(root / ".prepare.lock", "w")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        raise DataError(f"{root}: another `python -m simcrop.prepare` is writing this folder") from None
    return fh


class _GcPause:
    """Python's cyclic GC off for the bookkeeping of a run (its rows are acyclic JSON: refcounting frees them).

    A full collection re-scans every live object, and a run holds a few dozen per item (manifest rows, entries,
    jobs), so with 50,000 items the collections alone grew faster than linearly in n (bench/bench_prepare.py
    -k scale). `tick()` collects the young generations only (cheap) every 256 items, for garbage cycles of the
    in-process volume work; `resumed()` turns it back on for the text phase (model loading); __exit__ restores it.
    """

    def __init__(self):
        self.was, self.n = gc.isenabled(), 0

    def __enter__(self) -> _GcPause:
        gc.disable()
        return self

    def __exit__(self, *exc) -> None:
        if self.was:
            gc.enable()

    def tick(self, every: int = 256) -> None:
        self.n += 1
        if self.n % every == 0:
            gc.collect(1)

    @contextlib.contextmanager
    def resumed(self):
        if self.was:
            gc.enable()
        try:
            yield
        finally:
            gc.disable()


class _Flusher:
    """Rewrites the manifest: `flush()` now, `flush.due()` when `every` seconds passed since the last write, where
    `every` = max(30 s, 20 x the last write's duration). The whole manifest is rewritten each time (atomically),
    so a fixed interval would cost O(n) per write and O(n^2) per run; this keeps the writes under 5 % of the run."""

    def __init__(self, write: Callable[[], None], every: float = 30.0):
        self.write, self.min_every, self.every = write, every, every
        self.last = time.monotonic()

    def __call__(self) -> None:
        t = time.monotonic()
        self.write()
        self.last = time.monotonic()
        self.every = max(self.min_every, 20 * (self.last - t))

    def due(self) -> None:
        if time.monotonic() - self.last > self.every:
            self()


def _remove_unreferenced(root: Path, entries: dict) -> int:
    """Delete temporary leftovers and files of items no longer in the manifest (only in prepare's subfolders)."""
    keep = set()
    for e in entries.values():
        for rec in (e.get("volume"), e.get("text"), e.get("feats"), *e.get("masks", {}).values()):
            if rec:
                keep.add(rec["file"])
    n = 0
    for sub in _SUBDIRS:
        for p in (root / sub).rglob("*") if (root / sub).is_dir() else []:
            if p.is_file() and str(p.relative_to(root)) not in keep:
                p.unlink()
                n += 1
    return n


def run_prepare(src: str | Path, out: str | Path, fmt: str = "auto", settings: Settings = Settings(),
                workers: int = 0, splits: Iterable[str] | None = None, verify: str = "sha256",
                device: str = "auto", progress: bool = True, log: Callable = print, limit: int = 0) -> dict:
    """Prepare `src` into `out` (resuming what is there); returns counts and the list of rejects."""
    with _GcPause() as gc_pause:
        return _run_prepare(src, out, fmt, settings, workers, splits, verify, device, progress, log, limit, gc_pause)


def _run_prepare(src, out, fmt, settings, workers, splits, verify, device, progress, log, limit,
                 gc_pause: _GcPause) -> dict:
    t0 = time.perf_counter()
    src, root = Path(src), Path(out)
    if settings.volume_engine not in VOLUME_ENGINES:
        raise DataError(f"volume engine {settings.volume_engine!r} (SIMCROP_PREPARE_ENGINE?): expected one of "
                        f"{', '.join(VOLUME_ENGINES)}")
    if not src.exists():
        raise DataError(f"{src}: source not found")
    fmt = detect_format(src) if fmt == "auto" else fmt
    items = list_ctrate(src, splits) if fmt == "ctrate" else list_manifest(src)
    if limit:
        items = items[:limit]
    root.mkdir(parents=True, exist_ok=True)
    lock = _lock(root)
    try:
        for stale in root.glob("*.tmp-*"):  # a killed run's half-written manifest / rejects
            stale.unlink()
        if (root / INFO_FILE).exists():
            (root / INFO_FILE).unlink()  # the folder is not a usable prepared dataset until this run ends
        old = {(e["split"], e["name"]): e for e in read_jsonl(root / MANIFEST_FILE)} \
            if (root / MANIFEST_FILE).is_file() else {}
        entries = {}  # (split, name) -> manifest entry, kept entries first (a crash keeps them listed)
        rejects = [{"name": it.name, "split": it.split, "source": it.source, "stage": "input", "reason": it.error}
                   for it in items if it.error]
        jobs = collections.deque(it for it in items if not it.error)
        del items  # the jobs' SourceItems are dropped one by one as they are handed out (payload)
        for it in jobs:
            if (it.split, it.name) in old:
                entries[(it.split, it.name)] = old[(it.split, it.name)]

        def write_manifest() -> None:
            _atomic_write_jsonl(root / MANIFEST_FILE, _ordered(entries))

        flush = _Flusher(write_manifest)  # flush() now; flush.due() at most every 30 s, < 5 % of the run
        counts = {"kept": 0, "done": 0}
        s_dict = asdict(settings)

        n_jobs = len(jobs)

        def payload():  # one job at a time (no list of n job dicts, each with a copy of its report)
            while jobs:
                it = jobs.popleft()
                yield {"item": asdict(it), "out": str(root), "settings": s_dict, "verify": verify,
                       "previous": old.get((it.split, it.name))}

        from tqdm import tqdm

        bar = tqdm(total=n_jobs, desc="volumes", disable=not progress, dynamic_ncols=True, file=sys.stderr)

        def collect(job: dict, res: dict) -> None:
            key = (job["item"]["split"], job["item"]["name"])
            previous = old.pop(key, None)  # not needed any more: entries holds what stays
            if res["status"] == "rejected":
                entries.pop(key, None)
                rejects.append({"name": key[1], "split": key[0], "source": job["item"]["source"],
                                "stage": "volume", "reason": res["reason"]})
            else:
                counts[res["status"]] += 1
                # a redone volume keeps its text records: the text phase checks them by key + checksum
                prev = {k: v for k, v in (previous or {}).items() if k in ("text", "feats")}
                entries[key] = {**prev, **res["entry"]}
            bar.update(1)
            gc_pause.tick()
            if progress:
                bar.set_postfix_str(f"kept {counts['kept']} new {counts['done']} rejected {len(rejects)}",
                                    refresh=False)
            flush.due()

        try:
            if workers > 0:
                ctx = multiprocessing.get_context("spawn")
                pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker)
                try:
                    todo, running = payload(), {}
                    while True:  # at most 2 jobs per worker in flight: bounded memory, prompt Ctrl-C
                        for job in todo:
                            running[pool.submit(process_volume, job)] = job
                            if len(running) >= 2 * workers:
                                break
                        if not running:
                            break
                        done, _ = wait(running, return_when=FIRST_COMPLETED)
                        for fut in done:
                            collect(running.pop(fut), fut.result())
                finally:
                    pool.shutdown(wait=True, cancel_futures=True)
            else:
                for job in payload():
                    collect(job, process_volume(job))
        except BrokenProcessPool as exc:
            raise DataError(f"{root}: a worker process died ({exc}; out of memory?); rerun to resume") from exc
        finally:
            bar.close()
            flush()
        quiet = not progress and settings.text_encoder.lower() not in ("", "none")
        with hf_progress_bars(not quiet), gc_pause.resumed():  # --no-progress: the encoder's loading bars too
            text_info, text_rejects = prepare_text(root, entries, settings, device, progress, log, flush.due)
        rejects += text_rejects
        flush()
        removed = _remove_unreferenced(root, entries)
        rejects.sort(key=lambda r: (r["split"], r["name"]))
        _atomic_write_jsonl(root / REJECTS_FILE, rejects)
        info = {"format": FORMAT, "version": FORMAT_VERSION, "source": str(src), "source_format": fmt,
                "settings": settings.volume_dict(), "text": text_info,
                "counts": {"items": len(entries), "kept": counts["kept"], "prepared": counts["done"],
                           "rejected": len(rejects)},
                "splits": sorted({k[0] for k in entries})}
        atomic_write_bytes(root / INFO_FILE, (json.dumps(info, indent=1) + "\n").encode())
    finally:
        lock.close()
    return {**info["counts"], "rejects": rejects, "removed": removed, "elapsed_s": time.perf_counter() - t0,
            "out": root}
