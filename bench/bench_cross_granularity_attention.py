"""cross_granularity_attention throughput and memory: reference (einsum + softmax) vs torch.compile(reference) vs
PyTorch SDPA (+ g, masked) vs the Triton flash kernels vs xformers (where it imports, CUDA only).

`pytest bench/bench_cross_granularity_attention.py --benchmark-only` on whatever device is here (CUDA if present,
bf16; else CPU, fp32). Providers x direction (forward; backward = autograd.grad through one retained forward graph)
x sizes (small; the paper's fusion layer B=14, H=6, L=512, N=686, Dh=128). Every query is real (the Triton kernels
would also skip fully padded query blocks: not measured here). extra_info: device, dtype, and on CUDA the peak
memory above the inputs. The triton provider runs on CPU only under TRITON_INTERPRET=1, at the small size, marked
`interpreted` (NOT a meaningful time). SIMCROP_BENCH_SIZES=paper and
SIMCROP_BENCH_PROVIDERS=reference,triton (comma lists) restrict sizes and providers.
On a shared CPU, OMP_NUM_THREADS=1 gives steadier numbers (extra_info records the thread count).
"""
import importlib
import os

import pytest
import torch
import torch.nn.functional as F

from simcrop.ops import reference as R

fused = importlib.import_module("simcrop.ops.cross_granularity_attention")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
SIZES = {"small": (2, 2, 32, 48, 32), "paper": (14, 6, 512, 686, 128)}  # (B, H, L, N, Dh)
SELECTED = [s for s in os.environ.get("SIMCROP_BENCH_SIZES", ",".join(SIZES)).split(",") if s]
PROVIDERS = [p for p in os.environ.get("SIMCROP_BENCH_PROVIDERS", "").split(",") if p] or [
    "reference", "compiled", "sdpa", "triton", "xformers"]
INTERPRETED = DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET", "") == "1"
_COMPILED = {}


def sdpa(q, k, v, g, q_mask):
    """The same operator from PyTorch's fused attention (flash / memory-efficient backends on CUDA)."""
    out = F.scaled_dot_product_attention(q, k, v) + g.unsqueeze(2)
    return out * q_mask[:, None, :, None].to(out.dtype)


def xformers_attention(q, k, v, g, q_mask):
    import xformers.ops as xops  # [B, L, H, Dh] layout

    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    return (out + g.unsqueeze(2)) * q_mask[:, None, :, None].to(out.dtype)


def implementation(provider: str, size: str):
    if provider == "reference":
        return R.cross_granularity_attention
    if provider == "compiled":
        if "fn" not in _COMPILED:
            _COMPILED["fn"] = torch.compile(R.cross_granularity_attention, dynamic=False)
        return _COMPILED["fn"]
    if provider == "sdpa":
        return sdpa
    if provider == "xformers":
        if DEVICE.type != "cuda":
            pytest.skip("xformers has no CPU path")
        pytest.importorskip("xformers.ops")
        return xformers_attention
    reason = fused.check(DEVICE)
    if reason is not None:
        pytest.skip(f"triton: {reason}")
    if INTERPRETED and size != "small":
        pytest.skip("triton in the interpreter: small size only")
    return fused.cross_granularity_attention


def inputs(size: str):
    B, H, L, N, Dh = SIZES[size]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, L, H, Dh, generator=g).to(DEVICE, DTYPE).transpose(1, 2)  # as the fusion layer: strided
    k, v = torch.randn(B, N, 2, H, Dh, generator=g).to(DEVICE, DTYPE).permute(2, 0, 3, 1, 4)
    g_tok = torch.randn(B, H, Dh, generator=g).to(DEVICE, DTYPE)
    return q, k, v, g_tok, torch.ones(B, L, dtype=torch.bool, device=DEVICE)


def measure(benchmark, run, rounds: int) -> None:
    """Median over `rounds` calls (synchronised on CUDA) after warm-up; peak CUDA memory of one call."""
    for _ in range(2):
        run()
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        benchmark.extra_info["peak_MiB"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 2)

        def timed():
            run()
            torch.cuda.synchronize()
    else:
        timed = run
    benchmark.pedantic(timed, rounds=rounds, iterations=1)


@pytest.mark.parametrize("size", SELECTED)
@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_cross_granularity_attention(benchmark, provider, direction, size):
    fn = implementation(provider, size)
    q, k, v, g, mask = inputs(size)
    benchmark.group = f"cross_granularity_attention {direction} {size} {SIZES[size]}"
    benchmark.extra_info.update(device=str(DEVICE), dtype=str(DTYPE).removeprefix("torch."), interpreted=(
        provider == "triton" and INTERPRETED), threads=torch.get_num_threads())
    if direction == "forward":
        def run():
            return fn(q, k, v, g, mask)
    else:
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v, g)]
        out = fn(*leaves, mask)
        grad = torch.randn_like(out)

        def run():
            return torch.autograd.grad(out, leaves, grad, retain_graph=True)
    rounds = 30 if DEVICE.type == "cuda" else (10 if size == "small" else 3)
    measure(benchmark, run, rounds)
