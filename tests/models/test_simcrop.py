"""The SimCroP model: stages, gradients, loss switches, compile."""
import pytest
import torch

from simcrop.config import ConfigError, make_config
from simcrop.models import vit3d
from simcrop.models.simcrop import mlm_label_capacity
from simcrop.ops import reference as R

from .helpers import random_batch, tiny_model


def test_every_trainable_parameter_gets_a_gradient():
    model = tiny_model()
    out = model(random_batch(model))
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not missing, f"parameters without gradient: {missing}"
    assert torch.isclose(out["loss"], out["mim"] + out["align"] + out["mlm"])


def test_loss_weights_and_switches():
    base = tiny_model()
    batch = random_batch(base)
    ref = base(batch)
    weighted = tiny_model(w_mim=2.0, w_align=0.5, w_mlm=0.0)
    weighted.load_state_dict(base.state_dict())
    out = weighted(batch)
    # dropout draws differ between calls, so compare the deterministic terms (MIM and align have no dropout)
    assert torch.isclose(out["loss"], 2 * out["mim"] + 0.5 * out["align"])
    assert torch.isclose(out["mim"], ref["mim"]) and torch.isclose(out["align"], ref["align"])
    off = tiny_model(use_mlm=False, use_align=False)
    assert not hasattr(off, "fusion") and not hasattr(off, "head_v")
    out = off(batch)
    assert out["mlm"] == 0 and out["align"] == 0 and torch.isclose(out["loss"], out["mim"])
    with pytest.raises(ConfigError, match="every loss is switched off"):
        make_config("tiny", use_mim=False, use_mlm=False, use_align=False)


def test_patch_embedding_equals_conv3d():
    enc = vit3d.ViT3DEncoder((32, 32, 16), (16, 16, 8), dim=48, depth=1, heads=2)
    x = torch.randn(2, 1, 32, 32, 16)
    conv = torch.nn.Conv3d(1, 48, kernel_size=(16, 16, 8), stride=(16, 16, 8))
    with torch.no_grad():  # linear weight over (dx, dy, dz, c) -> conv weight [D, C, px, py, pz]
        conv.weight.copy_(enc.patch_embed.weight.reshape(48, 16, 16, 8, 1).permute(0, 4, 1, 2, 3))
        conv.bias.copy_(enc.patch_embed.bias)
    tokens = enc.patch_embed(R.patchify3d(x, (16, 16, 8)))  # [B, N, D]
    expect = conv(x).flatten(2).transpose(1, 2)  # [B, D, gx, gy, gz] -> [B, N, D]
    assert torch.allclose(tokens, expect, atol=1e-4)


def test_sincos_3d_uses_one_third_per_axis():
    emb = vit3d.sincos_3d(12, (2, 3, 4), cls_token=True)
    assert emb.shape == (1 + 24, 12) and torch.equal(emb[0], torch.zeros(12))
    # token n = (ix * gy + iy) * gz + iz: moving along z changes only the last third
    a, b = emb[1 + 0], emb[1 + 1]
    assert torch.equal(a[:8], b[:8]) and not torch.equal(a[8:], b[8:])
    c = emb[1 + 4]  # iy + 1
    assert torch.equal(a[:4], c[:4]) and not torch.equal(a[4:8], c[4:8])
    with pytest.raises(ValueError, match="divisible by 6"):
        vit3d.sincos_3d(16, (2, 2, 2))


def test_decoder_restores_patch_order():
    """The decoder sees token i's encoding at patch position ids_keep[i]: shuffling by ids_restore is exact."""
    torch.manual_seed(0)
    dec = vit3d.MIMDecoder((2, 2, 2), enc_dim=6, patch_dim=4, dim=12, depth=0, heads=2)
    noise = torch.rand(1, 8)
    ids_keep, mask, ids_restore = R.random_masking(noise, 3)
    tokens = torch.randn(1, 4, 6)
    with torch.no_grad():
        dec.pos_embed.zero_()
        pred = dec(tokens, ids_restore)
        expect = dec.pred(dec.norm(dec.embed(tokens)))[:, 1:]  # visible tokens, in keep order
        mask_pred = dec.pred(dec.norm(dec.mask_token))[0, 0]
    for r, n in enumerate(ids_keep[0].tolist()):
        assert torch.allclose(pred[0, n], expect[0, r], atol=1e-6)
    for n in torch.nonzero(mask[0]).flatten().tolist():
        assert torch.allclose(pred[0, n], mask_pred, atol=1e-6)


def test_model_rejects_a_volume_of_the_wrong_shape():
    model = tiny_model()
    batch = random_batch(model)
    batch["volume"] = batch["volume"][..., :16]
    with pytest.raises(ValueError, match=r"the model expects \[B, 1, 64, 64, 32\]"):
        model(batch)


def test_mlm_capacity_covers_every_masked_token():
    cfg = make_config("tiny").model
    assert mlm_label_capacity(cfg) >= round(cfg.mlm_ratio * (cfg.report_max_len - 2))
    assert mlm_label_capacity(make_config("tiny", mlm_loss_on="all").model) == cfg.report_max_len


def test_compiled_and_eager_losses_agree():
    model = tiny_model(dropout=0.0)
    batch = random_batch(model)
    eager = model(batch)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(batch)
    for key in ("loss", "mim", "align", "mlm"):
        assert torch.allclose(eager[key], compiled[key], rtol=1e-5, atol=1e-6), key


def test_grad_checkpointing_gives_the_same_gradients():
    model = tiny_model(dropout=0.0)
    batch = random_batch(model)
    model(batch)["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(batch)["loss"].backward()
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, grads[n], atol=1e-6), n
