"""Throughput of the C++/CUDA masked_mse (the MIM loss) against the reference and torch.compile(reference).

`pytest bench/bench_masked_mse.py --benchmark-only` (add `-k cuda` for the GPU cases only, `-k "not paper"` for
a quick run). Providers: reference (eager pure PyTorch), compiled (torch.compile(reference), inductor),
extension (simcrop.ops.masked_mse). Cases: forward, and forward+backward (the gradient w.r.t. the prediction),
raw and norm_pix targets. Shapes (bench/_volumes.py): tiny (B=4, 1x64x64x32) and the paper's (B=14,
1x224x224x112), patch 16x16x8, mask ratio 0.75. extra_info holds the device, the thread count and, on CUDA, the
peak memory of one call above the inputs (bench/_timing.py). Quote ratios from one run on one machine
(bench/RESULTS.md).
"""
import importlib

import pytest

from simcrop.ops import reference as R
from simcrop.ops.extension import check_device

from ._timing import DEVICES, implementation, measure
from ._volumes import PATCH, PROVIDERS, ROUNDS, SHAPES, mim_inputs

ext = importlib.import_module("simcrop.ops.masked_mse")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("size", list(SHAPES))
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm_pix", [False, True], ids=["raw", "norm_pix"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_masked_mse(benchmark, mode, norm_pix, device, size, provider):
    impl = implementation(provider, R.masked_mse, ext.masked_mse, check_device, device)
    x, _, pred, mask, _ = mim_inputs(size, device)
    if mode == "fwd":
        fn = lambda: impl(pred, x, mask, PATCH, norm_pix)  # noqa: E731
    else:
        pg = pred.detach().requires_grad_()

        def fn():
            impl(pg, x, mask, PATCH, norm_pix).backward()
            pg.grad = None

    measure(benchmark, fn, ROUNDS[size], device,
            group=f"masked_mse {mode} {'norm_pix' if norm_pix else 'raw'} {size} {device}")
