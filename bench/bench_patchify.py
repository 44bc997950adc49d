"""Throughput of the C++/CUDA masked_patchify and masked_mse against the reference and torch.compile(reference).

`pytest bench/bench_patchify.py --benchmark-only` (add `-k cuda` for the GPU cases only, `-k "not paper"` for
a quick run). Providers: reference (eager pure PyTorch), compiled (torch.compile(reference), inductor),
extension (simcrop.ops.patchify / simcrop.ops.masked_mse). Cases: forward, and forward+backward (the gradient
w.r.t. the volume for masked_patchify, w.r.t. the prediction for masked_mse). Shapes: tiny (B=4, 1x64x64x32)
and the paper's (B=14, 1x224x224x112), patch 16x16x8, mask ratio 0.75. extra_info holds the device and, on CUDA,
the peak memory of one call. Quote ratios from one run on one machine (bench/RESULTS.md).
"""
import importlib
import math

import pytest
import torch

from simcrop.ops import reference as R
from simcrop.ops.extension import check_device

ext_patchify = importlib.import_module("simcrop.ops.patchify")
ext_mse = importlib.import_module("simcrop.ops.masked_mse")

PATCH = (16, 16, 8)
RATIO = 0.75
SHAPES = {"tiny": (4, 1, 64, 64, 32), "paper": (14, 1, 224, 224, 112)}
ROUNDS = {"tiny": 20, "paper": 5}
DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
    ),
]
PROVIDERS = ["reference", "compiled", "extension"]


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


_inputs_cache: dict = {}


def _inputs(size: str, device: str):
    """Volume [B, 1, X, Y, Z] in [-1, 1], noise [B, N], prediction [B, N, P] and mask [B, N] (cached per case)."""
    key = (size, device)
    if key not in _inputs_cache:
        _inputs_cache.clear()  # one case at a time: the paper's shape is ~0.3 GB per tensor
        gen = torch.Generator().manual_seed(0)
        shape = SHAPES[size]
        B, N, P = shape[0], math.prod(s // p for s, p in zip(shape[2:], PATCH)), math.prod(PATCH) * shape[1]
        x = (torch.rand(shape, generator=gen) * 2 - 1).to(device)
        noise = torch.rand(B, N, generator=gen).to(device)
        pred = torch.randn(B, N, P, generator=gen).to(device)
        _, mask, _ = R.random_masking(noise, R.num_visible(N, RATIO))
        _inputs_cache[key] = (x, noise, pred, mask, R.num_visible(N, RATIO))
    return _inputs_cache[key]


def _masked_patchify_impl(provider):
    if provider == "reference":
        return R.masked_patchify
    if provider == "compiled":
        return torch.compile(R.masked_patchify, dynamic=False)
    return ext_patchify.masked_patchify


def _masked_mse_impl(provider):
    if provider == "reference":
        return R.masked_mse
    if provider == "compiled":
        return torch.compile(R.masked_mse, dynamic=False)
    return ext_mse.masked_mse


def _run(benchmark, fn, device, size, group):
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):  # warm-up: compilation, allocator
        fn()
    _sync(device)
    if device == "cuda":
        benchmark.extra_info["peak_mem_MiB"] = torch.cuda.max_memory_allocated() / 2**20

    def timed():
        fn()
        _sync(device)

    benchmark.group = group
    benchmark.extra_info["device"] = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    benchmark.pedantic(timed, rounds=ROUNDS[size], iterations=1)


def _skip_unless_extension(provider, device):
    if provider == "extension":
        reason = check_device(torch.device(device))
        if reason:
            pytest.fail(f"the extension cannot run on {device}: {reason}")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("size", list(SHAPES))
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_masked_patchify(benchmark, mode, device, size, provider):
    _skip_unless_extension(provider, device)
    x, noise, _, _, n_keep = _inputs(size, device)
    impl = _masked_patchify_impl(provider)
    if mode == "fwd":
        fn = lambda: impl(x, PATCH, noise, n_keep)  # noqa: E731
    else:
        xg = x.detach().requires_grad_()
        grad = torch.ones(x.shape[0], n_keep, math.prod(PATCH) * x.shape[1], device=device)

        def fn():
            visible = impl(xg, PATCH, noise, n_keep)[0]  # [B, N_keep, P]
            visible.backward(grad)
            xg.grad = None

    _run(benchmark, fn, device, size, f"masked_patchify {mode} {size} {device}")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("size", list(SHAPES))
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm_pix", [False, True], ids=["raw", "norm_pix"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_masked_mse(benchmark, mode, norm_pix, device, size, provider):
    _skip_unless_extension(provider, device)
    x, _, pred, mask, _ = _inputs(size, device)
    impl = _masked_mse_impl(provider)
    if mode == "fwd":
        fn = lambda: impl(pred, x, mask, PATCH, norm_pix)  # noqa: E731
    else:
        pg = pred.detach().requires_grad_()

        def fn():
            impl(pg, x, mask, PATCH, norm_pix).backward()
            pg.grad = None

    _run(benchmark, fn, device, size, f"masked_mse {mode} {'norm_pix' if norm_pix else 'raw'} {size} {device}")
