"""One synthetic case in memory: a chest phantom in HU with its report and voxel-level ground truth.

``generate_case`` runs the stages in order: anatomy parameters and finding plans, the normal anatomy, the
findings drawn into it, scanner noise, the report. ``SyntheticCase.hu`` is int16 HU in [-1024, 3071]. Air outside
the body is exactly -1000 (no noise there); Gaussian noise (10-20 HU) is added inside the body only.
``findings == " ".join(s["text"] for s in sentences)``.

Determinism: case ``i`` depends only on ``(seed, i, shape, spacing)``; findings, sizes, locations and report text
depend only on ``(seed, i)`` (unless a lesion cannot be placed at all in a tiny field of view).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from simcrop.data.synthetic.anatomy import base_hu, build_anatomy, draw_vessels, sample_anatomy
from simcrop.data.synthetic.findings import (CTRATE_LABELS, FINDING_TO_CTRATE, FINDINGS, heart_factor,
                                             place_findings, sample_findings)
from simcrop.data.synthetic.geometry import Axes, make_affine
from simcrop.data.synthetic.reports import clinical_information, compose_report, technique

DEFAULT_SHAPE: tuple[int, int, int] = (80, 80, 40)  # voxels (X, Y, Z)
DEFAULT_SPACING: tuple[float, float, float] = (4.0, 4.0, 8.0)  # mm (x, y, z)
PAPER_SHAPE: tuple[int, int, int] = (224, 224, 112)
PAPER_SPACING: tuple[float, float, float] = (1.5, 1.5, 3.0)

RESCALE_SLOPE = 1.0
RESCALE_INTERCEPT = -1024.0  # HU = stored * RESCALE_SLOPE + RESCALE_INTERCEPT
HU_MIN, HU_MAX = -1024, 3071


@dataclass
class SyntheticCase:
    """One synthetic CT with its report and voxel-level ground truth."""

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
    A = sample_anatomy(r_anat)
    plans = sample_findings(r_find)

    affine = make_affine(shape, spacing)
    world = Axes(*(affine[d, 3] + np.arange(shape[d]) * spacing[d] for d in range(3)))
    scale = np.array([A.scale_xy, A.scale_xy, A.scale_z])
    canon = Axes(*((v - A.shift[d]) / scale[d] for d, v in enumerate((world.xs, world.ys, world.zs))))
    soft_mm = float(min(spacing))  # partial-volume edge width

    factor = heart_factor(plans)
    lab, geo = build_anatomy(canon, A, factor)
    hu = base_hu(lab, geo, canon, r_noise)
    draw_vessels(hu, lab, canon, A, soft_mm / A.scale_xy)
    les, infos = place_findings(plans, hu, lab, world, canon, A, factor, r_place, soft_mm)

    # Scanner noise inside the body only; air outside stays exactly -1000.
    inside = lab > 0
    sigma = r_anat.uniform(10.0, 20.0)
    hu[inside] += r_noise.normal(0.0, sigma, int(inside.sum())).astype(np.float32)
    hu_i16 = np.clip(np.rint(hu), HU_MIN, HU_MAX).astype(np.int16)

    sentences, impression = compose_report(r_text, infos)
    # Drop normal sentences whose region is not in the field of view (only happens for tiny grids).
    present = set(np.unique(lab).tolist())
    sentences = [s for s in sentences if s["lesion_ids"] or present & set(s["anatomy_labels"])]
    labels = {f: int(any(L["finding"] == f for L in infos)) for f in FINDINGS}
    clinical = clinical_information(r_text)
    return SyntheticCase(
        index=int(index), seed=int(seed), hu=hu_i16, anatomy=lab, lesions=les, affine=affine, spacing=spacing,
        findings=" ".join(s["text"] for s in sentences), impression=impression, sentences=sentences,
        labels=labels, lesion_info=infos, clinical_information=clinical, technique=technique(spacing),
    )
