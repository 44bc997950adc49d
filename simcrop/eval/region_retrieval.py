"""Region -> sentence retrieval: does the pooled ground-truth region point back to its own sentence?
("does not align", once the patch probe says the encoder can see the region)

For each findings sentence j of a CT with a ground-truth region R_j (patches inside by the grounding rule,
metrics.patch_inside, after the evaluation's centre crop), on the unmasked volume:
  a_j = mean of g_v(H_i) over i in R_j (un-normalised, as L_align pools its top-K patches);
  rank the CT's M kept sentences by cos(a_j, s_k), s_k = mean of g_t over sentence k (in context);
  hit = sentence j ranks first (ties count against it); chance = 1 / M.
Controls, scored the same way for sentence j:
  shuffled: the region of ANOTHER sentence of the same group (lesion / normal) of the same CT (each such
            region with a different patch set, hit averaged over them): a map that only tells "lesion" from
            "normal", or that prefers one sentence whatever the region, scores as high here as on R_j;
  random:   `draws` random patch sets of |R_j| patches of the CT.
Aligned content: hit >> chance and hit >> both controls. Reported per group ('lesion', 'normal', 'all') and
per finding, with every sentence's record (for a seed-level bootstrap).
"""
from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional

from simcrop.data.text import split_sentences
from simcrop.eval import metrics
from simcrop.eval.data import load_volume, patch_fractions
from simcrop.eval.features import text_token_features
from simcrop.models.text import sentence_mean


def _top1(pooled: torch.Tensor, S: torch.Tensor, j: int) -> tuple[float, int]:
    """pooled [Dp], S [M, Dp] L2-normalised -> (hit: sentence j strictly first, rank of j with ties against)."""
    sims = functional.normalize(pooled.float(), dim=-1) @ S.T  # [M]
    rank = int((sims >= sims[j]).sum())
    return float(rank == 1), rank


def region_sentence_scores(v: torch.Tensor, s: torch.Tensor, regions: list, groups: list[str],
                           rng: np.random.Generator, draws: int = 8) -> list[dict]:
    """v [N, Dp] patch features, s [M, Dp] sentence embeddings, regions[j] = inside [N] bool or None (no region),
    groups[j] = 'lesion' | 'normal' -> one record per sentence with a region: hit, rank, chance (1 / M), n_patches,
    shuffled_hit (NaN without another region of its group), n_shuffled, random_hit."""
    S = functional.normalize(s.float(), dim=-1)  # [M, Dp]
    M = S.shape[0]
    out = []
    for j in range(M):
        r = regions[j]
        if r is None or not np.any(r):
            continue
        idx = torch.from_numpy(np.flatnonzero(r))
        hit, rank = _top1(v[idx].mean(0), S, j)
        others = [k for k in range(M) if k != j and groups[k] == groups[j] and regions[k] is not None
                  and np.any(regions[k]) and not np.array_equal(regions[k], r)]
        shuffled = [_top1(v[torch.from_numpy(np.flatnonzero(regions[k]))].mean(0), S, j)[0] for k in others]
        rand = [_top1(v[torch.from_numpy(rng.choice(v.shape[0], len(idx), replace=False))].mean(0), S, j)[0]
                for _ in range(draws)]
        out.append({"index": j, "group": groups[j], "hit": hit, "rank": rank, "chance": 1.0 / M, "m": M,
                    "n_patches": len(idx), "shuffled_hit": float(np.mean(shuffled)) if shuffled else float("nan"),
                    "n_shuffled": len(shuffled), "random_hit": float(np.mean(rand)) if rand else float("nan")})
    return out


@torch.no_grad()
def case_embeddings(model, text, volume: torch.Tensor, findings: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """volume [1, 1, X, Y, Z], findings -> (g_v of every patch [N, Dp], kept sentences' s_j [M_kept, Dp]) on CPU."""
    m = model.cfg
    h = model.encoder.forward_volume(volume.to(device))[0, 1:]  # [N, D]
    v = model.head_v(h).float().cpu()  # [N, Dp]
    u, sids, _ = text_token_features(model, text, [findings], m.findings_max_len, m.max_sentences, device)
    s, valid = sentence_mean(u, sids, m.max_sentences)  # [1, M, Dp], [1, M]
    return v, s[0, valid[0]].float().cpu()


def evaluate_case(model, text, case, device, inside_threshold: float, rng, draws: int) -> list[dict]:
    cfg = model.cfg
    texts = [t.text for t in case.sentences]
    findings = " ".join(texts)
    if split_sentences(findings) != [" ".join(t.split()) for t in texts]:
        raise ValueError(f"{case.item.name}: its sentences do not split back from the joined findings")
    volume = load_volume(case.item, cfg.img_size)[None]  # [1, 1, X, Y, Z]
    v, s = case_embeddings(model, text, volume, findings, device)
    kept = case.sentences[: s.shape[0]]
    regions, groups = [], []
    for sent in kept:
        inside, rule = metrics.patch_inside(patch_fractions(sent.mask, cfg.img_size, cfg.patch_size), inside_threshold)
        regions.append(None if rule == "none" else inside)
        groups.append("normal" if sent.finding == "normal" else "lesion")
    recs = region_sentence_scores(v, s, regions, groups, rng, draws)
    return [{"volume": case.item.name, "sentence": kept[r["index"]].text, "finding": kept[r["index"]].finding, **r}
            for r in recs]


def aggregate(records: list[dict]) -> dict:
    def block(rs):
        out = {"n": len(rs)}
        for key in ("hit", "chance", "shuffled_hit", "random_hit", "rank"):
            out[key] = metrics.summarize(r[key] for r in rs)
        out["rank_chance"] = metrics.summarize((r["m"] + 1) / 2 for r in rs)
        out["hit_minus_chance"] = metrics.summarize(r["hit"] - r["chance"] for r in rs)
        out["hit_minus_shuffled"] = metrics.summarize(r["hit"] - r["shuffled_hit"] for r in rs)
        return out

    groups = {"all": records, "lesion": [r for r in records if r["group"] == "lesion"],
              "normal": [r for r in records if r["group"] == "normal"]}
    findings = sorted({r["finding"] for r in records})
    return {"groups": {g: block(rs) for g, rs in groups.items()},
            "findings": {f: block([r for r in records if r["finding"] == f]) for f in findings}}


def run_region_retrieval(model, text, cases, device, inside_threshold: float = 0.5, draws: int = 8, seed: int = 0,
                         log=print) -> dict:
    rng = np.random.default_rng(seed)
    records = []
    for case in cases:
        try:
            records += evaluate_case(model, text, case, device, inside_threshold, rng, draws)
        except ValueError as exc:
            log(f"  skipping {exc}")
    if not records:
        from simcrop.eval.errors import EvalError

        raise EvalError("no sentence with a region inside the crop: nothing to retrieve")
    return {"inside_threshold": inside_threshold, "draws": draws, "seed": seed, "n_cases": len(cases),
            **aggregate(records), "sentences": records}


def markdown(res: dict, title: str) -> str:
    from simcrop.eval.report import fmt, md_table

    def pm(b):
        return f"{fmt(b['mean'])} ± {fmt(b['sem'])}"

    def row(name, b):
        return [name, b["n"], pm(b["hit"]), fmt(b["chance"]["mean"]), pm(b["shuffled_hit"]), pm(b["random_hit"]),
                f"{fmt(b['rank']['mean'])} / {fmt(b['rank_chance']['mean'])}"]

    header = ["sentences", "n", "top-1 (own region)", "chance 1/M", "shuffled region (another sentence's)",
              f"random patch set ({res['draws']} draws)", "mean rank / chance"]
    return "\n\n".join([
        f"# Region -> sentence retrieval — {title}",
        f"{res['n_cases']} cases. Each ground-truth region (patches with >= {res['inside_threshold']:g} of their "
        f"voxels inside; smaller regions: the patches holding region voxels) pools g_v over its patches; the CT's "
        f"sentences are ranked by cosine to the pooled vector; top-1 = its own sentence ranks first (ties count "
        f"against). Controls: another sentence's region of the same group and CT, and random patch sets of the "
        f"same size. ± = standard error over sentences.",
        md_table(header, [row(g, b) for g, b in res["groups"].items()]),
        "By finding:",
        md_table(header, [row(f, b) for f, b in res["findings"].items()]),
    ])
