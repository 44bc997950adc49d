"""A tiny pre-trained run (tiny preset, tiny-bert, 2 steps) with simcrop.eval-style result files, shared by
tests/interop; and random encoders of other geometries."""
import json
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def interop_run(tmp_path_factory, train_args) -> Path:
    from simcrop.train import main

    out = tmp_path_factory.mktemp("interop_run") / "run"
    assert main(train_args(out, "--steps", "2")) == 0
    ckpt = out / "checkpoints" / "step_00000002"
    ev = out / "eval" / ckpt.name  # what simcrop.eval writes by default (headline fields only)
    ev.mkdir(parents=True)
    common = {"checkpoint": str(ckpt), "data": "synthetic", "preset": "tiny"}
    (ev / "linear-probe.json").write_text(json.dumps(
        {"task": "linear-probe", **common, "fractions": {"0.1": {"auroc": 0.625}, "1": {"auroc": 0.75}}}))
    (ev / "zero-shot.json").write_text(json.dumps({"task": "zero-shot", **common, "auroc": 0.5625}))
    (ev / "segment.json").write_text(json.dumps({"task": "segment", **common, "dice": 0.4375, "dice_pooled": 0.5}))
    return out


@pytest.fixture
def random_encoder():
    """random_encoder(img_size, patch_size, dim, depth, heads) -> a ViT3DEncoder with every weight perturbed (so
    that LayerNorm scales, biases and the cls token all matter), eval mode."""
    from simcrop.models.vit3d import ViT3DEncoder

    def make(img_size, patch_size, dim=48, depth=2, heads=2, seed=0):
        torch.manual_seed(seed)
        enc = ViT3DEncoder(img_size, patch_size, dim=dim, depth=depth, heads=heads)
        with torch.no_grad():
            for p in enc.parameters():
                p.add_(0.05 * torch.randn_like(p))
        return enc.eval()

    return make


def volume(img_size, batch=2, seed=1) -> torch.Tensor:
    """[B, 1, X, Y, Z] uniform in [-1, 1] (the encoder's input range)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 1, *img_size, generator=g) * 2 - 1
