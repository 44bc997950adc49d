"""Triton topk_align (simcrop.ops.topk_align, kernels/topk_align.py) against simcrop.ops.reference.topk_align.

Without a GPU the kernels run in Triton's interpreter (the `triton_device` fixture sets TRITON_INTERPRET=1 for
this module): they really run in CI, on small odd sizes. Tests marked `cuda` (bf16 / fp16, the paper's shapes)
run where a GPU is present; `test_kernels_compile_for_sm90` compiles the GPU kernels ahead of time without one.
"""
import importlib
import math

import pytest
import torch
from torch.library import opcheck

import simcrop.ops as ops
from simcrop.ops import reference as R
from simcrop.ops.backend import BackendUnavailable

fused = importlib.import_module("simcrop.ops.topk_align")  # the module (simcrop.ops.topk_align is the wrapper)

pytestmark = pytest.mark.usefixtures("triton_device")

# (a, grad_v) tolerance (rtol, atol) vs float64 for inputs of each dtype: fp32 accumulation, output rounding
TOL = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (1e-2, 1e-2), torch.float16: (2e-3, 2e-3)}
SIM_ATOL = 2e-6  # fp32 cosine: the kernel scales <s, v> by both inverse norms, the reference normalises first

# (B, N, M, D, K): odd sizes; K = N; several N tiles; several sentence blocks per CT (N_PAD 1024 -> BLOCK_M 4)
CASES = [(2, 37, 5, 48, 6), (1, 16, 3, 8, 16), (3, 70, 9, 20, 5), (2, 1000, 6, 24, 7)]


def make_inputs(B, N, M, D, K, device, dtype=torch.float32, seed=0, per_sentence=False, strided=False):
    g = torch.Generator().manual_seed(seed)
    if strided:  # [B, D, N] memory viewed as [B, N, D]: no unit stride on D
        v = torch.randn(B, D, N, generator=g).transpose(1, 2)
    else:
        v = torch.randn(B, N, D, generator=g)
    s = torch.randn(B, M, D, generator=g)
    mask = torch.rand(B, M, generator=g) > 0.25
    mask[0, 0] = True
    kps = torch.randint(0, K + 3, (B, M), generator=g) if per_sentence else None  # 0 and > K included
    cast = lambda t: t.to(device=device, dtype=dtype)
    return cast(v), cast(s), mask.to(device), None if kps is None else kps.to(device)


def pooled64(v, idx):
    """Oracle of the pooling for a given selection: a[b, j] = mean of v[b, idx[b, j, r]] over idx >= 0 (float64)."""
    B, M, K = idx.shape
    w = (idx >= 0).double()
    w = w / w.sum(-1, keepdim=True).clamp_min(1)  # [B, M, K]
    picked = torch.gather(v.double(), 1, idx.clamp_min(0).reshape(B, M * K, 1).expand(-1, -1, v.shape[-1]))
    return torch.einsum("bmk,bmkd->bmd", w, picked.reshape(B, M, K, -1))


def test_pooling_oracle_is_the_reference():
    """pooled64 (the oracle used with the kernel's own selection) is the reference's pooling in float64."""
    v, s, mask, kps = make_inputs(2, 37, 5, 48, 6, "cpu", per_sentence=True)
    v64 = v.double().requires_grad_(True)
    a, idx, _ = R.topk_align(v64, s.double(), mask, 6, kps)
    torch.testing.assert_close(pooled64(v64, idx), a, rtol=1e-7, atol=1e-7)  # the reference's 1/k is fp32


def assert_selection_matches(idx, sim, ref_idx, ref_sim, atol=SIM_ATOL):
    """Same selection as the reference, up to the order of fp32 near-ties: the similarities agree rank by rank, and
    where the indices differ the reference's similarity has a neighbour within atol (a near-tie)."""
    assert idx.shape == ref_idx.shape and idx.dtype == torch.int64 and sim.dtype == torch.float32
    assert torch.equal(idx < 0, ref_idx < 0)
    torch.testing.assert_close(sim, ref_sim, rtol=0, atol=atol)
    differ = idx != ref_idx
    if differ.any():
        gap_prev = torch.nn.functional.pad((ref_sim[..., 1:] - ref_sim[..., :-1]).abs(), (1, 0), value=1.0)
        gap_next = torch.nn.functional.pad((ref_sim[..., 1:] - ref_sim[..., :-1]).abs(), (0, 1), value=1.0)
        near_tie = (gap_prev <= 2 * atol) | (gap_next <= 2 * atol)
        assert near_tie[differ].all(), f"selection differs away from near-ties at {differ.nonzero().tolist()}"


@pytest.mark.parametrize("per_sentence", [False, True], ids=["K", "k_per_sentence"])
@pytest.mark.parametrize("case", CASES, ids=["x".join(map(str, c)) for c in CASES])
def test_forward_backward_match_float64_reference(case, per_sentence, triton_device, poison):
    poison(fused)
    B, N, M, D, K = case
    v, s, mask, kps = make_inputs(*case, triton_device, per_sentence=per_sentence, strided=(N == 37))
    v.requires_grad_(True)
    s.requires_grad_(True)
    a, idx, sim = ops.topk_align(v, s, mask, K, kps, backend="fused")
    _, ref_idx, ref_sim = R.topk_align(v.detach().cpu(), s.detach().cpu(), mask.cpu(), K,
                                       None if kps is None else kps.cpu())
    if triton_device.type == "cpu":  # seeded inputs without near-ties: exactly the reference's ranks
        assert torch.equal(idx, ref_idx)
    assert_selection_matches(idx.cpu(), sim.cpu(), ref_idx, ref_sim)  # on GPUs: up to fp32 near-ties
    assert a.dtype == v.dtype and not idx.requires_grad and not sim.requires_grad

    # a and dL/dv against float64, for this selection (the reference's own when the indices are equal)
    v64 = v.detach().cpu().double().requires_grad_(True)
    a64 = pooled64(v64, idx.cpu())
    torch.testing.assert_close(a.detach().cpu().double(), a64.detach(), rtol=1e-5, atol=1e-6)
    grad_a = torch.randn(a.shape, generator=torch.Generator().manual_seed(1))
    (grad_v,) = torch.autograd.grad(a, v, grad_a.to(a.device))
    (grad64,) = torch.autograd.grad(a64, v64, grad_a.double())
    torch.testing.assert_close(grad_v.cpu().double(), grad64, rtol=1e-5, atol=1e-6)
    assert s.grad is None  # the selection is not differentiated: no gradient reaches s


def test_ties_go_to_the_lower_patch_index(triton_device):
    """Exactly representable cosines (4 entries of +-2^p per patch, +-1 per sentence: every sim is a multiple of
    1/8, computed exactly by both sides) with duplicated patches: many exact ties."""
    B, N, M, D, K = 2, 45, 6, 16, 9
    g = torch.Generator().manual_seed(3)

    def sparse_signs(rows):
        x = torch.zeros(rows, D)
        for r in range(rows):
            cols = torch.randperm(D, generator=g)[:4]
            x[r, cols] = torch.randint(0, 2, (4,), generator=g).float() * 2 - 1
        return x

    v = torch.stack([sparse_signs(N) for _ in range(B)])  # [B, N, D]
    v[:, 20:30] = v[:, 5:15]  # duplicated patch vectors
    v = v * 2.0 ** torch.randint(-2, 3, (B, N, 1), generator=g)  # different norms, same directions
    s = torch.stack([sparse_signs(M) for _ in range(B)])
    mask = torch.ones(B, M, dtype=torch.bool)
    a, idx, sim = ops.topk_align(v.to(triton_device), s.to(triton_device), mask.to(triton_device), K,
                                 backend="fused")
    ref_a, ref_idx, ref_sim = R.topk_align(v, s, mask, K)
    assert torch.equal(sim.cpu(), ref_sim)
    assert torch.equal(idx.cpu(), ref_idx)
    ties = (sim[..., 1:] == sim[..., :-1]).cpu()
    assert ties.sum() > 10  # the case does exercise ties
    assert (idx[..., 1:].cpu()[ties] > idx[..., :-1].cpu()[ties]).all()  # equal sims: ascending patch index
    torch.testing.assert_close(a.cpu(), ref_a, rtol=1e-6, atol=1e-6)


def test_padding_sentences_give_zeros_minus_one_and_no_gradient(triton_device):
    B, N, M, D, K = 2, 21, 4, 12, 3
    v, s, mask, _ = make_inputs(B, N, M, D, K, triton_device)
    mask[0] = False  # a CT without a single real sentence
    mask[1, 2:] = False
    v.requires_grad_(True)
    a, idx, sim = ops.topk_align(v, s, mask, K, backend="fused")
    pad = ~mask
    assert (a[pad] == 0).all() and (idx[pad] == -1).all() and (sim[pad] == 0).all()
    (grad_v,) = torch.autograd.grad(a, v, torch.ones_like(a))
    assert (grad_v[0] == 0).all()  # the padded CT's patches get nothing
    expected = torch.zeros(N, device=triton_device)
    expected.index_add_(0, idx[1, :2].reshape(-1), torch.full((2 * K,), 1.0 / K, device=triton_device))
    torch.testing.assert_close(grad_v[1].sum(-1), expected * D)


def test_all_sentences_padded(triton_device):
    v, s, mask, _ = make_inputs(2, 9, 3, 5, 2, triton_device)
    mask[:] = False
    a, idx, sim = ops.topk_align(v, s, mask, 2, backend="fused")
    assert (a == 0).all() and (idx == -1).all() and (sim == 0).all()


def test_zero_vectors_have_cosine_zero(triton_device):
    """|x| < eps: x / max(|x|, eps) as the reference, so a zero patch or sentence has cosine 0 with everything."""
    v, s, mask, _ = make_inputs(1, 10, 2, 6, 10, triton_device)
    v[0, 3] = 0
    s[0, 1] = 0
    a, idx, sim = ops.topk_align(v, s, mask, 10, backend="fused")
    ref = R.topk_align(v.cpu(), s.cpu(), mask.cpu(), 10)
    assert torch.equal(idx.cpu(), ref[1])
    assert (sim[0, 1] == 0).all() and torch.equal(idx[0, 1].cpu(), torch.arange(10))  # all tied: index order


def test_opcheck(triton_device):
    v, s, mask, kps = make_inputs(2, 19, 3, 10, 4, triton_device, per_sentence=True)
    v.requires_grad_(True)
    opcheck(torch.ops.simcrop.topk_align.default, (v, s, mask, 4, kps, 1e-6))
    opcheck(torch.ops.simcrop.topk_align.default, (v, s, mask, 4, None, 1e-6))
    _, idx, _ = ops.topk_align(v.detach(), s, mask, 4, kps, backend="fused")
    opcheck(torch.ops.simcrop.topk_align_backward.default, (torch.randn(2, 3, 10, device=triton_device), idx, 19))


def test_torch_compile_fullgraph(triton_device):
    v, s, mask, kps = make_inputs(2, 23, 4, 10, 3, triton_device, per_sentence=True)

    def loss(v, s, mask, kps):
        a, _, sim = ops.topk_align(v, s, mask, 3, kps, backend="fused")
        return (a * a).sum() + sim.sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    v1, v2 = v.clone().requires_grad_(True), v.clone().requires_grad_(True)
    out1, out2 = compiled(v1, s, mask, kps), loss(v2, s, mask, kps)
    out1.backward()
    out2.backward()
    torch.testing.assert_close(out1, out2)
    torch.testing.assert_close(v1.grad, v2.grad)


def test_invalid_inputs_raise_clear_errors(triton_device):
    v, s, mask, _ = make_inputs(2, 12, 3, 8, 2, triton_device)
    with pytest.raises(ValueError, match=r"K = 13 must be in 1\.\.N"):
        fused.topk_align(v, s, mask, 13)
    with pytest.raises(ValueError, match="sent_mask must be bool"):
        fused.topk_align(v, s, mask.float(), 2)
    with pytest.raises(ValueError, match="but s is"):
        fused.topk_align(v, s[..., :5], mask, 2)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        fused.topk_align(v.double(), s, mask, 2)
    with pytest.raises(ValueError, match="k_per_sentence must be an integer"):
        fused.topk_align(v, s, mask, 2, torch.ones(2, 3, device=triton_device))
    with pytest.raises(ValueError, match=r"supports K <= 64.*use backend='reference'"):
        fused.topk_align(torch.zeros(1, 70, 2, device=triton_device), s[:1, :, :2], mask[:1], 65)
    with pytest.raises(ValueError, match=r"N <= 4096"):
        fused.topk_align(torch.zeros(1, 4097, 1, device=triton_device), s[:1, :, :1], mask[:1], 2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path only")
def test_cpu_needs_the_interpreter(monkeypatch):
    """Without TRITON_INTERPRET the CPU path is refused with a reason: auto takes the reference, fused raises."""
    monkeypatch.delenv("TRITON_INTERPRET")
    cpu = torch.device("cpu")
    assert "TRITON_INTERPRET=1" in fused.check(cpu)
    assert ops.describe("auto", cpu)["topk_align"].startswith("reference (")
    v, s, mask, _ = make_inputs(1, 8, 2, 4, 2, cpu)
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET"):
        ops.topk_align(v, s, mask, 2, backend="fused")
    a, _, _ = ops.topk_align(v, s, mask, 2, backend="auto")
    torch.testing.assert_close(a, R.topk_align(v, s, mask, 2)[0])


@pytest.mark.parametrize("w_align_volume", [0.0, 1.0], ids=["spec-align", "with-sentence-volume-term"])
def test_tiny_model_loss_and_gradients_fused_equal_reference(triton_device, monkeypatch, w_align_volume):
    """The tiny SimCroP with kernels='fused' vs 'reference', same seed and batch. Only the two Triton ops differ
    between the runs: every other op (the C++ ones, registered or not) is pinned to the reference by wrapping its
    simcrop.ops entry point, which the model calls by attribute."""
    from simcrop.config import make_config
    from simcrop.models.simcrop import SimCroP
    from simcrop.ops.backend import OP_NAMES

    for name in set(OP_NAMES) - {"topk_align", "cross_granularity_attention"}:
        wrapped = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _f=wrapped, backend=None, **kw: _f(*a, backend="reference", **kw))

    launched = []
    for module in (fused, importlib.import_module("simcrop.ops.cross_granularity_attention")):
        counted = lambda m, spec, _f=module.launch: (launched.append(spec.kernel), _f(m, spec))
        monkeypatch.setattr(module, "launch", counted)

    def run(kernels):
        torch.manual_seed(0)
        model = SimCroP(make_config("tiny", kernels=kernels, w_align_volume=w_align_volume).model, text_hidden=64, vocab_size=500).to(triton_device)
        batch = tiny_batch(model, triton_device)
        torch.manual_seed(1)  # same dropout masks in both runs
        out = model(batch)
        out["loss"].backward()
        return out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    out_f, grads_f = run("fused")
    assert {"topk_align_fwd_kernel", "topk_align_bwd_kernel", "cga_fwd_kernel", "cga_bwd_dq_kernel"} <= set(launched)
    launched.clear()
    out_r, grads_r = run("reference")
    assert not launched
    for term in ("loss", "mim", "align", "mlm"):
        torch.testing.assert_close(out_f[term], out_r[term], rtol=1e-5, atol=1e-6)
    assert grads_f.keys() == grads_r.keys() and len(grads_f) > 20
    for name in grads_f:
        torch.testing.assert_close(grads_f[name], grads_r[name], rtol=1e-4, atol=1e-6, msg=name)


def tiny_batch(model, device, B=2):
    m = model.cfg
    g = torch.Generator().manual_seed(5)
    Lf, Lr = m.findings_max_len, m.report_max_len
    sentence_ids = torch.zeros(B, Lf, dtype=torch.long)
    sentence_ids[:, 1:31] = torch.arange(1, 7).repeat_interleave(5)  # 6 sentences of 5 tokens
    sentence_ids[1, 21:31] = 0  # the second CT has 4
    report_mask = torch.zeros(B, Lr, dtype=torch.bool)
    report_mask[0, :50] = True
    report_mask[1, :23] = True
    labels = torch.full((B, Lr), -100)
    labels[:, 3:20] = torch.randint(0, 500, (B, 17), generator=g)
    batch = {
        "volume": torch.rand(B, 1, *m.img_size, generator=g) * 2 - 1,
        "mask_noise": torch.rand(B, model.num_patches, generator=g),
        "findings_feats": torch.randn(B, Lf, 64, generator=g),
        "sentence_ids": sentence_ids,
        "report_feats": torch.randn(B, Lr, 64, generator=g),
        "report_mask": report_mask,
        "mlm_labels": labels,
    }
    return {k: t.to(device) for k, t in batch.items()}


def test_kernels_compile_for_sm90(aot_compile):
    """Ahead-of-time compilation of the GPU kernels (Triton's bundled ptxas, no GPU needed), for the launches the
    op makes at the paper's shape and at the supported maximum, in bf16 and fp32, with and without
    k_per_sentence: no errors and no register spills."""
    results = aot_compile("""
import importlib
ops = importlib.import_module("simcrop.ops.topk_align")
for dtype in (torch.bfloat16, torch.float32):
    for B, N, M, D, K in ((14, 686, 20, 768, 32), (2, 4096, 64, 1024, 64)):
        v = torch.empty(B, N, D, dtype=dtype, device="meta")
        s = torch.empty(B, M, D, dtype=dtype, device="meta")
        mask = torch.empty(B, M, dtype=torch.bool, device="meta")
        kps = torch.empty(B, M, dtype=torch.int64, device="meta")
        report("topk_align", ops.launches(v, s, mask, K, kps))
    report("topk_align", ops.launches(v, s, mask, K)[:1])  # without k_per_sentence (HAS_KPS=False)
""")
    assert len(results) == 10
    for r in results:
        assert r["spill_bytes"] == 0, r


# -- CUDA only: 16-bit inputs and the paper's shapes ------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,per_sentence", [
    ((14, 686, 20, 768, 32), False), ((2, 4096, 64, 1024, 64), True), ((3, 101, 7, 40, 9), True),
], ids=["paper", "max-k_per_sentence", "odd-k_per_sentence"])
@pytest.mark.cuda  # skipped without a GPU (tests/ops/conftest.py)
def test_cuda_dtypes_and_shapes(dtype, shape, per_sentence):
    B, N, M, D, K = shape
    v, s, mask, kps = make_inputs(B, N, M, D, K, "cuda", dtype=dtype, per_sentence=per_sentence)
    v.requires_grad_(True)
    a, idx, sim = ops.topk_align(v, s, mask, K, kps, backend="fused")
    ref_a, ref_idx, ref_sim = R.topk_align(v.detach(), s, mask, K, kps)
    assert_selection_matches(idx, sim, ref_idx, ref_sim)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(a.double(), pooled64(v.detach(), idx), rtol=rtol, atol=atol)
    grad_a = torch.randn_like(a)
    (grad_v,) = torch.autograd.grad(a, v, grad_a)
    v64 = v.detach().double().requires_grad_(True)
    (grad64,) = torch.autograd.grad(pooled64(v64, idx), v64, grad_a.double())
    torch.testing.assert_close(grad_v.double(), grad64, rtol=rtol, atol=atol)
    assert math.isfinite(float(a.float().sum()))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path only")
def test_auto_never_picks_the_interpreter_for_cpu_tensors(triton_device):
    """Under TRITON_INTERPRET=1 `fused` runs the kernels on CPU, but `auto` keeps the (fast) reference."""
    cpu = torch.device("cpu")
    assert fused.check(cpu) is None
    for op in ("topk_align", "cross_granularity_attention"):
        assert ops.describe("auto", cpu)[op].startswith("reference (triton runs on CPU only in its interpreter")
        assert ops.describe("fused", cpu)[op] == "triton"
