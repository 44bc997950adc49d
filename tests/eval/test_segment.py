"""UNETR on the pre-trained ViT: evenly spaced skip blocks, 3D positions for any ROI, shapes, one train step."""
import pytest
import torch

from simcrop.config import make_config
from simcrop.eval.segment import UNETR, encoder_for_roi, skip_blocks, up_factors
from simcrop.models.vit3d import ViT3DEncoder, sincos_3d


def test_skip_blocks_are_evenly_spaced():
    assert skip_blocks(12) == (3, 6, 9, 12)
    assert skip_blocks(4) == (1, 2, 3, 4)
    assert skip_blocks(8) == (2, 4, 6, 8)
    assert skip_blocks(6) == (2, 3, 5, 6)


def test_up_factors_multiply_to_the_patch():
    f = up_factors((16, 16, 8))
    assert f[0] == (2, 2, 1) and f[1:] == [(2, 2, 2)] * 3
    prod = [1, 1, 1]
    for step in f:
        prod = [a * b for a, b in zip(prod, step)]
    assert prod == [16, 16, 8]
    with pytest.raises(Exception, match="powers of two"):
        up_factors((12, 16, 8))


def _tiny_encoder(img=(64, 64, 32)):
    cfg = make_config("tiny").model
    torch.manual_seed(0)
    return cfg, ViT3DEncoder(img, cfg.patch_size, 1, cfg.enc_dim, cfg.enc_depth, cfg.enc_heads, cfg.mlp_ratio)


def test_position_embedding_is_3d_and_recomputed_for_the_roi():
    cfg, enc = _tiny_encoder()
    roi = (32, 48, 48)  # differs from the pre-training crop on every axis
    new = encoder_for_roi(cfg, enc, roi)
    assert new.grid == (2, 3, 6)
    assert torch.equal(new.pos_embed[0], sincos_3d(cfg.enc_dim, new.grid))
    for name, p in enc.state_dict().items():
        assert torch.equal(new.state_dict()[name], p), name
    pos = new.pos_embed[0, 1:].reshape(2, 3, 6, -1)  # [gx, gy, gz, D]
    for k in range(5):  # moving one patch along depth (z) changes the embedding
        assert not torch.allclose(pos[1, 2, k], pos[1, 2, k + 1])
    assert not torch.allclose(pos[0, 0, 0], pos[0, 1, 0]) and not torch.allclose(pos[0, 0, 0], pos[1, 0, 0])


def test_unetr_forward_shapes_and_backward():
    cfg, enc = _tiny_encoder()
    roi = (32, 32, 16)
    net = UNETR(encoder_for_roi(cfg, enc, roi), classes=3, feature_size=8)
    assert net.skips == (1, 2, 3, 4)
    x = torch.randn(2, 1, *roi)
    out = net(x)
    assert out.shape == (2, 3, *roi)
    out.mean().backward()
    assert net.encoder.blocks[0].attn.qkv.weight.grad is not None  # the encoder is fine-tuned


def test_unetr_uses_the_chosen_blocks(monkeypatch):
    cfg, enc = _tiny_encoder((32, 32, 16))
    net = UNETR(enc, classes=2, feature_size=8)
    seen = {}
    orig = enc.forward_volume

    def spy(x, return_blocks=()):
        seen["blocks"] = return_blocks
        return orig(x, return_blocks)

    monkeypatch.setattr(enc, "forward_volume", spy)
    net(torch.randn(1, 1, 32, 32, 16))
    assert seen["blocks"] == (1, 2, 3)  # block 4 = the final (normed) tokens
