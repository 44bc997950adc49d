"""Zero-shot classification and report <-> volume retrieval in the aligned space (g_v, g_t).

Zero-shot: for each finding a positive and a negative prompt ("There is a pulmonary nodule in the lung." vs
"No pulmonary nodule."); score = cos(image, positive) - cos(image, negative) (the log-odds of a two-way softmax
up to the temperature, so AUROC does not depend on it); AUROC per finding and macro, against the label CSV.
Retrieval: report embedding = mean of the L2-normalised sentence embeddings s_j of its findings; image =
pooled g_v; cosine similarity; recall@1/5/10 report -> volume and volume -> report (chance = k / N).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from simcrop.eval import metrics as M
from simcrop.eval.errors import EvalError

#: Positive / negative prompts for the synthetic findings and CT-RATE's 18 columns.
PROMPTS: dict[str, tuple[str, str]] = {
    "nodule": ("There is a pulmonary nodule in the lung.", "No pulmonary nodule."),
    "mass": ("There is a mass in the lung.", "No lung mass."),
    "ground_glass_opacity": ("There is ground-glass opacity in the lung.", "No ground-glass opacity."),
    "consolidation": ("There is consolidation in the lung.", "No consolidation."),
    "pleural_effusion": ("There is a pleural effusion.", "No pleural effusion."),
    "cardiomegaly": ("The heart is enlarged.", "Heart size is normal."),
    "Medical material": ("Medical material is present.", "No medical material."),
    "Arterial wall calcification": ("There is arterial wall calcification.", "No arterial wall calcification."),
    "Cardiomegaly": ("The heart is enlarged.", "Heart size is normal."),
    "Pericardial effusion": ("There is a pericardial effusion.", "No pericardial effusion."),
    "Coronary artery wall calcification": ("There is coronary artery calcification.", "No coronary artery calcification."),
    "Hiatal hernia": ("There is a hiatal hernia.", "No hiatal hernia."),
    "Lymphadenopathy": ("There is mediastinal lymphadenopathy.", "No lymphadenopathy."),
    "Emphysema": ("There is emphysema in the lungs.", "No emphysema."),
    "Atelectasis": ("There is atelectasis in the lung.", "No atelectasis."),
    "Lung nodule": ("There is a pulmonary nodule in the lung.", "No pulmonary nodule."),
    "Lung opacity": ("There is an opacity in the lung.", "No lung opacity."),
    "Pulmonary fibrotic sequela": ("There are fibrotic changes in the lung.", "No fibrotic changes."),
    "Pleural effusion": ("There is a pleural effusion.", "No pleural effusion."),
    "Mosaic attenuation pattern": ("There is a mosaic attenuation pattern.", "No mosaic attenuation."),
    "Peribronchial thickening": ("There is peribronchial thickening.", "No peribronchial thickening."),
    "Consolidation": ("There is consolidation in the lung.", "No consolidation."),
    "Bronchiectasis": ("There is bronchiectasis.", "No bronchiectasis."),
    "Interlobular septal thickening": ("There is interlobular septal thickening.", "No septal thickening."),
}


def prompts_for(names: list[str], prompts_file: str | None = None) -> dict[str, tuple[str, str]]:
    """(positive, negative) per class name: a JSON file {name: [pos, neg]} first, then PROMPTS, then the
    template "There is <name>." / "No <name>."."""
    table = dict(PROMPTS)
    if prompts_file:
        try:
            user = json.loads(Path(prompts_file).read_text())
            table.update({k: (v[0], v[1]) for k, v in user.items()})
        except (OSError, json.JSONDecodeError, IndexError, TypeError, AttributeError) as exc:
            raise EvalError(f"{prompts_file}: expected a JSON object {{class: [positive, negative]}} ({exc})") from None
    out = {}
    for n in names:
        if n in table:
            out[n] = table[n]
        else:
            words = n.replace("_", " ").lower()
            out[n] = (f"There is {words}.", f"No {words}.")
    return out


def zero_shot_scores(image: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> np.ndarray:
    """image [N, Dp], pos / neg [C, Dp] -> scores [N, C] = cos(image, pos) - cos(image, neg)."""
    i = F.normalize(image.float(), dim=-1)
    return (i @ F.normalize(pos.float(), dim=-1).T - i @ F.normalize(neg.float(), dim=-1).T).numpy()


def zero_shot(image: torch.Tensor, labels: np.ndarray, names: list[str], prompt_emb,
              prompts_file: str | None = None) -> dict:
    """image [N, Dp] pooled embeddings, labels [N, C] 0/1 -> AUROC per class and macro.
    prompt_emb: callable(list[str]) -> [P, Dp] (the text side)."""
    pr = prompts_for(names, prompts_file)
    pos = prompt_emb([pr[n][0] for n in names])
    neg = prompt_emb([pr[n][1] for n in names])
    scores = zero_shot_scores(image, pos, neg)
    macro, per = M.macro_auroc(scores, labels)
    return {"auroc": macro, "auroc_per_class": dict(zip(names, per)), "prompts": {n: list(pr[n]) for n in names},
            "prevalence": dict(zip(names, np.asarray(labels).mean(0).tolist())), "n": int(len(labels))}


def report_embeddings(sentences: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """[(s [M, Dp], valid [M])] -> [R, Dp]: mean of each report's L2-normalised valid sentence embeddings."""
    out = []
    for s, valid in sentences:
        if not valid.any():
            raise EvalError("a report has no sentence embedding")
        out.append(F.normalize(s[valid].float(), dim=-1).mean(0))
    return torch.stack(out)


def retrieval(image: torch.Tensor, reports: torch.Tensor, ks=(1, 5, 10)) -> dict:
    """image [N, Dp], reports [N, Dp] (row i of each = case i) -> recall@k both ways and the chance rates."""
    sim = (F.normalize(reports.float(), dim=-1) @ F.normalize(image.float(), dim=-1).T).numpy()  # [report, volume]
    n = sim.shape[0]
    return {"report_to_volume": M.recall_at_k(sim, ks), "volume_to_report": M.recall_at_k(sim.T, ks),
            "chance": {int(k): min(1.0, k / n) for k in ks}, "n": int(n)}


def markdown_zero_shot(res: dict, title: str) -> str:
    from simcrop.eval.report import fmt, md_table

    rows = [[n, fmt(a), fmt(res["prevalence"][n]), f'"{res["prompts"][n][0]}" / "{res["prompts"][n][1]}"']
            for n, a in res["auroc_per_class"].items()]
    return "\n\n".join([
        f"# Zero-shot classification — {title}",
        f"Macro AUROC **{fmt(res['auroc'])}** over {res['n']} test volumes (chance 0.5). Score = cos(g_v pooled, "
        f"positive prompt) - cos(g_v pooled, negative prompt).",
        md_table(["finding", "AUROC", "prevalence", "prompts (positive / negative)"], rows),
    ])


def markdown_retrieval(res: dict, title: str) -> str:
    from simcrop.eval.report import md_table

    ks = list(res["chance"])
    rows = [["report → volume", *[res["report_to_volume"][k] for k in ks]],
            ["volume → report", *[res["volume_to_report"][k] for k in ks]],
            ["chance", *[res["chance"][k] for k in ks]]]
    return "\n\n".join([
        f"# Report ↔ volume retrieval — {title}",
        f"{res['n']} test pairs; report = mean of its normalised findings-sentence embeddings, volume = pooled g_v. "
        f"Ties count against the query.",
        md_table(["direction", *[f"R@{k}" for k in ks]], rows),
    ])
