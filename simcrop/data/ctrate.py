"""CT-RATE's on-disk layout: find the volumes, reports, metadata and labels of one split.

Layout (SPEC.md): <root>/dataset/{train,valid}/<s>_<p>/<s>_<p>_<scan>/<s>_<p>_<scan>_<recon>.nii.gz,
<root>/dataset/radiology_text_reports/<split>_reports.csv, <root>/dataset/metadata/<split>_metadata.csv,
<root>/dataset/multi_abnormality_labels/<split>_predicted_labels.csv. `root` may also be the dataset folder.
Stored value -> HU: value * RescaleSlope + RescaleIntercept (from the metadata CSV).
"""
from __future__ import annotations

import ast
import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from simcrop.data.errors import DataError

REPORT_COLUMNS = ("VolumeName", "Findings_EN", "Impressions_EN")
METADATA_COLUMNS = ("VolumeName", "XYSpacing", "ZSpacing", "RescaleSlope", "RescaleIntercept")
CT_RATE_LABELS = (
    "Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
    "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema", "Atelectasis",
    "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela", "Pleural effusion", "Mosaic attenuation pattern",
    "Peribronchial thickening", "Consolidation", "Bronchiectasis", "Interlobular septal thickening",
)
_NAME = re.compile(r"^(?P<split>[a-z]+)_(?P<patient>\d+)_(?P<scan>[a-z]+)_(?P<recon>\d+)\.nii(\.gz)?$")


@dataclass
class CTRateItem:
    name: str  # VolumeName, e.g. train_1_a_1.nii.gz
    path: Path
    findings: str
    impression: str  # '' when absent
    spacing: tuple[float, float, float]  # mm (x, y, z)
    slope: float
    intercept: float
    labels: dict[str, float] = field(default_factory=dict)


def dataset_dir(root: str | Path) -> Path:
    root = Path(root)
    if not root.exists():
        raise DataError(f"data path {root} does not exist")
    if (root / "dataset").is_dir():
        return root / "dataset"
    if (root / "radiology_text_reports").is_dir():
        return root
    raise DataError(f"{root} is not in CT-RATE layout: no dataset/radiology_text_reports folder inside")


def volume_path(ds: Path, split_dir: str, name: str) -> Path:
    """train_1_a_1.nii.gz -> <ds>/<split_dir>/train_1/train_1_a/train_1_a_1.nii.gz"""
    m = _NAME.match(name)
    if not m:
        raise DataError(f"VolumeName {name!r} does not follow CT-RATE's <split>_<patient>_<scan>_<recon>.nii.gz")
    patient = f"{m['split']}_{m['patient']}"
    return ds / split_dir / patient / f"{patient}_{m['scan']}" / name


def read_csv(path: Path, required: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """Rows keyed by VolumeName; DataError naming the file when missing, malformed or lacking columns."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in required if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f"{path}: missing column(s) {', '.join(missing)}")
            rows = {}
            for row in reader:
                rows[row["VolumeName"]] = row
    except (csv.Error, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable CSV ({exc})") from exc
    return rows


def _text(value: str | None) -> str:
    if value is None:
        return ""
    value = value.strip()
    return "" if value.lower() in ("", "nan", "none") else value


def _float(path: Path, name: str, column: str, value: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{path}: {name}: {column} {value!r} is not a number") from None
    if not math.isfinite(out):
        raise DataError(f"{path}: {name}: {column} is {value!r}")
    return out


def _xy_spacing(path: Path, name: str, value: str) -> tuple[float, float]:
    try:
        xy = ast.literal_eval(value) if isinstance(value, str) else value
        xy = [float(v) for v in np.ravel(xy)]
    except (ValueError, SyntaxError, TypeError):
        raise DataError(f"{path}: {name}: XYSpacing {value!r} is not a list of two numbers") from None
    if len(xy) != 2 or min(xy) <= 0:
        raise DataError(f"{path}: {name}: XYSpacing {value!r} must hold two positive numbers")
    return xy[0], xy[1]


def read_split(root: str | Path, split: str) -> list[CTRateItem]:
    """Every volume of `split` ('train' or 'valid') that has a report, with its metadata and labels.

    Raises DataError naming the file for a missing folder/CSV, an empty findings section, missing metadata.
    """
    ds = dataset_dir(root)
    reports_csv = ds / "radiology_text_reports" / f"{split}_reports.csv"
    meta_csv = ds / "metadata" / f"{split}_metadata.csv"
    labels_csv = ds / "multi_abnormality_labels" / f"{split}_predicted_labels.csv"
    reports = read_csv(reports_csv, REPORT_COLUMNS)
    meta = read_csv(meta_csv, METADATA_COLUMNS)
    labels = read_csv(labels_csv, ("VolumeName",)) if labels_csv.is_file() else {}
    items = []
    for name, row in reports.items():
        findings = _text(row.get("Findings_EN"))
        if not findings:
            raise DataError(f"{reports_csv}: {name}: empty findings section")
        if name not in meta:
            raise DataError(f"{meta_csv}: no metadata row for {name}")
        m = meta[name]
        sx, sy = _xy_spacing(meta_csv, name, m["XYSpacing"])
        sz = _float(meta_csv, name, "ZSpacing", m["ZSpacing"])
        lab = {k: _float(labels_csv, name, k, v) for k, v in labels.get(name, {}).items() if k != "VolumeName"}
        items.append(
            CTRateItem(
                name=name, path=volume_path(ds, split, name), findings=findings,
                impression=_text(row.get("Impressions_EN")), spacing=(sx, sy, sz),
                slope=_float(meta_csv, name, "RescaleSlope", m["RescaleSlope"]),
                intercept=_float(meta_csv, name, "RescaleIntercept", m["RescaleIntercept"]), labels=lab,
            )
        )
    if not items:
        raise DataError(f"{reports_csv}: no reports")
    return items


def volume_shape(item: CTRateItem) -> tuple[int, ...]:
    """The stored array shape, from the NIfTI header only (no decoding)."""
    import nibabel as nib

    if not item.path.is_file():
        raise DataError(f"{item.path}: volume file not found")
    try:
        return tuple(int(n) for n in nib.load(str(item.path)).shape)
    except Exception as exc:  # nibabel raises many types for broken headers
        raise DataError(f"{item.path}: unreadable NIfTI header ({exc})") from exc


def load_hu(item: CTRateItem) -> np.ndarray:
    """The volume in HU as float32 [X, Y, Z], reoriented to RAS+ from its header affine."""
    import nibabel as nib

    try:
        img = nib.as_closest_canonical(nib.load(str(item.path)))
        raw = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:
        raise DataError(f"{item.path}: cannot decode volume ({exc})") from exc
    if raw.ndim != 3:
        raise DataError(f"{item.path}: expected a 3D volume, got shape {raw.shape}")
    return raw * np.float32(item.slope) + np.float32(item.intercept)
