"""Sentence grounding: does a findings sentence pick the patches of the region it describes?

For each findings sentence j with a ground-truth region (the evaluation's centre crop applied to the region as
to the volume), on the UNMASKED volume:
  S_ji = cos(s_j, v_i),  s_j = mean of g_t over the sentence's tokens (in the context of the whole findings,
  as in training), v_i = g_v(H_i) for every patch i (as the alignment loss does, but over all N patches);
  top-K patches of S_j. (K = the checkpoint's topk unless given.)
Scores per sentence (simcrop.eval.metrics): share of the top-K patches inside the region, pointing-game hit
(argmax patch inside), the chance rate of both (region's share of patches), and the patch-level AUROC of S_j
for inside vs outside patches (chance 0.5). A patch is inside when >= `inside_threshold` (0.5) of its voxels
are in the region; a region that fills no patch that far (most lesions: a tiny-preset patch is 64 x 64 x 64 mm
of the synthetic data) uses "the patch holds region voxels" instead; the rule used is recorded per sentence.
Results split by sentence type: 'lesion' (a finding) vs 'normal' (a normal-anatomy sentence).
Also per sentence: the share of its top-K patches that are BACKGROUND (>= half their voxels at or below
BACKGROUND_HU, i.e. air outside the body) beside the background's share of the patches: a map that prefers
empty space shows up there. And a sentence-specificity control: the same scores for the CT's MEAN map (the
average of its sentences' maps, identical for every sentence of the CT). A map that merely prefers the body, or
one anatomy, beats the region-share chance for every sentence; grounding means beating this control too.
map 'fusion' (checkpoints trained with L_MLM) scores the masked-report branch's word-patch cross-attention
instead of the aligned-space similarity (fusion_attention_map), so MLM-only variants can be compared too.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional

from simcrop.data.text import split_sentences
from simcrop.eval import metrics
from simcrop.eval.data import center_crop_zero, load_volume, patch_fractions, patch_voxels
from simcrop.eval.features import patch_embeddings, text_token_features
from simcrop.models.text import sentence_mean


@torch.no_grad()
def sentence_patch_similarity(model, text, volume: torch.Tensor, findings: str, device) -> torch.Tensor:
    """volume [1, 1, X, Y, Z], findings text -> S [M_kept, N]: cos(s_j, g_v(H_i)) for the kept sentences."""
    m = model.cfg
    v = patch_embeddings(model, volume.to(device))  # [N, Dp]
    u, sids, n_kept = text_token_features(model, text, [findings], m.findings_max_len, m.max_sentences, device)
    s, valid = sentence_mean(u, sids, m.max_sentences)  # [1, M, Dp], [1, M]
    s = functional.normalize(s[0, valid[0]].float(), dim=-1)  # [M_kept, Dp]
    return (s @ functional.normalize(v.float(), dim=-1).T).cpu()  # [M_kept, N]


@torch.no_grad()
def fusion_token_attention(model, text, volume: torch.Tensor, findings: str, device):
    """The fusion layer's word-patch cross-attention on the unmasked findings: (attention [L, N] averaged over
    heads, each row summing to 1; sentence_ids [L]). Queries: frozen tower -> head_q -> the fusion layer's own
    stages (CrossGranularityFusion.attention_map); keys: Z = Linear(H) of all N patches of the unmasked volume
    [1, 1, X, Y, Z]."""
    from simcrop.data.text import tokenize_findings

    m = model.cfg
    h = model.encoder.forward_volume(volume.to(device))[:, 1:]  # [1, N, D]
    z = model.image_to_fusion(h)  # [1, N, Df]
    tok = tokenize_findings(text.tokenizer, findings, m.findings_max_len, m.max_sentences)
    used = int(tok["attention_mask"].sum())
    ids, mask = tok["input_ids"][None, :used].to(device), tok["attention_mask"][None, :used].to(device)
    q0 = model.head_q(text(ids, mask))  # [1, L, Df]
    attn = model.fusion.attention_map(q0, mask.bool(), z)  # [1, H, L, N]
    return attn.mean(1)[0].cpu(), tok["sentence_ids"][:used]


def fusion_attention_map(model, text, volume: torch.Tensor, findings: str, device) -> torch.Tensor:
    """Grounding map of the masked-report branch (checkpoints with L_MLM): A [M_kept, N] = the fusion
    cross-attention (fusion_token_attention) averaged over each sentence's tokens."""
    attn, sids = fusion_token_attention(model, text, volume, findings, device)
    s, valid = sentence_mean(attn[None], sids[None], model.cfg.max_sentences)  # [1, M, N]
    return s[0, valid[0]].float()


MAPS = {"align": sentence_patch_similarity, "fusion": fusion_attention_map}

BACKGROUND_HU = -990.0  # air outside the body is -1000 HU; lung parenchyma sits near -850


def background_patches(volume: torch.Tensor, patch_size) -> np.ndarray:
    """volume [1, X, Y, Z] in [-1, 1] (HU / 1000) -> [N] bool: >= half of the patch's voxels are background."""
    air = (volume[0] <= BACKGROUND_HU / 1000.0).numpy()
    return patch_fractions(air, air.shape, patch_size) >= 0.5


def sentence_scores(sim_j: np.ndarray, control: np.ndarray, inside: np.ndarray, background: np.ndarray,
                    k: int) -> dict:
    """One sentence's map sim_j [N] against its region inside [N] (metrics.grounding_scores), plus the share of
    its top-k patches in background [N] (beside the background's share) and the CT-mean map control [N]
    scored against the same region (control_share / control_hit / control_auroc)."""
    scores = metrics.grounding_scores(sim_j, inside, k)
    top = np.argsort(-np.asarray(sim_j, dtype=np.float64), kind="stable")[: scores["k"]]
    scores["background_share"] = float(background[top].mean())
    scores["background_chance"] = float(background.mean())
    ctl = metrics.grounding_scores(control, inside, k)
    scores.update(control_share=ctl["topk_share"], control_hit=ctl["hit"], control_auroc=ctl["patch_auroc"])
    return scores


def evaluate_case(model, text, case, device, topk: int, inside_threshold: float = 0.5, map_name: str = "align"):
    """One GroundingCase -> (records, volume [X, Y, Z] numpy, per-sentence details for pictures)."""
    cfg = model.cfg
    texts = [s.text for s in case.sentences]
    findings = " ".join(texts)
    if split_sentences(findings) != [" ".join(t.split()) for t in texts]:
        raise ValueError(f"{case.item.name}: its sentences do not split back from the joined findings")
    volume = load_volume(case.item, cfg.img_size)  # [1, X, Y, Z]
    sim = MAPS[map_name](model, text, volume[None], findings, device)  # [M_kept, N]
    background = background_patches(volume, cfg.patch_size)  # [N]
    control = sim.mean(0).numpy()  # [N] the CT's mean map: the same for all its sentences (specificity control)
    records, details = [], []
    for j, sent in enumerate(case.sentences[: sim.shape[0]]):  # sentences past max_sentences / max_len: dropped
        frac = patch_fractions(sent.mask, cfg.img_size, cfg.patch_size)
        inside, rule = metrics.patch_inside(frac, inside_threshold)
        rec = {"volume": case.item.name, "sentence": sent.text, "finding": sent.finding,
               "group": "normal" if sent.finding == "normal" else "lesion", "rule": rule}
        if rule == "none":
            records.append({**rec, "skipped": "region outside the crop"})
            continue
        scores = sentence_scores(sim[j].numpy(), control, inside, background, topk)
        top = np.argsort(-sim[j].numpy(), kind="stable")[: scores["k"]]
        records.append({**rec, **scores})
        details.append({"text": sent.text, "sim": sim[j].numpy(), "inside": inside,
                        "mask": center_crop_zero(sent.mask, cfg.img_size), "scores": scores,
                        "top": top})
    return records, volume[0].numpy(), details


class PositionShare:
    """Streaming share of the variance of per-patch vectors that the patch position explains:
    1 - E|v - mean over cases at that position|^2 / E|v - overall mean|^2 over cases c and positions n
    (0: content only; 1: every case gives the same vector at a position, whatever it shows).

        acc = PositionShare(); acc.add(V_c) for each case's V_c [N, D]; acc.value()
    """

    def __init__(self):
        self.s1 = None  # [N, D] sum over cases
        self.s2 = 0.0  # sum of |v|^2 over cases and positions
        self.c = 0

    def add(self, v: torch.Tensor) -> None:
        v = v.double().cpu()  # [N, D]
        self.s1 = v.clone() if self.s1 is None else self.s1 + v
        self.s2 += float((v * v).sum())
        self.c += 1

    def value(self) -> float:
        if self.c < 2:
            return float("nan")
        n = self.s1.shape[0]
        within = self.s2 - float((self.s1 * self.s1).sum()) / self.c  # sum |v - mean at position|^2
        total = self.s2 - float((self.s1.sum(0) ** 2).sum()) / (self.c * n)  # sum |v - overall mean|^2
        return float(1.0 - within / total) if total > 0 else float("nan")


def position_share(vectors: torch.Tensor) -> float:
    """V [C, N, D] (cases, positions, features) -> PositionShare of the L2-normalised vectors."""
    acc = PositionShare()
    for v in vectors:
        acc.add(functional.normalize(v.float(), dim=-1))
    return acc.value()


@torch.no_grad()
def selection_diagnostic(model, text, cases, device, draws: int = 4, inside_threshold: float = 0.5,
                         seed: int = 0) -> dict:
    """L_align under its training conditions, on held-out cases: per case and draw a random MAE mask (the
    checkpoint's mask ratio), the encoder on the visible patches, each sentence's top-K visible patches
    pooled as in training (simcrop.ops.topk_align).

    - discrimination: share of sentences whose own pooled patches a_j are closer to s_j than every other
      sentence's a_k of the same CT (what the within-CT InfoNCE rewards), beside the same with K RANDOM visible
      patches per sentence and the chance rate 1 / #sentences. Top-K selection by itself makes a_j resemble
      s_j, so a high value does not imply that the picked patches are the described ones;
    - masked grounding: share of those top-K patches inside the sentence's region beside the region's share of
      the visible patches (chance), split into lesion / normal sentences;
    - position share: the share of the variance of the normalised g_v(H_i) of the unmasked volumes that the
      patch position explains (1 - E|v - mean over cases at that position|^2 / E|v - overall mean|^2): near 1,
      a sentence can only pick positions, whatever the volume shows. Beside it the same statistic of the RAW
      input patches (position_share_raw: how much of it the data already has, e.g. anatomy at fixed places;
      position_share_raw_unnormalised: of the patch voxels as they are) and of the encoder tokens H_i before g_v
      (position_share_tokens).
    """
    from simcrop import ops

    cfg, K = model.cfg, model.cfg.topk
    gen = torch.Generator().manual_seed(seed)
    hits, hits_rand, n = 0, 0, 0
    ground = {"lesion": [], "normal": []}
    shares = {k: PositionShare() for k in ("gv", "raw", "raw_unnormalised", "tokens")}
    for case in cases:
        texts = [t.text for t in case.sentences]
        findings = " ".join(texts)
        vol = load_volume(case.item, cfg.img_size)[None].to(device)  # [1, 1, X, Y, Z]
        h = model.encoder.forward_volume(vol)[0, 1:]  # [N, D] unmasked tokens
        shares["gv"].add(functional.normalize(model.head_v(h).float(), dim=-1))  # [N, Dp]
        shares["tokens"].add(functional.normalize(h.float(), dim=-1))
        raw = patch_voxels(vol[0].cpu(), cfg.patch_size)  # [N, P] the input patches
        shares["raw"].add(functional.normalize(raw, dim=-1))
        shares["raw_unnormalised"].add(raw)
        u, sids, _ = text_token_features(model, text, [findings], cfg.findings_max_len, cfg.max_sentences, device)
        sent, valid = sentence_mean(u, sids, cfg.max_sentences)  # [1, M, Dp], [1, M]
        S = functional.normalize(sent[0, valid[0]].float(), dim=-1)  # [m, Dp]
        m = S.shape[0]
        if m < 2:
            continue
        inside = [metrics.patch_inside(patch_fractions(t.mask, cfg.img_size, cfg.patch_size), inside_threshold)[0]
                  for t in case.sentences[:m]]
        for _ in range(draws):
            noise = torch.rand(1, model.num_patches, generator=gen).to(device)
            visible, _, _, ids_keep = model.mask_patches(vol, noise)
            v = model.head_v(model.encode(visible, ids_keep)[:, 1:])  # [1, n_keep, Dp]
            a, idx, _ = ops.topk_align(v, sent, valid, K, None, backend="reference")  # [1, M, Dp], [1, M, K]
            A = functional.normalize(a[0, valid[0]].float(), dim=-1)
            hits += int(((S @ A.T).argmax(1) == torch.arange(m, device=S.device)).sum())
            pick = torch.stack([torch.randperm(v.shape[1], generator=gen)[:K] for _ in range(m)])  # [m, K]
            R = functional.normalize(v[0][pick.to(device)].mean(1).float(), dim=-1)
            hits_rand += int(((S @ R.T).argmax(1) == torch.arange(m, device=S.device)).sum())
            n += m
            keep = ids_keep[0].cpu().numpy()
            for j in range(m):
                ins = inside[j][keep]
                if ins.any():
                    grp = "normal" if case.sentences[j].finding == "normal" else "lesion"
                    top = idx[0, valid[0]][j].cpu().numpy()
                    ground[grp].append((float(ins[top[top >= 0]].mean()), float(ins.mean())))
    out = {"draws": draws, "k": K, "sentences": n,
           "discrimination_topk": hits / max(n, 1), "discrimination_random_k": hits_rand / max(n, 1),
           "discrimination_chance": float(np.mean([1.0 / min(len(c.sentences), cfg.max_sentences) for c in cases]))}
    out["position_share"] = shares["gv"].value()
    out["position_share_raw"] = shares["raw"].value()
    out["position_share_raw_unnormalised"] = shares["raw_unnormalised"].value()
    out["position_share_tokens"] = shares["tokens"].value()
    for grp, vals in ground.items():
        out[f"masked_{grp}_share"] = float(np.mean([v[0] for v in vals])) if vals else float("nan")
        out[f"masked_{grp}_chance"] = float(np.mean([v[1] for v in vals])) if vals else float("nan")
    return out


def aggregate(records: list[dict]) -> dict:
    """Means (with standard errors) per group ('all', 'lesion', 'normal') and per finding; 'lesion_pointing':
    the lesion sentences only, their pointing hit beside its chance and the CT-mean control's hit."""
    scored = [r for r in records if "skipped" not in r]

    def block(rs):
        out = {"n": len(rs)}
        for key in ("topk_share", "hit", "chance", "patch_auroc", "background_share", "background_chance",
                    "control_share", "control_hit", "control_auroc"):
            out[key] = metrics.summarize(r[key] for r in rs)
        # the pointing game per sentence against its chance and against the CT-mean control (a seed-level
        # bootstrap can resample the per-sentence records in "sentences")
        out["hit_minus_chance"] = metrics.summarize(r["hit"] - r["chance"] for r in rs)
        out["hit_minus_control"] = metrics.summarize(r["hit"] - r["control_hit"] for r in rs)
        share, chance = out["topk_share"]["mean"], out["chance"]["mean"]
        out["lift"] = share / chance if rs and chance > 0 else float("nan")
        out["rules"] = {k: sum(r["rule"] == k for r in rs) for k in ("half", "any")}
        return out

    groups = {"all": scored, "lesion": [r for r in scored if r["group"] == "lesion"],
              "normal": [r for r in scored if r["group"] == "normal"]}
    findings = sorted({r["finding"] for r in scored})
    lesion = groups["lesion"]
    pointing = {"n": len(lesion), "n_cases": len({r["volume"] for r in lesion})}
    for key in ("hit", "chance", "control_hit"):
        pointing[key] = metrics.summarize(r[key] for r in lesion)
    pointing["hit_minus_chance"] = metrics.summarize(r["hit"] - r["chance"] for r in lesion)
    pointing["hit_minus_control"] = metrics.summarize(r["hit"] - r["control_hit"] for r in lesion)
    return {"groups": {g: block(rs) for g, rs in groups.items()}, "lesion_pointing": pointing,
            "findings": {f: block([r for r in scored if r["finding"] == f]) for f in findings},
            "skipped": sum("skipped" in r for r in records)}


def draw_case(path: Path, volume: np.ndarray, details: list[dict], cfg, title: str, spacing=(1.0, 1.0, 1.0),
              max_rows: int = 6, label: str = "cos(s_j, v_i)") -> None:
    """PNG: per sentence (lesions first) an axial and a coronal slice through its region (the slice holding
    the most region voxels): CT in grey, the sentence's patch similarity as a heat map, the region outlined
    in green, the top-K patches outlined in red (those crossing the slice). Radiological display: patient
    right on the viewer's left, anterior / superior up."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    rows = sorted(details, key=lambda d: d["scores"]["n_inside"])[:max_rows]
    gx, gy, gz = (s // p for s, p in zip(cfg.img_size, cfg.patch_size))
    px, py, pz = cfg.patch_size
    X, Y, Z = cfg.img_size
    sx, sy, sz = spacing
    fig, axes = plt.subplots(len(rows), 2, figsize=(9, 4.2 * len(rows)), squeeze=False)
    for r, d in enumerate(rows):
        heat = d["sim"].reshape(gx, gy, gz).repeat(px, 0).repeat(py, 1).repeat(pz, 2)  # [X, Y, Z] patch-constant
        lo, hi = float(d["sim"].min()), float(d["sim"].max())
        mask = d["mask"]
        top = [np.unravel_index(int(i), (gx, gy, gz)) for i in d["top"]]
        k_ax = int(mask.sum(axis=(0, 1)).argmax())
        j_co = int(mask.sum(axis=(0, 2)).argmax())
        views = [("axial", volume[:, :, k_ax], heat[:, :, k_ax], mask[:, :, k_ax], (X, Y), sy / sx,
                  [(a, b) for a, b, c in top if c == k_ax // pz], (px, py), f"z={k_ax}"),
                 ("coronal", volume[:, j_co, :], heat[:, j_co, :], mask[:, j_co, :], (X, Z), sz / sx,
                  [(a, c) for a, b, c in top if b == j_co // py], (px, pz), f"y={j_co}")]
        for c, (name, img, hm, mk, (W, H), aspect, boxes, (bw, bh), where) in enumerate(views):
            ax = axes[r, c]
            ext = (0, W, 0, H)
            ax.imshow(img.T, cmap="gray", origin="lower", extent=ext, aspect=aspect, vmin=-1, vmax=1)
            im = ax.imshow(hm.T, cmap="jet", origin="lower", extent=ext, aspect=aspect, alpha=0.3, vmin=lo, vmax=hi)
            if mk.any():
                ax.contour(np.arange(W) + 0.5, np.arange(H) + 0.5, mk.T.astype(float), levels=[0.5],
                           colors="lime", linewidths=1.2)
            for a, b in boxes:
                ax.add_patch(Rectangle((a * bw, b * bh), bw, bh, fill=False, edgecolor="red", linewidth=2))
            ax.invert_xaxis()  # patient right on the viewer's left
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{name} {where}: {len(boxes)} of top-{d['scores']['k']} here", fontsize=8)
            if c == 1:
                fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label=label)
        s = d["scores"]
        axes[r, 0].text(0.0, 1.16, "\n".join(textwrap.wrap(d["text"], 90)) +
                        f"\ntop-{s['k']} in region {s['topk_share']:.2f} (chance {s['chance']:.2f}), "
                        f"hit {int(s['hit'])}, patch AUROC {s['patch_auroc']:.2f}",
                        transform=axes[r, 0].transAxes, fontsize=9, va="bottom", ha="left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (4.2 * len(rows))), h_pad=3.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    tmp.replace(path)


def run_grounding(model, text, cases, device, topk: int | None = None, inside_threshold: float = 0.5,
                  figures: int = 0, fig_dir: Path | None = None, log=print, map_name: str = "align") -> dict:
    k = topk or model.cfg.topk
    records, drawn = [], []
    for n, case in enumerate(cases):
        try:
            recs, volume, details = evaluate_case(model, text, case, device, k, inside_threshold, map_name)
        except ValueError as exc:
            log(f"  skipping {exc}")
            continue
        records += recs
        if fig_dir is not None and len(drawn) < figures and details:
            path = Path(fig_dir) / f"{case.item.name.replace('.nii.gz', '')}.png"
            what = "cos(s_j, v_i)" if map_name == "align" else "fusion cross-attention"
            draw_case(path, volume, details, model.cfg,
                      f"{case.item.name}: {what}, top-{k} patches, crop {model.cfg.img_size}", case.item.spacing,
                      label=what)
            drawn.append(str(path))
    if not any("skipped" not in r for r in records):
        from simcrop.eval.errors import EvalError

        raise EvalError("no sentence with a region inside the crop: nothing to ground")
    return {"k": k, "map": map_name, "inside_threshold": inside_threshold, "n_cases": len(cases), **aggregate(records),
            "figures": drawn, "sentences": records}


def markdown(res: dict, title: str) -> str:
    from simcrop.eval.report import fmt, md_table

    def row(name, b):
        return [name, b["n"], f"{fmt(b['topk_share']['mean'])} ± {fmt(b['topk_share']['sem'])}",
                fmt(b["hit"]["mean"]), fmt(b["chance"]["mean"]), fmt(b["lift"]),
                f"{fmt(b['patch_auroc']['mean'])}", f"{b['rules']['half']}/{b['rules']['any']}",
                f"{fmt(b['control_share']['mean'])} / {fmt(b['control_hit']['mean'])} / {fmt(b['control_auroc']['mean'])}",
                f"{fmt(b['background_share']['mean'])} / {fmt(b['background_chance']['mean'])}"]

    header = ["sentences", "n", f"top-{res['k']} share in region", "pointing hit", "chance (region share)",
              "share / chance", "patch AUROC", "rule half/any", "CT-mean map (control): share / hit / AUROC",
              "top-K share in background / background share"]
    what = ("similarity cos(g_t sentence, g_v patch)" if res.get("map", "align") == "align" else
            "the fusion layer's word-patch cross-attention (mean over heads and the sentence's tokens)")
    return "\n\n".join([
        f"# Sentence grounding — {title}",
        f"{res['n_cases']} {'test' if res.get('split', 'valid') == 'valid' else res['split'] + ' (pre-training)'} cases; {what} over all patches of the unmasked "
        f"volume; a patch is in the region when >= {res['inside_threshold']:g} of its voxels are (regions too small "
        f"for that: when it holds region voxels). Chance = the region's share of patches (for the top-K share and "
        f"for the pointing hit alike); patch AUROC chance = 0.5. ± = standard error over sentences. Background: patches at least half "
        f"air outside the body (<= {BACKGROUND_HU:g} HU); a map that prefers empty space picks them above their share. "
        f"Control: the CT's mean map over its sentences, scored against each sentence's region; a "
        f"sentence-specific map beats it. "
        f"Skipped (region outside the crop): {res['skipped']}.",
        md_table(header, [row(g, b) for g, b in res["groups"].items()]),
        "By finding:",
        md_table(header, [row(f, b) for f, b in res["findings"].items()]),
        _pointing_md(res),
        ("Pictures: " + ", ".join(f"`{Path(p).name}`" for p in res["figures"])) if res["figures"] else "",
        _diagnostic_md(res.get("diagnostic")),
    ])


def _pointing_md(res: dict) -> str:
    from simcrop.eval.report import fmt, md_table

    p = res.get("lesion_pointing")
    if not p or not p["n"]:
        return ""

    def pm(b):
        return f"{fmt(b['mean'])} ± {fmt(b['sem'])}"

    return "\n\n".join([
        f"Lesion sentences only ({p['n']} sentences of {p['n_cases']} cases): pointing hit (the argmax patch in the "
        f"region) against its chance (the region's share of patches) and against the CT-mean map's hit. Grounding "
        f"needs both differences above 0; per-sentence values are in the JSON's `sentences` (for a bootstrap).",
        md_table(["pointing hit", "chance", "CT-mean control hit", "hit - chance", "hit - control"],
                 [[pm(p["hit"]), pm(p["chance"]), pm(p["control_hit"]), pm(p["hit_minus_chance"]),
                   pm(p["hit_minus_control"])]]),
    ])


def _diagnostic_md(d: dict | None) -> str:
    from simcrop.eval.report import fmt, md_table

    if not d:
        return ""
    return "\n\n".join([
        f"## L_align under training conditions ({d['draws']} random MAE masks per case, top-{d['k']} of the "
        f"visible patches, {d['sentences']} sentence draws)",
        md_table(["measure", "value", "reference"], [
            ["sentence picks its own pooled top-K (within-CT discrimination)", d["discrimination_topk"],
             f"random K patches {fmt(d['discrimination_random_k'])}, chance {fmt(d['discrimination_chance'])}"],
            ["lesion sentences: top-K share in region", d["masked_lesion_share"], f"chance {fmt(d['masked_lesion_chance'])}"],
            ["normal sentences: top-K share in region", d["masked_normal_share"], f"chance {fmt(d['masked_normal_chance'])}"],
            ["share of g_v variance explained by patch position", d.get("position_share"),
             f"0 = content only; raw input patches {fmt(d.get('position_share_raw', float('nan')))} (unnormalised "
             f"{fmt(d.get('position_share_raw_unnormalised', float('nan')))}), encoder tokens "
             f"{fmt(d.get('position_share_tokens', float('nan')))}"],
        ]),
        "Top-K selection by itself makes the pooled patches resemble their sentence, so discrimination well above "
        "the random-K value with region shares at chance means the within-CT InfoNCE is being met without "
        "locating the described regions.",
    ])
