"""L_align and L_MLM against small hand-computed examples."""
import math

import pytest
import torch

from simcrop.models.losses import mlm_cross_entropy, select_label_positions, sentence_infonce
from simcrop.ops import reference as R


def ce(logits: list[float], target: int) -> float:
    return math.log(sum(math.exp(x) for x in logits)) - logits[target]


def test_align_loss_hand_example_two_cts_three_sentences():
    """2 CTs x 3 sentences, K = 2; CT 0 has a padding sentence, CT 1 a tie in similarity."""
    tau = 0.5
    # visible patch features (after g_v) and sentence embeddings (after g_t and sentence pooling)
    v = torch.tensor([
        [[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]],
        [[2.0, 0, 0], [0, 1, 0], [0, 1, 0], [0, 0, 3]],  # patches 1 and 2 tie for any sentence
    ])
    s = torch.tensor([
        [[1.0, 0, 0], [0, 0, 1], [9, 9, 9]],  # third sentence is padding
        [[1.0, 0, 0], [0, 1, 0], [0, 0, 1]],
    ])
    valid = torch.tensor([[True, True, False], [True, True, True]])
    a, idx, _ = R.topk_align(v, s, valid, k=2)
    # CT 0: e_x -> patches 0 (cos 1), 3 (0.707); e_z -> patch 2 (cos 1), then a tie at cos 0 among 0, 1, 3 -> 0
    assert idx[0, :2].tolist() == [[0, 3], [2, 0]]
    # CT 1: e_x -> 0, then tie at 0 among 1, 2, 3 -> 1; e_y -> tie 1 and 2 (cos 1) -> [1, 2]; e_z -> 3, then 0
    assert idx[1].tolist() == [[0, 1], [1, 2], [3, 0]]
    expect_a = torch.tensor([
        [[1.0, 0.5, 0], [0.5, 0, 0.5], [0, 0, 0]],
        [[1.0, 0.5, 0], [0, 1, 0], [1, 0, 1.5]],
    ])
    assert torch.allclose(a, expect_a)

    def cos(x, y):
        return float(x @ y / (x.norm() * y.norm()))

    total, count = 0.0, 0
    for b, n_valid in ((0, 2), (1, 3)):
        c = [[cos(s[b, j], expect_a[b, k]) / tau for k in range(n_valid)] for j in range(n_valid)]
        for j in range(n_valid):
            total += ce(c[j], j) + ce([c[k][j] for k in range(n_valid)], j)
            count += 1
    loss = sentence_infonce(s, a, valid, tau)
    assert math.isclose(float(loss), total / count, rel_tol=1e-5)


def test_align_loss_ignores_padding_sentences_completely():
    torch.manual_seed(0)
    s, a = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    valid = torch.tensor([[True, True, True, False], [True, False, True, True]])
    base = sentence_infonce(s, a, valid, 0.07)
    s2, a2 = s.clone(), a.clone()
    s2[0, 3], a2[0, 3], s2[1, 1], a2[1, 1] = 100.0, -100.0, 5.0, 7.0
    assert torch.allclose(sentence_infonce(s2, a2, valid, 0.07), base)
    s.requires_grad_(True)
    sentence_infonce(s, a, valid, 0.07).backward()
    assert torch.equal(s.grad[0, 3], torch.zeros(8)) and torch.isfinite(s.grad).all()


def test_align_loss_of_a_ct_without_sentences_is_zero_and_finite():
    s = torch.randn(1, 3, 4, requires_grad=True)
    loss = sentence_infonce(s, torch.randn(1, 3, 4), torch.zeros(1, 3, dtype=torch.bool), 0.07)
    loss.backward()
    assert loss == 0 and torch.isfinite(s.grad).all()


def test_mlm_loss_counts_labelled_positions_only():
    labels = torch.tensor([[-100, 3, -100, 1, -100], [2, -100, -100, -100, 0]])
    positions, targets = select_label_positions(labels, 3)
    assert positions[0, :2].tolist() == [1, 3] and targets[0].tolist() == [3, 1, -100]
    assert positions[1, :2].tolist() == [0, 4] and targets[1].tolist() == [2, 0, -100]
    logits = torch.randn(2, 3, 5)
    expect = sum(ce(logits[b, t].tolist(), int(targets[b, t])) for b in range(2) for t in range(2)) / 4
    assert math.isclose(float(mlm_cross_entropy(logits, targets)), expect, rel_tol=1e-5)


# -- sentence-volume contrast (the w_align_volume extension, docs/method.md) ------------------------------------
def _volume_infonce_loop(v, s, valid, k, tau):
    """Brute force in float64: per valid sentence (b, j), pool CT c's top-k patches by cos(s_bj, .), then CE."""
    v, s = v.double(), s.double()
    total, n = 0.0, 0
    for b in range(v.shape[0]):
        for j in range(s.shape[1]):
            if not valid[b, j]:
                continue
            sn = s[b, j] / s[b, j].norm()
            logits = []
            for c in range(v.shape[0]):
                sims = (v[c] / v[c].norm(dim=-1, keepdim=True)) @ sn
                order = sorted(range(v.shape[1]), key=lambda i: (-float(sims[i]), i))[:k]
                a = v[c, order].mean(0)
                logits.append(float(a @ sn / a.norm()) / tau)
            total += ce(logits, b)
            n += 1
    return total / max(n, 1)


def test_sentence_volume_loss_matches_a_brute_force_loop():
    from simcrop.models.losses import sentence_volume_infonce

    g = torch.Generator().manual_seed(0)
    v, s = torch.randn(3, 7, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    valid = torch.tensor([[True, True, False, False], [True, True, True, True], [True, False, False, False]])
    got = sentence_volume_infonce(v, s, valid, 3, None, 0.3, backend="reference")
    assert math.isclose(float(got), _volume_infonce_loop(v, s, valid, 3, 0.3), rel_tol=1e-5)


def test_sentence_volume_loss_cannot_be_won_by_position_alone():
    """Identical patch features in every CT (a purely positional g_v) give exactly log(B) per sentence, however
    well each sentence is separated from the others of its CT; one CT with a distinctive patch wins its sentence."""
    from simcrop.models.losses import sentence_volume_infonce

    g = torch.Generator().manual_seed(1)
    v = torch.randn(1, 6, 8, generator=g).expand(4, 6, 8).contiguous()
    s = torch.randn(4, 3, 8, generator=g)
    valid = torch.ones(4, 3, dtype=torch.bool)
    loss = sentence_volume_infonce(v, s, valid, 2, None, 0.07, backend="reference")
    assert math.isclose(float(loss), math.log(4), rel_tol=1e-5)

    v2 = v.clone()
    v2[0, 5] = s[0, 0] * 10  # CT 0 holds the content its first sentence describes
    one = torch.zeros(4, 3, dtype=torch.bool)
    one[0, 0] = True
    assert float(sentence_volume_infonce(v2, s, one, 2, None, 0.07, backend="reference")) < 0.5 * math.log(4)


def test_sentence_volume_loss_is_zero_for_one_ct_and_gives_gradients():
    from simcrop.models.losses import sentence_volume_infonce

    g = torch.Generator().manual_seed(2)
    v = torch.randn(1, 5, 4, generator=g)
    s = torch.randn(1, 2, 4, generator=g)
    assert float(sentence_volume_infonce(v, s, torch.ones(1, 2, dtype=torch.bool), 2, None, 0.1)) == 0.0
    v = torch.randn(2, 5, 4, generator=g, requires_grad=True)
    s = torch.randn(2, 2, 4, generator=g, requires_grad=True)
    sentence_volume_infonce(v, s, torch.ones(2, 2, dtype=torch.bool), 2, None, 0.1).backward()
    assert v.grad.abs().sum() > 0 and s.grad.abs().sum() > 0
    assert (v.grad.abs().sum(-1) > 0).sum() < v.shape[0] * v.shape[1]  # unselected patches get no gradient


def test_spec_align_loss_is_met_by_position_alone():
    """SPEC's within-CT L_align has image-independent minima (docs/ablation.md, "why grounding is at chance"):
    the SAME patch features in every CT (g_v = a function of position only) and each sentence pointing at its own
    positions drive it towards 0 wherever the described regions are. The sentence-volume term stays at log(B)."""
    from simcrop.models.losses import sentence_volume_infonce

    B, N, M, D, K = 4, 8, 3, 8, 2
    positional = torch.eye(N, D)  # patch n -> e_n, in every CT
    v = positional.expand(B, N, D).contiguous()
    s = torch.stack([positional[2 * j] + positional[2 * j + 1] for j in range(M)]).expand(B, M, D).contiguous()
    valid = torch.ones(B, M, dtype=torch.bool)
    a, idx, _ = R.topk_align(v, s, valid, K)
    assert idx[0].tolist() == [[0, 1], [2, 3], [4, 5]]  # the same positions in every CT
    assert float(sentence_infonce(s, a, valid, 0.07)) < 1e-5  # 2 log(1 + 2 exp(-1 / 0.07))
    assert math.isclose(float(sentence_volume_infonce(v, s, valid, K, None, 0.07)), math.log(B), rel_tol=1e-5)


# -- cross-CT soft sentence-volume contrast (the w_align_soft extension, docs/method.md) -------------------------
def _soft_infonce_loop(v, s, valid, tau, tau_pool, offset=0):
    """Brute force in float64: per valid local sentence (b, j) and candidate CT c, softmax-pool c's patches by
    cos(s_bj, v_ci) / tau_pool, then CE over the C CTs with target offset + b. Returns (loss, pooled a)."""
    v, s = v.double(), s.double()
    C, N, D = v.shape
    B, M = s.shape[:2]
    pooled = torch.zeros(B, M, C, D, dtype=torch.float64)
    total, n = 0.0, 0
    for b in range(B):
        for j in range(M):
            sn = s[b, j] / s[b, j].norm()
            logits = []
            for c in range(C):
                sims = [float(v[c, i] @ sn / v[c, i].norm()) / tau_pool for i in range(N)]
                top = max(sims)
                z = sum(math.exp(x - top) for x in sims)
                a = sum(math.exp(sims[i] - top) / z * v[c, i] for i in range(N))
                if valid[b, j]:
                    pooled[b, j, c] = a
                logits.append(float(a @ sn / a.norm()) / tau)
            if valid[b, j]:
                total += ce(logits, offset + b)
                n += 1
    return total / max(n, 1), pooled


def test_soft_pool_align_and_its_loss_match_a_float64_brute_force_loop():
    from simcrop.models.losses import sentence_volume_soft_infonce

    g = torch.Generator().manual_seed(3)
    C, N, B, M, D = 5, 7, 3, 4, 6  # odd sizes; the B local CTs sit at offset 1 among the C candidates
    v = torch.randn(C, N, D, generator=g, dtype=torch.float64)
    s = torch.randn(B, M, D, generator=g, dtype=torch.float64)
    valid = torch.tensor([[True, True, False, False], [True, True, True, True], [True, False, True, False]])
    want_loss, want_a = _soft_infonce_loop(v, s, valid, 0.3, 0.2, offset=1)
    a = R.soft_pool_align(v, s, valid, tau_pool=0.2)
    assert a.dtype == torch.float64 and a.shape == (B, M, C, D)
    torch.testing.assert_close(a, want_a, rtol=1e-12, atol=1e-12)
    got = sentence_volume_soft_infonce(v, s, valid, 0.3, 0.2, backend="reference", offset=1)
    assert math.isclose(float(got), want_loss, rel_tol=1e-12)
    # float32 inputs compute in float32 and agree to float32 precision
    got32 = sentence_volume_soft_infonce(v.float(), s.float(), valid, 0.3, 0.2, offset=1)
    assert got32.dtype == torch.float32 and math.isclose(float(got32), want_loss, rel_tol=1e-5)


def test_soft_pool_align_gradcheck_in_float64():
    from simcrop.models.losses import sentence_volume_soft_infonce

    g = torch.Generator().manual_seed(4)
    v = torch.randn(3, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    s = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    valid = torch.tensor([[True, False, True], [True, True, True]])
    assert torch.autograd.gradcheck(lambda v, s: R.soft_pool_align(v, s, valid, 0.5), (v, s))
    assert torch.autograd.gradcheck(lambda v, s: sentence_volume_soft_infonce(v, s, valid, 0.3, 0.5, offset=1), (v, s))


def test_soft_pool_align_backend_switch_and_compile():
    import torch._dynamo

    from simcrop import ops

    g = torch.Generator().manual_seed(5)
    v, s = torch.randn(3, 7, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    valid = torch.ones(2, 5, dtype=torch.bool)
    ref = R.soft_pool_align(v, s, valid, 0.05)
    assert torch.equal(ops.soft_pool_align(v, s, valid, 0.05), ref)  # auto -> reference (no fused op yet)
    with pytest.raises(ops.BackendUnavailable, match="soft_pool_align"):
        ops.soft_pool_align(v, s, valid, 0.05, backend="fused")
    torch._dynamo.reset()
    compiled = torch.compile(lambda v, s: ops.soft_pool_align(v, s, valid, 0.05), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(v, s), ref)


def test_soft_pooling_gradient_reaches_patches_outside_the_top_k():
    """Hard top-K pooling trains only the K patches a sentence picks; soft pooling sends gradient to EVERY visible
    patch of every CT, so a lesion patch that is not yet among the top K can still be pulled towards its sentence."""
    from simcrop.models.losses import sentence_volume_infonce, sentence_volume_soft_infonce

    g = torch.Generator().manual_seed(6)
    B, N, M, D, K = 3, 9, 2, 6, 2
    v = torch.randn(B, N, D, generator=g, requires_grad=True)
    s = torch.randn(B, M, D, generator=g)
    valid = torch.ones(B, M, dtype=torch.bool)
    sentence_volume_soft_infonce(v, s, valid, 0.07, 0.05).backward()
    per_patch = v.grad.norm(dim=-1)  # [B, N]
    # the union over all sentences of the top-K picks in each CT: every other patch is "unselected"
    _, idx, _ = R.topk_align(v.detach().repeat(B, 1, 1), s.repeat_interleave(B, 0), valid.repeat_interleave(B, 0), K)
    picked = torch.zeros(B, N, dtype=torch.bool)
    for pair in range(B * B):
        picked[pair % B, idx[pair].flatten()] = True
    assert (~picked).sum() > 0
    assert (per_patch[~picked] > 1e-8).all()  # soft: gradient on every unselected patch
    v.grad = None
    sentence_volume_infonce(v, s, valid, K, None, 0.07, backend="reference").backward()
    assert torch.equal(v.grad.norm(dim=-1)[~picked], torch.zeros(int((~picked).sum())))  # hard: none there


def test_soft_cross_ct_term_scores_exactly_log_b_for_position_only_features():
    """Patch features that depend on the position only (identical in every CT) pool to the same a_bj^c for every c,
    so every sentence scores exactly log(C), however its sentences point at positions of their own; SPEC's
    within-CT L_align is ~0 on the same features. One CT holding its sentence's content wins that sentence."""
    from simcrop.models.losses import sentence_volume_soft_infonce

    B, N, M, D = 4, 8, 3, 8
    positional = torch.eye(N, D)  # patch n -> e_n, in every CT
    v = positional.expand(B, N, D).contiguous()
    s = torch.stack([positional[2 * j] + positional[2 * j + 1] for j in range(M)]).expand(B, M, D).contiguous()
    valid = torch.ones(B, M, dtype=torch.bool)
    a, _, _ = R.topk_align(v, s, valid, 2)
    assert float(sentence_infonce(s, a, valid, 0.07)) < 1e-5
    for tau_pool in (0.05, 1.0):
        loss = sentence_volume_soft_infonce(v, s, valid, 0.07, tau_pool)
        assert math.isclose(float(loss), math.log(B), rel_tol=1e-6)
    g = torch.Generator().manual_seed(7)
    v_rand = torch.randn(1, N, D, generator=g).expand(B, N, D).contiguous()  # any position-only map, any sentences
    s_rand = torch.randn(2, M, D, generator=g)
    loss = sentence_volume_soft_infonce(v_rand, s_rand, valid[:2], 0.07, 0.05, offset=2)
    assert math.isclose(float(loss), math.log(B), rel_tol=1e-6)

    v2 = v_rand.clone()
    v2[2, 5] = s_rand[0, 0] * 10  # CT 2 (= local CT 0 at offset 2) holds what its first sentence describes
    one = torch.zeros(2, M, dtype=torch.bool)
    one[0, 0] = True
    assert float(sentence_volume_soft_infonce(v2, s_rand, one, 0.07, 0.05, offset=2)) < 0.5 * math.log(B)


def test_soft_cross_ct_term_is_zero_for_one_ct_and_finite_on_padding():
    from simcrop.models.losses import sentence_volume_soft_infonce

    g = torch.Generator().manual_seed(8)
    v = torch.randn(1, 5, 4, generator=g, requires_grad=True)
    s = torch.randn(1, 2, 4, generator=g, requires_grad=True)
    assert float(sentence_volume_soft_infonce(v, s, torch.ones(1, 2, dtype=torch.bool), 0.07, 0.05).detach()) == 0.0
    v = torch.randn(3, 5, 4, generator=g, requires_grad=True)
    s = torch.zeros(3, 2, 4)  # padding sentences are zero vectors
    s[:, 0] = torch.randn(3, 4, generator=g)
    s.requires_grad_(True)
    valid = torch.tensor([[True, False]] * 3)
    base = sentence_volume_soft_infonce(v, s, valid, 0.07, 0.05)
    base.backward()
    assert torch.isfinite(v.grad).all() and torch.isfinite(s.grad).all()
    assert torch.equal(s.grad[:, 1], torch.zeros(3, 4))  # padding sentences: neither anchors nor in the pools
    s2 = s.detach().clone()
    s2[:, 1] = 100.0
    assert torch.equal(sentence_volume_soft_infonce(v, s2, valid, 0.07, 0.05), base)


def test_soft_cross_ct_term_of_slices_against_the_global_batch_reweights_to_the_global_mean():
    """What N ranks compute: each slice of anchors against ALL CTs, weighted by its share of the valid sentences,
    sums to the loss of one process holding the whole batch (and so does the gradient)."""
    from simcrop.models.losses import sentence_volume_soft_infonce

    g = torch.Generator().manual_seed(9)
    v = torch.randn(4, 6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    s = torch.randn(4, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    valid = torch.tensor([[True, True, True], [True, False, False], [True, True, False], [True, True, True]])
    whole = sentence_volume_soft_infonce(v, s, valid, 0.1, 0.05)
    gv, gs = torch.autograd.grad(whole, (v, s))
    n = valid.sum()
    parts = sum(sentence_volume_soft_infonce(v, s[r:r + 2], valid[r:r + 2], 0.1, 0.05, offset=r)
                * valid[r:r + 2].sum() / n for r in (0, 2))
    torch.testing.assert_close(parts, whole)
    pv, ps = torch.autograd.grad(parts, (v, s))
    torch.testing.assert_close(pv, gv)
    torch.testing.assert_close(ps, gs)


def test_tiny_model_with_the_soft_cross_ct_term():
    """The align term = SPEC's L_align + w * the soft term (from the model's own heads); --no-align-within keeps
    the soft term alone; the loss is finite and the gradients reach the encoder."""
    from simcrop.config import ConfigError, make_config
    from simcrop.models.losses import sentence_volume_soft_infonce
    from simcrop.models.text import sentence_mean
    from .helpers import random_batch, tiny_model

    kw = dict(use_mim=False, use_mlm=False, dropout=0.0, kernels="reference")
    off = tiny_model(**kw)
    batch = random_batch(off, batch_size=3)
    on = tiny_model(w_align_soft=0.5, soft_pool_tau=0.1, **kw)
    alone = tiny_model(w_align_soft=0.5, soft_pool_tau=0.1, align_within=False, **kw)
    with torch.no_grad():
        base = off(batch)["align"]
        visible, _, _, ids_keep = on.mask_patches(batch["volume"], batch["mask_noise"])
        v = on.head_v(on.encode(visible, ids_keep)[:, 1:])  # [B, N_keep, Dp]
        s, valid = sentence_mean(on.head_t(batch["findings_feats"]), batch["sentence_ids"], on.cfg.max_sentences)
        soft = sentence_volume_soft_infonce(v, s, valid, on.cfg.tau, 0.1)
        assert 0 < float(soft) < math.log(3) + 1
        torch.testing.assert_close(on(batch)["align"], base + 0.5 * soft)
        torch.testing.assert_close(alone(batch)["align"], 0.5 * soft)
    out = on(batch)
    out["loss"].backward()
    grads = [p.grad for p in on.parameters() if p.requires_grad]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    assert sum(float(p.grad.abs().sum()) for p in on.encoder.parameters() if p.grad is not None) > 0
    off(batch)["loss"].backward()
    assert not torch.allclose(on.head_v[0].weight.grad, off.head_v[0].weight.grad)
    with pytest.raises(ConfigError, match="align term empty"):
        make_config("tiny", align_within=False)
    with pytest.raises(ConfigError, match="soft_pool_tau"):
        make_config("tiny", w_align_soft=1.0, soft_pool_tau=0.0)
    with pytest.raises(ConfigError, match="w_align_soft"):
        make_config("tiny", w_align_soft=-1.0)


def test_soft_cross_ct_term_stays_float32_inside_bf16_autocast():
    from simcrop.models.losses import sentence_volume_soft_infonce

    g = torch.Generator().manual_seed(10)
    v, s = torch.randn(3, 7, 8, generator=g), torch.randn(3, 4, 8, generator=g)
    valid = torch.ones(3, 4, dtype=torch.bool)
    want = sentence_volume_soft_infonce(v, s, valid, 0.07, 0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = R.soft_pool_align(v.bfloat16(), s.bfloat16(), valid, 0.05)
        got = sentence_volume_soft_infonce(v, s, valid, 0.07, 0.05)
    assert a.dtype == torch.float32 and got.dtype == torch.float32
    torch.testing.assert_close(got, want)
