"""topk_align throughput and memory: reference vs torch.compile(reference) vs the Triton kernel.

`pytest bench/bench_topk_align.py --benchmark-only` on whatever device is here (CUDA if present, bf16; else CPU,
fp32). Providers x direction (forward; backward = autograd.grad through one retained forward graph) x sizes
(small, the paper's B=14, N=686, M=20, D=768, K=32). extra_info carries the device, dtype, thread count, and on
CUDA the peak memory above the inputs (torch.cuda.max_memory_allocated); on CPU only time is recorded.
The triton provider runs on CPU only under TRITON_INTERPRET=1, at the small size, and is then marked
`interpreted` (its time is NOT meaningful). SIMCROP_BENCH_SIZES=paper and
SIMCROP_BENCH_PROVIDERS=reference,triton (comma lists) restrict sizes and providers (bench/_timing.py).
On a shared CPU, OMP_NUM_THREADS=1 gives steadier numbers.
"""
import importlib

import pytest
import torch

from simcrop.ops import reference as R

from ._timing import DEVICE, DTYPE, implementation, measure, op_call, op_info, op_rounds, selected

fused = importlib.import_module("simcrop.ops.topk_align")

SIZES = {"small": (4, 64, 8, 128, 8), "paper": (14, 686, 20, 768, 32)}  # (B, N, M, D, K)
PROVIDERS = selected("SIMCROP_BENCH_PROVIDERS", ["reference", "compiled", "triton"])


def inputs(size: str):
    B, N, M, D, K = SIZES[size]
    g = torch.Generator().manual_seed(0)
    v = torch.randn(B, N, D, generator=g).to(DEVICE, DTYPE)
    s = torch.randn(B, M, D, generator=g).to(DEVICE, DTYPE)
    mask = torch.arange(M).expand(B, M) < torch.randint(M // 2, M + 1, (B, 1), generator=g)  # a few padded
    return v, s, mask.to(DEVICE), K


@pytest.mark.parametrize("size", selected("SIMCROP_BENCH_SIZES", SIZES))
@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_topk_align(benchmark, provider, direction, size):
    fn = implementation(provider, R.topk_align, fused.topk_align, fused.check, size=size)
    run = op_call(direction, fn, inputs(size), wrt=[0])  # backward: the gradient w.r.t. v
    measure(benchmark, run, op_rounds(size), group=f"topk_align {direction} {size} {SIZES[size]}",
            **op_info(provider))
