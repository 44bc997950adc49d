"""cross_granularity_attention throughput and memory: reference (einsum + softmax) vs torch.compile(reference) vs
PyTorch SDPA (+ g, masked) vs the Triton flash kernels vs xformers (where it imports, CUDA only).

`pytest bench/bench_cross_granularity_attention.py --benchmark-only` on whatever device is here (CUDA if present,
bf16; else CPU, fp32). Providers x direction (forward; backward = autograd.grad through one retained forward graph)
x sizes (small; the paper's fusion layer B=14, H=6, L=512, N=686, Dh=128). Every query is real (the Triton kernels
would also skip fully padded query blocks: not measured here). extra_info: device, dtype, thread count, and on CUDA
the peak memory above the inputs. The triton provider runs on CPU only under TRITON_INTERPRET=1, at the small size,
marked `interpreted` (NOT a meaningful time). SIMCROP_BENCH_SIZES=paper and
SIMCROP_BENCH_PROVIDERS=reference,triton (comma lists) restrict sizes and providers (bench/_timing.py).
On a shared CPU, OMP_NUM_THREADS=1 gives steadier numbers.
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

from simcrop.ops import reference as R

from ._timing import DEVICE, DTYPE, implementation, measure, op_call, op_info, op_rounds, selected

fused = importlib.import_module("simcrop.ops.cross_granularity_attention")

SIZES = {"small": (2, 2, 32, 48, 32), "paper": (14, 6, 512, 686, 128)}  # (B, H, L, N, Dh)
PROVIDERS = selected("SIMCROP_BENCH_PROVIDERS", ["reference", "compiled", "sdpa", "triton", "xformers"])


def sdpa(q, k, v, g, q_mask):
    """The same operator from PyTorch's fused attention (flash / memory-efficient backends on CUDA)."""
    out = F.scaled_dot_product_attention(q, k, v) + g.unsqueeze(2)
    return out * q_mask[:, None, :, None].to(out.dtype)


def xformers_attention(q, k, v, g, q_mask):
    import xformers.ops as xops  # [B, L, H, Dh] layout

    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    return (out + g.unsqueeze(2)) * q_mask[:, None, :, None].to(out.dtype)


def provider_fn(provider: str, size: str):
    if provider == "sdpa":
        return sdpa
    if provider == "xformers":
        if DEVICE.type != "cuda":
            pytest.skip("xformers has no CPU path")
        pytest.importorskip("xformers.ops")
        return xformers_attention
    return implementation(provider, R.cross_granularity_attention, fused.cross_granularity_attention, fused.check,
                          size=size)


def inputs(size: str):
    B, H, L, N, Dh = SIZES[size]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, L, H, Dh, generator=g).to(DEVICE, DTYPE).transpose(1, 2)  # as the fusion layer: strided
    k, v = torch.randn(B, N, 2, H, Dh, generator=g).to(DEVICE, DTYPE).permute(2, 0, 3, 1, 4)
    g_tok = torch.randn(B, H, Dh, generator=g).to(DEVICE, DTYPE)
    return q, k, v, g_tok, torch.ones(B, L, dtype=torch.bool, device=DEVICE)


@pytest.mark.parametrize("size", selected("SIMCROP_BENCH_SIZES", SIZES))
@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_cross_granularity_attention(benchmark, provider, direction, size):
    fn = provider_fn(provider, size)
    run = op_call(direction, fn, inputs(size), wrt=[0, 1, 2, 3])  # backward: the gradients w.r.t. q, k, v, g
    measure(benchmark, run, op_rounds(size), group=f"cross_granularity_attention {direction} {size} {SIZES[size]}",
            **op_info(provider))
