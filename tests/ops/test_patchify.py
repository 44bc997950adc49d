"""C++/CUDA patchify3d / unpatchify3d / masked_patchify (simcrop.ops.patchify) against simcrop.ops.reference.

Data movement only, so every comparison is exact. The extension must be built (CI builds it with
`pip install --no-build-isolation -e .`): without it these tests FAIL, they do not skip.
"""
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from torch.library import opcheck

import simcrop.ops as ops
from simcrop.ops import reference as R
from simcrop.ops.backend import BackendUnavailable, resolve
from simcrop.ops.extension import check_device, has_cuda_ext
from simcrop.ops.patchify import masked_patchify, masked_unpatchify, patchify3d, unpatchify3d

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# (B, C, X, Y, Z), patch: odd, non-cubic grids, single patch, 1-voxel patches, several channels
SHAPES = [
    ((2, 5, 2 * 3, 3 * 5, 4 * 2), (2, 3, 4)),
    ((3, 1, 7, 9, 11), (7, 3, 1)),
    ((1, 1, 16, 16, 8), (16, 16, 8)),
    ((2, 2, 4, 6, 10), (1, 1, 1)),
    ((1, 3, 12, 4, 9), (4, 4, 3)),
]
IDS = [f"{'x'.join(map(str, s))}-p{'x'.join(map(str, p))}" for s, p in SHAPES]

pytestmark = pytest.mark.usefixtures("require_extension")  # tests/ops/conftest.py: fails when not built


def _n(shape, patch):
    return math.prod(s // p for s, p in zip(shape[2:], patch))


def _noise_with_ties(B, N, gen):
    """Uniform noise where about half the values repeat: exercises the stable tie-breaking."""
    noise = torch.rand(B, N, generator=gen)
    ties = torch.randint(0, 3, (B, N), generator=gen).float() / 4
    return torch.where(torch.rand(B, N, generator=gen) < 0.5, ties, noise)


# -- forward equality -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,patch", SHAPES, ids=IDS)
def test_patchify_and_unpatchify_match_reference(shape, patch, dtype):
    x = torch.randn(shape).to(dtype)
    p = patchify3d(x, patch)
    assert torch.equal(p, R.patchify3d(x, patch))
    back = unpatchify3d(p, patch, shape[2:], channels=shape[1])
    assert torch.equal(back, R.unpatchify3d(p, patch, shape[2:], channels=shape[1]))
    assert torch.equal(back, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,patch", SHAPES, ids=IDS)
def test_masked_patchify_matches_reference_with_ties(shape, patch, dtype):
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=gen).to(dtype)
    N = _n(shape, patch)
    noise = _noise_with_ties(shape[0], N, gen)
    for n_keep in sorted({1, max(1, N // 4), N}):
        got = masked_patchify(x, patch, noise, n_keep)
        want = R.masked_patchify(x, patch, noise, n_keep)
        for g, w, name in zip(got, want, ("visible", "mask", "ids_restore", "ids_keep")):
            assert g.dtype == w.dtype and torch.equal(g, w), f"{name} differs at n_keep={n_keep}"


def test_backend_switch_uses_the_extension_on_cpu():
    shape, patch = SHAPES[0]
    x = torch.randn(shape)
    noise = torch.rand(shape[0], _n(shape, patch))
    assert resolve("masked_patchify", "fused", torch.device("cpu"))[1] == "c++/cuda"
    for g, w in zip(ops.masked_patchify(x, patch, noise, 7, backend="fused"), R.masked_patchify(x, patch, noise, 7)):
        assert torch.equal(g, w)


# -- backward ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,patch", SHAPES[:3], ids=IDS[:3])
def test_masked_patchify_gradient_matches_reference(shape, patch):
    x = torch.randn(shape, requires_grad=True)
    noise = torch.rand(shape[0], _n(shape, patch))
    n_keep = max(1, _n(shape, patch) // 3)
    visible = masked_patchify(x, patch, noise, n_keep)[0]
    g = torch.randn_like(visible)
    (gx,) = torch.autograd.grad(visible, x, g)
    x_ref = x.detach().requires_grad_()
    (gx_ref,) = torch.autograd.grad(R.masked_patchify(x_ref, patch, noise, n_keep)[0], x_ref, g)
    assert torch.equal(gx, gx_ref)  # hidden patches: exactly zero


def test_gradcheck_float64():
    shape, patch = (2, 2, 4, 3, 4), (2, 1, 2)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    N = _n(shape, patch)
    ids_keep = torch.stack([torch.randperm(N)[:5] for _ in range(shape[0])])
    assert torch.autograd.gradcheck(lambda t: patchify3d(t, patch), (x,))
    assert torch.autograd.gradgradcheck(lambda t: patchify3d(t, patch), (x,))
    p = torch.randn(shape[0], N, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: unpatchify3d(t, patch, shape[2:], channels=2), (p,))
    assert torch.autograd.gradcheck(lambda t: torch.ops.simcrop.masked_patchify(t, list(patch), ids_keep), (x,))
    assert torch.autograd.gradgradcheck(lambda t: torch.ops.simcrop.masked_patchify(t, list(patch), ids_keep), (x,))
    v = torch.randn(shape[0], 5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: masked_unpatchify(t, patch, ids_keep, shape[2:]), (v,))


def test_opcheck():
    shape, patch = (2, 3, 4, 6, 2), [2, 3, 1]
    x = torch.randn(shape, requires_grad=True)
    N = _n(shape, patch)
    ids_keep = torch.stack([torch.randperm(N)[:3] for _ in range(shape[0])])
    opcheck(torch.ops.simcrop.patchify3d.default, (x, patch))
    opcheck(torch.ops.simcrop.unpatchify3d.default, (torch.randn(2, N, 18, requires_grad=True), patch, [4, 6, 2], 3))
    opcheck(torch.ops.simcrop.masked_patchify.default, (x, patch, ids_keep))
    visible = torch.randn(2, 3, 18, requires_grad=True)
    opcheck(torch.ops.simcrop.masked_unpatchify.default, (visible, patch, ids_keep, [4, 6, 2]))


def test_torch_compile_fullgraph():
    shape, patch = SHAPES[0]
    x = torch.randn(shape, requires_grad=True)
    noise = _noise_with_ties(shape[0], _n(shape, patch), torch.Generator().manual_seed(1))

    def step(x, noise):
        visible, mask, ids_restore, ids_keep = masked_patchify(x, patch, noise, 11)
        return visible, mask, ids_restore, unpatchify3d(patchify3d(x, patch), patch, shape[2:], shape[1])

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got, want = compiled(x, noise), step(x, noise)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    (gx,) = torch.autograd.grad(got[0].sum() + got[3].sum(), x)
    (gx_eager,) = torch.autograd.grad(want[0].sum() + want[3].sum(), x)
    assert torch.equal(gx, gx_eager)


# -- inputs -----------------------------------------------------------------------------------------------------
def test_non_contiguous_inputs():
    shape, patch = SHAPES[0]
    base = torch.randn(shape[0], shape[2], shape[1], shape[3], 2 * shape[4])
    x = base.transpose(1, 2)[..., ::2]  # [B, C, X, Y, Z], neither contiguous nor dense
    assert not x.is_contiguous()
    N = _n(shape, patch)
    noise = torch.rand(N, shape[0]).t()  # [B, N] transposed view
    assert torch.equal(patchify3d(x, patch), R.patchify3d(x, patch))
    for g, w in zip(masked_patchify(x, patch, noise, 9), R.masked_patchify(x, patch, noise, 9)):
        assert torch.equal(g, w)
    p = R.patchify3d(x, patch).transpose(0, 1).contiguous().transpose(0, 1)  # [B, N, P] view
    assert torch.equal(unpatchify3d(p, patch, shape[2:], shape[1]), x)


def test_hidden_patches_are_zero_even_in_poisoned_memory():
    """masked_unpatchify allocates its output uninitialised: hidden patches must be written, not left over."""
    shape, patch = (2, 1, 8, 8, 8), (4, 4, 4)
    N = _n(shape, patch)
    ids_keep = torch.tensor([[5, 0], [2, 7]])
    visible = torch.randn(2, 2, 64)
    for _ in range(3):
        poison = torch.full((math.prod(shape),), float("nan"))
        del poison  # the allocator tends to hand this block back to the op below
        out = masked_unpatchify(visible, patch, ids_keep, shape[2:])
        want = torch.zeros(2, N, 64)
        want.scatter_(1, ids_keep[..., None].expand(-1, -1, 64), visible)
        assert torch.equal(out, R.unpatchify3d(want, patch, shape[2:]))


def test_clear_errors():
    x = torch.randn(1, 1, 10, 8, 8)
    with pytest.raises(ValueError, match="does not divide"):
        patchify3d(x, (4, 4, 4))
    with pytest.raises(ValueError, match="does not divide"):
        masked_patchify(x, (3, 4, 4), torch.rand(1, 6), 2)
    with pytest.raises(TypeError, match="float32, float64, float16 or bfloat16"):
        patchify3d(x.to(torch.int32), (2, 4, 4))
    with pytest.raises(ValueError, match=r"\[B, C, X, Y, Z\]"):
        patchify3d(x[0], (2, 4, 4))
    with pytest.raises(ValueError, match="noise shape"):
        masked_patchify(x, (2, 4, 4), torch.rand(1, 7), 2)
    with pytest.raises(ValueError, match="noise is on meta"):
        masked_patchify(x, (2, 4, 4), torch.rand(1, 20, device="meta"), 2)
    with pytest.raises(ValueError, match="n_keep"):
        masked_patchify(x, (2, 4, 4), torch.rand(1, 20), 0)
    with pytest.raises(ValueError, match="expected N = 20"):
        unpatchify3d(torch.randn(1, 19, 32), (2, 4, 4), (10, 8, 8))
    with pytest.raises(BackendUnavailable, match="no kernels for meta"):
        patchify3d(x.to("meta"), (2, 4, 4))
    with pytest.raises(RuntimeError, match="out of range"):  # the C++ check behind the Python one
        torch.ops.simcrop.masked_patchify(x, [2, 4, 4], torch.tensor([[3, 20]]))
    with pytest.raises(RuntimeError, match="does not divide"):
        torch.ops.simcrop.patchify3d(x, [4, 4, 4])


def test_unbuilt_extension_is_reported_not_hidden():
    """Without simcrop._C, `import simcrop.ops` works, check() says why, --kernels fused raises, nothing heavy loads."""
    code = """
import importlib.util, sys
find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name == "simcrop._C" else find_spec(name, *a)
import torch, simcrop.ops as ops
from simcrop.ops.extension import check_device, has_ext
assert not has_ext()
reason = check_device(torch.device("cpu"))
assert reason == "extension not built: run pip install --no-build-isolation -e .", reason
assert ops.describe("auto", torch.device("cpu"))["masked_mse"] == "reference (" + reason + ")"
try:
    ops.masked_mse(torch.zeros(1, 1, 8), torch.zeros(1, 1, 2, 2, 2), torch.ones(1, 1), (2, 2, 2), backend="fused")
    raise SystemExit("fused did not raise")
except ops.BackendUnavailable as exc:
    assert reason in str(exc), exc
heavy = [m for m in sys.modules if m.split(".")[0] in ("transformers", "monai", "nvidia")
         or m.startswith("simcrop.models")]
assert not heavy, heavy
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_index_math_unit_tests(tmp_path):
    """csrc/tests/test_patch_index.cpp (also run by CTest) with the host compiler: the math the CUDA kernels share."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler on PATH")
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    exe = tmp_path / "test_patch_index"
    src = os.path.join(root, "csrc", "tests", "test_patch_index.cpp")
    include = os.path.join(root, "csrc", "include")
    subprocess.run([cxx, "-std=c++17", "-O1", "-Wall", "-Werror", "-I", include, src, "-o", str(exe)], check=True,
                   timeout=120)
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.strip() == "test_patch_index: ok", run.stdout


def test_cuda_check_reason():
    reason = check_device(torch.device("cuda"))
    assert (reason is None) == has_cuda_ext()
    if reason is not None:
        assert "without its CUDA kernels" in reason


# -- CUDA (skipped without a GPU) -------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,patch", SHAPES, ids=IDS)
@pytest.mark.cuda
def test_cuda_matches_reference(shape, patch, dtype):
    assert has_cuda_ext(), check_device(torch.device("cuda"))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(dtype).cuda().requires_grad_()
    N = _n(shape, patch)
    noise = _noise_with_ties(shape[0], N, gen).cuda()
    n_keep = max(1, N // 4)
    assert torch.equal(patchify3d(x, patch), R.patchify3d(x, patch))
    got, want = masked_patchify(x, patch, noise, n_keep), R.masked_patchify(x, patch, noise, n_keep)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    g = torch.randn_like(got[0])
    assert torch.equal(torch.autograd.grad(got[0], x, g)[0], torch.autograd.grad(want[0], x, g)[0])
    p = R.patchify3d(x.detach(), patch)
    assert torch.equal(unpatchify3d(p, patch, shape[2:], shape[1]), x.detach())


@pytest.mark.cuda
def test_cuda_opcheck_and_compile():
    shape, patch = (2, 3, 4, 6, 2), [2, 3, 1]
    x = torch.randn(shape, device="cuda", requires_grad=True)
    ids_keep = torch.stack([torch.randperm(8)[:3] for _ in range(2)]).cuda()
    opcheck(torch.ops.simcrop.patchify3d.default, (x, patch))
    opcheck(torch.ops.simcrop.masked_patchify.default, (x, patch, ids_keep))
    noise = torch.rand(2, 8, device="cuda")
    compiled = torch.compile(lambda t: masked_patchify(t, patch, noise, 3)[0], fullgraph=True)
    assert torch.equal(compiled(x), R.masked_patchify(x, patch, noise, 3)[0])
