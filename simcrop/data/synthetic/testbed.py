"""The grounding testbed: phantoms whose findings the small encoder can SEE, beside the realistic phantoms.

The realistic phantoms (case.py) hide most findings from a 64 mm patch (a median nodule fills 0.2 % of it). The
testbed keeps their normal anatomy (anatomy.py: body, lobes, heart, airways, bones, vessels, scanner noise)
and their on-disk layout (writer.py: CT-RATE's folders, the same ground-truth files), but its findings are
large lung lesions of four types that differ by intensity and texture (``TESTBED_LOOKS``):

    solid         +35 HU, coarse texture (+-45 HU, 8 mm grain)         soft tissue, heterogeneous
    ground_glass  lung raised to about -600 HU, vessels kept, soft rim  hazy
    fluid         +12 HU, homogeneous, sharp edge                       smooth water density
    calcified     +300 HU, fine texture (+-40 HU)                       bright

Each lesion is 48-80 mm across (a lobulated union of spheres), centred in one lobe and drawn inside the lung of
that side (never into the mediastinum or the chest wall); lobes are drawn uniformly: the side 50/50, then a
lobe of that side uniformly, at most one lesion per lobe and one per type in a CT. 0-3 lesions per CT
(``_N_LESIONS_P``). Lesions lie inside the central ``TESTBED_CROP`` (the evaluation's centre crop), so every
region is seen whole at evaluation. Each lesion gets one findings sentence naming its type and its lobe +
side ("A 6.2 cm solid mass is seen in the right upper lobe."); normal-anatomy sentences (heart, mediastinum,
airways, bones, pleura; "The lungs are clear." without lesions) are drawn as in the realistic reports.

Grid: ``TESTBED_SHAPE`` 72 x 72 x 36 voxels of 4 x 4 x 8 mm (288 mm cubes); the ``testbed`` preset
(simcrop/config.py) crops 64 x 64 x 32 and cuts 8 x 8 x 4-voxel patches = 32 mm cubes, an 8 x 8 x 8 grid.
Determinism: case ``i`` depends only on ``(seed, i, shape, spacing, crop)``; its streams are salted, so the
testbed's case i is unrelated to the realistic phantoms' case i.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from simcrop.data.synthetic.anatomy import (ANATOMY_IDS, ANATOMY_LABELS, BONE_LABELS, LEFT_LUNG_LABELS, LUNG_LABELS,
                                            RIGHT_LUNG_LABELS, base_hu, build_anatomy, draw_vessels, sample_anatomy)
from simcrop.data.synthetic.case import HU_MAX, HU_MIN, SyntheticCase
from simcrop.data.synthetic.findings import CTRATE_LABELS, _place_center
from simcrop.data.synthetic.geometry import Axes, make_affine, smooth_noise, union_sdf, unit_vectors
from simcrop.data.synthetic.reports import _cap, _pick, clinical_information, technique

TESTBED_VERSION = "1"
TESTBED_TYPES: tuple[str, ...] = ("solid", "ground_glass", "fluid", "calcified")
# type -> (mode, target HU, texture amplitude HU, texture grain mm, edge width mm)
TESTBED_LOOKS: dict[str, dict] = {
    "solid": {"mode": "replace", "hu": 35.0, "texture": 45.0, "grain_mm": 8.0, "edge_mm": 4.0},
    "ground_glass": {"mode": "add", "hu": -600.0, "texture": 0.0, "grain_mm": 0.0, "edge_mm": 8.0},
    "fluid": {"mode": "replace", "hu": 12.0, "texture": 0.0, "grain_mm": 0.0, "edge_mm": 2.0},
    "calcified": {"mode": "replace", "hu": 300.0, "texture": 40.0, "grain_mm": 4.0, "edge_mm": 4.0},
}
TESTBED_TO_CTRATE: dict[str, tuple[str, ...]] = {
    "solid": ("Lung nodule",),
    "ground_glass": ("Lung opacity",),
    "fluid": (),
    "calcified": ("Lung nodule",),
}
TESTBED_SHAPE: tuple[int, int, int] = (72, 72, 36)  # voxels (X, Y, Z)
TESTBED_SPACING: tuple[float, float, float] = (4.0, 4.0, 8.0)  # mm
TESTBED_CROP: tuple[int, int, int] = (64, 64, 32)  # the testbed preset's crop: lesions lie inside it
TESTBED_N = 1280  # cases of the cached testbed: 768 train + 512 valid
TESTBED_VAL_FRACTION = 0.4
SIZE_RANGE_MM = (48, 80)  # lesion diameter, uniform (integers)
_N_LESIONS_P = (0.1, 0.3, 0.4, 0.2)  # 0, 1, 2, 3 lesions per CT
_SALT = 0x7E57  # the testbed's streams differ from the realistic phantoms' for the same (seed, index)


class TestbedCase(SyntheticCase):
    """A testbed case: a SyntheticCase whose labels are TESTBED_TYPES."""

    __test__ = False  # not a pytest test class

    def ctrate_labels(self) -> dict[str, int]:
        out = {name: 0 for name in CTRATE_LABELS}
        for f, v in self.labels.items():
            if v:
                for name in TESTBED_TO_CTRATE.get(f, ()):
                    out[name] = 1
        return out


def sample_lesions(rng: np.random.Generator) -> list[dict]:
    """Plans (grid-independent): [{finding, lobe, side, size_mm, offsets, radii}] with distinct types and lobes."""
    n = int(rng.choice(len(_N_LESIONS_P), p=_N_LESIONS_P))
    types = [str(t) for t in rng.choice(TESTBED_TYPES, size=n, replace=False)]
    free = {"right": list(RIGHT_LUNG_LABELS), "left": list(LEFT_LUNG_LABELS)}
    plans = []
    for t in types:
        sides = [s for s in ("right", "left") if free[s]]
        side = sides[int(rng.integers(len(sides)))]
        lobe = free[side].pop(int(rng.integers(len(free[side]))))
        size = float(rng.integers(SIZE_RANGE_MM[0], SIZE_RANGE_MM[1] + 1))
        # a lobulated blob: a core sphere of radius R and 3 lobules bulging up to 1.05 R: extent ~ the diameter
        offsets = np.vstack([np.zeros((1, 3)), unit_vectors(rng, 3) * rng.uniform(0.15, 0.3, (3, 1))])
        radii = np.concatenate([[1.0], rng.uniform(0.65, 0.75, 3)])
        plans.append({"finding": t, "lobe": ANATOMY_LABELS[int(lobe)], "side": side, "size_mm": size,
                      "offsets": offsets, "radii": radii})
    return plans


def _crop_box(shape, crop) -> np.ndarray:
    """bool [X, Y, Z]: the voxels of the evaluation's centre crop (simcrop.data.augment.center_crop_pad)."""
    box = np.zeros(shape, bool)
    sl = tuple(slice(max(n - c, 0) // 2, max(n - c, 0) // 2 + min(n, c)) for n, c in zip(shape, crop))
    box[sl] = True
    return box


def _draw_lesion(plan, lesion_id, hu, lab, les, w: Axes, box, rng, soft_mm) -> dict | None:
    """Draw one planned lesion into hu (in place); its voxels into les. None when it cannot be placed."""
    lobe = ANATOMY_IDS[plan["lobe"]]
    side = np.isin(lab, RIGHT_LUNG_LABELS if plan["side"] == "right" else LEFT_LUNG_LABELS)
    avail = side & (les == 0) & box
    R = plan["size_mm"] / 2.0
    center = _place_center(rng, (lab == lobe) & avail, w, R * 0.8)
    if center is None:
        return None
    look = TESTBED_LOOKS[plan["finding"]]
    res = union_sdf(w, center, R, plan["offsets"], plan["radii"])
    if res is None:
        return None
    sl, sdf = res
    a = avail[sl]
    edge = max(look["edge_mm"], soft_mm)
    wt = np.clip(sdf / edge + (0.5 if look["mode"] == "add" else 0.75), 0.0, 1.0) * a  # partial volume
    sub = hu[sl]
    if look["mode"] == "add":  # hazy: lung raised toward the target, vessels stay visible
        sub += wt * (look["hu"] - (-855.0)) * 0.95
    else:
        target = np.full(sub.shape, look["hu"], np.float32)
        if look["texture"]:
            box_axes = Axes(w.xs[sl[0]], w.ys[sl[1]], w.zs[sl[2]])
            target += look["texture"] * smooth_noise(rng, box_axes, look["grain_mm"])
        sub += wt * (target - sub)
    inside = (sdf >= 0) & a
    ci = tuple(int(np.clip(np.searchsorted(v, cv), 0, len(v) - 1)) for v, cv in zip((w.xs, w.ys, w.zs), center))
    local = tuple(ci[d] - sl[d].start for d in range(3))
    if all(0 <= local[d] < inside.shape[d] for d in range(3)) and a[local]:
        inside[local] = True  # the centre voxel always belongs to the lesion
    if not inside.any():
        return None
    les[sl][inside] = lesion_id
    lobe_share = float((lab[sl][inside] == lobe).mean())
    idx = np.argwhere(inside)  # [n, 3] voxel indices within the box
    step = [float(v[1] - v[0]) if len(v) > 1 else 0.0 for v in (w.xs, w.ys, w.zs)]
    extent = [round(float(idx[:, d].max() - idx[:, d].min() + 1) * step[d], 1) for d in range(3)]  # mm
    return {"id": lesion_id, "finding": plan["finding"], "location": plan["lobe"].replace("_", " "),
            "side": plan["side"], "size_mm": plan["size_mm"], "extent_mm": extent, "n_voxels": int(inside.sum()),
            "center_mm": [round(float(v), 2) for v in center], "lobe_share": round(lobe_share, 3),
            "hu": look["hu"]}


def _fmt_size(rng, mm: float) -> str:
    return f"{mm / 10.0:.1f} cm" if rng.random() < 0.6 else f"{int(round(mm))} mm"


def _lesion_sentence(rng, L: dict) -> str:
    f, loc, size = L["finding"], L["location"], _fmt_size(rng, L["size_mm"])
    art = "an" if size.startswith(("8", "11", "18")) else "a"
    options = {
        "solid": [f"{_cap(art)} {size} solid mass is seen in the {loc}.",
                  f"There is a solid soft-tissue mass in the {loc}.",
                  f"A large solid lesion measuring {size} is present in the {loc}."],
        "ground_glass": [f"A large area of ground-glass opacity is seen in the {loc}.",
                         f"There is {art} {size} ground-glass opacity in the {loc}.",
                         f"Hazy ground-glass attenuation is present in the {loc}."],
        "fluid": [f"{_cap(art)} {size} fluid-filled cyst is seen in the {loc}.",
                  f"There is a fluid-density cystic lesion in the {loc}.",
                  f"A cyst of fluid attenuation measuring {size} is present in the {loc}."],
        "calcified": [f"{_cap(art)} {size} densely calcified mass is seen in the {loc}.",
                      f"There is a calcified lesion in the {loc}.",
                      f"A large calcified lesion measuring {size} is present in the {loc}."],
    }
    return _pick(rng, options[f])


_IMPRESSION = {"solid": "solid mass", "ground_glass": "ground-glass opacity", "fluid": "fluid-filled cyst",
               "calcified": "calcified mass"}


def _sentence(text, finding="normal", anatomy=(), lesions=()) -> dict:
    return {"text": text, "finding": finding, "anatomy_labels": [int(a) for a in anatomy],
            "lesion_ids": [int(i) for i in lesions]}


def compose_report(rng: np.random.Generator, lesions: list[dict], present: set) -> tuple[list[dict], str]:
    """(findings sentences, impression): one sentence per lesion (type + lobe + side), normal anatomy as
    today; a normal sentence whose region is not in the field of view is left out."""
    lungs = [_sentence(_lesion_sentence(rng, L), L["finding"], (), (L["id"],)) for L in lesions]
    lungs = [lungs[i] for i in rng.permutation(len(lungs))]
    if not lesions:
        lungs.append(_sentence(_pick(rng, ["The lungs are clear.", "Both lungs are clear.",
                                           "The lung parenchyma is clear."]), anatomy=LUNG_LABELS))
    if rng.random() < 0.3:
        lungs.append(_sentence(_pick(rng, ["No pneumothorax.", "There is no pneumothorax."]), anatomy=LUNG_LABELS))
    pleura = [_sentence(_pick(rng, ["No pleural effusion is seen.", "There is no pleural effusion.",
                                    "No pleural effusion."]), anatomy=LUNG_LABELS)] if rng.random() < 0.6 else []
    heart = [_sentence(_pick(rng, ["Heart size is normal.", "The heart is normal in size.",
                                   "Cardiac size is within normal limits."]), anatomy=(7,))]
    if rng.random() < 0.6:
        heart.append(_sentence(_pick(rng, ["Mediastinal structures are unremarkable.",
                                           "No mediastinal lymphadenopathy.",
                                           "The thoracic aorta is normal in caliber."]), anatomy=(8,)))
    rng.shuffle(heart)
    airway = [_sentence(_pick(rng, ["The trachea and main bronchi are patent.", "The central airways are patent.",
                                    "Trachea and both main bronchi are patent."]), anatomy=(9,))] \
        if rng.random() < 0.85 else []
    bones = [_sentence(_pick(rng, ["Visualized osseous structures are unremarkable.",
                                   "No destructive bone lesion is seen.", "The osseous structures are intact."]),
                       anatomy=BONE_LABELS)] if rng.random() < 0.75 else []
    groups = {"airway": airway, "lungs": lungs, "pleura": pleura, "heart": heart, "bones": bones}
    orders = [("airway", "lungs", "pleura", "heart", "bones"), ("heart", "airway", "lungs", "pleura", "bones"),
              ("lungs", "pleura", "airway", "heart", "bones")]
    order = orders[int(rng.choice(3, p=[0.5, 0.25, 0.25]))]
    sentences = [s for g in order for s in groups[g]]
    sentences = [s for s in sentences if s["lesion_ids"] or present & set(s["anatomy_labels"])]
    if lesions:
        impression = " ".join(f"{_cap(_IMPRESSION[L['finding']])} in the {L['location']}."
                              for L in sorted(lesions, key=lambda L: L["id"]))
    else:
        impression = _pick(rng, ["No acute cardiopulmonary abnormality.", "Normal chest CT."])
    if rng.random() < 0.1:
        impression = ""
    return sentences, impression


def generate_testbed_case(index: int, seed: int = 0, shape: Sequence[int] = TESTBED_SHAPE,
                          spacing: Sequence[float] = TESTBED_SPACING,
                          crop: Sequence[int] = TESTBED_CROP) -> TestbedCase:
    """Case `index` of the testbed with `seed` (deterministic; independent of the dataset size)."""
    shape = tuple(int(s) for s in shape)
    spacing = tuple(float(s) for s in spacing)
    if len(shape) != 3 or min(shape) < 1 or len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"bad shape/spacing: {shape} {spacing}")
    if index < 0 or seed < 0:
        raise ValueError("index and seed must be non-negative")
    r_anat, r_plan, r_place, r_text, r_noise = (
        np.random.default_rng(s) for s in np.random.SeedSequence([int(seed), int(index), _SALT]).spawn(5)
    )
    A = sample_anatomy(r_anat)
    plans = sample_lesions(r_plan)

    affine = make_affine(shape, spacing)
    world = Axes(*(affine[d, 3] + np.arange(shape[d]) * spacing[d] for d in range(3)))
    scale = np.array([A.scale_xy, A.scale_xy, A.scale_z])
    canon = Axes(*((v - A.shift[d]) / scale[d] for d, v in enumerate((world.xs, world.ys, world.zs))))
    soft_mm = float(min(spacing))

    lab, geo = build_anatomy(canon, A, 1.0)
    hu = base_hu(lab, geo, canon, r_noise)
    draw_vessels(hu, lab, canon, A, soft_mm / A.scale_xy)
    box = _crop_box(shape, crop)
    les = np.zeros(shape, np.uint8)
    infos: list[dict] = []
    for plan in plans:
        info = _draw_lesion(plan, len(infos) + 1, hu, lab, les, world, box, r_place, soft_mm)
        if info is not None:
            infos.append(info)

    inside = lab > 0  # scanner noise inside the body only; air outside stays exactly -1000
    sigma = r_anat.uniform(10.0, 20.0)
    hu[inside] += r_noise.normal(0.0, sigma, int(inside.sum())).astype(np.float32)
    hu_i16 = np.clip(np.rint(hu), HU_MIN, HU_MAX).astype(np.int16)

    sentences, impression = compose_report(r_text, infos, set(np.unique(lab).tolist()))
    labels = {t: int(any(L["finding"] == t for L in infos)) for t in TESTBED_TYPES}
    return TestbedCase(
        index=int(index), seed=int(seed), hu=hu_i16, anatomy=lab, lesions=les, affine=affine, spacing=spacing,
        findings=" ".join(s["text"] for s in sentences), impression=impression, sentences=sentences,
        labels=labels, lesion_info=infos, clinical_information=clinical_information(r_text),
        technique=technique(spacing),
    )


def testbed_info(crop: Sequence[int] = TESTBED_CROP) -> dict:
    """What SYNTHETIC_INFO.json records beside the common keys."""
    return {"generator": "simcrop.data.synthetic.testbed", "generator_version": TESTBED_VERSION,
            "variant": "testbed", "lesion_looks": TESTBED_LOOKS, "lesion_size_mm": list(SIZE_RANGE_MM),
            "lesions_per_case_p": list(_N_LESIONS_P), "crop": list(crop)}
