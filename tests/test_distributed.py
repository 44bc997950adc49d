"""torchrun on CPU (gloo): 2 ranks x batch 2 == 1 process x batch 4; checkpoints load at any world size."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from simcrop.checkpoint import latest_checkpoint
from simcrop.data.synthetic import write_dataset
from simcrop.train import main


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("synthetic") / "ds", n=14, seed=7)


def common(data, cache, out, *extra):
    return ["--data", str(data), "--cache-dir", str(cache), "--out", str(out), "--text-encoder", "tiny-bert",
            "--no-progress", "--warmup-steps", "1", "--log-every", "1", "--dropout", "0", *extra]


def torchrun(nproc: int, argv: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "simcrop.train", *argv]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def losses(out: Path) -> list[float]:
    with open(out / "metrics.csv", newline="") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_ranks_match_one_process_with_the_same_global_batch(data, tmp_path, fsdp):
    cache = tmp_path / "cache"
    single, multi = tmp_path / "single", tmp_path / "multi"
    assert main(common(data, cache, single, "--steps", "3", "--batch-size", "4")) == 0
    extra = ["--fsdp"] if fsdp else []
    run = torchrun(2, common(data, cache, multi, "--steps", "3", "--batch-size", "2", *extra))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "2 device(s)" in run.stdout and ("FSDP2" if fsdp else "DDP") in run.stdout
    assert losses(multi) == pytest.approx(losses(single), rel=1e-5)
    a = load_file(str(latest_checkpoint(single) / "model.safetensors"))
    b = load_file(str(latest_checkpoint(multi) / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=5e-5), k
    # the 2-rank checkpoint resumes in one process (any world size)
    assert main(common(data, cache, multi, "--steps", "4", "--batch-size", "4", "--resume", "auto")) == 0
    assert latest_checkpoint(multi).name == "step_00000004"
