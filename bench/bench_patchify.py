"""Throughput of the C++/CUDA masked_patchify against the reference and torch.compile(reference).

`pytest bench/bench_patchify.py --benchmark-only` (add `-k cuda` for the GPU cases only, `-k "not paper"` for
a quick run). Providers: reference (eager pure PyTorch), compiled (torch.compile(reference), inductor),
extension (simcrop.ops.patchify). Cases: forward, and forward+backward (the gradient w.r.t. the volume). Shapes
(bench/_volumes.py): tiny (B=4, 1x64x64x32) and the paper's (B=14, 1x224x224x112), patch 16x16x8, mask ratio
0.75. extra_info holds the device, the thread count and, on CUDA, the peak memory of one call above the inputs
(bench/_timing.py). Quote ratios from one run on one machine (bench/RESULTS.md). The loss: bench_masked_mse.py.
"""
import importlib
import math

import pytest
import torch

from simcrop.ops import reference as R
from simcrop.ops.extension import check_device

from ._timing import DEVICES, implementation, measure
from ._volumes import PATCH, PROVIDERS, ROUNDS, SHAPES, mim_inputs

ext = importlib.import_module("simcrop.ops.patchify")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("size", list(SHAPES))
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_masked_patchify(benchmark, mode, device, size, provider):
    impl = implementation(provider, R.masked_patchify, ext.masked_patchify, check_device, device)
    x, noise, _, _, n_keep = mim_inputs(size, device)
    if mode == "fwd":
        fn = lambda: impl(x, PATCH, noise, n_keep)  # noqa: E731
    else:
        xg = x.detach().requires_grad_()
        grad = torch.ones(x.shape[0], n_keep, math.prod(PATCH) * x.shape[1], device=device)

        def fn():
            visible = impl(xg, PATCH, noise, n_keep)[0]  # [B, N_keep, P]
            visible.backward(grad)
            xg.grad = None

    measure(benchmark, fn, ROUNDS[size], device, group=f"masked_patchify {mode} {size} {device}")
