"""The public loading API: simcrop.load_encoder, save_pretrained / from_pretrained, preprocess, and refusals."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import simcrop
from simcrop.checkpoint import CheckpointError

from .conftest import volume

ROOT = Path(__file__).resolve().parents[2]


def _python(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_facade_is_lazy_and_load_encoder_needs_no_text_tower(interop_run):
    """`import simcrop.ops` (and `import simcrop`) load nothing of the API; load_encoder imports no transformers
    and looks for no tiny-bert build (the cache folder is not given)."""
    out = _python(
        "import sys, simcrop.ops, simcrop\n"
        "assert 'simcrop.pretrained' not in sys.modules and 'simcrop.models' not in sys.modules, sorted(sys.modules)\n"
        f"enc = simcrop.load_encoder({str(interop_run)!r})\n"
        "assert 'transformers' not in sys.modules\n"
        "print(type(enc).__name__, enc.training, tuple(enc.img_size))\n"
    )
    assert out.split() == ["SimCroPEncoder", "False", "(64,", "64,", "32)"]
    assert {"load_encoder", "preprocess", "SimCroPEncoder", "PREPROCESSING"} <= set(dir(simcrop))
    with pytest.raises(AttributeError):
        simcrop.no_such_name  # noqa: B018


def test_load_encoder_equals_the_trained_model(interop_run, cache):
    from simcrop.factory import load_pretrained

    _, model, _ = load_pretrained(interop_run, cache=cache)
    enc = simcrop.load_encoder(interop_run)
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    x = volume(enc.img_size)
    tokens, blocks = model.encoder.forward_volume(x, return_blocks=(1, 3))
    assert torch.equal(enc.forward_features(x), tokens) and tokens.shape == (2, 1 + 64, 192)
    skips = enc.intermediate_layers(x, (1, 3))
    assert all(torch.equal(a, b) for a, b in zip(skips, blocks))
    grids = enc.intermediate_layers(x, (3,), reshape=True)
    assert grids[0].shape == (2, 192, 4, 4, 4)
    assert torch.equal(grids[0][:, :, 1, 2, 3], blocks[1][:, 1 + (1 * 4 + 2) * 4 + 3])  # token n = (ix*gy+iy)*gz+iz
    with pytest.raises(ValueError, match="1..4"):
        enc.intermediate_layers(x, (5,))
    enc64 = simcrop.load_encoder(interop_run / "checkpoints" / "step_00000002", dtype=torch.float64)
    assert enc64.norm.weight.dtype == torch.float64
    assert (enc64.forward_features(x.double()) - tokens.double()).abs().max() < 1e-4


def test_save_pretrained_round_trip_and_model_card(interop_run, tmp_path):
    enc = simcrop.load_encoder(interop_run)
    folder = enc.save_pretrained(tmp_path / "hf")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["format"] == "simcrop-encoder" and config["pos_embed"] == "sincos-3d"
    assert config["encoder"] == {"img_size": [64, 64, 32], "patch_size": [16, 16, 8], "in_chans": 1, "dim": 192,
                                 "depth": 4, "heads": 3, "mlp_ratio": 4.0}
    assert config["training"]["preset"] == "tiny" and config["training"]["step"] == 2
    card = (folder / "README.md").read_text()
    for text in ("preset: tiny", "optimizer steps done: 2", "mim, mlm, align", "auroc@10% 0.625", "auroc@100% 0.750",
                 "| zero-shot | step_00000002 | auroc 0.562", "dice 0.438", "spacing_mm: [1.5, 1.5, 3.0]",
                 "hu_clip: [-1000.0, 1000.0]", "orientation: RAS+"):
        assert text in card, text
    back = simcrop.SimCroPEncoder.from_pretrained(folder)
    again = simcrop.load_encoder(folder)  # the same through the one entry point
    x = volume(enc.img_size)
    assert torch.equal(back.forward_features(x), enc.forward_features(x))
    assert torch.equal(again.forward_features(x), enc.forward_features(x))
    assert "auroc@10% 0.625" in again.save_pretrained(tmp_path / "hf2").joinpath("README.md").read_text()  # carried


def test_refused_inputs_name_the_file(interop_run, tmp_path):
    ckpt = interop_run / "checkpoints" / "step_00000002"
    # a checkpoint whose config.json says another preset (the weights are the tiny preset's)
    other = tmp_path / "other"
    shutil.copytree(ckpt, other)
    from simcrop.config import make_config

    (other / "config.json").write_text(json.dumps({**make_config("vit_b").to_dict(), "text_encoder_id": "minilm"}, default=list))
    with pytest.raises(CheckpointError) as e:
        simcrop.load_encoder(other)
    msg = str(e.value)
    assert "\n" not in msg and str(other / "model.safetensors") in msg and "encoder.cls_token" in msg
    assert "[1, 1, 192]" in msg and "[1, 1, 768]" in msg
    # a truncated safetensors file, in a checkpoint and in a pretrained folder
    trunc = tmp_path / "trunc"
    shutil.copytree(ckpt, trunc)
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{trunc / 'model.safetensors'}: unreadable safetensors"):
        simcrop.load_encoder(trunc)
    hf = simcrop.load_encoder(ckpt).save_pretrained(tmp_path / "hf")
    blob = (hf / "model.safetensors").read_bytes()
    (hf / "model.safetensors").write_bytes(blob[:100])
    with pytest.raises(CheckpointError, match=f"{hf / 'model.safetensors'}: unreadable safetensors"):
        simcrop.load_encoder(hf)
    # a pretrained folder whose config.json was edited to another geometry
    hf2 = simcrop.load_encoder(ckpt).save_pretrained(tmp_path / "hf2")
    cfg = json.loads((hf2 / "config.json").read_text())
    cfg["encoder"]["depth"] = 5
    (hf2 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model.safetensors: missing key blocks.4.norm1.weight"):
        simcrop.load_encoder(hf2)
    with pytest.raises(CheckpointError, match="not found"):
        simcrop.load_encoder(tmp_path / "nowhere")


def test_preprocess_orients_resamples_clips_and_crops(tmp_path):
    import nibabel as nib

    rng = np.random.default_rng(0)
    hu = rng.uniform(-2000, 2000, size=(40, 30, 20)).astype(np.float32)
    # an LPS-like array (x and y flipped) at the training spacing: only reorientation, clipping and the crop act
    lps = np.diag([-1.5, -1.5, 3.0, 1.0])
    x = simcrop.preprocess(hu, size=(32, 32, 16), affine=lps)
    from simcrop.data.augment import center_crop_pad, hu_to_unit

    expect = center_crop_pad(hu_to_unit(torch.from_numpy(hu[::-1, ::-1].copy())), (32, 32, 16))
    assert x.shape == (1, 1, 32, 32, 16) and x.dtype == torch.float32 and torch.equal(x[0, 0], expect)
    assert x.min() >= -1 and x.max() <= 1
    # a NIfTI file at 0.75 x 0.75 x 1.5 mm: resampled by 1/2 per axis, the same as the array path
    nib.save(nib.Nifti1Image(hu, np.diag([0.75, 0.75, 1.5, 1.0])), str(tmp_path / "ct.nii.gz"))
    from_file = simcrop.preprocess(tmp_path / "ct.nii.gz", size=(16, 16, 8))
    from_array = simcrop.preprocess(hu, size=(16, 16, 8), spacing=(0.75, 0.75, 1.5))
    assert from_file.shape == (1, 1, 16, 16, 8) and torch.allclose(from_file, from_array)
    enc = simcrop.SimCroPEncoder((16, 16, 8), (8, 8, 4), dim=12, depth=1, heads=2)
    assert enc.preprocess(hu, spacing=(0.75, 0.75, 1.5)).shape == (1, 1, 16, 16, 8)
    with pytest.raises(ValueError, match=r"\[X, Y, Z\]"):
        simcrop.preprocess(hu[0], size=(16, 16, 8))
