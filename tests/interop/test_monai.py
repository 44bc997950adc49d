"""Export to MONAI: monai.networks.nets.ViT loads it strictly and computes our tokens; UNETR's .vit takes the
cls-free export of a 16^3-patch, 12-block encoder and nothing else."""
import pytest
import torch

import simcrop
from simcrop.interop.monai_vit import monai_vit_kwargs, set_layernorm_eps, to_monai_vit

from .conftest import volume

monai_nets = pytest.importorskip("monai.networks.nets")
pytest.importorskip("einops")  # MONAI's attention needs it


def _monai_tokens(enc, x, eps_fix=True):
    vit = monai_nets.ViT(**monai_vit_kwargs(enc))
    if eps_fix:
        assert set_layernorm_eps(vit) == 3 * enc.depth + 1  # norm1, norm2, norm_cross_attn per block + norm
    vit.load_state_dict(to_monai_vit(enc), strict=True)
    vit.eval()
    with torch.no_grad():
        logits, hidden = vit(x)
    return vit.norm(hidden[-1]), hidden, logits


@pytest.mark.parametrize("geometry", ["tiny-trained", "anisotropic"])
def test_monai_vit_reproduces_our_tokens(geometry, interop_run, random_encoder):
    if geometry == "tiny-trained":
        enc = simcrop.load_encoder(interop_run)  # tiny preset: 64 x 64 x 32, patch 16 x 16 x 8, 4 x 192
    else:
        enc = random_encoder((64, 64, 32), (16, 8, 4), dim=48, depth=2, heads=2)  # grid 4 x 8 x 8
    x = volume(enc.img_size)
    with torch.no_grad():
        ours = enc.forward_features(x)
        skips = enc.intermediate_layers(x, range(1, enc.depth + 1))
    tokens, hidden, logits = _monai_tokens(enc, x)
    assert tokens.shape == ours.shape
    assert (tokens - ours).abs().max() < 1e-5
    assert all((h - s).abs().max() < 1e-5 for h, s in zip(hidden, skips))  # UNETR-style skips agree too
    assert logits.shape == (2, 2) and torch.equal(logits, torch.zeros(2, 2))  # the new head starts at zero
    # MONAI's own LayerNorm eps (1e-5, ours 1e-6) is a visible difference: the fix-up is needed
    loose, _, _ = _monai_tokens(enc, x, eps_fix=False)
    assert (loose - ours).abs().max() > 1e-5


def test_export_cli_writes_what_monai_loads(interop_run, tmp_path, capsys):
    from simcrop.export import main

    enc = simcrop.load_encoder(interop_run)
    x = volume(enc.img_size, batch=1)
    for name in ("vit.safetensors", "vit.pt"):
        out = tmp_path / name
        assert main(["--checkpoint", str(interop_run), "--to", "monai-vit", "--out", str(out)]) == 0
        assert "monai.networks.nets.ViT(in_channels=1, img_size=(64, 64, 32)" in capsys.readouterr().out
        if out.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(out))
        else:
            state = torch.load(out, weights_only=True)
        vit = monai_nets.ViT(**monai_vit_kwargs(enc))
        set_layernorm_eps(vit)
        vit.load_state_dict(state, strict=True)
        with torch.no_grad():
            assert (vit.eval().norm(vit(x)[1][-1]) - enc.forward_features(x)).abs().max() < 1e-5
    assert main(["--checkpoint", str(interop_run), "--to", "monai-vit", "--out", str(tmp_path / "vit.txt")]) == 2
    assert "expected a .safetensors" in capsys.readouterr().err


def test_unetr_vit_takes_the_cls_free_export_of_16_cubed_patches(random_encoder, interop_run):
    unetr_cls = monai_nets.UNETR
    enc = random_encoder((32, 32, 32), (16, 16, 16), dim=48, depth=12, heads=2)
    unetr = unetr_cls(in_channels=1, out_channels=3, img_size=(32, 32, 32), feature_size=8, hidden_size=48,
                      mlp_dim=192, num_heads=2, qkv_bias=True)
    set_layernorm_eps(unetr.vit)
    unetr.vit.load_state_dict(to_monai_vit(enc, cls_token=False), strict=True)
    with torch.no_grad():
        assert unetr.eval()(volume((32, 32, 32), batch=1)).shape == (1, 3, 32, 32, 32)
    # MONAI's UNETR fixes patch 16^3 and 12 blocks: the tiny preset (16 x 16 x 8, 4 blocks) does not fit
    tiny = simcrop.load_encoder(interop_run)
    unetr = unetr_cls(in_channels=1, out_channels=3, img_size=(64, 64, 32), hidden_size=192, mlp_dim=768, num_heads=3,
                      qkv_bias=True)
    with pytest.raises(RuntimeError, match="patch_embeddings.weight"):
        unetr.vit.load_state_dict(to_monai_vit(tiny, cls_token=False), strict=True)
