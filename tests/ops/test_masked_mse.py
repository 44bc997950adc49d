"""C++/CUDA masked_mse (simcrop.ops.masked_mse) against a float64 oracle of simcrop.ops.reference.masked_mse.

The extension must be built (CI builds it with `pip install --no-build-isolation -e .`): without it these tests
FAIL, they do not skip.
"""
import importlib
import math

import pytest
import torch
from torch.library import opcheck

import simcrop.ops as ops
from simcrop.ops import reference as R
from simcrop.ops.extension import check_device, has_cuda_ext

fused = importlib.import_module("simcrop.ops.masked_mse")  # the module (simcrop.ops.masked_mse is the wrapper)

pytestmark = pytest.mark.usefixtures("require_extension")  # tests/ops/conftest.py: fails when not built

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Inputs are rounded to the dtype first and the oracle sees the same values, so the loss error is float32
# accumulation only; the gradient is rounded to pred's dtype.
LOSS_TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (2e-5, 1e-6), torch.float16: (2e-5, 1e-6),
            torch.bfloat16: (2e-5, 1e-6)}
GRAD_TOL = {torch.float64: (1e-10, 1e-14), torch.float32: (2e-5, 1e-9), torch.float16: (2e-3, 1e-7),
            torch.bfloat16: (1e-2, 1e-7)}
SHAPES = [
    ((2, 5, 2 * 3, 3 * 5, 4 * 2), (2, 3, 4)),
    ((3, 1, 7, 9, 11), (7, 3, 1)),
    ((2, 1, 16, 16, 8), (8, 8, 4)),
    ((1, 2, 4, 6, 10), (1, 3, 2)),
]
IDS = [f"{'x'.join(map(str, s))}-p{'x'.join(map(str, p))}" for s, p in SHAPES]


def oracle(pred, x, mask, patch, norm_pix=False, normalization="masked", eps=1e-6):
    """reference.masked_mse computed in float64 (same formula, no float32 cast)."""
    target = R.patchify3d(x.double(), patch)
    if norm_pix:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + eps).sqrt()
    err = (pred.double() - target).pow(2).mean(-1)
    m = mask.double()
    den = m.sum().clamp_min(1.0) if normalization == "masked" else m.numel()
    return (err * m).sum() / den


def inputs(shape, patch, dtype, seed=0, device="cpu", ratio=0.75):
    gen = torch.Generator().manual_seed(seed)
    B, C = shape[:2]
    N = math.prod(s // p for s, p in zip(shape[2:], patch))
    x = (torch.rand(shape, generator=gen) * 2 - 1).to(dtype)  # [-1, 1] intensities
    pred = torch.randn(B, N, math.prod(patch) * C, generator=gen).to(dtype)
    _, mask, _ = R.random_masking(torch.rand(B, N, generator=gen), max(1, R.num_visible(N, ratio)))
    return pred.to(device), x.to(device), mask.to(dtype).to(device)


# -- forward and backward against the float64 oracle ------------------------------------------------------------
@pytest.mark.parametrize("normalization", ["masked", "all"])
@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,patch", SHAPES, ids=IDS)
def test_matches_oracle(shape, patch, dtype, norm_pix, normalization):
    pred, x, mask = inputs(shape, patch, dtype, seed=len(shape) + shape[2])
    pred.requires_grad_()
    loss = fused.masked_mse(pred, x, mask, patch, norm_pix, normalization)
    assert loss.shape == () and loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    pred64 = pred.detach().double().requires_grad_()
    want = oracle(pred64, x, mask, patch, norm_pix, normalization)
    rtol, atol = LOSS_TOL[dtype]
    torch.testing.assert_close(loss.double(), want, rtol=rtol, atol=atol)
    # and the float32 reference itself, at float32 tolerance
    ref = R.masked_mse(pred.detach(), x, mask, patch, norm_pix, normalization)
    torch.testing.assert_close(loss.float(), ref, rtol=2e-5, atol=1e-6)
    (g,) = torch.autograd.grad(loss, pred)
    (g_want,) = torch.autograd.grad(want, pred64)
    assert g.dtype == dtype
    rtol, atol = GRAD_TOL[dtype]
    torch.testing.assert_close(g.double(), g_want, rtol=rtol, atol=atol)


def test_public_wrapper_and_mixed_dtypes():
    shape, patch = SHAPES[0]
    pred, x, mask = inputs(shape, patch, torch.float32)
    loss = ops.masked_mse(pred, x, mask, patch, True, "all", backend="fused")
    torch.testing.assert_close(loss.double(), oracle(pred, x, mask, patch, True, "all"), rtol=2e-5, atol=1e-6)
    # bf16 predictions against a float32 volume (autocast), float32 pred against a float64 volume, bool mask
    for p, v, m in [(pred.bfloat16(), x, mask), (pred, x.double(), mask.bool())]:
        got = fused.masked_mse(p, v, m, patch)
        torch.testing.assert_close(got, R.masked_mse(p, v, m, patch), rtol=2e-5, atol=1e-6)


def test_gradcheck_float64():
    shape, patch = (2, 2, 4, 3, 4), (2, 1, 2)
    pred, x, mask = inputs(shape, patch, torch.float64)
    pred.requires_grad_()
    for norm_pix in (False, True):
        for normalization in ("masked", "all"):
            assert torch.autograd.gradcheck(
                lambda p: fused.masked_mse(p, x, mask, patch, norm_pix, normalization), (pred,)
            ), (norm_pix, normalization)


def test_opcheck():
    shape, patch = (2, 2, 4, 3, 4), [2, 1, 2]
    pred, x, mask = inputs(shape, patch, torch.float32)
    for args in [(patch, False, "masked", 1e-6), (patch, True, "all", 1e-6)]:
        opcheck(torch.ops.simcrop.masked_mse.default, (pred.requires_grad_(), x, mask, *args))
        opcheck(torch.ops.simcrop.masked_mse_backward.default, (torch.tensor(1.5), pred.detach(), x, mask, *args))


def test_torch_compile_fullgraph():
    shape, patch = SHAPES[0]
    pred, x, mask = inputs(shape, patch, torch.float32)
    pred.requires_grad_()

    def loss_fn(pred, x, mask):
        return fused.masked_mse(pred * 2, x, mask, patch, norm_pix=True)

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    got, want = compiled(pred, x, mask), loss_fn(pred, x, mask)
    assert torch.equal(got, want)
    assert torch.equal(torch.autograd.grad(got, pred)[0], torch.autograd.grad(want, pred)[0])


# -- semantics at the edges ---------------------------------------------------------------------------------------
def test_non_contiguous_inputs():
    shape, patch = SHAPES[0]
    pred, x, mask = inputs(shape, patch, torch.float32)
    pred_nc = pred.transpose(0, 1).contiguous().transpose(0, 1)
    x_nc = x.transpose(2, 4).contiguous().transpose(2, 4)
    mask_nc = mask.t().contiguous().t()
    assert not (pred_nc.is_contiguous() or x_nc.is_contiguous() or mask_nc.is_contiguous())
    for norm_pix in (False, True):
        assert torch.equal(fused.masked_mse(pred_nc, x_nc, mask_nc, patch, norm_pix),
                           fused.masked_mse(pred, x, mask, patch, norm_pix))


def test_empty_mask_and_weights_and_target_gradient():
    shape, patch = SHAPES[1]
    pred, x, mask = inputs(shape, patch, torch.float32)
    pred.requires_grad_()
    x.requires_grad_()
    zero = fused.masked_mse(pred, x, torch.zeros_like(mask), patch)  # sum(mask) clamped at 1: loss 0
    assert zero.item() == 0.0
    assert torch.equal(torch.autograd.grad(zero, pred)[0], torch.zeros_like(pred))
    weights = torch.rand_like(mask)  # fractional weights follow the same formula
    torch.testing.assert_close(fused.masked_mse(pred, x, weights, patch).double(),
                               oracle(pred, x, weights, patch), rtol=2e-5, atol=1e-6)
    fused.masked_mse(pred, x, mask, patch).backward()
    assert x.grad is None  # documented: the volume is the target, no gradient flows to it


def test_unmasked_patches_are_skipped():
    """Documented difference: NaN in a visible (m = 0) patch does not reach the loss (the reference gives NaN)."""
    shape, patch = SHAPES[2]
    pred, x, mask = inputs(shape, patch, torch.float32)
    pred_bad = pred.clone()
    pred_bad[mask == 0] = float("nan")
    assert torch.equal(fused.masked_mse(pred_bad, x, mask, patch), fused.masked_mse(pred, x, mask, patch))


def test_clear_errors():
    shape, patch = SHAPES[0]
    pred, x, mask = inputs(shape, patch, torch.float32)
    with pytest.raises(ValueError, match="does not divide"):
        fused.masked_mse(pred, x, mask, (4, 3, 4))
    with pytest.raises(ValueError, match="prediction shape"):
        fused.masked_mse(pred[:, :-1], x, mask, patch)
    with pytest.raises(ValueError, match="mask shape"):
        fused.masked_mse(pred, x, mask[:, :-1], patch)
    with pytest.raises(ValueError, match="normalization"):
        fused.masked_mse(pred, x, mask, patch, normalization="mean")
    with pytest.raises(TypeError, match="pred must be float32"):
        fused.masked_mse(pred.long(), x, mask, patch)
    with pytest.raises(TypeError, match="mask must be a float or bool"):
        fused.masked_mse(pred, x, mask.long(), patch)
    with pytest.raises(ValueError, match="one device"):
        fused.masked_mse(pred, x.to("meta"), mask, patch)
    with pytest.raises(RuntimeError, match="pred must be"):  # the C++ check behind the Python one
        torch.ops.simcrop.masked_mse(pred[:, :-1], x, mask, list(patch), False, "masked", 1e-6)


# -- CUDA (skipped without a GPU) -------------------------------------------------------------------------------
@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,patch", SHAPES, ids=IDS)
@pytest.mark.cuda
def test_cuda_matches_oracle(shape, patch, dtype, norm_pix):
    assert has_cuda_ext(), check_device(torch.device("cuda"))
    pred, x, mask = inputs(shape, patch, dtype, device="cuda")
    pred.requires_grad_()
    loss = fused.masked_mse(pred, x, mask, patch, norm_pix)
    pred64 = pred.detach().double().requires_grad_()
    want = oracle(pred64, x, mask, patch, norm_pix)
    torch.testing.assert_close(loss.double(), want, rtol=LOSS_TOL[dtype][0], atol=LOSS_TOL[dtype][1])
    g, g_want = torch.autograd.grad(loss, pred)[0], torch.autograd.grad(want, pred64)[0]
    torch.testing.assert_close(g.double(), g_want, rtol=GRAD_TOL[dtype][0], atol=GRAD_TOL[dtype][1])


@pytest.mark.cuda
def test_cuda_gradcheck_opcheck_compile():
    shape, patch = (2, 2, 4, 3, 4), (2, 1, 2)
    pred, x, mask = inputs(shape, patch, torch.float64, device="cuda")
    pred.requires_grad_()
    assert torch.autograd.gradcheck(lambda p: fused.masked_mse(p, x, mask, patch, True), (pred,))
    opcheck(torch.ops.simcrop.masked_mse.default, (pred, x, mask, list(patch), True, "all", 1e-6))
    compiled = torch.compile(lambda p: fused.masked_mse(p, x, mask, patch), fullgraph=True)
    torch.testing.assert_close(compiled(pred), fused.masked_mse(pred, x, mask, patch))
