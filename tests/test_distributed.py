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


@pytest.fixture
def common(train_args):
    """common(data, cache, out, *extra): the shared train_args without dropout (rank-exact comparisons)."""
    return lambda data, cache, out, *extra: train_args(out, "--dropout", "0", *extra, data=data, cache_dir=cache)


def torchrun(nproc: int, argv: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "simcrop.train", *argv]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def losses(out: Path) -> list[float]:
    with open(out / "metrics.csv", newline="") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_ranks_match_one_process_with_the_same_global_batch(data, tmp_path, fsdp, common):
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


_GATHER_GRAD_SCRIPT = r'''
import sys
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from simcrop.distributed import all_gather_with_grad
from simcrop.models.losses import sentence_volume_soft_infonce

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
B, N, M, D = 2, 5, 3, 6  # per rank
x = torch.randn(world * B, N, 4, dtype=torch.float64)  # the global batch's patch inputs
t = torch.randn(world * B, M, 4, dtype=torch.float64)  # and sentence inputs
valid = torch.rand(world * B, M) < 0.7
valid[:, 0] = True


class Heads(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.g_v, self.g_t = torch.nn.Linear(4, D).double(), torch.nn.Linear(4, D).double()

    def forward(self, x, t):
        return self.g_v(x), self.g_t(t)


model = Heads()
# one process holding the global batch
v, s = model(x, t)
loss = sentence_volume_soft_infonce(v, s, valid, 0.1, 0.05)
want = torch.autograd.grad(loss, list(model.parameters()))
# this rank: its slice, negatives all-gathered, loss re-weighted as the trainer does (share x world), DDP averaging
ddp = DDP(model)
sl = slice(rank * B, (rank + 1) * B)
v, s = ddp(x[sl], t[sl])
v_all, offset = all_gather_with_grad(v)
assert v_all.shape == (world * B, N, D) and offset == rank * B
n_local = valid[sl].sum().double()
n_global = n_local.clone()
dist.all_reduce(n_global)
local = sentence_volume_soft_infonce(v_all, s, valid[sl], 0.1, 0.05, offset=offset)
(local * (n_local / n_global) * world).backward()
for p, w in zip(model.parameters(), want):
    assert torch.allclose(p.grad, w, rtol=1e-10, atol=1e-12), (rank, (p.grad - w).abs().max())
# control: a gather WITHOUT the summed backward (other ranks' features detached) gives another gradient
ddp.zero_grad()
v, s = ddp(x[sl], t[sl])
others = v_all.detach()
v_cut = torch.cat([others[:offset], v, others[offset + B:]])
local = sentence_volume_soft_infonce(v_cut, s, valid[sl], 0.1, 0.05, offset=offset)
(local * (n_local / n_global) * world).backward()
assert not torch.allclose(model.g_v.weight.grad, want[0], rtol=1e-3)
dist.barrier()
print(f"rank {rank}: gradients equal the single-process gradient", flush=True)
dist.destroy_process_group()
'''


def test_all_gather_with_grad_under_ddp_gives_the_single_process_gradient(tmp_path):
    """The soft cross-CT term's gradient factor: all_gather's backward SUMS every rank's gradient into the local
    slice, DDP AVERAGES parameter gradients over the W ranks, the trainer multiplies each rank's loss by
    W x (local sentences / global sentences): together exactly the gradient of one process with the global batch."""
    script = tmp_path / "gather_grad.py"
    script.write_text(_GATHER_GRAD_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.count("gradients equal the single-process gradient") == 2


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_ranks_match_one_process_with_the_soft_cross_ct_term(data, tmp_path, fsdp, common):
    """--w-align-soft: the negatives are the GLOBAL batch (all-gathered), so 2 ranks x 2 == 1 process x 4 holds."""
    cache = tmp_path / "cache"
    single, multi = tmp_path / "single", tmp_path / "multi"
    soft = ["--steps", "3", "--w-align-soft", "1"]
    assert main(common(data, cache, single, *soft, "--batch-size", "4")) == 0
    run = torchrun(2, common(data, cache, multi, *soft, "--batch-size", "2", *(["--fsdp"] if fsdp else [])))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "cross-CT soft sentence-volume contrast" in run.stdout and "all-gathered over 2 ranks" in run.stdout
    assert ("FSDP2" if fsdp else "DDP") in run.stdout
    assert losses(multi) == pytest.approx(losses(single), rel=1e-5)
    a = load_file(str(latest_checkpoint(single) / "model.safetensors"))
    b = load_file(str(latest_checkpoint(multi) / "model.safetensors"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=5e-5), k
