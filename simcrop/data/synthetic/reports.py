"""Report wording: findings sentences, each tied to the voxel region it describes, and the impression.

Findings sentences each end with '.', and a '.' between two digits ("1.5 cm") stays inside its sentence (the
SPEC's splitting rule). Each sentence dict holds ``text``, ``finding`` (a ``FINDINGS`` name or ``"normal"``),
``anatomy_labels`` and ``lesion_ids``: its region is the union of voxels with those anatomy labels and of those
lesion instances (``region_mask``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from simcrop.data.synthetic.anatomy import BONE_LABELS, LUNG_LABELS
from simcrop.data.synthetic.findings import FINDINGS, LUNG_FINDINGS

_P_NO_IMPRESSION = 0.1  # fraction of reports without an impression section


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


def compose_report(rng: np.random.Generator, lesions: list[dict]):
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


def clinical_information(rng: np.random.Generator) -> str:
    """The report's clinical information line."""
    return _pick(rng, ["Cough.", "Shortness of breath.", "Fever and cough.", "Chest pain.", "Follow-up.",
                       "Not given."])


def technique(spacing: Sequence[float]) -> str:
    """The report's technique line (slice thickness = z spacing, mm)."""
    return (f"Non-contrast axial chest CT images were obtained and reconstructed "
            f"with {spacing[2]:g} mm slice thickness.")
