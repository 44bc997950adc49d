"""L_align and L_MLM against small hand-computed examples."""
import math

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
