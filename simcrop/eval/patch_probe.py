"""Per-patch linear probe: can a linear read-out tell which patches hold a lesion of type t? ("cannot see")

The ceiling of grounding: if a supervised linear probe on the frozen encoder's patch tokens cannot find the
lesion patches, no image-report objective can ground them, and a grounding failure says "cannot see", not
"does not align". The same probe on the raw input patches is the input-side reference (is the lesion visible
in the input at all, at this patch size?).

Per case (the evaluation's centre crop, unmasked volume):
  tokens  H_i = encoder output of patch i (final LayerNorm, cls dropped)            [N, D]
  raw     the patch's P voxels in [-1, 1] and a `bins`-bin histogram of them        [N, P + bins]
Targets per lesion type t (a finding of the ground-truth sentences; 'any' = every lesion sentence): a patch is
POSITIVE when it lies inside a region of type t by the grounding rule (>= `threshold` of its voxels, or the
patches holding region voxels for a region too small for that: metrics.patch_inside), NEGATIVE when it holds
no voxel of type t (so other types' lesion patches are negatives of t), and left out otherwise (partly filled).
Sampling: every patch touching a lesion, plus up to `negatives_per_case` random lesion-free patches per case.
Probe: logistic regression (features z-scored on the probe-training patches, class-balanced loss, L2 `l2`,
L-BFGS); trained on the patches of the training cases, scored on those of other cases (split by case).
Scores: pooled AUROC over the test patches, and the within-CT AUROC (mean over test CTs holding both
classes: lesion patches against the other patches of the SAME CT, which is what grounding must tell apart).
Also the position share (grounding.PositionShare, L2-normalised vectors as for g_v) of the raw patches (their
voxels; 'raw_unnormalised': the voxels as they are), the tokens and g_v (when present): a
representation whose variance is mostly patch position lets sentences pick places, not content; the raw
patches' value is what the data itself brings (anatomy at fixed places).
"""
from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional

from simcrop.eval import metrics
from simcrop.eval.data import load_volume, patch_fractions, patch_voxels
from simcrop.eval.grounding import PositionShare

RAW_BINS = 16  # histogram bins of the raw-patch features over [-1, 1]


def raw_patch_features(volume: torch.Tensor, patch, bins: int = RAW_BINS) -> torch.Tensor:
    """volume [1, X, Y, Z] in [-1, 1] -> [N, P + bins]: each patch's voxels and the share of them in each of
    `bins` equal intensity bins over [-1, 1] (a linear read-out of the voxels alone cannot use texture)."""
    vox = patch_voxels(volume, patch)  # [N, P]
    idx = ((vox.clamp(-1, 1) + 1) / 2 * bins).long().clamp_(0, bins - 1)  # [N, P]
    hist = functional.one_hot(idx, bins).float().mean(1)  # [N, bins]
    return torch.cat([vox, hist], 1)


def patch_targets(sentences, size, patch, threshold: float = 0.5) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Ground-truth sentences (SentenceRegion) of one case -> {type: (positive [N], negative [N])} for every
    lesion finding in the case, plus 'any' (every lesion sentence); normal-anatomy sentences are ignored."""
    pos: dict[str, np.ndarray] = {}
    touched: dict[str, np.ndarray] = {}
    for s in sentences:
        if s.finding == "normal":
            continue
        frac = patch_fractions(s.mask, size, patch)  # [N]
        inside, rule = metrics.patch_inside(frac, threshold)
        if rule == "none":
            continue
        for t in (s.finding, "any"):
            pos[t] = pos.get(t, np.zeros_like(inside)) | inside
            touched[t] = touched.get(t, np.zeros_like(inside)) | (frac > 0)
    return {t: (pos[t], ~touched[t]) for t in pos}


def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-3, iters: int = 100):
    """x [S, F], y [S] 0/1 -> a scorer f(x [T, F]) -> logits [T]: logistic regression on z-scored features,
    class-balanced mean BCE + l2 * |w|^2, L-BFGS (float64)."""
    x, y = x.double(), y.double()
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mu) / sd
    n_pos = float(y.sum())
    n_neg = float(len(y) - n_pos)
    weight = torch.where(y > 0.5, 0.5 / max(n_pos, 1.0), 0.5 / max(n_neg, 1.0))  # [S] sums to 1
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (functional.binary_cross_entropy_with_logits(z @ w + b, y, reduction="none") * weight).sum()
        loss = loss + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w, b = w.detach(), b.detach()
    return lambda t: (((t.double() - mu) / sd) @ w + b).float()


def probe_type(train: list[tuple], test: list[tuple], t: str, l2: float) -> dict:
    """train / test: per case (features [S, F], {type: (pos [S], neg [S])}) -> the probe of type t."""
    def stack(cases):
        xs, ys, cid = [], [], []
        for c, (x, tg) in enumerate(cases):
            pos, neg = tg.get(t, (np.zeros(len(x), bool), np.ones(len(x), bool)))
            keep = pos | neg
            xs.append(x[torch.from_numpy(keep)])
            ys.append(pos[keep])
            cid.append(np.full(int(keep.sum()), c))
        return torch.cat(xs), np.concatenate(ys), np.concatenate(cid)

    xtr, ytr, _ = stack(train)
    xte, yte, cte = stack(test)
    out = {"n_train_pos": int(ytr.sum()), "n_train_neg": int((~ytr).sum()), "n_test_pos": int(yte.sum()),
           "n_test_neg": int((~yte).sum())}
    if ytr.all() or not ytr.any():
        return {**out, "auroc": float("nan"), "within_ct_auroc": float("nan"), "within_ct_n": 0}
    score = fit_logistic(xtr, torch.from_numpy(ytr).long(), l2)(xte).numpy()
    within = [metrics.auroc(score[cte == c], yte[cte == c]) for c in np.unique(cte[yte])]
    within = [a for a in within if np.isfinite(a)]
    return {**out, "auroc": metrics.auroc(score, yte) if yte.any() and not yte.all() else float("nan"),
            "within_ct_auroc": float(np.mean(within)) if within else float("nan"), "within_ct_n": len(within)}


@torch.no_grad()
def case_features(model, case, device) -> dict[str, torch.Tensor]:
    """One GroundingCase -> {'tokens': [N, D], 'raw': [N, P + bins], 'voxels': [N, P], and with heads
    'gv': [N, Dp]} (CPU)."""
    cfg = model.cfg
    volume = load_volume(case.item, cfg.img_size)  # [1, X, Y, Z]
    h = model.encoder.forward_volume(volume[None].to(device))[0, 1:]  # [N, D]
    out = {"tokens": h.float().cpu(), "raw": raw_patch_features(volume, cfg.patch_size),
           "voxels": patch_voxels(volume, cfg.patch_size)}
    if hasattr(model, "head_v"):
        out["gv"] = model.head_v(h).float().cpu()
    return out


def _sample(targets: dict, n: int, negatives: int, rng: np.random.Generator) -> np.ndarray:
    """Indices kept: every patch touching a lesion ('any' not negative) and <= `negatives` lesion-free ones."""
    touched = ~targets["any"][1] if "any" in targets else np.zeros(n, bool)
    free = np.flatnonzero(~touched)
    if negatives and len(free) > negatives:
        free = rng.choice(free, negatives, replace=False)
    return np.sort(np.concatenate([np.flatnonzero(touched), free]))


def run_patch_probe(model, train_cases, test_cases, device, threshold: float = 0.5, negatives_per_case: int = 128,
                    l2: float = 1e-3, seed: int = 0, log=print) -> dict:
    """The per-patch probe on tokens and raw patches (module docstring) and the position shares."""
    cfg = model.cfg
    reps = ("tokens", "raw")
    data = {"train": {r: [] for r in reps}, "test": {r: [] for r in reps}}
    shares = {}
    types: set[str] = set()
    for split, cases in (("train", train_cases), ("test", test_cases)):
        for c, case in enumerate(cases):
            feats = case_features(model, case, device)
            targets = patch_targets(case.sentences, cfg.img_size, cfg.patch_size, threshold)
            types |= set(targets)
            if split == "test":
                vecs = {"raw": functional.normalize(feats["voxels"], dim=-1), "raw_unnormalised": feats["voxels"],
                        "tokens": functional.normalize(feats["tokens"], dim=-1)}
                if "gv" in feats:
                    vecs["gv"] = functional.normalize(feats["gv"], dim=-1)
                for r, v in vecs.items():
                    shares.setdefault(r, PositionShare()).add(v)
            keep = _sample(targets, len(feats["tokens"]), negatives_per_case,
                           np.random.default_rng([seed, c, int(split == "test")]))
            tg = {t: (p[keep], q[keep]) for t, (p, q) in targets.items()}
            for r in reps:
                data[split][r].append((feats[r][torch.from_numpy(keep)], tg))
        log(f"  patch probe: {len(cases)} {split} cases encoded")
    order = sorted(types - {"any"}) + (["any"] if "any" in types else [])
    res = {"threshold": threshold, "negatives_per_case": negatives_per_case, "l2": l2, "seed": seed,
           "n_train_cases": len(train_cases), "n_test_cases": len(test_cases), "types": order,
           "raw_features": f"{int(np.prod(cfg.patch_size))} voxels + {RAW_BINS}-bin histogram"}
    for r in reps:
        per = {t: probe_type(data["train"][r], data["test"][r], t, l2) for t in order}
        res[r] = {"per_type": per,
                  "macro_auroc": metrics.nanmean(per[t]["auroc"] for t in order if t != "any"),
                  "macro_within_ct_auroc": metrics.nanmean(per[t]["within_ct_auroc"] for t in order if t != "any")}
        log(f"  patch probe {r}: macro AUROC {res[r]['macro_auroc']:.3f} (within-CT "
            f"{res[r]['macro_within_ct_auroc']:.3f}); " + ", ".join(f"{t} {per[t]['auroc']:.3f}" for t in order))
    res["position_share"] = {r: acc.value() for r, acc in shares.items()}
    return res


def markdown(res: dict, title: str) -> str:
    from simcrop.eval.report import fmt, md_table

    rows = []
    for t in res["types"]:
        tok, raw = res["tokens"]["per_type"][t], res["raw"]["per_type"][t]
        rows.append([t, fmt(tok["auroc"]), fmt(tok["within_ct_auroc"]), fmt(raw["auroc"]), fmt(raw["within_ct_auroc"]),
                     f"{tok['n_train_pos']} / {tok['n_train_neg']}", f"{tok['n_test_pos']} / {tok['n_test_neg']}"])
    rows.append(["macro (types)", fmt(res["tokens"]["macro_auroc"]), fmt(res["tokens"]["macro_within_ct_auroc"]),
                 fmt(res["raw"]["macro_auroc"]), fmt(res["raw"]["macro_within_ct_auroc"]), "", ""])
    ps = res["position_share"]
    return "\n\n".join([
        f"# Per-patch linear probe — {title}",
        f"Does a patch hold lesion type t? Logistic regression trained on the patches of {res['n_train_cases']} "
        f"training cases, scored on {res['n_test_cases']} other cases. Positive: the patch lies in a region of "
        f"type t (>= {res['threshold']:g} of its voxels; the patches holding region voxels for smaller regions); "
        f"negative: no voxel of type t; every lesion patch plus up to {res['negatives_per_case']} lesion-free "
        f"patches per case. Tokens = the frozen encoder's patch tokens (the ceiling of grounding); raw = the input "
        f"patch ({res['raw_features']}; the input-side reference). Within-CT = lesion patches against the other "
        f"patches of the same CT. Chance 0.5.",
        md_table(["type", "tokens AUROC", "tokens within-CT", "raw AUROC", "raw within-CT",
                  "train pos / neg", "test pos / neg"], rows),
        "Share of the variance explained by patch position over the test cases (0 = content only, 1 = position "
        "only; L2-normalised vectors as in the grounding diagnostic; raw = the input patch's voxels, "
        "raw_unnormalised = the same without normalisation): " + ", ".join(f"{k} {fmt(v)}" for k, v in ps.items())
        + ". A g_v share far above the raw patches' is the encoder's own position preference; a raw share near "
        "the g_v share means the data already carries it.",
    ])
