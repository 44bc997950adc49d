"""Fused masked-voxel MIM loss (SimCroP L_MIM): C++/CUDA kernels (csrc/cpu/masked_mse.cpp,
csrc/cuda/masked_mse.cu) that read the target patches straight from the volume, with no patchified copy.

Semantics of simcrop.ops.reference.masked_mse (pred [B, N, P], x [B, C, X, Y, Z], mask [B, N], 1 = hidden):
  e_n = mean_p (pred - t^)^2 with t^ = the patch of x, normalised per patch when norm_pix
  (mean / unbiased var over P, eps); loss = sum_n m_n e_n / max(sum m, 1) ('masked') or / (B N) ('all').
Differences, all documented: accumulation and the result are float32, float64 for float64 pred (the reference is
float32 throughout); patches with m = 0 are skipped, so NaN/Inf there does not reach the loss; gradient flows to
pred only: the volume (target) and the mask get None.
"""
from __future__ import annotations

import math

import torch

from simcrop.ops import reference
from simcrop.ops.backend import register_fused
from simcrop.ops.extension import check_device, has_ext, require
from simcrop.ops.patchify import _check_dtype

__all__ = ["masked_mse"]

NORMALIZATIONS = ("masked", "all")


def masked_mse(
    pred: torch.Tensor,
    x: torch.Tensor,
    mask: torch.Tensor,
    patch,
    norm_pix: bool = False,
    normalization: str = "masked",
    eps: float = 1e-6,
) -> torch.Tensor:
    """MIM loss over hidden patches: pred [B, N, P], volume x [B, C, X, Y, Z], mask [B, N] -> 0-d float32.

    Args: as reference.masked_mse. Returns a 0-d tensor (float64 when pred is float64), differentiable in pred.
    """
    op = "masked_mse"
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"{op}: normalization must be 'masked' or 'all', got {normalization!r}")
    if x.dim() != 5:
        raise ValueError(f"{op}: x must be [B, C, X, Y, Z], got shape {tuple(x.shape)}")
    _check_dtype(pred, op, "pred")
    _check_dtype(x, op, "x")
    if mask.dtype.is_complex or not (mask.dtype.is_floating_point or mask.dtype == torch.bool):
        raise TypeError(f"{op}: mask must be a float or bool tensor, got {mask.dtype}")
    patch = [int(p) for p in patch]
    grid = reference.patch_grid(tuple(x.shape[2:]), tuple(patch))
    B, N, P = x.shape[0], math.prod(grid), math.prod(patch) * x.shape[1]
    if tuple(pred.shape) != (B, N, P):
        raise ValueError(f"{op}: prediction shape {tuple(pred.shape)} != patchified target {(B, N, P)}")
    if tuple(mask.shape) != (B, N):
        raise ValueError(f"{op}: mask shape {tuple(mask.shape)} != [B, N] = {(B, N)}")
    if not (pred.device == x.device == mask.device):
        raise ValueError(f"{op}: pred, x and mask must be on one device, got {pred.device}, {x.device}, {mask.device}")
    require(pred.device, op)
    return torch.ops.simcrop.masked_mse(
        pred.contiguous(), x.contiguous(), mask.contiguous(), patch, bool(norm_pix), normalization, float(eps)
    )


def _register() -> None:
    lib = "simcrop::"

    @torch.library.register_fake(lib + "masked_mse")
    def _(pred, x, mask, patch, norm_pix, normalization, eps):
        return pred.new_empty((), dtype=torch.float64 if pred.dtype == torch.float64 else torch.float32)

    @torch.library.register_fake(lib + "masked_mse_backward")
    def _(grad, pred, x, mask, patch, norm_pix, normalization, eps):
        return torch.empty_like(pred)

    def setup(ctx, inputs, output):
        pred, x, mask, patch, norm_pix, normalization, eps = inputs
        ctx.args = (patch, norm_pix, normalization, eps)
        ctx.save_for_backward(pred, x, mask)

    def backward(ctx, grad):  # 0-d -> d loss / d pred [B, N, P]; none for the target volume and the mask
        pred, x, mask = ctx.saved_tensors
        grad_pred = torch.ops.simcrop.masked_mse_backward(grad, pred, x, mask, *ctx.args)
        return grad_pred, None, None, None, None, None, None

    torch.library.register_autograd(lib + "masked_mse", backward, setup_context=setup)


if has_ext():
    _register()

register_fused("masked_mse", masked_mse, check_device, "c++/cuda")
