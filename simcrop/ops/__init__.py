"""simcrop.ops: SimCroP's operators, each usable on its own by other vision-language projects.

Every op takes `backend="auto"|"fused"|"reference"` (see simcrop.ops.backend); the semantics, shapes and
tie-breaking rules are those of the pure-PyTorch references in simcrop.ops.reference. Importing this package
imports torch only (never the model, transformers, MONAI or DALI).
"""
from __future__ import annotations

import torch

from simcrop.ops import reference
from simcrop.ops.backend import BACKENDS, BackendUnavailable, describe, register_fused, resolve
from simcrop.ops.reference import num_visible, patch_grid, patchify3d, unpatchify3d

# C++/CUDA fused masked_patchify + masked_mse (csrc/): registers with the backend switch; never fails when the
# extension is not built (check() then says so). Imported before the wrappers below: importing a submodule binds
# its name on this package, and the public functions masked_mse / masked_patchify must win that name.
from simcrop.ops import masked_mse as _masked_mse_fused, patchify as _patchify_fused  # noqa: E402,F401  isort: skip
# Triton topk_align + cross_granularity_attention (kernels/): register likewise; Triton loads on first launch.
from simcrop.ops import cross_granularity_attention as _cga_triton, topk_align as _topk_triton  # noqa: E402,F401

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "cross_granularity_attention",
    "describe",
    "masked_mse",
    "masked_patchify",
    "num_visible",
    "patch_grid",
    "patchify3d",
    "reference",
    "register_fused",
    "soft_pool_align",
    "topk_align",
    "unpatchify3d",
]


def masked_patchify(x, patch, noise, n_keep: int, backend: str = "auto"):
    """[B, C, X, Y, Z], noise [B, N] -> visible [B, N_keep, P], mask [B, N], ids_restore [B, N], ids_keep [B, N_keep]."""
    impl, _ = resolve("masked_patchify", backend, x.device)
    return impl(x, tuple(patch), noise, n_keep)


def masked_mse(pred, x, mask, patch, norm_pix: bool = False, normalization: str = "masked", backend: str = "auto"):
    """MIM loss over hidden patches: pred [B, N, P], volume x [B, C, X, Y, Z], mask [B, N] -> scalar."""
    impl, _ = resolve("masked_mse", backend, pred.device)
    return impl(pred, x, mask, tuple(patch), norm_pix=norm_pix, normalization=normalization)


def topk_align(v, s, sent_mask, k: int, k_per_sentence: torch.Tensor | None = None, backend: str = "auto"):
    """Top-K sentence-patch selection + pooling: v [B, N, D], s [B, M, D] -> (a [B, M, D], idx, sim [B, M, K])."""
    impl, _ = resolve("topk_align", backend, v.device)
    return impl(v, s, sent_mask, k, k_per_sentence)


def cross_granularity_attention(q, k, v, g, q_mask, backend: str = "auto"):
    """softmax(q k^T / sqrt(Dh)) v + g at every real query: q [B, H, L, Dh], k, v [B, H, N, Dh], g [B, H, Dh]."""
    impl, _ = resolve("cross_granularity_attention", backend, q.device)
    return impl(q, k, v, g, q_mask)


def soft_pool_align(v, s, sent_mask=None, tau_pool: float = 0.05, backend: str = "auto"):
    """Soft pooling of every CT's patches per sentence: v [C, N, D], s [B, M, D] -> a [B, M, C, D] (float32),
    a[b, j, c] = sum_i softmax_i(cos(s_bj, v_ci) / tau_pool) v_ci. Reference only so far (docs/ops.md): `fused`
    raises BackendUnavailable, `auto` takes the reference."""
    impl, _ = resolve("soft_pool_align", backend, v.device)
    return impl(v, s, sent_mask, tau_pool)
