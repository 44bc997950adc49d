"""Findings of a phantom: which ones a case has (grid-independent plans) and how each is drawn into the volume.

``lesions`` (uint8) holds lesion instances 1..n (0 = background); ``lesion_info[id - 1]`` describes instance id.
Lung findings are confined to one lobe and keep its anatomy label; ``pleural_effusion`` lies in the posterior
(dependent, patient supine) part of one hemithorax and keeps the lobe labels of the voxels it fills;
``cardiomegaly``'s instance is the (enlarged) heart.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from simcrop.data.synthetic.anatomy import (ANATOMY_IDS, ANATOMY_LABELS, LEFT_LUNG_LABELS, LUNG_LABELS,
                                            RIGHT_LUNG_LABELS, AnatomyParams)
from simcrop.data.synthetic.geometry import Axes, segment_sdf, union_sdf, unit_vectors

FINDINGS: tuple[str, ...] = (
    "nodule",
    "mass",
    "ground_glass_opacity",
    "consolidation",
    "pleural_effusion",
    "cardiomegaly",
)
LUNG_FINDINGS: tuple[str, ...] = ("nodule", "mass", "ground_glass_opacity", "consolidation")

# CT-RATE's 18 multi-abnormality columns, in SPEC.md's order.
CTRATE_LABELS: tuple[str, ...] = (
    "Medical material",
    "Arterial wall calcification",
    "Cardiomegaly",
    "Pericardial effusion",
    "Coronary artery wall calcification",
    "Hiatal hernia",
    "Lymphadenopathy",
    "Emphysema",
    "Atelectasis",
    "Lung nodule",
    "Lung opacity",
    "Pulmonary fibrotic sequela",
    "Pleural effusion",
    "Mosaic attenuation pattern",
    "Peribronchial thickening",
    "Consolidation",
    "Bronchiectasis",
    "Interlobular septal thickening",
)
FINDING_TO_CTRATE: dict[str, tuple[str, ...]] = {
    "nodule": ("Lung nodule",),
    "mass": ("Lung nodule",),
    "ground_glass_opacity": ("Lung opacity",),
    "consolidation": ("Consolidation", "Lung opacity"),
    "pleural_effusion": ("Pleural effusion",),
    "cardiomegaly": ("Cardiomegaly",),
}

# Fraction of fully normal cases and the distribution of the number of finding types otherwise.
_P_NORMAL = 0.3
_N_TYPES_P = (0.45, 0.35, 0.20)  # 1, 2, 3 finding types
_FINDING_P = (0.22, 0.14, 0.18, 0.16, 0.15, 0.15)  # sampling weights, same order as FINDINGS


@dataclass
class LesionPlan:
    """One planned finding, before it is drawn."""

    finding: str
    location: str  # lobe name (ANATOMY_LABELS), "right"/"left" (effusion) or "heart"
    size_mm: float  # nominal diameter (lung), max fluid thickness (effusion), heart width (cardiomegaly)
    params: dict = field(default_factory=dict)


def sample_findings(rng: np.random.Generator) -> list[LesionPlan]:
    """Random finding types, locations, sizes and shape parameters (independent of the voxel grid)."""
    if rng.random() < _P_NORMAL:
        return []
    k = int(rng.choice([1, 2, 3], p=_N_TYPES_P))
    types = [str(t) for t in rng.choice(FINDINGS, size=k, replace=False, p=_FINDING_P)]
    types.sort(key=FINDINGS.index)
    n_lung = sum(2 if t == "nodule" else 1 for t in types if t in LUNG_FINDINGS)
    lobes = [ANATOMY_LABELS[int(i)] for i in rng.permutation(LUNG_LABELS)[:n_lung]]
    plans: list[LesionPlan] = []
    for t in types:
        if t == "nodule":
            for _ in range(2 if rng.random() < 0.2 else 1):
                plans.append(LesionPlan(t, lobes.pop(), float(rng.integers(4, 13))))
        elif t == "mass":
            p = {"lobules": unit_vectors(rng, 4), "lobule_r": rng.uniform(0.45, 0.6, 4)}
            plans.append(LesionPlan(t, lobes.pop(), float(rng.integers(30, 61)), p))
        elif t == "ground_glass_opacity":
            p = {"blobs": unit_vectors(rng, 5) * rng.uniform(0.2, 0.55, (5, 1)), "blob_r": rng.uniform(0.35, 0.55, 5)}
            plans.append(LesionPlan(t, lobes.pop(), float(rng.integers(20, 46)), p))
        elif t == "consolidation":
            p = {
                "blobs": unit_vectors(rng, 3) * rng.uniform(0.2, 0.45, (3, 1)),
                "blob_r": rng.uniform(0.45, 0.6, 3),
                "bronchograms": unit_vectors(rng, 2) if rng.random() < 0.6 else np.zeros((0, 3)),
            }
            plans.append(LesionPlan(t, lobes.pop(), float(rng.integers(25, 56)), p))
        elif t == "pleural_effusion":
            side = "right" if rng.random() < 0.5 else "left"
            plans.append(LesionPlan(t, side, float(rng.integers(12, 41))))
        elif t == "cardiomegaly":
            plans.append(LesionPlan(t, "heart", 0.0, {"factor": rng.uniform(1.3, 1.5)}))
    return plans


def heart_factor(plans: list[LesionPlan]) -> float:
    """How much the heart is enlarged (1.0 without cardiomegaly); the anatomy is drawn with it."""
    card = [p for p in plans if p.finding == "cardiomegaly"]
    return float(card[0].params["factor"]) if card else 1.0


def place_findings(plans: list[LesionPlan], hu: np.ndarray, lab: np.ndarray, world: Axes, canon: Axes,
                   A: AnatomyParams, factor: float, rng: np.random.Generator,
                   soft_mm: float) -> tuple[np.ndarray, list[dict]]:
    """Draw the planned findings into hu (in place); returns (lesions uint8 [X, Y, Z], lesion_info).

    A finding that cannot be placed (its region is outside a tiny field of view) is left out.
    """
    les = np.zeros(lab.shape, np.uint8)
    infos: list[dict] = []
    # Effusion and cardiomegaly first (they decide which lung voxels are free), then lung lesions.
    for plan in sorted(plans, key=lambda p: p.finding not in ("pleural_effusion", "cardiomegaly")):
        nid = len(infos) + 1
        if plan.finding == "cardiomegaly":
            info = _apply_cardiomegaly(nid, lab, les, A, factor)
        elif plan.finding == "pleural_effusion":
            info = _apply_effusion(plan, nid, hu, lab, les, canon, A)
        else:
            info = _apply_lung_lesion(plan, nid, hu, lab, les, world, rng, soft_mm)
        if info is not None:
            infos.append(info)
    return les, infos


def _apply_cardiomegaly(lesion_id, lab, les, A: AnatomyParams, factor: float) -> dict | None:
    """The whole (already enlarged) heart is the lesion instance."""
    heart = lab == 7
    if not heart.any():
        return None
    les[heart] = lesion_id
    width = 2.0 * A.heart_ax[0] * factor * A.scale_xy
    return {"id": lesion_id, "finding": "cardiomegaly", "location": "heart", "size_mm": round(float(width), 1),
            "n_voxels": int(heart.sum()), "factor": round(factor, 3)}


def _place_center(rng: np.random.Generator, avail: np.ndarray, w: Axes, radius: float, tries: int = 40):
    """Pick a voxel centre (mm) in avail whose ball of `radius` mm lies inside avail as much as possible."""
    idx = np.flatnonzero(avail)
    if idx.size == 0:
        return None
    best, best_frac = None, -1.0
    for f in rng.integers(0, idx.size, size=tries):
        p = w.point(idx[f])
        sl = w.box(p - radius, p + radius)
        x, y, z = w.sub(sl)
        ball = (x - p[0]) ** 2 + (y - p[1]) ** 2 + (z - p[2]) ** 2 <= radius**2
        frac = float(avail[sl][ball].mean())
        if frac > best_frac:
            best, best_frac = p, frac
        if frac >= 0.97:
            break
    return best


def _apply_lung_lesion(plan, lesion_id, hu, lab, les, w: Axes, rng, soft_mm) -> dict | None:
    """Draw one lung lesion confined to its lobe; returns its info dict or None if it could not be placed."""
    lobe = ANATOMY_IDS[plan.location]
    avail = (lab == lobe) & (les == 0)
    R = plan.size_mm / 2.0
    center = _place_center(rng, avail, w, R * (0.8 if plan.finding in ("mass", "nodule") else 0.6))
    if center is None:
        return None
    p = plan.params
    if plan.finding == "nodule":
        offsets, radii, edge, target, mode = np.zeros((1, 3)), np.array([1.0]), soft_mm, 30.0, "replace"
    elif plan.finding == "mass":
        offsets = np.vstack([np.zeros((1, 3)), p["lobules"] * 0.45])
        radii = np.concatenate([[0.75], p["lobule_r"]])
        edge, target, mode = soft_mm, 35.0, "replace"
    elif plan.finding == "ground_glass_opacity":
        offsets = np.vstack([np.zeros((1, 3)), p["blobs"]])
        radii = np.concatenate([[0.5], p["blob_r"]])
        edge, target, mode = max(6.0, soft_mm), -600.0, "add"
    else:  # consolidation
        offsets = np.vstack([np.zeros((1, 3)), p["blobs"]])
        radii = np.concatenate([[0.55], p["blob_r"]])
        edge, target, mode = soft_mm, 22.0, "replace"
    sl, sdf = union_sdf(w, center, R, offsets, radii)
    a = avail[sl]
    # Soft partial-volume weight, only inside the lobe: >= 0.75 on lesion voxels (sdf >= 0) of dense lesions,
    # >= 0.5 for hazy ground glass; fades out over `edge` mm outside.
    wt = np.clip(sdf / edge + (0.5 if mode == "add" else 0.75), 0.0, 1.0) * a
    sub = hu[sl]
    if mode == "add":  # hazy density increase that keeps vessels visible
        sub += wt * (target - (-855.0)) * 0.95
    else:
        sub += wt * (target + rng.normal(0.0, 6.0, sub.shape).astype(np.float32) - sub)
    inside = (sdf >= 0) & a
    ci = tuple(int(np.searchsorted(v, cv)) for v, cv in zip((w.xs, w.ys, w.zs), center))
    inside[tuple(ci[d] - sl[d].start for d in range(3))] = True  # the centre voxel always belongs to the lesion
    info = {}
    if plan.finding == "consolidation":
        n_air = 0
        for d in p["bronchograms"]:
            res = segment_sdf(w, center - d * R * 0.3, center + d * R * 0.7, 2.0, 1.5)
            if res is None:
                continue
            bsl, bsdf = res
            air = np.zeros(inside.shape, bool)
            # Map the bronchogram box into the lesion box.
            inter = tuple(slice(max(a_.start, b_.start), min(a_.stop, b_.stop)) for a_, b_ in zip(sl, bsl))
            if any(s.stop <= s.start for s in inter):
                continue
            li = tuple(slice(s.start - a_.start, s.stop - a_.start) for s, a_ in zip(inter, sl))
            bi = tuple(slice(s.start - b_.start, s.stop - b_.start) for s, b_ in zip(inter, bsl))
            air[li] = bsdf[bi] >= 0
            air &= inside
            sub[air] = -900.0
            n_air += int(air.sum())
        info["air_bronchograms"] = n_air > 0
    les[sl][inside] = lesion_id
    return {
        "id": lesion_id,
        "finding": plan.finding,
        "location": plan.location.replace("_", " "),
        "size_mm": float(plan.size_mm),
        "n_voxels": int(inside.sum()),
        "center_mm": [round(float(v), 2) for v in center],
        **info,
    }


def _apply_effusion(plan, lesion_id, hu, lab, les, c: Axes, A: AnatomyParams) -> dict | None:
    """Pleural fluid (~10 HU) as a posterior (dependent) crescent at the base of one hemithorax."""
    side_labels = RIGHT_LUNG_LABELS if plan.location == "right" else LEFT_LUNG_LABELS
    side = np.isin(lab, side_labels) & (les == 0)
    if not side.any():
        return None
    x, y, z = c.x, c.y, c.z
    D = plan.size_mm / A.scale_xy  # canonical mm
    y_back = -A.cav_ay * np.sqrt(np.clip(1.0 - (x / A.cav_ax) ** 2, 0.0, 1.0))  # posterior wall (X, 1, 1)
    z_dome = A.z_dome_r if plan.location == "right" else A.z_dome_l
    z_lo, z_hi = z_dome - 20.0, z_dome + 70.0
    taper = np.clip((z_hi - z) / (z_hi - z_lo), 0.0, 1.0) ** 0.8  # thickest at the base
    thick = D * (1.0 - 0.5 * (x / A.cav_ax) ** 2) * taper
    fluid = side & (y - y_back < thick)
    if not fluid.any():  # tiny field of view: take the most dependent voxels of that side
        ys = np.broadcast_to(y, lab.shape)[side]
        fluid = side & (y <= np.quantile(ys, 0.05))
    hu[fluid] = 12.0
    les[fluid] = lesion_id
    return {
        "id": lesion_id,
        "finding": plan.finding,
        "location": plan.location,
        "size_mm": float(plan.size_mm),
        "n_voxels": int(fluid.sum()),
        "severity": "small" if plan.size_mm < 25 else "moderate",
    }
