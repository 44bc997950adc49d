"""topk_align throughput and memory: reference vs torch.compile(reference) vs the Triton kernel.

`pytest bench/bench_topk_align.py --benchmark-only` on whatever device is here (CUDA if present, bf16; else CPU,
fp32). Providers x direction (forward; backward = autograd.grad through one retained forward graph) x sizes
(small, the paper's B=14, N=686, M=20, D=768, K=32). extra_info carries the device, dtype, and on CUDA the peak
memory above the inputs (torch.cuda.max_memory_allocated); on CPU only time is recorded.
The triton provider runs on CPU only under TRITON_INTERPRET=1, at the small size, and is then marked
`interpreted` (its time is NOT meaningful). SIMCROP_BENCH_SIZES=paper and
SIMCROP_BENCH_PROVIDERS=reference,triton (comma lists) restrict sizes and providers.
On a shared CPU, OMP_NUM_THREADS=1 gives steadier numbers (extra_info records the thread count).
"""
import importlib
import os

import pytest
import torch

from simcrop.ops import reference as R

fused = importlib.import_module("simcrop.ops.topk_align")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
SIZES = {"small": (4, 64, 8, 128, 8), "paper": (14, 686, 20, 768, 32)}  # (B, N, M, D, K)
SELECTED = [s for s in os.environ.get("SIMCROP_BENCH_SIZES", ",".join(SIZES)).split(",") if s]
PROVIDERS = [p for p in os.environ.get("SIMCROP_BENCH_PROVIDERS", "").split(",") if p] or [
    "reference", "compiled", "triton"]
INTERPRETED = DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET", "") == "1"
_COMPILED = {}


def implementation(provider: str, size: str):
    if provider == "reference":
        return R.topk_align
    if provider == "compiled":
        if "fn" not in _COMPILED:
            _COMPILED["fn"] = torch.compile(R.topk_align, dynamic=False)
        return _COMPILED["fn"]
    reason = fused.check(DEVICE)
    if reason is not None:
        pytest.skip(f"triton: {reason}")
    if INTERPRETED and size != "small":
        pytest.skip("triton in the interpreter: small size only")
    return fused.topk_align


def inputs(size: str):
    B, N, M, D, K = SIZES[size]
    g = torch.Generator().manual_seed(0)
    v = torch.randn(B, N, D, generator=g).to(DEVICE, DTYPE)
    s = torch.randn(B, M, D, generator=g).to(DEVICE, DTYPE)
    mask = torch.arange(M).expand(B, M) < torch.randint(M // 2, M + 1, (B, 1), generator=g)  # a few padded
    return v, s, mask.to(DEVICE), K


def measure(benchmark, run, rounds: int) -> None:
    """Median over `rounds` calls (synchronised on CUDA) after warm-up; peak CUDA memory of one call."""
    for _ in range(2):
        run()  # warm-up: compilation, autotuning, caches
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
def test_topk_align(benchmark, provider, direction, size):
    fn = implementation(provider, size)
    v, s, mask, K = inputs(size)
    benchmark.group = f"topk_align {direction} {size} {SIZES[size]}"
    benchmark.extra_info.update(device=str(DEVICE), dtype=str(DTYPE).removeprefix("torch."), interpreted=(
        provider == "triton" and INTERPRETED), threads=torch.get_num_threads())
    if direction == "forward":
        def run():
            return fn(v, s, mask, K)
    else:
        v.requires_grad_(True)
        a = fn(v, s, mask, K)[0]
        grad = torch.randn_like(a)

        def run():
            return torch.autograd.grad(a, v, grad, retain_graph=True)
    rounds = 30 if DEVICE.type == "cuda" else (10 if size == "small" else 3)
    measure(benchmark, run, rounds)
