"""Triton cross_granularity_attention (simcrop.ops.cross_granularity_attention, kernels/cross_granularity_attention.py)
against a float64 run of simcrop.ops.reference.cross_granularity_attention.

Without a GPU the kernels run in Triton's interpreter (the `triton_device` fixture sets TRITON_INTERPRET=1 for
this module), on small odd sizes. Tests marked `cuda` (bf16 / fp16, the paper's shapes) run where a GPU is
present; `test_kernels_compile_for_sm90` compiles the GPU kernels ahead of time without one. The tiny model's
fused-vs-reference equality (both Triton ops at once) is in test_topk_align.py.
"""
import importlib

import pytest
import torch
from torch.library import opcheck

import simcrop.ops as ops
from simcrop.ops import reference as R
from simcrop.ops.backend import BackendUnavailable

fused = importlib.import_module("simcrop.ops.cross_granularity_attention")  # the module, not the wrapper

pytestmark = pytest.mark.usefixtures("triton_device")
# (rtol, atol) vs float64 for inputs of each dtype (fp32 accumulation; 16-bit P and dS feed the dots on GPUs)
TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (4e-3, 4e-3)}

# (B, H, L, N, Dh): the brief's odd case; several query / key tiles with Dh not a power of two; single token
CASES = [(2, 3, 13, 37, 16), (1, 2, 70, 65, 24), (2, 1, 1, 1, 8)]


def make_inputs(B, H, L, N, Dh, device, dtype=torch.float32, seed=0):
    """q, k, v laid out as the fusion layer makes them (views of [B, L, H*Dh] / [B, N, 2*H*Dh]: not contiguous)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, L, H, Dh, generator=g).to(device, dtype).transpose(1, 2)  # [B, H, L, Dh]
    kv = torch.randn(B, N, 2, H, Dh, generator=g).to(device, dtype).permute(2, 0, 3, 1, 4)  # [2, B, H, N, Dh]
    g_tok = torch.randn(B, H, Dh, generator=g).to(device, dtype)
    mask = torch.rand(B, L, generator=g) > 0.3
    mask[0, 0] = True
    if B > 1:
        mask[1] = False  # a sample without a single real query
    return q, kv[0], kv[1], g_tok, mask.to(device)


def leaves(*ts):
    return [t.detach().requires_grad_(True) for t in ts]


def check_against_float64(q, k, v, g, mask, scale=None, tol=TOL[torch.float32]):
    """Forward and backward of the fused op against the reference in float64 (the same upstream gradient)."""
    q, k, v, g = leaves(q, k, v, g)
    out = ops.cross_granularity_attention(q, k, v, g, mask, backend="fused") if scale is None else \
        fused.cross_granularity_attention(q, k, v, g, mask, scale)
    q64, k64, v64, g64 = leaves(*(t.detach().cpu().double() for t in (q, k, v, g)))
    ref = R.cross_granularity_attention(q64, k64, v64, g64, mask.cpu(), scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    rtol, atol = tol
    torch.testing.assert_close(out.detach().cpu().double(), ref.detach(), rtol=rtol, atol=atol)
    assert (out[~mask[:, None, :].expand(-1, q.shape[1], -1)] == 0).all()  # padded queries: exact zeros

    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(7))
    grads = torch.autograd.grad(out, (q, k, v, g), grad_out.to(out.device, out.dtype))
    grads64 = torch.autograd.grad(ref, (q64, k64, v64, g64), grad_out.double())
    for name, got, want in zip("qkvg", grads, grads64):
        assert got.dtype == {"q": q, "k": k, "v": v, "g": g}[name].dtype
        torch.testing.assert_close(got.cpu().double(), want, rtol=rtol, atol=atol, msg=f"d{name}")
    pad = ~mask[:, None, :, None].expand_as(grads[0])
    assert (grads[0][pad] == 0).all()  # padded queries receive no gradient
    return out


@pytest.mark.parametrize("case", CASES, ids=["x".join(map(str, c)) for c in CASES])
def test_forward_backward_match_float64_reference(case, triton_device, poison):
    poison(fused)
    check_against_float64(*make_inputs(*case, triton_device))


def test_custom_scale_and_contiguous_inputs(triton_device):
    q, k, v, g, mask = make_inputs(2, 2, 9, 20, 16, triton_device, seed=3)
    check_against_float64(q.contiguous(), k.contiguous(), v.contiguous(), g, mask, scale=0.7)


def test_all_queries_padded(triton_device):
    q, k, v, g, mask = make_inputs(2, 2, 5, 7, 8, triton_device)
    mask[:] = False
    q, k, v, g = leaves(q, k, v, g)
    out = ops.cross_granularity_attention(q, k, v, g, mask, backend="fused")
    assert (out == 0).all()
    grads = torch.autograd.grad(out, (q, k, v, g), torch.randn_like(out))
    assert all((t == 0).all() for t in grads)


def test_dg_is_the_sum_of_dout_over_real_queries(triton_device):
    q, k, v, g, mask = make_inputs(2, 3, 11, 6, 16, triton_device, seed=5)
    g = g.detach().requires_grad_(True)
    out = ops.cross_granularity_attention(q, k, v, g, mask, backend="fused")
    grad_out = torch.randn_like(out)
    (dg,) = torch.autograd.grad(out, g, grad_out)
    torch.testing.assert_close(dg, (grad_out * mask[:, None, :, None]).sum(2))


def test_opcheck(triton_device):
    q, k, v, g, mask = (t.contiguous() for t in make_inputs(2, 3, 13, 37, 16, triton_device))
    q, k, v, g = leaves(q, k, v, g)
    opcheck(torch.ops.simcrop.cross_granularity_attention.default, (q, k, v, g, mask, 0.25))
    out, lse = torch.ops.simcrop.cross_granularity_attention(q.detach(), k.detach(), v.detach(), g.detach(), mask, 0.25)
    args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), g.detach(), mask, out, lse, 0.25)
    opcheck(torch.ops.simcrop.cross_granularity_attention_backward.default, args)


def test_torch_compile_fullgraph(triton_device):
    inputs = make_inputs(2, 2, 9, 12, 16, triton_device, seed=2)

    def loss(q, k, v, g, mask):
        return ops.cross_granularity_attention(q, k, v, g, mask, backend="fused").square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    a, b = leaves(*inputs[:4]), leaves(*inputs[:4])
    out1, out2 = compiled(*a, inputs[4]), loss(*b, inputs[4])
    out1.backward()
    out2.backward()
    torch.testing.assert_close(out1, out2)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad)


def test_invalid_inputs_raise_clear_errors(triton_device):
    q, k, v, g, mask = make_inputs(2, 2, 5, 7, 8, triton_device)
    with pytest.raises(ValueError, match=r"q must be \[B, H, L, Dh\]"):
        fused.cross_granularity_attention(q, k[..., :4], v, g, mask)
    with pytest.raises(ValueError, match="q_mask bool"):
        fused.cross_granularity_attention(q, k, v, g, mask.float())
    with pytest.raises(TypeError, match="share one dtype"):
        fused.cross_granularity_attention(q, k.double(), v, g, mask)
    with pytest.raises(ValueError, match=r"Dh <= 256.*use backend='reference'"):
        z = torch.zeros(1, 1, 2, 300, device=triton_device)
        fused.cross_granularity_attention(z, z, z, z[:, :, 0], mask[:1, :2])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path only")
def test_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    cpu = torch.device("cpu")
    assert "TRITON_INTERPRET=1" in fused.check(cpu)
    q, k, v, g, mask = make_inputs(1, 1, 3, 4, 8, cpu)
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET"):
        ops.cross_granularity_attention(q, k, v, g, mask, backend="fused")
    out = ops.cross_granularity_attention(q, k, v, g, mask, backend="auto")
    torch.testing.assert_close(out, R.cross_granularity_attention(q, k, v, g, mask))


def test_kernels_compile_for_sm90(aot_compile):
    """Ahead-of-time compilation of the GPU kernels (no GPU needed) for the paper's shape and Dh = 256, in bf16 and
    fp32, with the model's strided q / k / v: no errors and no register spills."""
    results = aot_compile("""
import importlib
ops = importlib.import_module("simcrop.ops.cross_granularity_attention")
for dtype in (torch.bfloat16, torch.float32):
    for B, H, L, N, Dh in ((14, 6, 512, 686, 128), (2, 2, 64, 64, 256)):
        q = torch.empty(B, L, H, Dh, dtype=dtype, device="meta").transpose(1, 2)
        k, v = torch.empty(2, B, N, H, Dh, dtype=dtype, device="meta").transpose(2, 3)
        g = torch.empty(B, H, Dh, dtype=dtype, device="meta")
        mask = torch.empty(B, L, dtype=torch.bool, device="meta")
        report("cross_granularity_attention", ops.launches(q, k, v, g, mask))
""")
    assert len(results) == 16
    for r in results:
        assert r["spill_bytes"] == 0, r


# -- CUDA only: 16-bit inputs and the paper's shapes ------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(14, 6, 512, 686, 128), (2, 3, 13, 37, 16), (2, 2, 100, 70, 256)],
                         ids=["paper", "odd", "dh256"])
@pytest.mark.cuda  # skipped without a GPU (tests/ops/conftest.py)
def test_cuda_dtypes_and_shapes(dtype, shape):
    check_against_float64(*make_inputs(*shape, "cuda", dtype=dtype), tol=TOL[dtype])


@pytest.mark.cuda
def test_cuda_matches_sdpa():
    """Independent check: the attention part equals PyTorch's scaled_dot_product_attention (bf16, paper shape)."""
    q, k, v, g, mask = make_inputs(14, 6, 512, 686, 128, "cuda", dtype=torch.bfloat16)
    mask[:] = True
    out = ops.cross_granularity_attention(q, k, v, torch.zeros_like(g), mask, backend="fused")
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, sdpa, rtol=2e-2, atol=2e-2)
