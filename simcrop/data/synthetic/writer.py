"""A synthetic dataset on disk in CT-RATE's layout (``write_dataset`` lists the files).

Volumes are int16 stored values = HU + 1024 (``RescaleSlope`` 1, ``RescaleIntercept`` -1024 in the metadata
CSV). The NIfTI ``scl_slope`` / ``scl_inter`` are NaN (unset), so nibabel returns the raw stored values and a
reader must apply the CSV rescale, as with CT-RATE. The metadata CSV uses DICOM (LPS) conventions:
``ImageOrientationPatient`` = LPS direction cosines of array axis 0 then array axis 1 (``[-1, 0, 0, 0, -1, 0]``
here, since RAS+ x/y point to LPS -x/-y), ``ImagePositionPatient`` = LPS mm of voxel ``[0, 0, 0]``, i.e.
``(-affine[0, 3], -affine[1, 3], affine[2, 3])``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from simcrop.data.synthetic.anatomy import ANATOMY_LABELS
from simcrop.data.synthetic.case import (DEFAULT_SHAPE, DEFAULT_SPACING, RESCALE_INTERCEPT, RESCALE_SLOPE,
                                         generate_case)
from simcrop.data.synthetic.findings import CTRATE_LABELS, FINDINGS

GENERATOR_VERSION = "1"
DEFAULT_N = 320
DEFAULT_VAL_FRACTION = 0.2

VARIANTS = ("default", "testbed")  # the realistic phantoms (case.py) | the grounding testbed (testbed.py)

REPORT_COLUMNS = ("VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN")
METADATA_COLUMNS = (
    "VolumeName",
    "XYSpacing",
    "ZSpacing",
    "RescaleSlope",
    "RescaleIntercept",
    "ImagePositionPatient",
    "ImageOrientationPatient",
)


def is_valid_case(index: int, val_fraction: float) -> bool:
    """Split rule: case i is validation iff floor((i+1) f) > floor(i f) (every 5th case for f = 0.2).

    Independent of n, so a dataset of n cases is a prefix of one with more cases (same names).
    """
    eps = 1e-9
    return math.floor((index + 1) * val_fraction + eps) > math.floor(index * val_fraction + eps)


def _fmt_list(values) -> str:
    return "[" + ", ".join(repr(round(float(v), 4)) for v in values) + "]"


def _save_nifti(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write a single-file NIfTI-1 (.nii.gz) with qform = sform = affine and scl_slope = scl_inter = NaN.

    nibabel's own writer replaces NaN scaling by (1, 0); the header and the Fortran-ordered voxels are
    therefore written directly, through nibabel's Opener (deterministic gzip: no time stamp).
    """
    import nibabel as nib
    from nibabel.openers import Opener

    img = nib.Nifti1Image(data, affine)
    hdr = img.header
    hdr.set_data_dtype(data.dtype)
    hdr.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)  # scanner
    img.set_sform(affine, code=1)
    img.update_header()
    offset = 352  # 348-byte header + 4-byte "no extensions" flag
    hdr.set_data_offset(offset)
    hdr["scl_slope"] = np.nan  # unset: readers return raw stored values
    hdr["scl_inter"] = np.nan
    with Opener(str(path), "wb") as fh:
        hdr.write_to(fh)
        fh.write(b"\0" * (offset - fh.tell()))
        fh.write(np.asarray(data, dtype=hdr.get_data_dtype()).tobytes(order="F"))


def _write_csv(path: Path, columns: Sequence[str], rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(columns))
        w.writeheader()
        for r in rows:
            w.writerow(r)


def _is_nonempty(p: Path) -> bool:
    return p.exists() and (not p.is_dir() or any(p.iterdir()))


def variant_defaults(variant: str = "default") -> dict:
    """The variant's default n, val_fraction, shape and spacing (ValueError for an unknown variant)."""
    if variant == "default":
        return {"n": DEFAULT_N, "val_fraction": DEFAULT_VAL_FRACTION, "shape": DEFAULT_SHAPE,
                "spacing": DEFAULT_SPACING}
    if variant == "testbed":
        from simcrop.data.synthetic import testbed as tb

        return {"n": tb.TESTBED_N, "val_fraction": tb.TESTBED_VAL_FRACTION, "shape": tb.TESTBED_SHAPE,
                "spacing": tb.TESTBED_SPACING}
    raise ValueError(f"unknown synthetic variant {variant!r}; known: {', '.join(VARIANTS)}")


def _variant(variant: str):
    """(case generator (index, seed, shape, spacing) -> SyntheticCase, finding names, extra info keys)."""
    if variant == "default":
        return generate_case, FINDINGS, {}
    if variant == "testbed":
        from simcrop.data.synthetic import testbed as tb

        return tb.generate_testbed_case, tb.TESTBED_TYPES, tb.testbed_info()
    raise ValueError(f"unknown synthetic variant {variant!r}; known: {', '.join(VARIANTS)}")


def write_dataset(
    out_dir: str | os.PathLike,
    n: int,
    seed: int = 0,
    val_fraction: float | None = None,
    shape: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    overwrite: bool = False,
    verbose: bool = False,
    variant: str = "default",
) -> Path:
    """Write n synthetic cases in CT-RATE's layout; returns out_dir.

    variant: 'default' (the realistic phantoms, case.py) or 'testbed' (the grounding testbed, testbed.py: its
    finding columns are testbed.TESTBED_TYPES); val_fraction / shape / spacing default to the variant's.

    Layout (one scan ``a``, one reconstruction ``1`` per patient; <s> = train / valid)::

        out_dir/dataset/<s>/<s>_<p>/<s>_<p>_a/<s>_<p>_a_1.nii.gz       int16, stored = HU + 1024
        out_dir/dataset/radiology_text_reports/<s>_reports.csv        REPORT_COLUMNS
        out_dir/dataset/metadata/<s>_metadata.csv                     METADATA_COLUMNS (CT-RATE string lists)
        out_dir/dataset/multi_abnormality_labels/<s>_predicted_labels.csv   VolumeName + CTRATE_LABELS
        out_dir/dataset/synthetic_ground_truth/<s>_labels.csv         VolumeName + FINDINGS
        out_dir/dataset/synthetic_ground_truth/<s>/<VolumeName>_{anatomy,lesions}.nii.gz   uint8 maps
        out_dir/dataset/synthetic_ground_truth/<s>_sentences.jsonl    sentences + lesions per volume
        out_dir/SYNTHETIC_INFO.json                                   parameters, label names, case index

    Case i goes to valid iff ``is_valid_case(i, val_fraction)``; patients are numbered 1.. within each split in
    case order. Everything is generated into ``<out_dir>.tmp-<pid>`` and moved into place with os.replace at the
    end. Raises FileExistsError if out_dir exists and is non-empty (unless overwrite=True).
    """
    out = Path(out_dir)
    defaults = variant_defaults(variant)
    val_fraction = defaults["val_fraction"] if val_fraction is None else val_fraction
    shape = tuple(int(s) for s in (defaults["shape"] if shape is None else shape))
    spacing = tuple(float(s) for s in (defaults["spacing"] if spacing is None else spacing))
    if n < 1:
        raise ValueError("n must be >= 1")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError("val_fraction must be in [0, 1)")
    if _is_nonempty(out) and not overwrite:
        raise FileExistsError(f"refusing to write the synthetic dataset into existing non-empty {out} "
                              f"(pass overwrite=True / --overwrite, or choose another directory)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    t0 = time.perf_counter()
    try:
        _write_tree(tmp, n, seed, val_fraction, shape, spacing, verbose, variant)
        _move_into_place(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if verbose:
        print(f"wrote {n} synthetic {'' if variant == 'default' else variant + ' '}cases to {out} in "
              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return out


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    old = None
    if _is_nonempty(out):
        if not overwrite:
            raise FileExistsError(f"{out} appeared while generating; not overwriting it")
        old = out.parent / f"{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    try:
        os.replace(tmp, out)  # atomic; succeeds onto a missing or empty directory
    except OSError as e:
        if old is not None:
            os.replace(old, out)
        raise FileExistsError(f"could not move the generated dataset into {out}: {e}") from e
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


def _write_tree(root: Path, n, seed, val_fraction, shape, spacing, verbose, variant="default") -> None:
    make_case, findings, extra_info = _variant(variant)
    ds = root / "dataset"
    for sub in ("train", "valid", "radiology_text_reports", "metadata", "multi_abnormality_labels",
                "synthetic_ground_truth/train", "synthetic_ground_truth/valid"):
        (ds / sub).mkdir(parents=True, exist_ok=True)
    rows = {s: {"reports": [], "metadata": [], "ctrate": [], "labels": [], "jsonl": []} for s in ("train", "valid")}
    counters = {"train": 0, "valid": 0}
    cases_index = []
    for i in range(n):
        split = "valid" if is_valid_case(i, val_fraction) else "train"
        counters[split] += 1
        p = counters[split]
        stem = f"{split}_{p}_a_1"
        name = f"{stem}.nii.gz"
        case = make_case(i, seed, shape, spacing)
        vol_dir = ds / split / f"{split}_{p}" / f"{split}_{p}_a"
        vol_dir.mkdir(parents=True, exist_ok=True)
        _save_nifti(case.stored(), case.affine, vol_dir / name)
        gt = ds / "synthetic_ground_truth" / split
        _save_nifti(case.anatomy, case.affine, gt / f"{name}_anatomy.nii.gz")
        _save_nifti(case.lesions, case.affine, gt / f"{name}_lesions.nii.gz")
        r = rows[split]
        r["reports"].append({"VolumeName": name, "ClinicalInformation_EN": case.clinical_information,
                             "Technique_EN": case.technique, "Findings_EN": case.findings,
                             "Impressions_EN": case.impression})
        aff = case.affine
        r["metadata"].append({
            "VolumeName": name,
            "XYSpacing": _fmt_list(spacing[:2]),
            "ZSpacing": repr(float(spacing[2])),
            "RescaleSlope": repr(RESCALE_SLOPE),
            "RescaleIntercept": repr(RESCALE_INTERCEPT),
            # DICOM LPS: position of voxel [0, 0, 0]; direction cosines of array axes 0 and 1 (RAS+ -> LPS).
            "ImagePositionPatient": _fmt_list([-aff[0, 3], -aff[1, 3], aff[2, 3]]),
            "ImageOrientationPatient": _fmt_list([-1, 0, 0, 0, -1, 0]),
        })
        r["ctrate"].append({"VolumeName": name, **case.ctrate_labels()})
        r["labels"].append({"VolumeName": name, **case.labels})
        r["jsonl"].append(json.dumps({"VolumeName": name, "case_index": i, "sentences": case.sentences,
                                      "lesions": case.lesion_info}, sort_keys=False))
        cases_index.append({"case_index": i, "VolumeName": name, "split": split})
        if verbose and (i + 1) % 50 == 0:
            print(f"  {i + 1}/{n}", file=sys.stderr)
    for split, r in rows.items():
        _write_csv(ds / "radiology_text_reports" / f"{split}_reports.csv", REPORT_COLUMNS, r["reports"])
        _write_csv(ds / "metadata" / f"{split}_metadata.csv", METADATA_COLUMNS, r["metadata"])
        _write_csv(ds / "multi_abnormality_labels" / f"{split}_predicted_labels.csv",
                   ("VolumeName",) + CTRATE_LABELS, r["ctrate"])
        _write_csv(ds / "synthetic_ground_truth" / f"{split}_labels.csv", ("VolumeName",) + tuple(findings),
                   r["labels"])
        with open(ds / "synthetic_ground_truth" / f"{split}_sentences.jsonl", "w", encoding="utf-8") as fh:
            for line in r["jsonl"]:
                fh.write(line + "\n")
    info = {
        "generator": "simcrop.data.synthetic",
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "n": int(n),
        "n_train": counters["train"],
        "n_valid": counters["valid"],
        "val_fraction": float(val_fraction),
        "shape": list(shape),
        "spacing": list(spacing),
        "orientation": "RAS+ (nibabel): array axes (X, Y, Z) point to patient Right, Anterior, Superior",
        "rescale": {"slope": RESCALE_SLOPE, "intercept": RESCALE_INTERCEPT, "nifti_scl": "unset (NaN)"},
        "findings": list(findings),
        "anatomy_labels": {str(k): v for k, v in ANATOMY_LABELS.items()},
        "ctrate_labels": list(CTRATE_LABELS),
        "cases": cases_index,
    }
    info.update(extra_info)  # the default variant adds nothing (its bytes are pinned)
    (root / "SYNTHETIC_INFO.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
