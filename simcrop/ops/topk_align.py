"""Fused top-K sentence-patch alignment: the torch.library op `simcrop::topk_align` around a Triton kernel.

v [B, N, D], s [B, M, D], sent_mask [B, M] bool, K, k_per_sentence [B, M] | None
  -> a [B, M, D] (v's dtype), idx [B, M, K] int64, sim [B, M, K] float32
with the semantics of simcrop.ops.reference.topk_align (cosine in fp32, ties to the lower patch index, -1 beyond
k_j and for padding sentences, a = mean of the selected un-normalised v; gradient to v only). SimCroP L_align.
Registered as the "triton" fused backend of `topk_align`; kernels and their math: kernels/topk_align.py.
Supported: N <= 4096 patches, M <= 64 sentences, K <= 64, any D; v, s in float32 / bfloat16 / float16 (fp32
accumulation), any strides; CUDA, or CPU under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from simcrop.ops._triton import (
    FLOAT_DTYPES,
    Launch,
    cdiv,
    check_float,
    check_same_device,
    launch,
    pow2,
    require,
    unavailable,
)
from simcrop.ops.backend import register_fused

__all__ = ["topk_align", "check", "launches", "MAX_N", "MAX_M", "MAX_K"]

MAX_N, MAX_M, MAX_K = 4096, 64, 64
_REGS = 4096  # elements of the [BLOCK_M, N_PAD] key tile (int64) one program keeps in registers
_TILE = 8192  # elements of one broadcast product tile
_alloc = torch.empty  # output allocation (tests swap in a poisoning allocator)
_PROBE = "topk_align_fwd_kernel"  # the kernel whose decoration tells interpreter from compiler


def _alloc_idx(B: int, M: int, k: int, device) -> Tensor:
    return _alloc(B, M, k, dtype=torch.int64, device=device)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def check(device: torch.device) -> str | None:
    """None when the Triton topk_align can run on `device`, else why not (simcrop.ops.backend contract)."""
    return unavailable("topk_align", _PROBE, torch.device(device))


def _validate(v: Tensor, s: Tensor, sent_mask: Tensor, k: int, k_per_sentence: Optional[Tensor], eps: float):
    name = "topk_align (triton)"
    if v.dim() != 3 or s.dim() != 3:
        raise ValueError(f"{name}: v must be [B, N, D] and s [B, M, D], got {tuple(v.shape)} and {tuple(s.shape)}")
    B, N, D = v.shape
    M = s.shape[1]
    if s.shape[0] != B or s.shape[2] != D:
        raise ValueError(f"{name}: v is [B, N, D] = {tuple(v.shape)} but s is {tuple(s.shape)}")
    check_float(name, v=v, s=s)
    if sent_mask.shape != (B, M) or sent_mask.dtype != torch.bool:
        raise ValueError(
            f"{name}: sent_mask must be bool [B, M] = {(B, M)}, got {sent_mask.dtype} {tuple(sent_mask.shape)}"
        )
    if k_per_sentence is not None:
        kind = k_per_sentence.dtype
        if k_per_sentence.shape != (B, M) or kind.is_floating_point or kind.is_complex or kind == torch.bool:
            raise ValueError(
                f"{name}: k_per_sentence must be an integer [B, M] = {(B, M)} tensor, "
                f"got {k_per_sentence.dtype} {tuple(k_per_sentence.shape)}"
            )
    check_same_device(name, "v", v, s=s, sent_mask=sent_mask, k_per_sentence=k_per_sentence)
    if not 1 <= k <= N:
        raise ValueError(f"{name}: K = {k} must be in 1..N, N = {N} visible patches")
    if k > MAX_K or N > MAX_N or M > MAX_M:
        raise ValueError(
            f"{name}: supports K <= {MAX_K}, N <= {MAX_N}, M <= {MAX_M}; got K = {k}, N = {N}, M = {M} "
            "(use backend='reference')"
        )
    if not eps > 0:
        raise ValueError(f"{name}: eps must be > 0, got {eps}")


def _fwd_launch(v, s, sent_mask, k, k_per_sentence, eps, a, idx, sim) -> Launch:
    """topk_align_fwd_kernel's launch: one program per (block of BLOCK_M sentences, b)."""
    B, N, D = v.shape
    M = s.shape[1]
    n_pad = max(pow2(N), 16)
    block_n = min(n_pad, 64)
    block_m = max(1, min(_REGS // n_pad, pow2(M), 16))
    if v.device.type == "cuda":  # fewer sentences per program until there is a program for every SM
        while block_m > 1 and B * cdiv(M, block_m) < _sm_count(v.device):
            block_m //= 2
    k_pad = pow2(k)
    mask = sent_mask.view(torch.uint8)  # [B, M] 0/1 bytes, no copy
    kps = k_per_sentence if k_per_sentence is not None else mask  # a valid pointer; unread without HAS_KPS
    args = (
        v, s, mask, kps, a, idx, sim, N, M, D, k, float(eps),
        *v.stride(), *s.stride(), *mask.stride(), *kps.stride(),
    )
    meta = dict(
        HAS_KPS=k_per_sentence is not None, BLOCK_M=block_m, BLOCK_N=block_n, N_TILES=n_pad // block_n,
        BLOCK_D=max(1, min(_TILE // (block_m * block_n), pow2(D))), K_PAD=k_pad,
        POOL_D=max(1, min(_TILE // (block_m * k_pad), pow2(D))), num_warps=4,
    )
    return Launch("topk_align_fwd_kernel", (cdiv(M, block_m), B), args, meta)


def _bwd_launch(grad_a, idx, grad_v) -> Launch:
    """topk_align_bwd_kernel's launch: one program per (block of BLOCK_N patches, b)."""
    B, M, D = grad_a.shape
    n, K = grad_v.shape[1], idx.shape[2]
    m_pad = max(16, pow2(M))
    block_n = 64 if m_pad <= 32 else 32  # W [BLOCK_N, M_PAD] and the dot operands fit registers (no spills)
    block_d = min(64 if m_pad <= 32 else 32, max(16, pow2(D)))
    args = (grad_a, idx, grad_v, n, M, D, K, *grad_a.stride())
    meta = dict(BLOCK_N=block_n, M_PAD=m_pad, BLOCK_D=block_d, num_warps=4)
    return Launch("topk_align_bwd_kernel", (cdiv(n, block_n), B), args, meta)


def launches(v, s, sent_mask, k, k_per_sentence=None, eps=1e-6) -> list[Launch]:
    """Every kernel launch of one forward + backward on these inputs (works on meta tensors): for ahead-of-time
    compilation checks (simcrop.ops._triton.compile_for_target) without a GPU."""
    B, N, D = v.shape
    M = s.shape[1]
    a, idx, sim = _alloc(B, M, D, dtype=v.dtype, device=v.device), _alloc_idx(B, M, k, v.device), _alloc(
        B, M, k, dtype=torch.float32, device=v.device)
    grad_v = _alloc(B, N, D, dtype=v.dtype, device=v.device)
    return [_fwd_launch(v, s, sent_mask, k, k_per_sentence, eps, a, idx, sim), _bwd_launch(a, idx, grad_v)]


@torch.library.custom_op("simcrop::topk_align", mutates_args=())
def topk_align_op(
    v: Tensor, s: Tensor, sent_mask: Tensor, k: int, k_per_sentence: Optional[Tensor], eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(a [B, M, D], idx [B, M, K] int64, sim [B, M, K] fp32); see the module docstring."""
    _validate(v, s, sent_mask, k, k_per_sentence, eps)
    require("topk_align", _PROBE, v.device)
    B, N, D = v.shape
    M = s.shape[1]
    a = _alloc(B, M, D, dtype=v.dtype, device=v.device)
    idx = _alloc_idx(B, M, k, v.device)
    sim = _alloc(B, M, k, dtype=torch.float32, device=v.device)
    if B * M == 0:
        return a, idx, sim
    from simcrop.kernels import topk_align as kernels  # lazily: imports Triton, decorates the kernels

    launch(kernels, _fwd_launch(v, s, sent_mask, k, k_per_sentence, eps, a, idx, sim))
    return a, idx, sim


@topk_align_op.register_fake
def _topk_align_fake(v, s, sent_mask, k, k_per_sentence, eps):
    _validate(v, s, sent_mask, k, k_per_sentence, eps)
    B, N, D = v.shape
    M = s.shape[1]
    return (
        v.new_empty(B, M, D),
        v.new_empty(B, M, k, dtype=torch.int64),
        v.new_empty(B, M, k, dtype=torch.float32),
    )


@torch.library.custom_op("simcrop::topk_align_backward", mutates_args=())
def topk_align_backward_op(grad_a: Tensor, idx: Tensor, n: int) -> Tensor:
    """grad_a [B, M, D], idx [B, M, K] (from the forward) -> grad_v [B, n, D] in grad_a's dtype."""
    _validate_backward(grad_a, idx, n)
    require("topk_align", _PROBE, grad_a.device)
    B, M, D = grad_a.shape
    grad_v = _alloc(B, n, D, dtype=grad_a.dtype, device=grad_a.device)
    if grad_v.numel() == 0:
        return grad_v
    from simcrop.kernels import topk_align as kernels

    launch(kernels, _bwd_launch(grad_a, idx.contiguous(), grad_v))
    return grad_v


def _validate_backward(grad_a: Tensor, idx: Tensor, n: int) -> None:
    if grad_a.dim() != 3 or idx.dim() != 3 or idx.shape[:2] != grad_a.shape[:2] or idx.dtype != torch.int64:
        raise ValueError(
            f"topk_align_backward: grad_a must be [B, M, D] and idx int64 [B, M, K], "
            f"got {tuple(grad_a.shape)} and {idx.dtype} {tuple(idx.shape)}"
        )
    if grad_a.dtype not in FLOAT_DTYPES or idx.device != grad_a.device:
        raise ValueError(f"topk_align_backward: grad_a {grad_a.dtype} on {grad_a.device}, idx on {idx.device}")
    if n < 1:
        raise ValueError(f"topk_align_backward: n must be >= 1, got {n}")


@topk_align_backward_op.register_fake
def _topk_align_backward_fake(grad_a, idx, n):
    _validate_backward(grad_a, idx, n)
    return grad_a.new_empty(grad_a.shape[0], n, grad_a.shape[2])


def _setup_context(ctx, inputs, output):
    v = inputs[0]
    _, idx, sim = output
    ctx.save_for_backward(idx)
    ctx.n = v.shape[1]
    ctx.mark_non_differentiable(idx, sim)  # the selection is not differentiated (as the reference)


def _backward(ctx, grad_a, grad_idx, grad_sim):
    (idx,) = ctx.saved_tensors
    grad_v = None
    if ctx.needs_input_grad[0] and grad_a is not None:
        grad_v = torch.ops.simcrop.topk_align_backward(grad_a, idx, ctx.n)  # [B, N, D]
    return grad_v, None, None, None, None, None  # s, sent_mask, k, k_per_sentence, eps get none


topk_align_op.register_autograd(_backward, setup_context=_setup_context)


def topk_align(
    v: Tensor, s: Tensor, sent_mask: Tensor, k: int, k_per_sentence: Optional[Tensor] = None, eps: float = 1e-6
):
    """Triton top-K selection + pooling; same signature and results as simcrop.ops.reference.topk_align.

    Args: v [B, N, D] patch features, s [B, M, D] sentence features, sent_mask [B, M] bool, k = K_max,
      k_per_sentence [B, M] int (values above K act as K, below 1 select nothing) or None, eps of the norms.
    Returns: a [B, M, D] (v's dtype), idx [B, M, K] int64 (-1 = none), sim [B, M, K] float32 (0 where idx is -1).
    """
    return torch.ops.simcrop.topk_align(v, s, sent_mask, k, k_per_sentence, eps)


register_fused("topk_align", topk_align, check, name="triton", auto_on_cpu=False)
