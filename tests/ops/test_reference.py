"""The pure-PyTorch references against explicit loop implementations written independently here."""
import itertools

import pytest
import torch

from simcrop.ops import reference as R


def loop_patchify(x, patch):
    B, C, X, Y, Z = x.shape
    px, py, pz = patch
    gx, gy, gz = X // px, Y // py, Z // pz
    out = torch.empty(B, gx * gy * gz, px * py * pz * C, dtype=x.dtype)
    for b, ix, iy, iz in itertools.product(range(B), range(gx), range(gy), range(gz)):
        n = (ix * gy + iy) * gz + iz
        p = 0
        for dx, dy, dz, c in itertools.product(range(px), range(py), range(pz), range(C)):
            out[b, n, p] = x[b, c, ix * px + dx, iy * py + dy, iz * pz + dz]
            p += 1
    return out


@pytest.mark.parametrize("shape,patch", [((2, 1, 4, 6, 8), (2, 3, 4)), ((1, 2, 6, 3, 10), (3, 1, 5))])
def test_patchify_matches_loops_and_roundtrips(shape, patch):
    x = torch.randn(shape, dtype=torch.float64)
    p = R.patchify3d(x, patch)
    assert torch.equal(p, loop_patchify(x, patch))
    assert torch.equal(R.unpatchify3d(p, patch, shape[2:], channels=shape[1]), x)


def test_patchify_rejects_non_dividing_patch():
    with pytest.raises(ValueError, match="does not divide"):
        R.patchify3d(torch.zeros(1, 1, 10, 8, 8), (4, 4, 4))


def test_random_masking_invariants():
    torch.manual_seed(0)
    B, N, keep = 3, 37, 9
    noise = torch.rand(B, N)
    ids_keep, mask, ids_restore = R.random_masking(noise, keep)
    ids_shuffle = torch.argsort(noise, dim=1)
    assert torch.equal(torch.gather(ids_shuffle, 1, ids_restore), torch.arange(N).expand(B, N))  # inverse
    assert torch.equal(mask.sum(1), torch.full((B,), float(N - keep)))
    for b in range(B):
        kept = set(ids_keep[b].tolist())
        hidden = set(torch.nonzero(mask[b]).flatten().tolist())
        assert kept.isdisjoint(hidden) and kept | hidden == set(range(N))  # kept + masked = all
        assert kept == set(torch.topk(-noise[b], keep).indices.tolist())  # the lowest noise is kept


def test_masked_patchify_gathers_visible_patches():
    x = torch.randn(2, 1, 8, 8, 4)
    noise = torch.rand(2, 16)
    vis, mask, ids_restore, ids_keep = R.masked_patchify(x, (2, 4, 2), noise, 5)
    full = loop_patchify(x, (2, 4, 2))
    for b in range(2):
        assert torch.equal(vis[b], full[b, ids_keep[b]])
    assert vis.shape == (2, 5, 16)


def test_masked_mse_against_loops_and_normalisations():
    torch.manual_seed(1)
    x = torch.randn(2, 1, 4, 4, 4, dtype=torch.float64)
    patch = (2, 2, 2)
    pred = torch.randn(2, 8, 8, dtype=torch.float64)
    mask = torch.zeros(2, 8, dtype=torch.float64)
    mask[0, [1, 3, 5]] = 1
    mask[1, [0, 2, 4, 6, 7]] = 1
    target = loop_patchify(x, patch)
    errs = [((pred[b, n] - target[b, n]) ** 2).mean() for b in range(2) for n in range(8) if mask[b, n]]
    expect = torch.stack(errs).sum()
    assert torch.allclose(R.masked_mse(pred, x, mask, patch).double(), expect / 8)
    assert torch.allclose(R.masked_mse(pred, x, mask, patch, normalization="all").double(), expect / 16)
    t = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    errs = [((pred[b, n] - t[b, n]) ** 2).mean() for b in range(2) for n in range(8) if mask[b, n]]
    assert torch.allclose(R.masked_mse(pred, x, mask, patch, norm_pix=True).double(), torch.stack(errs).sum() / 8)


def loop_topk_align(v, s, sent_mask, k, kps=None):
    """Independent oracle: python sort by (-cos, index) per sentence."""
    B, N, D = v.shape
    M = s.shape[1]
    a = torch.zeros(B, M, D, dtype=torch.float64)
    idx = torch.full((B, M, k), -1)
    for b, j in itertools.product(range(B), range(M)):
        if not sent_mask[b, j]:
            continue
        kj = k if kps is None else int(kps[b, j])
        sims = []
        for i in range(N):
            sn, vn = s[b, j].double(), v[b, i].double()
            c = float(sn @ vn / (max(sn.norm(), 1e-6) * max(vn.norm(), 1e-6)))
            sims.append((-c, i))
        chosen = [i for _, i in sorted(sims)[:kj]]
        idx[b, j, :kj] = torch.tensor(chosen)
        a[b, j] = v[b, chosen].double().mean(0)
    return a, idx


def test_topk_align_hand_example_with_tie_and_padding():
    # CT 0: four patches; patches 1 and 2 are identical (a tie), sentence 2 is padding
    v = torch.tensor([[[1.0, 0, 0], [0, 1, 0], [0, 1, 0], [1, 1, 0]], [[0, 0, 2], [1, 0, 0], [0, 3, 0], [0, 0, 1]]])
    s = torch.tensor([[[0.0, 1, 0], [1, 0, 0], [5, 5, 5]], [[0, 0, 1], [1, 1, 0], [0, 0, 0]]])
    sent_mask = torch.tensor([[True, True, False], [True, True, False]])
    a, idx, sim = R.topk_align(v, s, sent_mask, k=2)
    # sentence (0,0) = e_y: cos 1 with patches 1 and 2 (tie -> lower index first), 0.707 with 3
    assert idx[0, 0].tolist() == [1, 2] and torch.allclose(a[0, 0], torch.tensor([0.0, 1, 0]))
    # sentence (0,1) = e_x: patch 0 (cos 1), then patch 3 (0.707)
    assert idx[0, 1].tolist() == [0, 3] and torch.allclose(a[0, 1], torch.tensor([1.0, 0.5, 0]))
    # sentence (1,0) = e_z: patches 0 and 3 (both cos 1: tie, lower index first), un-normalised mean
    assert idx[1, 0].tolist() == [0, 3] and torch.allclose(a[1, 0], torch.tensor([0.0, 0, 1.5]))
    assert idx[0, 2].tolist() == [-1, -1] and torch.equal(a[0, 2], torch.zeros(3))
    assert torch.allclose(sim[0, 1], torch.tensor([1.0, 2**-0.5]))


def test_topk_align_random_against_loops_with_per_sentence_k():
    torch.manual_seed(2)
    B, N, M, D, K = 2, 37, 5, 6, 4
    v, s = torch.randn(B, N, D), torch.randn(B, M, D)
    v[0, 7] = v[0, 3]  # an exact tie
    s[0, 0] = v[0, 3]
    sent_mask = torch.tensor([[1, 1, 1, 0, 1], [1, 0, 1, 1, 1]], dtype=torch.bool)
    kps = torch.randint(1, K + 1, (B, M))
    for per in (None, kps):
        a, idx, _ = R.topk_align(v, s, sent_mask, K, per)
        ea, eidx = loop_topk_align(v, s, sent_mask, K, per)
        assert torch.equal(idx, eidx)
        assert torch.allclose(a.double(), ea, atol=1e-6)
    assert idx[0, 0, :2].tolist() == [3, 7] or kps[0, 0] == 1


def test_topk_align_gradient_flows_to_selected_patches_only():
    torch.manual_seed(3)
    v = torch.randn(1, 10, 4, requires_grad=True)
    s = torch.randn(1, 2, 4, requires_grad=True)
    a, idx, _ = R.topk_align(v, s, torch.ones(1, 2, dtype=torch.bool), k=3)
    a.sum().backward()
    selected = set(idx.flatten().tolist())
    for i in range(10):
        assert bool(v.grad[0, i].abs().sum() > 0) == (i in selected)
    assert s.grad is None  # the selection is not differentiated


def test_topk_align_rejects_k_above_n():
    with pytest.raises(ValueError, match="K = 5"):
        R.topk_align(torch.randn(1, 4, 3), torch.randn(1, 2, 3), torch.ones(1, 2, dtype=torch.bool), 5)


def test_cross_granularity_attention_against_loops():
    torch.manual_seed(4)
    B, H, L, N, Dh = 2, 3, 5, 7, 4
    q, k, v = torch.randn(B, H, L, Dh), torch.randn(B, H, N, Dh), torch.randn(B, H, N, Dh)
    g = torch.randn(B, H, Dh)
    q_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    out = R.cross_granularity_attention(q, k, v, g, q_mask)
    for b, h, l in itertools.product(range(B), range(H), range(L)):
        if not q_mask[b, l]:
            assert torch.equal(out[b, h, l], torch.zeros(Dh))
            continue
        w = torch.softmax(torch.stack([q[b, h, l] @ k[b, h, i] for i in range(N)]) / Dh**0.5, 0)
        expect = sum(w[i] * v[b, h, i] for i in range(N)) + g[b, h]
        assert torch.allclose(out[b, h, l], expect, atol=1e-5)
