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
