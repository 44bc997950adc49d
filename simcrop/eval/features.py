"""Frozen-encoder features for the downstream protocols, computed once per (checkpoint, data split).

Image side (unmasked volume, evaluation centre crop, `ViT3DEncoder.forward_volume`):
  tokens H [B, 1 + N, D] (cls first, final LayerNorm) -> patches H_i, i = 1..N
  'mean'      mean_i H_i                    [D]   (linear probe: "mean of patch tokens")
  'gv_mean'   mean_i g_v(H_i)               [Dp]  (pooled embedding in the aligned space; default)
  'gv_of_mean' g_v(mean_i H_i)              [Dp]  (the alternative pooling: head after the mean)
Text side (frozen text tower, then g_t, as in training):
  sentence j of a report: s_j = mean of g_t(u_t) over its tokens (simcrop.models.text.sentence_mean);
  a prompt: the mean of g_t(u_t) over all its word pieces.
The alignment loss compares mean-of-g_v over picked patches with mean-of-g_t over a sentence's tokens, hence
'gv_mean' is the default pooled image embedding.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from simcrop.data.text import tokenize_findings
from simcrop.eval.data import load_volume
from simcrop.eval.errors import EvalError
from simcrop.models.text import sentence_mean

CACHE_VERSION = 1


def has_heads(model) -> bool:
    return hasattr(model, "head_v") and hasattr(model, "head_t")


def require_heads(model, task: str) -> None:
    if not has_heads(model):
        raise EvalError(
            f"{task} needs the alignment heads g_v / g_t, but this checkpoint was trained without L_align "
            f"(use_align false)"
        )


@torch.no_grad()
def encode_batch(model, volumes: torch.Tensor) -> dict[str, torch.Tensor]:
    """volumes [B, 1, X, Y, Z] -> {'mean': [B, D], and with heads 'gv_mean', 'gv_of_mean': [B, Dp]}."""
    h = model.encoder.forward_volume(volumes)[:, 1:]  # [B, N, D]
    out = {"mean": h.mean(1)}
    if has_heads(model):
        out["gv_mean"] = model.head_v(h).mean(1)  # [B, Dp]
        out["gv_of_mean"] = model.head_v(h.mean(1))  # [B, Dp]
    return out


@torch.no_grad()
def patch_embeddings(model, volume: torch.Tensor) -> torch.Tensor:
    """volume [1, 1, X, Y, Z] -> g_v of every patch of the unmasked volume [N, Dp]."""
    h = model.encoder.forward_volume(volume)[:, 1:]  # [1, N, D]
    return model.head_v(h)[0]


def _cache_key(fingerprint: str, items, img_size) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([CACHE_VERSION, fingerprint, list(img_size)]).encode())
    for it in items:
        h.update(str(Path(it.path).resolve()).encode())
    return h.hexdigest()[:20]


def volume_features(model, items, img_size, device, batch_size: int = 4, cache_dir: Path | None = None,
                    fingerprint: str = "", log=print) -> dict[str, torch.Tensor]:
    """Pooled features of every item (see the module docstring), cached as
    `<cache_dir>/features-<key>.pt` where key hashes the checkpoint fingerprint, the volumes and the crop."""
    path = None
    if cache_dir is not None and fingerprint:
        path = Path(cache_dir) / f"features-{_cache_key(fingerprint, items, img_size)}.pt"
        if path.is_file():
            cached = torch.load(path, map_location="cpu", weights_only=True)
            if cached.get("names") == [it.name for it in items]:
                log(f"  features from cache {path}")
                return cached["features"]
    feats: dict[str, list[torch.Tensor]] = {}
    model.eval()
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        vol = torch.stack([load_volume(it, img_size) for it in chunk]).to(device)  # [B, 1, X, Y, Z]
        for k, v in encode_batch(model, vol).items():
            feats.setdefault(k, []).append(v.float().cpu())
    out = {k: torch.cat(v) for k, v in feats.items()}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"names": [it.name for it in items], "features": out}, tmp)
        tmp.replace(path)
    return out


@torch.no_grad()
def text_token_features(model, text, texts: list[str], max_len: int, max_sentences: int, device):
    """Findings-like texts -> (g_t token features [T, L, Dp], sentence_ids [T, L], n_sentences [T])."""
    toks = []
    for t in texts:
        try:
            toks.append(tokenize_findings(text.tokenizer, t, max_len, max_sentences))
        except ValueError as exc:
            raise EvalError(f"text {t[:60]!r}: {exc}") from None
    ids = torch.stack([t["input_ids"] for t in toks]).to(device)
    mask = torch.stack([t["attention_mask"] for t in toks]).to(device)
    sids = torch.stack([t["sentence_ids"] for t in toks]).to(device)
    used = int(mask.sum(1).max())
    feats = text(ids[:, :used], mask[:, :used])  # [T, used, H]
    u = model.head_t(feats)  # [T, used, Dp]
    return u, sids[:, :used], torch.tensor([t["n_sentences"] for t in toks])


def sentence_embeddings(model, text, texts: list[str], device, batch_size: int = 16):
    """Reports' findings -> per report (sentences [M, Dp], valid [M]) with M = max_sentences of the config."""
    m = model.cfg
    out = []
    for start in range(0, len(texts), batch_size):
        u, sids, _ = text_token_features(model, text, texts[start : start + batch_size], m.findings_max_len,
                                         m.max_sentences, device)
        s, valid = sentence_mean(u, sids, m.max_sentences)  # [T, M, Dp], [T, M]
        out += [(s[i].float().cpu(), valid[i].cpu()) for i in range(len(s))]
    return out


def prompt_embeddings(model, text, prompts: list[str], device) -> torch.Tensor:
    """Prompts -> [P, Dp]: the mean of g_t over each prompt's word pieces (all its sentences together)."""
    m = model.cfg
    u, sids, _ = text_token_features(model, text, prompts, m.findings_max_len, m.max_sentences, device)
    whole = (sids > 0).long()  # one "sentence" per prompt
    s, _ = sentence_mean(u, whole, 1)  # [P, 1, Dp]
    return s[:, 0].float().cpu()
