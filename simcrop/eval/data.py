"""What the downstream protocols read: a split's volumes (centre-cropped as in evaluation), label tables,
per-sentence ground-truth regions, and segmentation pairs.

Sources (all relative to a CT-RATE-layout data folder `root`, split = 'train' | 'valid'):
- volumes, reports: simcrop.data.ctrate.read_split;
- labels (multi-label): `dataset/synthetic_ground_truth/<split>_labels.csv` (the synthetic findings: FINDINGS, or
  the testbed's TESTBED_TYPES) when present, else CT-RATE's
  `dataset/multi_abnormality_labels/<split>_predicted_labels.csv` (18 columns), or any CSV with
  VolumeName + one 0/1 column per class; multi-class: one column of class names / integers;
- sentence regions: `dataset/synthetic_ground_truth/<split>_sentences.jsonl` + the anatomy / lesion maps, or a
  user JSONL whose sentences name a mask NIfTI (docs/eval.md);
- segmentation pairs: the synthetic maps, or a CSV `image,label[,split]` of NIfTI pairs (docs/eval.md).
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from simcrop.data.augment import center_crop_pad, hu_to_unit
from simcrop.data.ctrate import CTRateItem, dataset_dir, load_hu, read_split
from simcrop.data.errors import DataError
from simcrop.eval.errors import EvalError


def read_items(root, split: str) -> list[CTRateItem]:
    try:
        return read_split(root, split)
    except DataError as exc:
        raise EvalError(str(exc)) from None


def load_volume(item: CTRateItem, size) -> torch.Tensor:
    """[1, X, Y, Z] float32 in [-1, 1], centre-cropped / reflect-padded to `size` (the evaluation transform)."""
    try:
        hu = load_hu(item)
    except DataError as exc:
        raise EvalError(str(exc)) from None
    return center_crop_pad(hu_to_unit(torch.from_numpy(hu)), tuple(size))[None].contiguous()


def center_crop_offsets(shape, size) -> list[tuple[int, int, int]]:
    """Per axis (crop start, kept length, pad before) of simcrop.data.augment.center_crop_pad."""
    out = []
    for n, want in zip(shape, size):
        start = max(n - want, 0) // 2
        kept = min(n, want)
        out.append((start, kept, (want - kept) // 2))
    return out


def center_crop_zero(x: np.ndarray, size) -> np.ndarray:
    """The same centre crop as center_crop_pad for a mask / label map [X, Y, Z], padding with zeros (padded
    voxels are mirrored image, not anatomy, so they belong to no region)."""
    offs = center_crop_offsets(x.shape, size)
    x = x[tuple(slice(s, s + k) for s, k, _ in offs)]
    pads = [(p, w - k - p) for (_, k, p), w in zip(offs, size)]
    return np.pad(x, pads, mode="constant") if any(a or b for a, b in pads) else x


def load_nifti(path: Path) -> np.ndarray:
    """A NIfTI as a numpy array reoriented to RAS+ (as load_hu does for volumes)."""
    import nibabel as nib

    if not Path(path).is_file():
        raise EvalError(f"{path}: file not found")
    try:
        return np.asarray(nib.as_closest_canonical(nib.load(str(path))).dataobj)
    except Exception as exc:
        raise EvalError(f"{path}: cannot read NIfTI ({exc})") from None


# -- labels -----------------------------------------------------------------------------------------------------
@dataclass
class LabelTable:
    names: list[str]  # class names
    values: np.ndarray  # [N, C] 0/1 (multilabel) or [N] class index (multiclass), in item order
    kind: str  # 'multilabel' | 'multiclass'
    source: str


def labels_csv(root, split: str, labels: str = "auto") -> Path:
    """The label CSV for `split`: 'auto' (synthetic ground truth, else CT-RATE's), 'ctrate', 'synthetic', or a
    path where '{split}' is replaced by the split name."""
    ds = dataset_dir(root)
    synth = ds / "synthetic_ground_truth" / f"{split}_labels.csv"
    ctrate = ds / "multi_abnormality_labels" / f"{split}_predicted_labels.csv"
    if labels == "auto":
        path = synth if synth.is_file() else ctrate
    elif labels == "synthetic":
        path = synth
    elif labels == "ctrate":
        path = ctrate
    else:
        path = Path(labels.replace("{split}", split))
    if not path.is_file():
        raise EvalError(f"{path}: label CSV not found (labels for split '{split}' are needed; see --labels)")
    return path


def read_labels(path: Path, names: list[str], kind: str = "multilabel", column: str | None = None,
                classes: list[str] | None = None) -> LabelTable:
    """Rows of `path` for the VolumeNames in `names` (order kept). multilabel: every column but VolumeName
    (0/1); multiclass: `column`, its values mapped to class indices (`classes` fixes the order)."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        cols = [c for c in (reader.fieldnames or []) if c != "VolumeName"]
        if "VolumeName" not in (reader.fieldnames or []):
            raise EvalError(f"{path}: no VolumeName column")
        rows = {r["VolumeName"]: r for r in reader}
    missing = [n for n in names if n not in rows]
    if missing:
        raise EvalError(f"{path}: no label row for {len(missing)} volume(s), e.g. {missing[0]}")
    if kind == "multilabel":
        if not cols:
            raise EvalError(f"{path}: no label columns")
        try:
            values = np.array([[float(rows[n][c]) for c in cols] for n in names], dtype=np.float64)
        except ValueError:
            raise EvalError(f"{path}: multi-label columns must hold numbers 0/1") from None
        return LabelTable(cols, (values > 0.5).astype(np.int64), kind, str(path))
    if column is None or column not in cols:
        raise EvalError(f"{path}: multi-class labels need --label-column, one of: {', '.join(cols)}")
    raw = [rows[n][column].strip() for n in names]
    if not classes:
        numeric = all(v.lstrip("-").isdigit() for v in raw)
        classes = sorted(set(raw), key=int) if numeric else sorted(set(raw))
    unknown = sorted(set(raw) - set(classes))
    if unknown:
        raise EvalError(f"{path}: column {column} has classes not seen in training: {', '.join(unknown[:5])}")
    index = {c: i for i, c in enumerate(classes)}
    return LabelTable(list(classes), np.array([index[v] for v in raw], dtype=np.int64), kind, str(path))


# -- sentence regions -------------------------------------------------------------------------------------------
@dataclass
class SentenceRegion:
    text: str
    finding: str  # a finding name, or 'normal' for normal-anatomy sentences
    mask: np.ndarray  # bool [X, Y, Z] in the stored (RAS+) grid of the volume


@dataclass
class GroundingCase:
    item: CTRateItem
    sentences: list[SentenceRegion] = field(default_factory=list)


def regions_file(root, split: str, regions: str | None) -> Path:
    if regions:
        path = Path(regions.replace("{split}", split))
    else:
        path = dataset_dir(root) / "synthetic_ground_truth" / f"{split}_sentences.jsonl"
    if not path.is_file():
        raise EvalError(
            f"{path}: no per-sentence ground-truth regions; grounding needs synthetic data "
            f"(simcrop.data.synthetic) or --regions <jsonl> (format in docs/eval.md)"
        )
    return path


def read_grounding_cases(root, split: str, regions: str | None = None, limit: int = 0) -> list[GroundingCase]:
    """Cases of `split` with the regions of their findings sentences (synthetic ground truth or user JSONL).

    Each JSONL line: {"VolumeName": ..., "sentences": [{"text", "finding", and either "mask" (a NIfTI path,
    relative to the JSONL's folder; nonzero = region) or "anatomy_labels" / "lesion_ids" (the synthetic maps
    `<split>/<VolumeName>_{anatomy,lesions}.nii.gz` beside the JSONL)}]}.
    """
    from simcrop.data.synthetic import region_mask

    path = regions_file(root, split, regions)
    items = {it.name: it for it in read_items(root, split)}
    cases = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                name, sentences = rec["VolumeName"], rec["sentences"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise EvalError(f"{path}:{lineno}: expected a JSON object with VolumeName and sentences") from None
            if name not in items:
                raise EvalError(f"{path}:{lineno}: {name} is not a volume of split '{split}' in {root}")
            case = GroundingCase(items[name])
            maps = None
            for s in sentences:
                if "mask" in s:
                    mask = load_nifti(path.parent / s["mask"]) != 0
                elif "anatomy_labels" in s or "lesion_ids" in s:
                    if maps is None:
                        gt = path.parent / split
                        maps = (load_nifti(gt / f"{name}_anatomy.nii.gz"), load_nifti(gt / f"{name}_lesions.nii.gz"))
                    mask = region_mask(maps[0], maps[1], s)
                else:
                    raise EvalError(f"{path}:{lineno}: sentence {s.get('text', '')[:40]!r} has no mask / region")
                case.sentences.append(SentenceRegion(s["text"], s.get("finding", "normal"), mask.astype(bool)))
            cases.append(case)
            if limit and len(cases) >= limit:
                break
    if not cases:
        raise EvalError(f"{path}: no case")
    return cases


def patch_voxels(volume: torch.Tensor, patch) -> torch.Tensor:
    """volume [1, X, Y, Z] (the encoder's input, already centre-cropped) -> the raw input patches [N, P], in the
    encoder's token order (simcrop.ops.reference.patchify3d; P = px * py * pz)."""
    from simcrop.ops.reference import patchify3d

    return patchify3d(volume[None].float(), tuple(patch))[0]


def patch_fractions(mask: np.ndarray, size, patch) -> np.ndarray:
    """mask [X, Y, Z] (stored grid) -> [N] share of each patch's voxels in the mask after the evaluation's
    centre crop (patch order n = (ix * gy + iy) * gz + iz, as the encoder's tokens)."""
    m = center_crop_zero(mask.astype(np.float32), size)
    (X, Y, Z), (px, py, pz) = m.shape, patch
    g = m.reshape(X // px, px, Y // py, py, Z // pz, pz).mean(axis=(1, 3, 5))  # [gx, gy, gz]
    return g.reshape(-1)


# -- segmentation pairs -----------------------------------------------------------------------------------------
@dataclass
class SegCase:
    name: str
    image: object  # CTRateItem (HU via metadata) or Path of a HU NIfTI
    label: object  # callable -> int label map [X, Y, Z]


def synthetic_finding_names(root, split: str) -> list[str]:
    """The finding types of a synthetic dataset (its labels CSV's columns): simcrop.data.synthetic.FINDINGS
    for the realistic phantoms, TESTBED_TYPES for the grounding testbed."""
    path = dataset_dir(root) / "synthetic_ground_truth" / f"{split}_labels.csv"
    if not path.is_file():
        raise EvalError(f"{path}: synthetic labels CSV not found")
    with open(path, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), [])
    return [c for c in header if c != "VolumeName"]


def synthetic_seg_cases(root, split: str, target: str) -> tuple[list[SegCase], list[str]]:
    """Synthetic cases with label maps: target 'lesions' (background / lesion), 'findings' (background + one
    class per finding type) or 'anatomy' (the 12 anatomy labels, 'outside' = background)."""
    from simcrop.data.synthetic import ANATOMY_LABELS

    ds = dataset_dir(root)
    gt = ds / "synthetic_ground_truth"
    if not (gt / split).is_dir():
        raise EvalError(f"{gt / split}: no synthetic label maps; segmentation needs synthetic data or --pairs <csv>")
    finding_names = synthetic_finding_names(root, split)
    if target == "anatomy":
        classes = [ANATOMY_LABELS[i] for i in sorted(ANATOMY_LABELS)]
    elif target == "lesions":
        classes = ["background", "lesion"]
    elif target == "findings":
        classes = ["background", *finding_names]
    else:
        raise EvalError(f"--target must be lesions, findings or anatomy, got {target!r}")
    infos = {}
    if target == "findings":
        with open(gt / f"{split}_sentences.jsonl", encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    rec = json.loads(line)
                    infos[rec["VolumeName"]] = {L["id"]: finding_names.index(L["finding"]) + 1 for L in rec["lesions"]}

    def label_fn(name):
        def load():
            if target == "anatomy":
                return load_nifti(gt / split / f"{name}_anatomy.nii.gz").astype(np.int64)
            les = load_nifti(gt / split / f"{name}_lesions.nii.gz").astype(np.int64)
            if target == "lesions":
                return (les > 0).astype(np.int64)
            lut = np.zeros(256, dtype=np.int64)
            for lid, cls in infos.get(name, {}).items():
                lut[lid] = cls
            return lut[les]
        return load

    cases = [SegCase(it.name, it, label_fn(it.name)) for it in read_items(root, split)]
    return cases, classes


def csv_seg_cases(pairs_csv: str, split: str) -> list[SegCase]:
    """User pairs: CSV with columns image,label[,split] (paths relative to the CSV; images in HU, labels
    integer maps on the same grid; split 'train' or 'test'/'valid'). Without a split column, every 5th row
    (rows 5, 10, ...) is test."""
    path = Path(pairs_csv)
    if not path.is_file():
        raise EvalError(f"{path}: pairs CSV not found")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not {"image", "label"} <= set(reader.fieldnames or []):
            raise EvalError(f"{path}: needs columns image,label[,split]")
        rows = list(reader)
    out = []
    for i, r in enumerate(rows):
        s = (r.get("split") or "").strip().lower()
        s = {"valid": "test", "val": "test", "": ("test" if (i + 1) % 5 == 0 else "train")}.get(s, s)
        if s not in ("train", "test"):
            raise EvalError(f"{path}: row {i + 2}: split must be train or test, got {r.get('split')!r}")
        if s != ("test" if split == "valid" else split):
            continue
        img, lab = path.parent / r["image"], path.parent / r["label"]
        out.append(SegCase(Path(r["image"]).name, img, (lambda lab=lab: load_nifti(lab).astype(np.int64))))
    if not out:
        raise EvalError(f"{path}: no rows for split {split}")
    return out


def load_seg_image(case: SegCase) -> np.ndarray:
    """float32 [X, Y, Z] in [-1, 1] (RAS+), not cropped."""
    if isinstance(case.image, CTRateItem):
        try:
            hu = load_hu(case.image)
        except DataError as exc:
            raise EvalError(str(exc)) from None
    else:
        hu = load_nifti(case.image).astype(np.float32)
    return hu_to_unit(torch.from_numpy(np.ascontiguousarray(hu))).numpy()


def pad_min(x: torch.Tensor, size, value: float) -> torch.Tensor:
    """[..., X, Y, Z] padded (constant, at the end) to at least `size` on each axis."""
    pads = []
    for n, want in zip(reversed(x.shape[-3:]), reversed(tuple(size))):
        pads += [0, max(want - n, 0)]
    return F.pad(x, pads, value=value) if any(pads) else x
