"""Built-in synthetic chest-CT + radiology-report dataset (numpy only, plus nibabel for writing).

Every case is a chest phantom in Hounsfield units with a matching radiology report whose findings sentences
each carry the voxel region they describe, so that sentence-to-region alignment can be learned and measured.

Geometry (read this before touching anatomy code)
-------------------------------------------------
* Arrays are indexed ``[X, Y, Z]`` (voxel indices ``i, j, k``).
* The affine is ``diag(sx, sy, sz, 1)`` plus a translation that puts the volume centre at world (0, 0, 0) mm,
  in nibabel's RAS+ world convention: **+x = patient Right, +y = Anterior, +z = Superior**, hence
  ``nibabel.aff2axcodes(affine) == ('R', 'A', 'S')``. Increasing ``i`` moves toward the patient's RIGHT (so the
  patient's left lung lies at LOW ``i``), increasing ``j`` moves anterior (spine at low ``j``), increasing ``k``
  moves up (lung apices at high ``k``).
* Anatomy is drawn in millimetres, so any ``shape`` / ``spacing`` works (e.g. ``PAPER_SHAPE`` at
  ``PAPER_SPACING``); anatomy outside the field of view is simply cut off.

Intensities and labels
----------------------
* ``SyntheticCase.hu`` is int16 HU in [-1024, 3071]. Air outside the body is exactly -1000 (no noise there);
  Gaussian noise (10-20 HU) is added inside the body only.
* ``anatomy`` (uint8) holds ``ANATOMY_LABELS`` ids: the normal anatomical compartment of each voxel. Pleural
  fluid keeps the lobe label of the hemithorax it fills; lesions keep their lobe label.
* ``lesions`` (uint8) holds lesion instances 1..n (0 = background); ``lesion_info[id - 1]`` describes instance id.
  Lung findings are confined to one lobe; ``pleural_effusion`` lies in the posterior (dependent, patient supine)
  part of one hemithorax; ``cardiomegaly``'s instance is the (enlarged) heart.

Reports
-------
Findings sentences each end with '.', and a '.' between two digits ("1.5 cm") stays inside its sentence (the
SPEC's splitting rule). Each sentence dict holds ``text``, ``finding`` (a ``FINDINGS`` name or ``"normal"``),
``anatomy_labels`` and ``lesion_ids``: its region is the union of voxels with those anatomy labels and of those
lesion instances. ``findings == " ".join(s["text"] for s in sentences)``.

On disk (CT-RATE layout, see ``write_dataset``)
-----------------------------------------------
Volumes are int16 stored values = HU + 1024 (``RescaleSlope`` 1, ``RescaleIntercept`` -1024 in the metadata
CSV). The NIfTI ``scl_slope`` / ``scl_inter`` are NaN (unset), so nibabel returns the raw stored values and a
reader must apply the CSV rescale, as with CT-RATE. The metadata CSV uses DICOM (LPS) conventions:
``ImageOrientationPatient`` = LPS direction cosines of array axis 0 then array axis 1 (``[-1, 0, 0, 0, -1, 0]``
here, since RAS+ x/y point to LPS -x/-y), ``ImagePositionPatient`` = LPS mm of voxel ``[0, 0, 0]``, i.e.
``(-affine[0, 3], -affine[1, 3], affine[2, 3])``.

Determinism: case ``i`` depends only on ``(seed, i, shape, spacing)``; findings, sizes, locations and report text
depend only on ``(seed, i)`` (unless a lesion cannot be placed at all in a tiny field of view).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

GENERATOR_VERSION = "1"

DEFAULT_SHAPE: tuple[int, int, int] = (80, 80, 40)  # voxels (X, Y, Z)
DEFAULT_SPACING: tuple[float, float, float] = (4.0, 4.0, 8.0)  # mm (x, y, z)
PAPER_SHAPE: tuple[int, int, int] = (224, 224, 112)
PAPER_SPACING: tuple[float, float, float] = (1.5, 1.5, 3.0)
DEFAULT_N = 320
DEFAULT_VAL_FRACTION = 0.2

RESCALE_SLOPE = 1.0
RESCALE_INTERCEPT = -1024.0  # HU = stored * RESCALE_SLOPE + RESCALE_INTERCEPT
HU_MIN, HU_MAX = -1024, 3071
AIR_HU = -1000.0

FINDINGS: tuple[str, ...] = (
    "nodule",
    "mass",
    "ground_glass_opacity",
    "consolidation",
    "pleural_effusion",
    "cardiomegaly",
)
LUNG_FINDINGS: tuple[str, ...] = ("nodule", "mass", "ground_glass_opacity", "consolidation")

ANATOMY_LABELS: dict[int, str] = {
    0: "outside",
    1: "body",  # other soft tissue, fat, abdomen, neck, paraspinal muscles, spinal canal
    2: "right_upper_lobe",
    3: "right_middle_lobe",
    4: "right_lower_lobe",
    5: "left_upper_lobe",  # incl. lingula
    6: "left_lower_lobe",
    7: "heart",
    8: "mediastinum",  # incl. aorta
    9: "airway",  # air lumen of trachea, main and lobar bronchi
    10: "spine",
    11: "ribs",  # ribs and sternum
}
ANATOMY_IDS: dict[str, int] = {name: i for i, name in ANATOMY_LABELS.items()}
LUNG_LABELS: tuple[int, ...] = (2, 3, 4, 5, 6)
RIGHT_LUNG_LABELS: tuple[int, ...] = (2, 3, 4)
LEFT_LUNG_LABELS: tuple[int, ...] = (5, 6)
BONE_LABELS: tuple[int, ...] = (10, 11)

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

# Fraction of fully normal cases and the distribution of the number of finding types otherwise.
_P_NORMAL = 0.3
_N_TYPES_P = (0.45, 0.35, 0.20)  # 1, 2, 3 finding types
_FINDING_P = (0.22, 0.14, 0.18, 0.16, 0.15, 0.15)  # sampling weights, same order as FINDINGS
_P_NO_IMPRESSION = 0.1


# ----------------------------------------------------------------------------------------------------------------
# Data container
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class SyntheticCase:
    """One synthetic CT with its report and voxel-level ground truth (see the module docstring)."""

    index: int
    seed: int
    hu: np.ndarray  # int16 [X, Y, Z], HU
    anatomy: np.ndarray  # uint8 [X, Y, Z], ANATOMY_LABELS ids
    lesions: np.ndarray  # uint8 [X, Y, Z], lesion instance ids (0 = none)
    affine: np.ndarray  # float64 [4, 4], voxel index -> RAS+ mm
    spacing: tuple[float, float, float]  # mm
    findings: str
    impression: str  # "" when the report has no impression section
    sentences: list[dict]
    labels: dict[str, int]  # FINDINGS name -> 0/1
    lesion_info: list[dict]  # lesion_info[id - 1] describes instance id
    clinical_information: str = ""
    technique: str = ""

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.hu.shape)  # type: ignore[return-value]

    def stored(self) -> np.ndarray:
        """int16 [X, Y, Z] values as written to disk: HU - RescaleIntercept."""
        return (self.hu.astype(np.int32) - int(RESCALE_INTERCEPT)).astype(np.int16)

    def ctrate_labels(self) -> dict[str, int]:
        """CT-RATE's 18 multi-abnormality labels (0/1) implied by the placed findings."""
        out = {name: 0 for name in CTRATE_LABELS}
        for f, v in self.labels.items():
            if v:
                for name in FINDING_TO_CTRATE.get(f, ()):
                    out[name] = 1
        return out

    def sentence_mask(self, j: int) -> np.ndarray:
        """bool [X, Y, Z] region of findings sentence j."""
        return region_mask(self.anatomy, self.lesions, self.sentences[j])


def region_mask(anatomy: np.ndarray, lesions: np.ndarray, sentence: dict) -> np.ndarray:
    """bool [X, Y, Z]: union of the sentence's anatomy labels and lesion instances."""
    m = np.isin(anatomy, np.asarray(sentence.get("anatomy_labels", []), dtype=anatomy.dtype))
    ids = sentence.get("lesion_ids", [])
    if ids:
        m |= np.isin(lesions, np.asarray(ids, dtype=lesions.dtype))
    return m


# ----------------------------------------------------------------------------------------------------------------
# Geometry helpers
# ----------------------------------------------------------------------------------------------------------------
def make_affine(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """RAS+ affine [4, 4] with positive diagonal spacing and the volume centre at world (0, 0, 0) mm."""
    aff = np.eye(4)
    for d in range(3):
        aff[d, d] = float(spacing[d])
        aff[d, 3] = -(int(shape[d]) - 1) / 2.0 * float(spacing[d])
    return aff


class _Axes:
    """Voxel-centre coordinates (mm) along X, Y, Z: 1-D vectors and broadcastable views.

    x: (X, 1, 1), y: (1, Y, 1), z: (1, 1, Z). Vectors must be increasing (they are: world or scaled world).
    """

    def __init__(self, xs: np.ndarray, ys: np.ndarray, zs: np.ndarray):
        self.xs, self.ys, self.zs = (np.asarray(v, dtype=np.float32) for v in (xs, ys, zs))
        self.x = self.xs[:, None, None]
        self.y = self.ys[None, :, None]
        self.z = self.zs[None, None, :]
        self.shape = (len(self.xs), len(self.ys), len(self.zs))

    def box(self, lo: Sequence[float], hi: Sequence[float]):
        """Index slices of the voxels whose centres lie in [lo, hi] (mm), or None if empty."""
        sl = []
        for v, a, b in zip((self.xs, self.ys, self.zs), lo, hi):
            i0 = int(np.searchsorted(v, a, "left"))
            i1 = int(np.searchsorted(v, b, "right"))
            if i1 <= i0:
                return None
            sl.append(slice(i0, i1))
        return tuple(sl)

    def sub(self, sl):
        """Broadcastable coordinate views (x, y, z) restricted to a box."""
        return self.xs[sl[0], None, None], self.ys[None, sl[1], None], self.zs[None, None, sl[2]]

    def point(self, flat_index: int) -> np.ndarray:
        i, j, k = np.unravel_index(int(flat_index), self.shape)
        return np.array([self.xs[i], self.ys[j], self.zs[k]], dtype=np.float64)


def _segment_sdf(axes: _Axes, p0, p1, r0: float, r1: float):
    """Signed distance (mm, > 0 inside) to a tapered tube from p0 (radius r0) to p1 (radius r1).

    Returns (slices, sdf) restricted to the tube's bounding box, or None if it misses the grid.
    """
    p0 = np.asarray(p0, np.float32)
    p1 = np.asarray(p1, np.float32)
    rmax = max(r0, r1) + 8.0
    sl = axes.box(np.minimum(p0, p1) - rmax, np.maximum(p0, p1) + rmax)
    if sl is None:
        return None
    x, y, z = axes.sub(sl)
    d = p1 - p0
    l2 = max(float(d @ d), 1e-6)
    t = ((x - p0[0]) * d[0] + (y - p0[1]) * d[1] + (z - p0[2]) * d[2]) / l2
    t = np.clip(t, 0.0, 1.0)
    dist = np.sqrt((x - p0[0] - t * d[0]) ** 2 + (y - p0[1] - t * d[1]) ** 2 + (z - p0[2] - t * d[2]) ** 2)
    return sl, (r0 + (r1 - r0) * t) - dist


def _draw_polyline_label(axes: _Axes, points, radii, target: np.ndarray, value: int | bool) -> None:
    """Set target[...] = value where a voxel centre lies inside the tube through points (radii per point)."""
    for a in range(len(points) - 1):
        res = _segment_sdf(axes, points[a], points[a + 1], radii[a], radii[a + 1])
        if res is not None:
            sl, sdf = res
            target[sl][sdf >= 0] = value


def _smooth_noise(rng: np.random.Generator, axes: _Axes, scale_mm: float) -> np.ndarray:
    """Smooth random field [X, Y, Z] (float32, ~unit std): Gaussian nodes every scale_mm, cosine-interpolated."""
    mats = []
    for v in (axes.xs, axes.ys, axes.zs):
        pos = (v - v[0]) / scale_mm  # position in node units
        n_nodes = int(np.floor(pos[-1])) + 2
        i0 = np.floor(pos).astype(np.int64)
        f = pos - i0
        f = (1.0 - np.cos(np.pi * f)) / 2.0
        w = np.zeros((len(v), n_nodes), np.float32)
        w[np.arange(len(v)), i0] = 1.0 - f
        w[np.arange(len(v)), i0 + 1] += f
        mats.append(w)
    nodes = rng.standard_normal(tuple(m.shape[1] for m in mats)).astype(np.float32)
    out = np.einsum("ia,jb,kc,abc->ijk", mats[0], mats[1], mats[2], nodes, optimize=True)
    return (out / max(float(out.std()), 1e-6)).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# Case plan: random choices that do not depend on the voxel grid
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class _Anat:
    """Per-case anatomy parameters, in canonical mm (world mm = canonical * scale + shift)."""

    scale_xy: float
    scale_z: float
    shift: np.ndarray  # (3,) mm
    body_ax: float  # body ellipse half-axes (x, y)
    body_ay: float
    fat: float  # subcutaneous fat thickness
    cav_ax: float  # thoracic cavity (inner rib cage) half-axes
    cav_ay: float
    z_apex: float  # lung apex height
    z_dome_r: float  # diaphragm dome tops (right higher, liver)
    z_dome_l: float
    z_fis_r: float  # oblique fissure height at y = 0 (right, left)
    z_fis_l: float
    z_hfis: float  # right horizontal fissure height
    heart_c: np.ndarray  # (3,) heart centre
    heart_ax: np.ndarray  # (3,) semi-axes: long (left-anterior), short (in-plane), z
    heart_angle: float  # radians, long axis rotated from -x toward +y
    rib_phase: float
    spine_phase: float
    vessels: list  # [(p0, p1, r0, r1)] in canonical mm


@dataclass
class _LesionPlan:
    finding: str
    location: str  # lobe name (ANATOMY_LABELS), "right"/"left" (effusion) or "heart"
    size_mm: float  # nominal diameter (lung), max fluid thickness (effusion), heart width (cardiomegaly)
    params: dict = field(default_factory=dict)


def _unit_vectors(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _sample_anatomy(rng: np.random.Generator) -> _Anat:
    fat = rng.uniform(8.0, 20.0)
    body_ax = rng.uniform(140.0, 150.0)
    body_ay = rng.uniform(100.0, 110.0)
    a = _Anat(
        scale_xy=rng.uniform(0.92, 1.0),
        scale_z=rng.uniform(0.9, 1.03),
        shift=np.array([rng.uniform(-6, 6), rng.uniform(-6, 6), rng.uniform(-10, 10)]),
        body_ax=body_ax,
        body_ay=body_ay,
        fat=fat,
        cav_ax=body_ax - fat - 16.0,
        cav_ay=body_ay - fat - 16.0,
        z_apex=rng.uniform(116.0, 128.0),
        z_dome_r=rng.uniform(-62.0, -48.0),
        z_dome_l=rng.uniform(-78.0, -64.0),
        z_fis_r=rng.uniform(-4.0, 8.0),
        z_fis_l=rng.uniform(0.0, 12.0),
        z_hfis=rng.uniform(14.0, 28.0),
        heart_c=np.array([rng.uniform(-27, -17), rng.uniform(15, 25), rng.uniform(-45, -35)]),
        heart_ax=np.array([rng.uniform(48, 56), rng.uniform(35, 41), rng.uniform(36, 44)]),
        heart_angle=math.radians(rng.uniform(32, 48)),
        rib_phase=rng.uniform(0, 26),
        spine_phase=rng.uniform(0, 28),
        vessels=[],
    )
    # Pulmonary vessel trees from each hilum: ~14 trunks per lung, each forking once (canonical mm).
    for sign, hilum in ((+1.0, np.array([45.0, 0.0, -10.0])), (-1.0, np.array([-45.0, 0.0, -12.0]))):
        for d in _unit_vectors(rng, 14):
            d[0] = sign * (abs(d[0]) + 0.6)  # point laterally (toward this lung)
            d[2] *= 1.4  # lungs are tall
            d /= np.linalg.norm(d)
            length = rng.uniform(50, 100)
            mid = hilum + d * length * 0.6
            a.vessels.append((hilum, mid, 3.5, 2.2))
            for c in _unit_vectors(rng, 2):
                cd = d + 0.6 * c
                cd /= np.linalg.norm(cd)
                a.vessels.append((mid, mid + cd * rng.uniform(0.4, 0.7) * length, 2.0, 0.9))
    return a


def _sample_findings(rng: np.random.Generator) -> list[_LesionPlan]:
    """Random finding types, locations, sizes and shape parameters (independent of the voxel grid)."""
    if rng.random() < _P_NORMAL:
        return []
    k = int(rng.choice([1, 2, 3], p=_N_TYPES_P))
    types = [str(t) for t in rng.choice(FINDINGS, size=k, replace=False, p=_FINDING_P)]
    types.sort(key=FINDINGS.index)
    n_lung = sum(2 if t == "nodule" else 1 for t in types if t in LUNG_FINDINGS)
    lobes = [ANATOMY_LABELS[int(i)] for i in rng.permutation(LUNG_LABELS)[:n_lung]]
    plans: list[_LesionPlan] = []
    for t in types:
        if t == "nodule":
            for _ in range(2 if rng.random() < 0.2 else 1):
                plans.append(_LesionPlan(t, lobes.pop(), float(rng.integers(4, 13))))
        elif t == "mass":
            p = {"lobules": _unit_vectors(rng, 4), "lobule_r": rng.uniform(0.45, 0.6, 4)}
            plans.append(_LesionPlan(t, lobes.pop(), float(rng.integers(30, 61)), p))
        elif t == "ground_glass_opacity":
            p = {"blobs": _unit_vectors(rng, 5) * rng.uniform(0.2, 0.55, (5, 1)), "blob_r": rng.uniform(0.35, 0.55, 5)}
            plans.append(_LesionPlan(t, lobes.pop(), float(rng.integers(20, 46)), p))
        elif t == "consolidation":
            p = {
                "blobs": _unit_vectors(rng, 3) * rng.uniform(0.2, 0.45, (3, 1)),
                "blob_r": rng.uniform(0.45, 0.6, 3),
                "bronchograms": _unit_vectors(rng, 2) if rng.random() < 0.6 else np.zeros((0, 3)),
            }
            plans.append(_LesionPlan(t, lobes.pop(), float(rng.integers(25, 56)), p))
        elif t == "pleural_effusion":
            side = "right" if rng.random() < 0.5 else "left"
            plans.append(_LesionPlan(t, side, float(rng.integers(12, 41))))
        elif t == "cardiomegaly":
            plans.append(_LesionPlan(t, "heart", 0.0, {"factor": rng.uniform(1.3, 1.5)}))
    return plans


# ----------------------------------------------------------------------------------------------------------------
# Volume synthesis
# ----------------------------------------------------------------------------------------------------------------
def _build_anatomy(c: _Axes, A: _Anat, heart_factor: float):
    """Label map (uint8 [X, Y, Z]) and lung/soft-tissue helpers, drawn on canonical coordinates c."""
    x, y, z = c.x, c.y, c.z  # (X,1,1), (1,Y,1), (1,1,Z) canonical mm
    shape = c.shape
    lab = np.zeros(shape, np.uint8)

    # Body: elliptic cylinder along z.
    body2d = (x / A.body_ax) ** 2 + (y / A.body_ay) ** 2 <= 1.0  # (X, Y, 1)
    lab[np.broadcast_to(body2d, shape)] = 1

    # Thoracic cavity (inside the rib cage) and lung dome / diaphragm surfaces (X, Y, 1).
    cav2d = (x / A.cav_ax) ** 2 + (y / A.cav_ay) ** 2 <= 1.0
    xl = 0.5 * A.cav_ax  # lateral centre of each lung
    ax_ = np.abs(x)
    z_top = A.z_apex - 55.0 * ((ax_ - xl) / xl) ** 2 - 35.0 * (y / A.cav_ay) ** 2
    z_dome = np.where(x > 0, A.z_dome_r, A.z_dome_l)  # right (+x) dome higher
    z_bot = z_dome - 30.0 * ((ax_ - xl) / xl) ** 2 - 35.0 * ((y - 15.0) / A.cav_ay) ** 2
    thorax = cav2d & (z > z_bot) & (z < z_top)  # (X, Y, Z)

    # Mediastinum: central band from sternum to spine, between diaphragm and thoracic inlet.
    z_med_lo = min(A.z_dome_r, A.z_dome_l) - 15.0
    med = cav2d & (np.abs(x + 4.0) < 24.0) & (z > z_med_lo) & (z < A.z_apex - 25.0)
    # Paraspinal block (vertebral body, paraspinal soft tissue): never lung.
    y_vb, r_vb = -50.0, 17.0
    para2d = (np.abs(x) < 28.0) & (y < y_vb + 15.0)

    # Aorta (mediastinum label): ascending -> arch (left of the trachea) -> descending, left of the spine.
    aorta = np.zeros(shape, bool)
    pts = [(8, 18, -30), (8, 15, 38), (-5, 12, 52), (-20, 5, 56), (-28, -15, 52), (-30, -36, 40), (-30, -38, -110)]
    _draw_polyline_label(c, pts, [14, 14, 13, 13, 12, 12, 12], aorta, True)

    # Heart: rotated ellipsoid, anterior-left, on the diaphragm; enlarged by heart_factor for cardiomegaly.
    ca, sa = math.cos(A.heart_angle), math.sin(A.heart_angle)
    hc = A.heart_c + np.array([-(heart_factor - 1.0) * 25.0, 0.0, 0.0])  # enlarged hearts grow to the left
    hax = A.heart_ax * np.array([heart_factor, 1.0 + (heart_factor - 1.0) * 0.7, 1.0 + (heart_factor - 1.0) * 0.6])
    dx, dy = x - hc[0], y - hc[1]
    u = -dx * ca + dy * sa  # along the long axis (toward left-anterior)
    v = dx * sa + dy * ca
    heart = ((u / hax[0]) ** 2 + (v / hax[1]) ** 2 + ((z - hc[2]) / hax[2]) ** 2 <= 1.0) & cav2d & ~para2d

    lab[med | aorta] = 8

    # Lungs and lobes.
    lung = thorax & ~med & ~para2d & ~aorta & ~heart
    right = x > 0  # (X, 1, 1): patient right = +x
    lower_r = z < A.z_fis_r - 0.8 * y  # oblique fissures: posterior-superior to anterior-inferior, (1, Y, Z)
    lower_l = z < A.z_fis_l - 0.8 * y
    upper_r = z >= A.z_hfis  # horizontal fissure (right only)
    lab[lung & right & ~lower_r & upper_r] = 2
    lab[lung & right & ~lower_r & ~upper_r] = 3
    lab[lung & right & lower_r] = 4
    lab[lung & ~right & ~lower_l] = 5
    lab[lung & ~right & lower_l] = 6
    lab[heart] = 7

    # Airway lumen: trachea down to the carina, main and lobar bronchi.
    airway = np.zeros(shape, bool)
    trachea = [(0, -15, 400), (0, -15, 25)]
    _draw_polyline_label(c, trachea, [9, 9], airway, True)
    for branch, radii in (
        ([(0, -15, 25), (28, -18, 12), (50, -20, 0), (58, -18, -20)], [7, 6, 5.5, 5]),  # right main + intermedius
        ([(50, -20, 0), (70, -15, 35)], [4.5, 3.5]),  # right upper
        ([(58, -18, -20), (68, 25, -40)], [4, 3]),  # right middle
        ([(58, -18, -20), (70, -40, -70)], [4.5, 3.5]),  # right lower
        ([(0, -15, 25), (-35, -20, 5), (-55, -22, -10)], [7, 6, 5]),  # left main
        ([(-55, -22, -10), (-72, -5, 25)], [4.5, 3.5]),  # left upper
        ([(-55, -22, -10), (-68, -40, -70)], [4.5, 3.5]),  # left lower
    ):
        _draw_polyline_label(c, branch, radii, airway, True)
    airway &= np.broadcast_to(body2d, shape)
    lab[airway] = 9

    # Spine: vertebral bodies (periodic in z, with discs), spinal canal, posterior elements.
    r_xy = np.sqrt(x**2 + (y - y_vb) ** 2)  # (X, Y, 1)
    phase = np.mod(z - A.spine_phase, 28.0)  # (1, 1, Z)
    disc = phase < 6.0
    vb = r_xy <= r_vb
    y_canal = y_vb - r_vb - 8.0
    r_canal = np.sqrt(x**2 + (y - y_canal) ** 2)
    post = (
        ((r_canal >= 7.0) & (r_canal <= 12.0) & (y < y_canal + 2.0))  # laminae
        | ((np.abs(x) < 4.0) & (y < y_canal - 8.0) & (y > y_canal - 20.0))  # spinous process
        | ((np.abs(x) > 9.0) & (np.abs(x) < 32.0) & (np.abs(y - y_canal - 2.0) < 5.0))  # transverse processes
    )
    spine = vb | (post & ~disc)
    lab[spine] = 10

    # Ribs: band just outside the cavity, periodic along u = z + 0.45 y (ribs descend anteriorly),
    # absent near the midline (spine behind, costal cartilage in front); sternum in front.
    band = ((x / (A.cav_ax + 2.0)) ** 2 + (y / (A.cav_ay + 2.0)) ** 2 > 1.0) & (
        (x / (A.cav_ax + 11.0)) ** 2 + (y / (A.cav_ay + 11.0)) ** 2 <= 1.0
    )
    band &= np.abs(x) >= 28.0
    rib_z = np.mod(z + 0.45 * y - A.rib_phase, 26.0) < 9.0  # (1, Y, Z)
    ribs = band & rib_z & (z < A.z_apex + 10.0) & (z > min(A.z_dome_r, A.z_dome_l) - 70.0)
    sternum = (np.abs(x) < 15.0) & (y > A.cav_ay - 2.0) & (y < A.cav_ay + 10.0)
    sternum = sternum & (z > A.heart_c[2] - 45.0) & (z < A.z_apex - 30.0)
    lab[ribs | sternum] = 11

    geo = {
        "body2d": body2d,
        "fat2d": body2d & ((x / (A.body_ax - A.fat)) ** 2 + (y / (A.body_ay - A.fat)) ** 2 > 1.0),
        "canal": (r_canal < 7.0) & np.broadcast_to(body2d, shape),
        "below_diaphragm": cav2d & (z <= z_bot),
        "vb_rim": vb & (r_xy > r_vb - 3.5),
        "disc": vb & disc,
        "sternum": sternum,
    }
    return lab, geo


def _base_hu(lab: np.ndarray, geo: dict, c: _Axes, rng: np.random.Generator) -> np.ndarray:
    """HU (float32 [X, Y, Z]) of the normal anatomy, before lesions and noise."""
    shape = lab.shape
    hu = np.full(shape, AIR_HU, np.float32)
    tex = _smooth_noise(rng, c, 10.0)  # ~unit-std smooth texture
    body = lab == 1
    hu[body] = 40.0  # muscle / soft tissue
    hu[np.broadcast_to(geo["fat2d"], shape) & body] = -100.0  # subcutaneous fat
    hu[geo["below_diaphragm"] & body & (c.x > -20.0)] = 58.0  # liver
    hu[geo["canal"] & body] = 15.0  # CSF
    hu[body] += 6.0 * tex[body]
    hu[lab == 8] = 38.0 + 4.0 * tex[lab == 8]  # mediastinum / aorta (non-contrast)
    hu[lab == 7] = 40.0 + 3.0 * tex[lab == 7]  # heart
    hu[lab == 9] = AIR_HU  # airway lumen
    lung = (lab >= 2) & (lab <= 6)
    # Lungs: ~-855 HU, denser posteriorly (dependent, supine), mild texture.
    hu[lung] = (-855.0 - 0.35 * np.broadcast_to(c.y, shape) + 15.0 * tex)[lung]
    spine = lab == 10
    hu[spine] = 500.0  # posterior elements
    hu[spine & geo["vb_rim"]] = 650.0  # cortical rim
    hu[spine & np.broadcast_to(c.x**2 + (c.y + 50.0) ** 2 <= (17.0 - 3.5) ** 2, shape)] = 320.0  # cancellous bone
    hu[spine & geo["disc"]] = 85.0  # intervertebral discs
    hu[lab == 11] = 560.0
    hu[(lab == 11) & geo["sternum"]] = 380.0
    return hu


def _draw_vessels(hu: np.ndarray, lab: np.ndarray, c: _Axes, A: _Anat, soft_mm: float) -> None:
    """Blend pulmonary vessels (~40 HU tapered tubes, soft edges) into lung voxels."""
    for p0, p1, r0, r1 in A.vessels:
        res = _segment_sdf(c, p0, p1, r0, r1)
        if res is None:
            continue
        sl, sdf = res
        w = np.clip(sdf / soft_mm + 0.5, 0.0, 1.0) * 0.85
        w *= (lab[sl] >= 2) & (lab[sl] <= 6)
        sub = hu[sl]
        sub += w * (40.0 - sub)


def _union_sdf(w: _Axes, center: np.ndarray, R: float, offsets: np.ndarray, radii: np.ndarray):
    """Signed distance (mm, > 0 inside) of a union of spheres around center; (slices, sdf) or None.

    offsets: (n, 3) in units of R; radii: (n,) in units of R. A sphere of radius radii[0] is always at the centre.
    """
    reach = R * float(np.max(np.linalg.norm(offsets, axis=1) + radii)) + 8.0
    sl = w.box(center - reach, center + reach)
    if sl is None:
        return None
    x, y, z = w.sub(sl)
    sdf = None
    for o, r in zip(offsets, radii):
        p = center + o * R
        s = r * R - np.sqrt((x - p[0]) ** 2 + (y - p[1]) ** 2 + (z - p[2]) ** 2)
        sdf = s if sdf is None else np.maximum(sdf, s)
    return sl, sdf


def _place_center(rng: np.random.Generator, avail: np.ndarray, w: _Axes, radius: float, tries: int = 40):
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


def _apply_lung_lesion(plan, lesion_id, hu, lab, les, w: _Axes, rng, soft_mm) -> dict | None:
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
    sl, sdf = _union_sdf(w, center, R, offsets, radii)
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
            res = _segment_sdf(w, center - d * R * 0.3, center + d * R * 0.7, 2.0, 1.5)
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


def _apply_effusion(plan, lesion_id, hu, lab, les, c: _Axes, A: _Anat) -> dict | None:
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


# ----------------------------------------------------------------------------------------------------------------
# Report text
# ----------------------------------------------------------------------------------------------------------------
def _fmt_size(rng: np.random.Generator, mm: float, p_cm: float) -> str:
    """'7 mm' or '0.7 cm' / '4.2 cm' (decimals stay inside the sentence by the digit rule)."""
    if rng.random() < p_cm:
        return f"{mm / 10.0:.1f} cm"
    return f"{int(round(mm))} mm"


def _a(size: str) -> str:
    """Indefinite article for a spoken size: 'an 8 mm', 'an 11 mm', 'a 7 mm'."""
    return "an" if size.startswith(("8", "11", "18")) else "a"


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


_LUNGS = list(LUNG_LABELS)


def _finding_sentence(rng, L: dict) -> str:
    f, loc = L["finding"], L["location"]
    if f == "nodule":
        size = _fmt_size(rng, L["size_mm"], 0.25)
        return _pick(rng, [
            f"{_cap(_a(size))} {size} solid nodule is seen in the {loc}.",
            f"There is {_a(size)} {size} pulmonary nodule in the {loc}.",
            f"A solid pulmonary nodule measuring {size} is noted in the {loc}.",
            f"In the {loc}, there is {_a(size)} {size} noncalcified nodule.",
            f"The {loc} contains {_a(size)} {size} nodule.",
        ])
    if f == "mass":
        size = _fmt_size(rng, L["size_mm"], 0.6)
        return _pick(rng, [
            f"A lobulated {size} mass is present in the {loc}.",
            f"There is {_a(size)} {size} soft tissue mass in the {loc}.",
            f"A large mass measuring {size} is seen in the {loc}.",
            f"In the {loc}, there is a lobulated mass measuring {size}.",
        ])
    if f == "ground_glass_opacity":
        size = _fmt_size(rng, L["size_mm"], 0.5)
        return _pick(rng, [
            f"Patchy ground-glass opacity is noted in the {loc}.",
            f"There is an area of ground-glass opacity in the {loc}.",
            f"Ground-glass opacities are seen in the {loc}.",
            f"{_cap(_a(size))} {size} area of ground-glass attenuation is present in the {loc}.",
            f"Hazy ground-glass opacity is seen in the {loc}.",
        ])
    if f == "consolidation":
        opts = [
            f"There is consolidation in the {loc}.",
            f"An area of consolidation is noted in the {loc}.",
            f"Airspace consolidation is present in the {loc}.",
            f"Focal consolidation is seen in the {loc}.",
        ]
        if L.get("air_bronchograms"):
            opts += [
                f"Consolidation with air bronchograms is seen in the {loc}.",
                f"There is airspace consolidation with air bronchograms in the {loc}.",
            ]
        return _pick(rng, opts)
    if f == "pleural_effusion":
        sev, side = L["severity"], L["location"]
        return _pick(rng, [
            f"{_cap(sev)} {side} pleural effusion.",
            f"There is a {sev} {side} pleural effusion.",
            f"A {sev} {side}-sided pleural effusion is present.",
            f"A {sev} pleural effusion is seen on the {side}.",
        ])
    if f == "cardiomegaly":
        return _pick(rng, [
            "The heart is enlarged.",
            "Cardiomegaly is present.",
            "The heart is enlarged in size.",
            "There is cardiomegaly.",
        ])
    raise ValueError(f)


def _impression_sentence(rng, L: dict) -> str:
    f, loc = L["finding"], L["location"]
    if f == "nodule":
        size = _fmt_size(rng, L["size_mm"], 0.25)
        return _pick(rng, [
            f"{_cap(loc)} nodule measuring {size}.",
            f"Pulmonary nodule in the {loc}, measuring {size}.",
        ])
    if f == "mass":
        size = _fmt_size(rng, L["size_mm"], 0.6)
        return _pick(rng, [
            f"{_cap(loc)} mass measuring {size}, suspicious for malignancy.",
            f"Lobulated {loc} mass, measuring {size}.",
        ])
    if f == "ground_glass_opacity":
        return _pick(rng, [
            f"Ground-glass opacity in the {loc}, likely infectious or inflammatory.",
            f"{_cap(loc)} ground-glass opacity.",
        ])
    if f == "consolidation":
        return _pick(rng, [
            f"{_cap(loc)} consolidation, compatible with pneumonia in the appropriate clinical setting.",
            f"Consolidation in the {loc}.",
        ])
    if f == "pleural_effusion":
        return f"{_cap(L['severity'])} {L['location']} pleural effusion."
    return _pick(rng, ["Cardiomegaly.", "Enlarged heart."])


def _sentence(text, finding="normal", anatomy=(), lesions=()) -> dict:
    return {"text": text, "finding": finding, "anatomy_labels": [int(a) for a in anatomy],
            "lesion_ids": [int(i) for i in lesions]}


def _compose_report(rng: np.random.Generator, lesions: list[dict]):
    """(findings sentences, impression text) describing exactly the placed lesions."""
    has = {f: any(L["finding"] == f for L in lesions) for f in FINDINGS}
    lung_pos = [L for L in lesions if L["finding"] in LUNG_FINDINGS]
    pos = [_sentence(_finding_sentence(rng, L), L["finding"], (), (L["id"],)) for L in lung_pos]
    order = rng.permutation(len(pos))
    lungs = [pos[i] for i in order]
    optional: list[tuple[str, dict]] = []  # (group, sentence) that may be dropped to respect 4..12
    if not lung_pos:
        lungs.append(_sentence(_pick(rng, ["The lungs are clear.", "Both lungs are clear.",
                                           "The lung parenchyma is clear."]), anatomy=_LUNGS))
    if not has["consolidation"] and rng.random() < (0.6 if lung_pos else 0.3):
        optional.append(("lungs", _sentence(_pick(rng, ["No focal consolidation.", "There is no consolidation.",
                                                        "No consolidation is seen."]), anatomy=_LUNGS)))
    if lung_pos and not has["nodule"] and not has["mass"] and rng.random() < 0.4:
        optional.append(("lungs", _sentence(_pick(rng, ["No pulmonary nodule or mass is seen.",
                                                        "No suspicious pulmonary nodules."]), anatomy=_LUNGS)))
    if rng.random() < 0.3:
        optional.append(("lungs", _sentence(_pick(rng, ["No pneumothorax.", "There is no pneumothorax."]),
                                            anatomy=_LUNGS)))
    eff = [L for L in lesions if L["finding"] == "pleural_effusion"]
    pleura = [_sentence(_finding_sentence(rng, L), L["finding"], (), (L["id"],)) for L in eff]
    if not eff:
        pleura.append(_sentence(_pick(rng, ["No pleural effusion is seen.", "There is no pleural effusion.",
                                            "No pleural effusion."]), anatomy=_LUNGS))
    card = [L for L in lesions if L["finding"] == "cardiomegaly"]
    heart = [_sentence(_finding_sentence(rng, L), "cardiomegaly", (7,), (L["id"],)) for L in card]
    if not card:
        heart.append(_sentence(_pick(rng, ["Heart size is normal.", "The heart is normal in size.",
                                           "Cardiac size is within normal limits."]), anatomy=(7,)))
    med = _sentence(_pick(rng, ["Mediastinal structures are unremarkable.", "No mediastinal lymphadenopathy.",
                                "The thoracic aorta is normal in caliber."]), anatomy=(8,))
    airway = _sentence(_pick(rng, ["The trachea and main bronchi are patent.", "The central airways are patent.",
                                   "Trachea and both main bronchi are patent."]), anatomy=(9,))
    bones = _sentence(_pick(rng, ["Visualized osseous structures are unremarkable.",
                                  "No destructive bone lesion is seen.", "The osseous structures are intact."]),
                      anatomy=BONE_LABELS)
    if rng.random() < 0.6:
        optional.append(("heart", med))
    if rng.random() < 0.75:
        optional.append(("bones", bones))
    if rng.random() < 0.85:
        optional.append(("airway", airway))
    # Keep 4..12 sentences: drop optional ones (first listed first) or add airway/bones/mediastinum.
    required = len(lungs) + len(pleura) + len(heart)
    while required + len(optional) > 12 and optional:
        optional.pop(0)
    for grp, s in (("airway", airway), ("bones", bones), ("heart", med)):
        if required + len(optional) >= 4:
            break
        if all(o is not s for _, o in optional):
            optional.append((grp, s))
    groups = {"airway": [], "lungs": lungs, "pleura": pleura, "heart": heart, "bones": []}
    for grp, s in optional:
        groups[grp].append(s)
    rng.shuffle(groups["heart"])
    orders = [("airway", "lungs", "pleura", "heart", "bones"), ("heart", "airway", "lungs", "pleura", "bones"),
              ("lungs", "pleura", "airway", "heart", "bones")]
    order = orders[int(rng.choice(3, p=[0.5, 0.25, 0.25]))]
    sentences = [s for g in order for s in groups[g]]

    # Impression: positives by priority, a normal statement, or absent (~10%).
    prio = ("mass", "nodule", "consolidation", "ground_glass_opacity", "pleural_effusion", "cardiomegaly")
    imp_lesions = sorted(lesions, key=lambda L: (prio.index(L["finding"]), L["id"]))
    if lesions:
        impression = " ".join(_impression_sentence(rng, L) for L in imp_lesions)
    else:
        impression = _pick(rng, ["No acute cardiopulmonary abnormality.", "No acute intrathoracic abnormality.",
                                 "Normal chest CT."])
    if rng.random() < _P_NO_IMPRESSION:
        impression = ""
    return sentences, impression


# ----------------------------------------------------------------------------------------------------------------
# Public: one case in memory
# ----------------------------------------------------------------------------------------------------------------
def generate_case(
    index: int,
    seed: int = 0,
    shape: Sequence[int] = DEFAULT_SHAPE,
    spacing: Sequence[float] = DEFAULT_SPACING,
) -> SyntheticCase:
    """Generate case `index` of the dataset with `seed` (deterministic; independent of the dataset size)."""
    shape = tuple(int(s) for s in shape)
    spacing = tuple(float(s) for s in spacing)
    if len(shape) != 3 or min(shape) < 1 or len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"bad shape/spacing: {shape} {spacing}")
    if index < 0 or seed < 0:
        raise ValueError("index and seed must be non-negative")
    # Independent streams: anatomy, findings (grid-independent), placement, text, noise.
    r_anat, r_find, r_place, r_text, r_noise = (
        np.random.default_rng(s) for s in np.random.SeedSequence([int(seed), int(index)]).spawn(5)
    )
    A = _sample_anatomy(r_anat)
    plans = _sample_findings(r_find)

    affine = make_affine(shape, spacing)
    world = _Axes(*(affine[d, 3] + np.arange(shape[d]) * spacing[d] for d in range(3)))
    scale = np.array([A.scale_xy, A.scale_xy, A.scale_z])
    canon = _Axes(*((v - A.shift[d]) / scale[d] for d, v in enumerate((world.xs, world.ys, world.zs))))
    soft_mm = float(min(spacing))  # partial-volume edge width

    card = [p for p in plans if p.finding == "cardiomegaly"]
    heart_factor = float(card[0].params["factor"]) if card else 1.0
    lab, geo = _build_anatomy(canon, A, heart_factor)
    hu = _base_hu(lab, geo, canon, r_noise)
    _draw_vessels(hu, lab, canon, A, soft_mm / A.scale_xy)

    les = np.zeros(shape, np.uint8)
    infos: list[dict] = []
    # Effusion and cardiomegaly first (they decide which lung voxels are free), then lung lesions.
    for plan in sorted(plans, key=lambda p: p.finding not in ("pleural_effusion", "cardiomegaly")):
        nid = len(infos) + 1
        if plan.finding == "cardiomegaly":
            heart = lab == 7
            if not heart.any():
                continue
            les[heart] = nid
            width = 2.0 * A.heart_ax[0] * heart_factor * A.scale_xy
            info = {"id": nid, "finding": "cardiomegaly", "location": "heart", "size_mm": round(float(width), 1),
                    "n_voxels": int(heart.sum()), "factor": round(heart_factor, 3)}
        elif plan.finding == "pleural_effusion":
            info = _apply_effusion(plan, nid, hu, lab, les, canon, A)
        else:
            info = _apply_lung_lesion(plan, nid, hu, lab, les, world, r_place, soft_mm)
        if info is not None:
            infos.append(info)

    # Scanner noise inside the body only; air outside stays exactly -1000.
    inside = lab > 0
    sigma = r_anat.uniform(10.0, 20.0)
    hu[inside] += r_noise.normal(0.0, sigma, int(inside.sum())).astype(np.float32)
    hu_i16 = np.clip(np.rint(hu), HU_MIN, HU_MAX).astype(np.int16)

    sentences, impression = _compose_report(r_text, infos)
    # Drop normal sentences whose region is not in the field of view (only happens for tiny grids).
    present = set(np.unique(lab).tolist())
    sentences = [s for s in sentences if s["lesion_ids"] or present & set(s["anatomy_labels"])]
    labels = {f: int(any(L["finding"] == f for L in infos)) for f in FINDINGS}
    clinical = _pick(r_text, ["Cough.", "Shortness of breath.", "Fever and cough.", "Chest pain.",
                              "Follow-up.", "Not given."])
    technique = (f"Non-contrast axial chest CT images were obtained and reconstructed "
                 f"with {spacing[2]:g} mm slice thickness.")
    return SyntheticCase(
        index=int(index), seed=int(seed), hu=hu_i16, anatomy=lab, lesions=les, affine=affine, spacing=spacing,
        findings=" ".join(s["text"] for s in sentences), impression=impression, sentences=sentences,
        labels=labels, lesion_info=infos, clinical_information=clinical, technique=technique,
    )


# ----------------------------------------------------------------------------------------------------------------
# Public: CT-RATE-layout dataset on disk
# ----------------------------------------------------------------------------------------------------------------
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


def write_dataset(
    out_dir: str | os.PathLike,
    n: int,
    seed: int = 0,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    shape: Sequence[int] = DEFAULT_SHAPE,
    spacing: Sequence[float] = DEFAULT_SPACING,
    overwrite: bool = False,
    verbose: bool = False,
) -> Path:
    """Write n synthetic cases in CT-RATE's layout; returns out_dir.

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
    shape = tuple(int(s) for s in shape)
    spacing = tuple(float(s) for s in spacing)
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
        _write_tree(tmp, n, seed, val_fraction, shape, spacing, verbose)
        _move_into_place(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if verbose:
        print(f"wrote {n} synthetic cases to {out} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
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


def _write_tree(root: Path, n, seed, val_fraction, shape, spacing, verbose) -> None:
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
        case = generate_case(i, seed, shape, spacing)
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
        _write_csv(ds / "synthetic_ground_truth" / f"{split}_labels.csv", ("VolumeName",) + FINDINGS, r["labels"])
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
        "findings": list(FINDINGS),
        "anatomy_labels": {str(k): v for k, v in ANATOMY_LABELS.items()},
        "ctrate_labels": list(CTRATE_LABELS),
        "cases": cases_index,
    }
    (root / "SYNTHETIC_INFO.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")


def default_cache_dir() -> Path:
    """$SIMCROP_CACHE, else ~/.cache/simcrop."""
    env = os.environ.get("SIMCROP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "simcrop"


def dataset_dirname(n: int = DEFAULT_N, seed: int = 0, shape: Sequence[int] = DEFAULT_SHAPE,
                    spacing: Sequence[float] = DEFAULT_SPACING,
                    val_fraction: float = DEFAULT_VAL_FRACTION) -> str:
    """synthetic-v<version>-n<n>-s<seed>-<X>x<Y>x<Z>[-sp<sx>x<sy>x<sz>][-vf<f>] (suffixes only when non-default)."""
    name = f"synthetic-v{GENERATOR_VERSION}-n{n}-s{seed}-" + "x".join(str(int(s)) for s in shape)
    if tuple(float(s) for s in spacing) != DEFAULT_SPACING:
        name += "-sp" + "x".join(f"{float(s):g}" for s in spacing)
    if float(val_fraction) != DEFAULT_VAL_FRACTION:
        name += f"-vf{float(val_fraction):g}"
    return name


def ensure_default_dataset(
    cache_dir: str | os.PathLike | None = None,
    n: int = DEFAULT_N,
    seed: int = 0,
    shape: Sequence[int] = DEFAULT_SHAPE,
    spacing: Sequence[float] = DEFAULT_SPACING,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    verbose: bool = False,
) -> Path:
    """Path of the cached synthetic dataset, generating it (atomically) on first use."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    name = dataset_dirname(n, seed, shape, spacing, val_fraction)
    out = root / name
    if (out / "SYNTHETIC_INFO.json").is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    # Remove leftovers of killed generations (older than an hour, so a concurrent writer is never disturbed).
    for stale in root.glob(f"{name}.tmp-*"):
        try:
            if time.time() - stale.stat().st_mtime > 3600:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass
    try:
        write_dataset(out, n, seed, val_fraction, shape, spacing, verbose=verbose)
    except FileExistsError:
        if (out / "SYNTHETIC_INFO.json").is_file():  # another process finished first
            return out
        raise
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m simcrop.data.synthetic",
                                 description="Write a synthetic chest-CT/report dataset in CT-RATE's layout.")
    ap.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    ap.add_argument("--n", type=int, default=DEFAULT_N, help="number of cases")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION)
    ap.add_argument("--shape", type=int, nargs=3, default=list(DEFAULT_SHAPE), metavar=("X", "Y", "Z"))
    ap.add_argument("--spacing", type=float, nargs=3, default=list(DEFAULT_SPACING), metavar=("SX", "SY", "SZ"))
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        out = write_dataset(args.out, args.n, args.seed, args.val_fraction, args.shape, args.spacing,
                            overwrite=args.overwrite)
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.n} cases to {out} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
