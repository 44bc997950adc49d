"""The loss functions of SimCroP that are not operators (those live in simcrop.ops)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from simcrop.ops.reference import l2_normalize


def sentence_infonce(s: torch.Tensor, a: torch.Tensor, valid: torch.Tensor, tau: float) -> torch.Tensor:
    """L_align's contrastive part: two-way InfoNCE between the sentences of each CT and their pooled patches.

    s [B, M, D] sentence embeddings, a [B, M, D] pooled selected patches, valid [B, M] bool.
    logits[b, j, k] = cos(s_bj, a_bk) / tau over the valid k of the SAME CT (other sentences are the negatives);
    L = mean_j CE(logits[b, j, :], j) + mean_j CE(logits[b, :, j], j), means over every valid sentence of the
    batch; padding sentences are neither anchors nor negatives. Returns a float32 scalar (0 when none is valid).
    """
    logits = torch.einsum("bmd,bkd->bmk", l2_normalize(s.float()), l2_normalize(a.float())) / tau  # [B, M, M]
    pair_ok = valid[:, :, None] & valid[:, None, :]  # [B, M, M]
    logits = logits.masked_fill(~pair_ok, -1e4)  # finite: exp(-1e4 - max) == 0, and no NaN in masked rows
    diag = torch.diagonal(logits, dim1=1, dim2=2)  # [B, M] positives
    row_lse = torch.logsumexp(logits, dim=2)  # sentence -> patches
    col_lse = torch.logsumexp(logits, dim=1)  # patches -> sentence
    zero = torch.zeros_like(diag)
    ce_s2a = torch.where(valid, row_lse - diag, zero)
    ce_a2s = torch.where(valid, col_lse - diag, zero)
    n = valid.sum().clamp_min(1)
    return (ce_s2a.sum() + ce_a2s.sum()) / n


def sentence_volume_infonce(
    v: torch.Tensor, s: torch.Tensor, valid: torch.Tensor, k: int, k_per_sentence, tau: float, backend: str = "auto"
) -> torch.Tensor:
    """Sentence -> volume InfoNCE through each sentence's own top-K selection (extension, docs/method.md).

    v [B, N, D] visible patch features, s [B, M, D] sentences, valid [B, M], k_per_sentence [B, M] or None.
    a[b, c, j] = mean of the top-K patches of CT c by cos(s_bj, v_ci) (simcrop.ops.topk_align over all B x B pairs);
    logits[b, j, c] = cos(s_bj, a[b, c, j]) / tau;  L = mean over valid (b, j) of CE(logits[b, j, :], b).
    A constant sentence -> position map scores the same on every CT, so only patch CONTENT can win this term.
    Returns a float32 scalar (0 when B == 1 or no sentence is valid). Memory: B^2 x N x D for the paired patches.
    """
    from simcrop import ops

    B, N, D = v.shape
    M = s.shape[1]
    v_pairs = v.unsqueeze(0).expand(B, B, N, D).reshape(B * B, N, D)  # pair (b, c) -> v[c]
    s_pairs = s.unsqueeze(1).expand(B, B, M, D).reshape(B * B, M, D)  # pair (b, c) -> s[b]
    valid_pairs = valid.unsqueeze(1).expand(B, B, M).reshape(B * B, M)
    k_pairs = None
    if k_per_sentence is not None:
        k_pairs = k_per_sentence.unsqueeze(1).expand(B, B, M).reshape(B * B, M)
    a, _, _ = ops.topk_align(v_pairs, s_pairs, valid_pairs, k, k_pairs, backend=backend)  # [B*B, M, D]
    a = l2_normalize(a.float()).view(B, B, M, D)  # [b, c, j]
    logits = torch.einsum("bjd,bcjd->bjc", l2_normalize(s.float()), a) / tau  # [B, M, B]
    own = torch.arange(B, device=v.device)
    pos = logits[own, :, own]  # [B, M]: CT b's own pool for its sentences
    ce = torch.where(valid, torch.logsumexp(logits, dim=2) - pos, torch.zeros_like(pos))
    return ce.sum() / valid.sum().clamp_min(1)


def sentence_volume_soft_infonce(
    v: torch.Tensor, s: torch.Tensor, valid: torch.Tensor, tau: float, tau_pool: float, backend: str = "auto",
    offset: int = 0,
) -> torch.Tensor:
    """Cross-CT sentence -> volume InfoNCE with SOFT pooling over patches (extension, docs/method.md).

    v [C, N, D] visible patch features of the C candidate CTs (under torchrun the all-gathered global batch; this
    rank's CTs are v[offset : offset + B]), s [B, M, D] this rank's sentences, valid [B, M] bool.
    a[b, j, c] = sum_i softmax_i(cos(s_bj, v_ci) / tau_pool) v_ci   (simcrop.ops.soft_pool_align)
    logits[b, j, c] = cos(s_bj, a[b, j, c]) / tau;  L = mean over valid (b, j) of CE(logits[b, j, :], offset + b).
    The mean runs over the LOCAL valid sentences (the anchors), the CE over ALL C CTs (the negatives), so the
    trainer's re-weighting by sentence counts gives the global mean. Features that depend on the position only
    (the same in every CT) give every c the same logit: exactly log(C). Returns a float32 scalar (float64 for
    float64 inputs; 0 when C == 1 or no sentence is valid).
    """
    from simcrop import ops

    B = s.shape[0]
    if not 0 <= offset <= v.shape[0] - B:
        raise ValueError(f"sentence_volume_soft_infonce: {B} local CTs at offset {offset} do not fit in {v.shape[0]}")
    a = ops.soft_pool_align(v, s, valid, tau_pool, backend=backend)  # [B, M, C, D], float32 (or float64)
    with torch.autocast(s.device.type, enabled=False):  # logits in a's precision under a bf16 autocast region
        sn = l2_normalize(s.to(a.dtype))  # [B, M, D]
        logits = torch.einsum("bmd,bmcd->bmc", sn, l2_normalize(a)) / tau  # [B, M, C]
    own = torch.arange(B, device=s.device)
    pos = logits[own, :, offset + own]  # [B, M]: each sentence against its own CT
    ce = torch.where(valid, torch.logsumexp(logits, dim=2) - pos, torch.zeros_like(pos))
    return ce.sum() / valid.sum().clamp_min(1)


def mlm_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits [B, T, V], targets [B, T] (-100 = ignore) -> mean CE over the counted positions (float32)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)


def select_label_positions(labels: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed-size gather of the positions that carry a label, so the vocabulary projection runs only there.

    labels [B, L] (-100 = none) -> positions [B, count], targets [B, count] (-100 where fewer than count labels).
    Shapes do not depend on the data (compile-friendly); `count` must be at least the most labels a sample can
    carry (the model derives it from mlm_ratio and report_max_len), or the surplus positions are dropped.
    """
    has = labels != -100  # [B, L]
    order = torch.argsort((~has).to(torch.int8), dim=1, stable=True)[:, :count]  # labelled positions first
    targets = torch.gather(labels, 1, order)  # [B, count]
    return order, targets
