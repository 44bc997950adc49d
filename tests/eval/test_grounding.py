"""Grounding maps: the aligned-space similarity and the fusion cross-attention equal what the model computes."""
import torch

from simcrop import ops
from simcrop.eval import load_pretrained
from simcrop.eval.data import load_volume, read_grounding_cases
from simcrop.eval.grounding import fusion_attention_map, fusion_token_attention, sentence_patch_similarity
from simcrop.models.text import sentence_mean


def test_maps_match_the_model(tiny_checkpoint, eval_data, eval_cache, monkeypatch):
    cfg, model, text = load_pretrained(tiny_checkpoint, cache_dir=eval_cache)
    case = read_grounding_cases(eval_data, "valid", limit=1)[0]
    findings = " ".join(s.text for s in case.sentences)
    vol = load_volume(case.item, cfg.model.img_size)[None]  # [1, 1, X, Y, Z]

    sim = sentence_patch_similarity(model, text, vol, findings, "cpu")
    assert sim.shape == (len(case.sentences), model.num_patches) and sim.abs().max() <= 1 + 1e-5
    # reference: g_v of every patch vs the sentence means of g_t, as the alignment stage computes them
    with torch.no_grad():
        v = model.head_v(model.encoder.forward_volume(vol)[:, 1:])[0]
        from simcrop.data.text import tokenize_findings

        tok = tokenize_findings(text.tokenizer, findings, cfg.model.findings_max_len, cfg.model.max_sentences)
        u = model.head_t(text(tok["input_ids"][None], tok["attention_mask"][None]))
        s, valid = sentence_mean(u, tok["sentence_ids"][None], cfg.model.max_sentences)
        ref = torch.nn.functional.cosine_similarity(s[0, valid[0]][:, None], v[None], dim=-1)
    torch.testing.assert_close(sim, ref, atol=1e-5, rtol=1e-4)

    attn, sids = fusion_token_attention(model, text, vol, findings, "cpu")
    torch.testing.assert_close(attn.sum(-1), torch.ones(attn.shape[0]))
    seen = {}
    real = ops.cross_granularity_attention

    def spy(q, k, v, g, mask, backend="auto"):
        seen["q"], seen["k"] = q, k
        return real(q, k, v, g, mask, backend=backend)

    monkeypatch.setattr(ops, "cross_granularity_attention", spy)
    with torch.no_grad():  # the model's own fusion forward on the same inputs
        h = model.encoder.forward_volume(vol)[:, 1:]
        L = attn.shape[0]
        feats = model.head_q(text(tok["input_ids"][None, :L], tok["attention_mask"][None, :L]))
        model.fusion(feats, tok["attention_mask"][None, :L].bool(), model.image_to_fusion(h), kernels="reference")
    q, k = seen["q"], seen["k"]
    ref = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, -1).mean(1)[0]
    torch.testing.assert_close(attn, ref, atol=1e-5, rtol=1e-4)
    amap = fusion_attention_map(model, text, vol, findings, "cpu")
    assert amap.shape == sim.shape
    torch.testing.assert_close(amap.sum(-1), torch.ones(amap.shape[0]))


def test_selection_diagnostic_runs_the_model_stages(tiny_checkpoint, eval_data, eval_cache):
    """selection_diagnostic drives the MAE stages itself (mask_patches -> encode); its shares are proportions."""
    from simcrop.eval.grounding import selection_diagnostic

    cfg, model, text = load_pretrained(tiny_checkpoint, cache_dir=eval_cache)
    cases = read_grounding_cases(eval_data, "valid", limit=2)
    out = selection_diagnostic(model, text, cases, "cpu", draws=1)
    assert out["draws"] == 1 and out["k"] == cfg.model.topk and out["sentences"] > 0
    for key in ("discrimination_topk", "discrimination_random_k", "discrimination_chance"):
        assert 0 <= out[key] <= 1, key
    # the position diagnostic beside the same statistic of the raw input patches and of the encoder tokens
    for key in ("position_share", "position_share_raw", "position_share_raw_unnormalised", "position_share_tokens"):
        assert 0 <= out[key] <= 1, key
