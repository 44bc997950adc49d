"""Fused cross-granularity attention: the torch.library op `simcrop::cross_granularity_attention` around Triton
flash-attention kernels (forward, and FlashAttention-2 backward).

q [B, H, L, Dh], k, v [B, H, N, Dh], g [B, H, Dh], q_mask [B, L] bool
  -> out [B, H, L, Dh] = (softmax(q k^T * scale) v + g) at real queries, exact zeros at padded ones (q's dtype),
with the semantics of simcrop.ops.reference.cross_granularity_attention (SimCroP fusion, steps 2-3).
Gradients to q, k, v, g; padded queries receive none. Registered as the "triton" fused backend;
kernels and their math: kernels/cross_granularity_attention.py. No [L, N] matrix is ever stored.
Supported: Dh <= 256, q/k/v in one of float32 / bfloat16 / float16 (g any of them), any strides; keys all valid;
CUDA, or CPU under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor

from simcrop.ops._triton import (
    FLOAT_DTYPES,
    Launch,
    cdiv,
    check_same_device,
    is_interpreted,
    launch,
    pow2,
    require,
    unavailable,
)
from simcrop.ops.backend import register_fused

__all__ = ["cross_granularity_attention", "check", "launches", "MAX_DH"]

MAX_DH = 256
LOG2E = 1.4426950408889634
_alloc = torch.empty  # output allocation (tests swap in a poisoning allocator)
_PROBE = "cga_fwd_kernel"  # the kernel whose decoration tells interpreter from compiler


def check(device: torch.device) -> str | None:
    """None when the Triton cross_granularity_attention can run on `device`, else why not."""
    return unavailable("cross_granularity_attention", _PROBE, torch.device(device))


def _validate(q: Tensor, k: Tensor, v: Tensor, g: Tensor, q_mask: Tensor, scale: float) -> None:
    name = "cross_granularity_attention (triton)"
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape or k.shape[:2] != q.shape[:2] or k.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"{name}: q must be [B, H, L, Dh] and k, v [B, H, N, Dh], got q {tuple(q.shape)}, k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}"
        )
    B, H, L, Dh = q.shape
    if g.shape != (B, H, Dh) or q_mask.shape != (B, L) or q_mask.dtype != torch.bool:
        raise ValueError(
            f"{name}: g must be [B, H, Dh] = {(B, H, Dh)} and q_mask bool [B, L] = {(B, L)}, "
            f"got g {tuple(g.shape)} and q_mask {q_mask.dtype} {tuple(q_mask.shape)}"
        )
    if q.dtype not in FLOAT_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype or g.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name}: q, k, v must share one dtype of float32 / bfloat16 / float16 (g any of them), "
            f"got q {q.dtype}, k {k.dtype}, v {v.dtype}, g {g.dtype}"
        )
    check_same_device(name, "q", q, k=k, v=v, g=g, q_mask=q_mask)
    if Dh > MAX_DH or k.shape[2] < 1:
        raise ValueError(
            f"{name}: supports 1 <= N and Dh <= {MAX_DH}, got N = {k.shape[2]}, Dh = {Dh} (use backend='reference')"
        )
    if not math.isfinite(scale):
        raise ValueError(f"{name}: scale must be finite, got {scale}")


def _config(kernel: str, dtype: torch.dtype, dh: int) -> dict[str, Any]:
    """Tile sizes per kernel, chosen so that ptxas reports no register spills for sm_90 (checked ahead of time by
    the tests). 16-bit inputs take bigger tiles than fp32, whose dots run on FMA units (input_precision='ieee')."""
    block_d = max(16, pow2(dh))
    half = dtype != torch.float32
    tiles = {  # (BLOCK_L, BLOCK_N) for (16-bit, Dh <= 128), (16-bit, Dh 256), (fp32, Dh <= 128), (fp32, Dh 256)
        "fwd": ((64, 64), (32, 32), (32, 32), (16, 32)),
        "dkdv": ((32, 64), (32, 32), (16, 32), (16, 32)),
        "dq": ((64, 32), (16, 32), (32, 16), (16, 16)),
    }[kernel][(0 if half else 2) + (block_d > 128)]
    return dict(BLOCK_L=tiles[0], BLOCK_N=tiles[1], BLOCK_D=block_d, num_warps=4 if block_d <= 64 else 8,
                num_stages=2)


def _upcast(module, dtype: torch.dtype) -> bool:
    """Dot operands in fp32: for fp32 inputs, and in the interpreter (its 16-bit tl.dot is wrong)."""
    return dtype == torch.float32 or is_interpreted(module.cga_fwd_kernel)


def _fwd_launch(q, k, v, g, q_mask, scale, out, lse, upcast: bool) -> Launch:
    """cga_fwd_kernel: one program per (block of BLOCK_L queries, b * h)."""
    B, H, L, Dh = q.shape
    N = k.shape[2]
    meta = _config("fwd", q.dtype, Dh)
    mask = q_mask.view(torch.uint8)  # [B, L] 0/1 bytes, no copy
    args = (
        q, k, v, g, mask, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *g.stride(), *mask.stride(),
        H, L, N, Dh, scale * LOG2E,
    )
    return Launch("cga_fwd_kernel", (cdiv(L, meta["BLOCK_L"]), B * H), args, dict(meta, UPCAST=upcast))


def _bwd_launches(grad_out, q, k, v, g, q_mask, out, lse, scale, delta, dq, dk, dv, dg, upcast: bool) -> list[Launch]:
    """preprocess (one program per b * h), dk/dv (per block of keys, b * h), dq (per block of queries, b * h)."""
    B, H, L, Dh = q.shape
    N = k.shape[2]
    mask = q_mask.view(torch.uint8)
    block_d = max(16, pow2(Dh))
    pre = Launch(
        "cga_bwd_preprocess_kernel", (B * H,),
        (out, grad_out, g, mask, delta, dg, *grad_out.stride(), *g.stride(), *mask.stride(), H, L, Dh),
        dict(BLOCK_L=max(16, 4096 // block_d), BLOCK_D=block_d, num_warps=4),
    )
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *mask.stride())
    dkdv, dqc = _config("dkdv", q.dtype, Dh), _config("dq", q.dtype, Dh)
    return [
        pre,
        Launch("cga_bwd_dkdv_kernel", (cdiv(N, dkdv["BLOCK_N"]), B * H),
               (q, k, v, mask, grad_out, lse, delta, dk, dv, *strides, H, L, N, Dh, scale * LOG2E, scale),
               dict(dkdv, UPCAST=upcast)),
        Launch("cga_bwd_dq_kernel", (cdiv(L, dqc["BLOCK_L"]), B * H),
               (q, k, v, mask, grad_out, lse, delta, dq, *strides, H, L, N, Dh, scale * LOG2E, scale),
               dict(dqc, UPCAST=upcast)),
    ]


def launches(q, k, v, g, q_mask, scale: float | None = None) -> list[Launch]:
    """Every kernel launch of one forward + backward on these inputs (works on meta tensors): for ahead-of-time
    compilation checks (simcrop.ops._triton.compile_for_target) without a GPU."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    B, H, L, Dh = q.shape
    upcast = q.dtype == torch.float32
    out, lse, delta = _alloc(q.shape, dtype=q.dtype, device=q.device), *(
        _alloc(B, H, L, dtype=torch.float32, device=q.device) for _ in range(2))
    grads = [_alloc(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v, g)]
    return [_fwd_launch(q, k, v, g, q_mask, scale, out, lse, upcast),
            *_bwd_launches(out, q, k, v, g, q_mask, out, lse, scale, delta, *grads, upcast)]


@torch.library.custom_op("simcrop::cross_granularity_attention", mutates_args=())
def cross_granularity_attention_op(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, q_mask: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    """(out [B, H, L, Dh] in q's dtype, lse [B, H, L] fp32 base-2 log-sum-exp of the scaled scores)."""
    _validate(q, k, v, g, q_mask, scale)
    require("cross_granularity_attention", _PROBE, q.device)
    B, H, L, Dh = q.shape
    out = _alloc(B, H, L, Dh, dtype=q.dtype, device=q.device)
    lse = _alloc(B, H, L, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    from simcrop.kernels import cross_granularity_attention as kernels  # lazily: imports Triton

    launch(kernels, _fwd_launch(q, k, v, g, q_mask, scale, out, lse, _upcast(kernels, q.dtype)))
    return out, lse


@cross_granularity_attention_op.register_fake
def _cga_fake(q, k, v, g, q_mask, scale):
    _validate(q, k, v, g, q_mask, scale)
    B, H, L, Dh = q.shape
    return q.new_empty(B, H, L, Dh), q.new_empty(B, H, L, dtype=torch.float32)


@torch.library.custom_op("simcrop::cross_granularity_attention_backward", mutates_args=())
def cross_granularity_attention_backward_op(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, g: Tensor, q_mask: Tensor, out: Tensor, lse: Tensor,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dg) in the dtypes of q, k, v, g, from the forward's out and lse."""
    _validate_backward(grad_out, q, out, lse)
    require("cross_granularity_attention", _PROBE, q.device)
    B, H, L, Dh = q.shape
    dq, dk, dv, dg = (_alloc(t.shape, dtype=t.dtype, device=q.device) for t in (q, k, v, g))
    if B * H * Dh == 0:
        return dq, dk, dv, dg
    if L == 0:
        return dq, dk.zero_(), dv.zero_(), dg.zero_()
    from simcrop.kernels import cross_granularity_attention as kernels

    delta = _alloc(B, H, L, dtype=torch.float32, device=q.device)  # rowsum(dO' * attention output)
    specs = _bwd_launches(grad_out, q, k, v, g, q_mask, out.contiguous(), lse.contiguous(), scale, delta,
                          dq, dk, dv, dg, _upcast(kernels, q.dtype))
    for spec in specs:  # in order: preprocess (delta, dg), then dk/dv, then dq
        launch(kernels, spec)
    return dq, dk, dv, dg


def _validate_backward(grad_out: Tensor, q: Tensor, out: Tensor, lse: Tensor) -> None:
    if grad_out.shape != q.shape or out.shape != q.shape or lse.shape != q.shape[:3] or lse.dtype != torch.float32:
        raise ValueError(
            f"cross_granularity_attention_backward: grad_out and out must be {tuple(q.shape)} and lse fp32 "
            f"{tuple(q.shape[:3])}, got {tuple(grad_out.shape)}, {tuple(out.shape)}, {lse.dtype} {tuple(lse.shape)}"
        )


@cross_granularity_attention_backward_op.register_fake
def _cga_backward_fake(grad_out, q, k, v, g, q_mask, out, lse, scale):
    _validate_backward(grad_out, q, out, lse)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), g.new_empty(g.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, g, q_mask, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, g, q_mask, out, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, g, q_mask, out, lse = ctx.saved_tensors
    if grad_out is None or not any(ctx.needs_input_grad[:4]):
        return None, None, None, None, None, None
    dq, dk, dv, dg = torch.ops.simcrop.cross_granularity_attention_backward(
        grad_out, q, k, v, g, q_mask, out, lse, ctx.scale
    )
    need = ctx.needs_input_grad
    return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None, dg if need[3] else None,
            None, None)


cross_granularity_attention_op.register_autograd(_backward, setup_context=_setup_context)


def cross_granularity_attention(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, q_mask: Tensor, scale: Optional[float] = None
) -> Tensor:
    """Triton softmax(q k^T * scale) v + g at real queries; same signature and results as the reference.

    Args: q [B, H, L, Dh] text queries, k, v [B, H, N, Dh] image tokens (all valid), g [B, H, Dh] pooled image
      token per head, q_mask [B, L] bool (True = real token), scale (default Dh^-1/2).
    Returns: [B, H, L, Dh] in q's dtype, zeros at padded queries.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out, _ = torch.ops.simcrop.cross_granularity_attention(q, k, v, g, q_mask, scale)
    return out


register_fused("cross_granularity_attention", cross_granularity_attention, check, name="triton", auto_on_cpu=False)
