"""Fused 3D patchify / unpatchify and MAE masked patchify: C++/CUDA kernels (csrc/cpu/patchify.cpp,
csrc/cuda/patchify.cu) behind torch.ops.simcrop.*, with fake kernels and autograd for torch.compile.

Conventions are those of simcrop.ops.reference: volumes [B, C, X, Y, Z]; patch n = (ix * gy + iy) * gz + iz;
P = px * py * pz * C ordered (dx, dy, dz, c). Any patch size that divides the volume works (no cubic grid).
Autograd: patchify3d and unpatchify3d are each other's backward; so are masked_patchify and masked_unpatchify.
"""
from __future__ import annotations

import math

import torch

from simcrop.ops import reference
from simcrop.ops.backend import register_fused
from simcrop.ops.extension import check_device, has_ext, require

__all__ = ["patchify3d", "unpatchify3d", "masked_patchify", "masked_unpatchify"]

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check_dtype(t: torch.Tensor, op: str, name: str) -> None:
    if t.dtype not in DTYPES:
        raise TypeError(f"{op}: {name} must be float32, float64, float16 or bfloat16, got {t.dtype}")


def _check_volume(x: torch.Tensor, patch, op: str) -> list[int]:
    """Validate x [B, C, X, Y, Z] and a dividing patch; returns the patch as a list of 3 ints."""
    if not isinstance(x, torch.Tensor) or x.dim() != 5:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{op}: x must be a [B, C, X, Y, Z] tensor, got {shape}")
    _check_dtype(x, op, "x")
    patch = [int(p) for p in patch]
    reference.patch_grid(tuple(x.shape[2:]), tuple(patch))  # ValueError naming the axis that does not divide
    require(x.device, op)
    return patch


def _check_ids(ids_keep: torch.Tensor, B: int, N: int, like: torch.Tensor, op: str) -> None:
    shape_ok = ids_keep.dim() == 2 and ids_keep.shape[0] == B and 0 < ids_keep.shape[1] <= N
    if ids_keep.dtype != torch.int64 or not shape_ok:
        raise ValueError(
            f"{op}: ids_keep must be int64 [B, K] with B = {B}, 1 <= K <= N = {N}; "
            f"got {ids_keep.dtype} {tuple(ids_keep.shape)}"
        )
    if ids_keep.device != like.device:
        raise ValueError(f"{op}: ids_keep is on {ids_keep.device} but the data on {like.device}")


def patchify3d(x: torch.Tensor, patch) -> torch.Tensor:
    """[B, C, X, Y, Z] -> [B, N, P] (as reference.patchify3d)."""
    patch = _check_volume(x, patch, "patchify3d")
    return torch.ops.simcrop.patchify3d(x.contiguous(), patch)


def unpatchify3d(patches: torch.Tensor, patch, spatial, channels: int = 1) -> torch.Tensor:
    """[B, N, P] -> [B, C, X, Y, Z] (as reference.unpatchify3d)."""
    op = "unpatchify3d"
    if patches.dim() != 3:
        raise ValueError(f"{op}: patches must be [B, N, P], got shape {tuple(patches.shape)}")
    _check_dtype(patches, op, "patches")
    patch, spatial = [int(p) for p in patch], [int(s) for s in spatial]
    grid = reference.patch_grid(tuple(spatial), tuple(patch))
    if patches.shape[1] != math.prod(grid) or patches.shape[2] != math.prod(patch) * channels:
        raise ValueError(
            f"{op}: got [B, N, P] = {tuple(patches.shape)}, expected N = {math.prod(grid)} and "
            f"P = {math.prod(patch) * channels} for volume {tuple(spatial)}, patch {tuple(patch)}, "
            f"{channels} channel(s)"
        )
    require(patches.device, op)
    return torch.ops.simcrop.unpatchify3d(patches.contiguous(), patch, spatial, int(channels))


def masked_unpatchify(visible: torch.Tensor, patch, ids_keep: torch.Tensor, spatial) -> torch.Tensor:
    """visible [B, K, P] put back at patches ids_keep [B, K] of a zero volume [B, C, X, Y, Z] (C = P / (px py pz))."""
    op = "masked_unpatchify"
    patch, spatial = [int(p) for p in patch], [int(s) for s in spatial]
    grid = reference.patch_grid(tuple(spatial), tuple(patch))
    if visible.dim() != 3 or visible.shape[2] % math.prod(patch) != 0:
        raise ValueError(
            f"{op}: visible must be [B, K, P] with P a multiple of {math.prod(patch)}, got {tuple(visible.shape)}"
        )
    _check_dtype(visible, op, "visible")
    _check_ids(ids_keep, visible.shape[0], math.prod(grid), visible, op)
    require(visible.device, op)
    return torch.ops.simcrop.masked_unpatchify(visible.contiguous(), patch, ids_keep.contiguous(), spatial)


def masked_patchify(x: torch.Tensor, patch, noise: torch.Tensor, n_keep: int):
    """Visible patches under MAE masking, without materialising all patches (as reference.masked_patchify).

    x [B, C, X, Y, Z], noise [B, N] -> visible [B, N_keep, P], mask [B, N] (x's dtype, 1 = hidden),
    ids_restore [B, N], ids_keep [B, N_keep]. The permutation (stable argsort of noise) comes from
    reference.random_masking (torch ops on the device, no sync); the kernel gathers only the kept patches.
    """
    op = "masked_patchify"
    patch = _check_volume(x, patch, op)
    B = x.shape[0]
    N = math.prod(reference.patch_grid(tuple(x.shape[2:]), tuple(patch)))
    if noise.dim() != 2 or tuple(noise.shape) != (B, N):
        raise ValueError(f"{op}: noise shape {tuple(noise.shape)} != [B, N] = {(B, N)}")
    if noise.device != x.device:
        raise ValueError(f"{op}: noise is on {noise.device} but x on {x.device}")
    ids_keep, mask, ids_restore = reference.random_masking(noise, n_keep)  # [B, K], [B, N], [B, N]
    visible = torch.ops.simcrop.masked_patchify(x.contiguous(), patch, ids_keep)  # [B, K, P]
    return visible, mask.to(x.dtype), ids_restore, ids_keep


# -- torch.library registrations: fake kernels (shapes for torch.compile / meta) and autograd --------------------
def _register() -> None:
    lib = "simcrop::"

    @torch.library.register_fake(lib + "patchify3d")
    def _(x, patch):
        B, C, X, Y, Z = x.shape
        N = (X // patch[0]) * (Y // patch[1]) * (Z // patch[2])
        return x.new_empty(B, N, patch[0] * patch[1] * patch[2] * C)

    @torch.library.register_fake(lib + "unpatchify3d")
    def _(patches, patch, spatial, channels):
        return patches.new_empty(patches.shape[0], channels, *spatial)

    @torch.library.register_fake(lib + "masked_patchify")
    def _(x, patch, ids_keep):
        return x.new_empty(x.shape[0], ids_keep.shape[1], patch[0] * patch[1] * patch[2] * x.shape[1])

    @torch.library.register_fake(lib + "masked_unpatchify")
    def _(visible, patch, ids_keep, spatial):
        return visible.new_empty(visible.shape[0], visible.shape[2] // (patch[0] * patch[1] * patch[2]), *spatial)

    # patchify3d <-> unpatchify3d
    def setup_patchify(ctx, inputs, output):
        x, patch = inputs
        ctx.patch, ctx.spatial, ctx.channels = patch, list(x.shape[2:]), x.shape[1]

    def backward_patchify(ctx, grad):  # [B, N, P] -> [B, C, X, Y, Z]
        return torch.ops.simcrop.unpatchify3d(grad, ctx.patch, ctx.spatial, ctx.channels), None

    def setup_unpatchify(ctx, inputs, output):
        ctx.patch = inputs[1]

    def backward_unpatchify(ctx, grad):  # [B, C, X, Y, Z] -> [B, N, P]
        return torch.ops.simcrop.patchify3d(grad, ctx.patch), None, None, None

    # masked_patchify <-> masked_unpatchify (hidden patches get zero gradient)
    def setup_masked(ctx, inputs, output):
        x, patch, ids_keep = inputs
        ctx.patch, ctx.spatial = patch, list(x.shape[2:])
        ctx.save_for_backward(ids_keep)

    def backward_masked(ctx, grad):  # [B, K, P] -> [B, C, X, Y, Z]
        (ids_keep,) = ctx.saved_tensors
        return torch.ops.simcrop.masked_unpatchify(grad, ctx.patch, ids_keep, ctx.spatial), None, None

    def setup_masked_un(ctx, inputs, output):
        _, patch, ids_keep, _ = inputs
        ctx.patch = patch
        ctx.save_for_backward(ids_keep)

    def backward_masked_un(ctx, grad):  # [B, C, X, Y, Z] -> [B, K, P]
        (ids_keep,) = ctx.saved_tensors
        return torch.ops.simcrop.masked_patchify(grad, ctx.patch, ids_keep), None, None, None

    torch.library.register_autograd(lib + "patchify3d", backward_patchify, setup_context=setup_patchify)
    torch.library.register_autograd(lib + "unpatchify3d", backward_unpatchify, setup_context=setup_unpatchify)
    torch.library.register_autograd(lib + "masked_patchify", backward_masked, setup_context=setup_masked)
    torch.library.register_autograd(lib + "masked_unpatchify", backward_masked_un, setup_context=setup_masked_un)


if has_ext():
    _register()

register_fused("masked_patchify", masked_patchify, check_device, "c++/cuda")
