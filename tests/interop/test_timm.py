"""The SimCroP authors' format both ways: our export loads strictly into a timm VisionTransformer-style stack with
their Conv3d patch embedding and reproduces our tokens; their (pre-training) checkpoints load into ours; broken,
misshapen and code-carrying files are refused with the file and the first misfit named."""
import os
import pickle

import pytest
import torch

import simcrop
from simcrop.checkpoint import CheckpointError
from simcrop.interop.common import encoder_geometry
from simcrop.interop.timm_vit import to_timm

from . import authors_vit
from .conftest import volume

BACKENDS = ["timm", "hand"]  # timm's own VisionTransformer / Block (when timm is installed), the stack written out


def _stack(backend, enc):
    g = encoder_geometry(enc)
    model = authors_vit.build(backend, g["img_size"], g["patch_size"], g["dim"], g["depth"], g["heads"], g["mlp_ratio"])
    if model is None:
        pytest.skip("timm is not installed (the hand-written stack runs the same check)")
    return model


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("geometry", ["tiny-trained", "anisotropic"])
def test_timm_style_stack_reproduces_our_tokens(backend, geometry, interop_run, random_encoder):
    if geometry == "tiny-trained":
        enc = simcrop.load_encoder(interop_run)  # 64 x 64 x 32, patch 16 x 16 x 8: 4^3 tokens
    else:
        enc = random_encoder((32, 32, 16), (8, 8, 4), dim=48, depth=2, heads=2)  # their patchify needs a cubic grid
    model = _stack(backend, enc)
    model.load_state_dict(to_timm(enc), strict=True)
    x = volume(enc.img_size)
    with torch.no_grad():
        diff = (model.forward_tokens(x) - enc.forward_features(x)).abs().max()
    assert diff < 1e-5


def _authors_checkpoint(tmp_path, backend="hand"):
    """A pre-training checkpoint as theirs: {"model": encoder + MIM decoder + text parts, "optimizer", "epoch"},
    with their released position embedding (H as sin on even channels, W as cos on odd ones, nothing of D)."""
    torch.manual_seed(3)
    model = authors_vit.build(backend, (32, 32, 16), (8, 8, 4), 48, 2, 2) or authors_vit.build("hand", (32, 32, 16), (8, 8, 4), 48, 2, 2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        div = torch.exp(torch.arange(0, 48, 2).double() * -(torch.log(torch.tensor(10000.0)).double() / 48))
        pe = torch.zeros(4, 4, 4, 48, dtype=torch.float64)
        h = torch.arange(4).double()[:, None, None, None]
        w = torch.arange(4).double()[None, :, None, None]
        pe[..., 0::2] = torch.sin(h * div).expand(4, 4, 4, 24)
        pe[..., 1::2] = torch.cos(w * div).expand(4, 4, 4, 24)
        model.pos_embed.copy_(torch.cat([torch.zeros(1, 48), pe.reshape(64, 48).float()])[None])
    state = dict(model.state_dict())
    state.update({"mask_token": torch.zeros(1, 1, 32), "decoder_embed.weight": torch.randn(32, 48),
                  "decoder_blocks.0.attn.qkv.weight": torch.randn(96, 32), "decoder_pred.weight": torch.randn(256, 32),
                  "text_encoder.embeddings.word_embeddings.weight": torch.randn(10, 16), "fusion.0.weight": torch.randn(4, 4)})
    path = tmp_path / "checkpoint-199.pth"
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []}, "epoch": 199}, path)
    return model, state, path


def test_authors_pretraining_checkpoint_loads_into_ours(tmp_path, caplog):
    model, state, path = _authors_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=r"checkpoint-199.pth: width 48 is not a multiple of 64: give the head count"):
        simcrop.load_encoder(path)  # no shape holds the head count: 64 per head (ViT-B, tiny) is the default
    with caplog.at_level("INFO", logger="simcrop.pretrained"):
        enc = simcrop.load_encoder(path, heads=2)
    assert enc.pos_embed_kind == "stored" and enc.geometry()["img_size"] == [32, 32, 16]
    assert enc.info["ignored"] == ("left out 6 tensor(s) outside the encoder: decoder_blocks (1), decoder_embed (1), "
                                   "decoder_pred (1), fusion (1), mask_token (1), text_encoder (1)")
    assert enc.info["ignored"] in caplog.text
    x = volume((32, 32, 16))
    with torch.no_grad():
        assert (enc.forward_features(x) - model.forward_tokens(x)).abs().max() < 1e-5
    # their position code survives save_pretrained / from_pretrained and the export back to their layout
    back = simcrop.load_encoder(enc.save_pretrained(tmp_path / "hf"))
    assert back.pos_embed_kind == "stored" and torch.equal(back.forward_features(x), enc.forward_features(x))
    assert torch.equal(to_timm(back)["pos_embed"], state["pos_embed"])
    # and the command line: --from timm writes our folder
    from simcrop.export import main

    assert main(["--from", "timm", "--checkpoint", str(path), "--heads", "2", "--out", str(tmp_path / "hf2")]) == 0
    assert torch.equal(simcrop.load_encoder(tmp_path / "hf2").forward_features(x), enc.forward_features(x))


def test_export_cli_timm_round_trip(interop_run, tmp_path):
    from simcrop.export import main

    enc = simcrop.load_encoder(interop_run)
    x = volume(enc.img_size, batch=1)
    for name in ("encoder.pth", "encoder.safetensors"):
        out = tmp_path / name
        assert main(["--checkpoint", str(interop_run), "--to", "timm", "--out", str(out)]) == 0
        if out.suffix == ".pth":  # what the authors' loaders read: checkpoint['model']
            state = torch.load(out, weights_only=True)["model"]
            model = authors_vit.build("hand", enc.img_size, enc.patch_size, 192, 4, 3)
            model.load_state_dict(state, strict=True)
            with torch.no_grad():
                assert (model.forward_tokens(x) - enc.forward_features(x)).abs().max() < 1e-5
        back = simcrop.load_encoder(out)  # and back: the sin-cos code is recognised, the tokens are ours
        assert back.pos_embed_kind == "sincos-3d" and torch.equal(back.forward_features(x), enc.forward_features(x))


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_bad_authors_files_are_refused(tmp_path):
    _, state, path = _authors_checkpoint(tmp_path)
    # wrong shape in a later block: the first misfit is named
    bad = dict(state)
    bad["blocks.1.attn.qkv.weight"] = torch.zeros(144, 47)
    torch.save({"model": bad}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as e:
        simcrop.load_encoder(tmp_path / "bad.pth", heads=2)
    assert str(e.value) == (f"{tmp_path / 'bad.pth'}: key blocks.1.attn.qkv.weight has shape [144, 47], "
                            f"a 2-block ViT of width 48 expects [144, 48]")
    missing = {k: v for k, v in state.items() if k != "blocks.0.norm2.bias"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing.pth: missing key blocks.0.norm2.bias"):
        simcrop.load_encoder(tmp_path / "missing.pth", heads=2)
    extra = {**state, "blocks.0.ls1.gamma": torch.ones(48)}  # a layer the encoder does not have is not skipped
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"extra.pth: unexpected key blocks.0.ls1.gamma"):
        simcrop.load_encoder(tmp_path / "extra.pth", heads=2)
    # truncated
    blob = path.read_bytes()
    (tmp_path / "trunc.pth").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match=r"trunc.pth: cannot load safely"):
        simcrop.load_encoder(tmp_path / "trunc.pth")
    # a pickle that carries code: refused by weights_only, and the code did not run
    marker = tmp_path / "code-ran"
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"model": _RunsCode(str(marker))}, f, protocol=2)
    with pytest.raises(CheckpointError) as e:
        simcrop.load_encoder(tmp_path / "evil.pth")
    assert str(tmp_path / "evil.pth") in str(e.value) and "refused" in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()
    from simcrop.export import main

    assert main(["--from", "timm", "--checkpoint", str(tmp_path / "evil.pth"), "--out", str(tmp_path / "o")]) == 2
    assert not marker.exists() and not (tmp_path / "o").exists()
