"""Tests of simcrop.models.tiny_bert: a deterministic, loadable tiny BERT built atomically from a corpus."""

import math
import os

import pytest
import torch

from simcrop.models.tiny_bert import build_tiny_bert

CORPUS = [
    "The lungs are clear. A 1.5 cm nodule in the right upper lobe. Heart size is normal.",
    "No pleural effusion. Mild emphysema. Atelectasis in the left lower lobe.",
    "Coronary artery calcification. Mediastinal lymph nodes are not enlarged. Trachea is patent.",
    "Consolidation in the right lower lobe. Ground glass opacity. Bronchiectasis.",
] * 4


def _files(path):
    return {f: (path / f).read_bytes() for f in sorted(os.listdir(path))}


def test_build_tiny_bert_deterministic_and_loadable(tmp_path):
    from transformers import AutoModel, AutoTokenizer

    state = torch.get_rng_state()
    a = build_tiny_bert(CORPUS, tmp_path / "a", vocab_size=120)
    assert torch.equal(torch.get_rng_state(), state)  # global RNG untouched
    b = build_tiny_bert(iter(CORPUS), tmp_path / "b", vocab_size=120)  # any iterable
    fa, fb = _files(a), _files(b)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt"} <= set(fa)
    assert fa == fb  # byte-identical weights, vocabulary and tokenizer
    vocab = fa["vocab.txt"].decode().split("\n")
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert "##s" in vocab and len(vocab) - 1 <= 120

    tok = AutoTokenizer.from_pretrained(a)
    model = AutoModel.from_pretrained(a)
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    assert model.get_input_embeddings().weight.shape[0] == len(tok) == len(vocab) - 1
    enc = tok("The LUNGS are clear.")
    pieces = tok.convert_ids_to_tokens(enc["input_ids"])
    assert pieces[0] == "[CLS]" and pieces[-1] == "[SEP]" and "[UNK]" not in pieces
    assert "lungs" in "".join(p.removeprefix("##") for p in pieces)  # lowercased
    assert tok.mask_token_id == 4 and tok.pad_token_id == 0

    # another seed gives other weights, same vocabulary; rebuilding over a folder replaces it atomically
    c = build_tiny_bert(CORPUS, a, vocab_size=120, seed=1)
    fc = _files(c)
    assert fc["vocab.txt"] == fa["vocab.txt"] and fc["model.safetensors"] != fa["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no temporary folder left behind


def test_build_tiny_bert_empty_corpus_raises(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        build_tiny_bert(["", "  ", math.nan], tmp_path / "x")
    assert not (tmp_path / "x").exists()
