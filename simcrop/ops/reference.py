"""Pure-PyTorch ground truth of every simcrop operator.

These functions define the semantics that fused kernels (Triton, C++/CUDA) must reproduce. They are the test
oracle, the CPU fallback behind the `reference` backend and the benchmark baseline. They are written for
clarity, not speed, but never loop over the batch in Python.

Conventions (shared with every backend):
- Volumes are [B, C, X, Y, Z] (RAS+ voxel axes); a patch is px x py x pz voxels.
- Patch n = (ix * gy + iy) * gz + iz on the grid (gx, gy, gz) = (X/px, Y/py, Z/pz).
- A patch vector has P = px * py * pz * C values ordered (dx, dy, dz, c), channel last (as MAE).
- MAE masking: ids_shuffle = stable argsort(noise) per sample, the first N_keep are visible,
  ids_restore = argsort(ids_shuffle); mask[b, n] = 1 where patch n is hidden.
"""
from __future__ import annotations

import torch

__all__ = [
    "patch_grid",
    "patchify3d",
    "unpatchify3d",
    "random_masking",
    "masked_patchify",
    "masked_mse",
    "topk_align",
    "cross_granularity_attention",
    "soft_pool_align",
    "l2_normalize",
    "num_visible",
]


def patch_grid(spatial: tuple[int, int, int], patch: tuple[int, int, int]) -> tuple[int, int, int]:
    """(X, Y, Z), (px, py, pz) -> (gx, gy, gz); raises ValueError when a patch side does not divide."""
    if len(spatial) != 3 or len(patch) != 3:
        raise ValueError(f"expected 3D volume and patch sizes, got volume {tuple(spatial)} and patch {tuple(patch)}")
    for axis, (size, p) in enumerate(zip(spatial, patch)):
        if p <= 0 or size % p != 0:
            raise ValueError(
                f"patch size {tuple(patch)} does not divide volume size {tuple(spatial)} (axis {'xyz'[axis]})"
            )
    return spatial[0] // patch[0], spatial[1] // patch[1], spatial[2] // patch[2]


def patchify3d(x: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """[B, C, X, Y, Z] -> [B, N, P] with N = gx*gy*gz, P = px*py*pz*C ordered (dx, dy, dz, c)."""
    if x.dim() != 5:
        raise ValueError(f"patchify3d expects [B, C, X, Y, Z], got shape {tuple(x.shape)}")
    B, C, X, Y, Z = x.shape
    px, py, pz = patch
    gx, gy, gz = patch_grid((X, Y, Z), patch)
    x = x.reshape(B, C, gx, px, gy, py, gz, pz)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # [B, gx, gy, gz, px, py, pz, C]
    return x.reshape(B, gx * gy * gz, px * py * pz * C)


def unpatchify3d(p: torch.Tensor, patch: tuple[int, int, int], spatial: tuple[int, int, int], channels: int = 1):
    """[B, N, P] -> [B, C, X, Y, Z]; the exact inverse of patchify3d."""
    B, N, P = p.shape
    px, py, pz = patch
    gx, gy, gz = patch_grid(tuple(spatial), patch)
    if N != gx * gy * gz or P != px * py * pz * channels:
        raise ValueError(
            f"unpatchify3d: got [B, N, P] = {tuple(p.shape)}, expected N = {gx * gy * gz} and "
            f"P = {px * py * pz * channels} for volume {tuple(spatial)}, patch {tuple(patch)}, {channels} channel(s)"
        )
    x = p.reshape(B, gx, gy, gz, px, py, pz, channels)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, C, gx, px, gy, py, gz, pz]
    return x.reshape(B, channels, gx * px, gy * py, gz * pz)


def num_visible(n_patches: int, mask_ratio: float) -> int:
    """Visible patches kept by MAE masking: int(N * (1 - ratio)), as MAE."""
    return int(n_patches * (1.0 - mask_ratio))


def random_masking(noise: torch.Tensor, n_keep: int):
    """MAE per-sample random masking from uniform noise [B, N].

    Returns ids_keep [B, N_keep] (int64), mask [B, N] (float, 1 = hidden), ids_restore [B, N] (int64).
    """
    B, N = noise.shape
    if not 0 < n_keep <= N:
        raise ValueError(f"random_masking: n_keep must be in 1..{N}, got {n_keep}")
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)  # [B, N] ascending noise first
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # [B, N] inverse permutation
    ids_keep = ids_shuffle[:, :n_keep]  # [B, N_keep]
    mask = torch.ones(B, N, dtype=noise.dtype, device=noise.device)
    mask[:, :n_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)  # [B, N] back in patch order
    return ids_keep, mask, ids_restore


def masked_patchify(x: torch.Tensor, patch: tuple[int, int, int], noise: torch.Tensor, n_keep: int):
    """Visible patches of a volume under MAE masking.

    x [B, C, X, Y, Z], noise [B, N] -> visible [B, N_keep, P], mask [B, N], ids_restore [B, N], ids_keep [B, N_keep].
    """
    patches = patchify3d(x, patch)  # [B, N, P]
    if noise.shape != patches.shape[:2]:
        raise ValueError(f"masked_patchify: noise shape {tuple(noise.shape)} != [B, N] = {tuple(patches.shape[:2])}")
    ids_keep, mask, ids_restore = random_masking(noise, n_keep)
    index = ids_keep.unsqueeze(-1).expand(-1, -1, patches.shape[-1])  # [B, N_keep, P]
    visible = torch.gather(patches, 1, index)
    return visible, mask.to(x.dtype), ids_restore, ids_keep


def masked_mse(
    pred: torch.Tensor,
    x: torch.Tensor,
    mask: torch.Tensor,
    patch: tuple[int, int, int],
    norm_pix: bool = False,
    normalization: str = "masked",
    eps: float = 1e-6,
) -> torch.Tensor:
    """MIM loss: mean squared error between predicted patches and the volume's patches.

    pred [B, N, P], x [B, C, X, Y, Z] (the [-1, 1] intensities), mask [B, N] (1 = hidden) -> scalar (float32).
    per-patch error e_n = mean_p (pred - target)^2; target normalised per patch (mean/var over P, MAE's
    norm_pix) when norm_pix. normalization='masked': sum_n e_n m_n / sum_n m_n (default);
    'all': sum_n e_n m_n / (B N), the authors' variant (divides by every patch: = ratio x the masked-only loss).
    """
    target = patchify3d(x, patch).float()  # [B, N, P]
    if pred.shape != target.shape:
        raise ValueError(f"masked_mse: prediction shape {tuple(pred.shape)} != patchified target {tuple(target.shape)}")
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True, unbiased=True)
        target = (target - mean) / (var + eps).sqrt()
    err = (pred.float() - target).pow(2).mean(dim=-1)  # [B, N]
    m = mask.float()
    if normalization == "masked":
        return (err * m).sum() / m.sum().clamp_min(1.0)
    if normalization == "all":
        return (err * m).sum() / m.numel()
    raise ValueError(f"masked_mse: normalization must be 'masked' or 'all', got {normalization!r}")


def topk_align(
    v: torch.Tensor,
    s: torch.Tensor,
    sent_mask: torch.Tensor,
    k: int,
    k_per_sentence: torch.Tensor | None = None,
    eps: float = 1e-6,
):
    """Similarity-driven selection and pooling of patches per sentence (SimCroP L_align, first half).

    v [B, N, D] visible patch features, s [B, M, D] sentence features, sent_mask [B, M] bool (True = real sentence),
    k = K_max, k_per_sentence [B, M] int in 1..K_max or None (every sentence uses K_max).
    sim[b, j, i] = cos(s_bj, v_bi) = <s/max(|s|, eps), v/max(|v|, eps)>, computed in float32.
    I_bj = the k_bj patches of largest sim; ties broken by the lower patch index (a stable descending sort).
    Returns
      a   [B, M, D]      mean of the UN-normalised v over I_bj (zeros for padding sentences), dtype of v;
      idx [B, M, K_max]  selected patch indices in rank order, -1 beyond k_bj and for padding sentences;
      sim [B, M, K_max]  their similarities (float32, 0 where idx is -1).
    Gradients: a -> v through the selected patches only; the selection (idx, sim) is not differentiated,
    so s receives no gradient from this op.
    """
    B, N, D = v.shape
    M = s.shape[1]
    if s.shape[0] != B or s.shape[2] != D:
        raise ValueError(f"topk_align: v is [B, N, D] = {tuple(v.shape)} but s is {tuple(s.shape)}")
    if sent_mask.shape != (B, M):
        raise ValueError(f"topk_align: sent_mask shape {tuple(sent_mask.shape)} != [B, M] = {(B, M)}")
    if not 1 <= k <= N:
        raise ValueError(f"topk_align: K = {k} must be in 1..N, N = {N} visible patches")
    with torch.no_grad():
        vn = v.float() / v.float().norm(dim=-1, keepdim=True).clamp_min(eps)  # [B, N, D]
        sn = s.float() / s.float().norm(dim=-1, keepdim=True).clamp_min(eps)  # [B, M, D]
        sim_all = torch.einsum("bmd,bnd->bmn", sn, vn)  # [B, M, N]
        sim_sorted, order = torch.sort(sim_all, dim=-1, descending=True, stable=True)
        idx = order[..., :k]  # [B, M, K]
        sim = sim_sorted[..., :k]  # [B, M, K]
        rank = torch.arange(k, device=v.device)  # [K]
        if k_per_sentence is None:
            keep = sent_mask.unsqueeze(-1).expand(B, M, k)  # [B, M, K]
        else:
            if k_per_sentence.shape != (B, M):
                raise ValueError(f"topk_align: k_per_sentence shape {tuple(k_per_sentence.shape)} != {(B, M)}")
            keep = (rank < k_per_sentence.unsqueeze(-1)) & sent_mask.unsqueeze(-1)  # [B, M, K]
        weight = keep.float() / keep.sum(-1, keepdim=True).clamp_min(1).float()  # [B, M, K] 1/k_bj or 0
        idx = torch.where(keep, idx, torch.full_like(idx, -1))
        sim = torch.where(keep, sim, torch.zeros_like(sim))
    # a_bj = sum_r w_bjr v_b,idx_bjr  (gather then weighted sum; differentiable in v only)
    gathered = torch.gather(v, 1, idx.clamp_min(0).reshape(B, M * k, 1).expand(B, M * k, D))  # [B, M*K, D]
    a = torch.einsum("bmk,bmkd->bmd", weight.to(v.dtype), gathered.reshape(B, M, k, D))
    return a, idx, sim


def cross_granularity_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    q_mask: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Word-patch cross-attention plus the instance-level pooled image token (SimCroP fusion, steps 2-3).

    q [B, H, L, Dh] (text queries), k, v [B, H, N, Dh] (visible image tokens), g [B, H, Dh] (W_g mean_i Z, split
    into heads), q_mask [B, L] bool (True = real token).
    out[b, h, l] = (softmax_i(q_bhl . k_bhi * scale) v_bh + g_bh) * q_mask[b, l], scale = Dh^-1/2 by default.
    Padded queries give zeros and receive no gradient. Returns [B, H, L, Dh] in q's dtype.
    """
    B, H, L, Dh = q.shape
    if k.shape[:2] != (B, H) or k.shape[-1] != Dh or v.shape != k.shape:
        raise ValueError(f"cross_granularity_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if g.shape != (B, H, Dh) or q_mask.shape != (B, L):
        raise ValueError(
            f"cross_granularity_attention: g must be {(B, H, Dh)} and q_mask {(B, L)}, "
            f"got {tuple(g.shape)} and {tuple(q_mask.shape)}"
        )
    scale = Dh**-0.5 if scale is None else scale
    scores = torch.einsum("bhld,bhnd->bhln", q.float(), k.float()) * scale  # [B, H, L, N]
    attn = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhln,bhnd->bhld", attn, v.float()) + g.float().unsqueeze(2)  # [B, H, L, Dh]
    out = out * q_mask[:, None, :, None].to(out.dtype)
    return out.to(q.dtype)


def soft_pool_align(
    v: torch.Tensor,
    s: torch.Tensor,
    sent_mask: torch.Tensor | None = None,
    tau_pool: float = 0.05,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Soft similarity pooling of every CT's patches for every sentence (the cross-CT alignment extension).

    v [C, N, D] visible patch features of C candidate CTs, s [B, M, D] sentence features, sent_mask [B, M] bool
    or None (all real). sim[b, j, c, i] = cos(s_bj, v_ci) (eps as topk_align);
    w[b, j, c, :] = softmax_i(sim[b, j, c, :] / tau_pool);  a[b, j, c] = sum_i w[b, j, c, i] v_ci (UN-normalised v).
    Returns a [B, M, C, D] in float32 (float64 when v or s is float64); zeros for padding sentences.
    Gradients reach every patch of every CT (through the weights and the pooled values) and s (through the
    weights): nothing is selected. Memory: a matmul [B*M, D] x [C*N, D]^T -> [B*M, C*N] similarities, softmax per
    (b, j, c), then a batched [C, B*M, N] x [C, N, D] -> pooled; never B x C x N x D (docs/ops.md gives the sum).
    """
    if v.dim() != 3 or s.dim() != 3 or s.shape[2] != v.shape[2]:
        raise ValueError(f"soft_pool_align: v must be [C, N, D] and s [B, M, D], got {tuple(v.shape)} and {tuple(s.shape)}")
    C, N, D = v.shape
    B, M = s.shape[:2]
    if sent_mask is not None and sent_mask.shape != (B, M):
        raise ValueError(f"soft_pool_align: sent_mask shape {tuple(sent_mask.shape)} != [B, M] = {(B, M)}")
    if not tau_pool > 0:
        raise ValueError(f"soft_pool_align: tau_pool must be > 0, got {tau_pool}")
    dtype = torch.float64 if torch.float64 in (v.dtype, s.dtype) else torch.float32
    with torch.autocast(v.device.type, enabled=False):  # float32 as documented, also inside a bf16 autocast region
        vf = v.to(dtype)  # [C, N, D]
        sn = l2_normalize(s.to(dtype), eps).reshape(B * M, D)  # [B*M, D]
        vn = l2_normalize(vf, eps).reshape(C * N, D)  # [C*N, D]
        logits = ((sn / tau_pool) @ vn.T).view(B * M, C, N)  # [B*M, C, N] = cos(s_bj, v_ci) / tau_pool
        w = torch.softmax(logits, dim=-1)  # [B*M, C, N], per (b, j, c) over CT c's patches
        a = torch.bmm(w.transpose(0, 1), vf).transpose(0, 1)  # [C, B*M, N] x [C, N, D] -> [B*M, C, D]
        a = a.reshape(B, M, C, D)
        if sent_mask is not None:
            a = a * sent_mask[:, :, None, None].to(dtype)
    return a


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / max(|x|, eps) over the last axis (the same eps as topk_align)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)
