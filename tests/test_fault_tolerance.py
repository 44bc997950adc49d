"""Fault tolerance: kill -9 + --resume auto, kill during a checkpoint write, SIGTERM, non-finite steps, OOM,
safe checkpoint loading."""
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import simcrop.checkpoint as ckpt
from simcrop.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from simcrop.models.simcrop import SimCroP
from simcrop.train import main


@pytest.fixture
def data(synthetic_data) -> Path:
    return synthetic_data


@pytest.fixture
def args(train_args):
    return lambda data, cache, out, *extra: train_args(out, *extra, data=data)


@pytest.fixture
def cli(args):
    """cli(data, cache, out, *extra) -> a simcrop.train subprocess with one thread (reproducible reductions)."""

    def start(data, cache, out, *extra):
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
        cmd = [sys.executable, "-m", "simcrop.train", *args(data, cache, out, *extra)]
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    return start


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(latest_checkpoint(out) / "model.safetensors"))


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    start = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.time() - start < timeout, f"{path} did not appear"
        time.sleep(0.05)


def test_kill_9_then_resume_auto_matches_an_uninterrupted_run(data, cache, args, cli, tmp_path):
    """All runs in subprocesses with one thread each, so float reductions run in the same order."""
    full, killed = tmp_path / "full", tmp_path / "killed"
    steps = ["--steps", "12", "--ckpt-every", "2"]
    proc = cli(data, cache, full, *steps)
    assert proc.wait() == 0, proc.communicate()[0]
    proc = cli(data, cache, killed, *steps)
    wait_for(killed / "checkpoints" / "step_00000004", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert latest_checkpoint(killed) is not None
    proc = cli(data, cache, killed, *steps, "--resume", "auto")
    assert proc.wait() == 0, proc.communicate()[0]
    a, b = final_weights(full), final_weights(killed)
    assert latest_checkpoint(killed).name == "step_00000012"
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one_loadable(data, cache, args, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert main(args(data, cache, out, "--steps", "2", "--ckpt-every", "1", "--stop-after", "1")) == 0
    real_save = torch.save

    def dying_save(obj, path, *a, **k):  # half a file, then the process "dies"
        real_save(obj, path, *a, **k)
        with open(path, "r+b") as f:
            f.truncate(100)
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(ckpt.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        main(args(data, cache, out, "--steps", "2", "--ckpt-every", "1", "--resume", "auto"))
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    latest = latest_checkpoint(out)
    assert latest.name == "step_00000001"
    load_checkpoint(latest)  # still complete
    assert any(p.name.startswith("step_00000002.tmp") for p in (out / "checkpoints").iterdir())
    assert main(args(data, cache, out, "--steps", "2", "--ckpt-every", "1", "--resume", "auto")) == 0
    assert latest_checkpoint(out).name == "step_00000002"


def test_sigterm_finishes_the_step_writes_a_checkpoint_and_exits_0(data, cache, args, cli, tmp_path):
    out = tmp_path / "run"
    proc = cli(data, cache, out, "--steps", "100000", "--ckpt-every", "1000")
    wait_for(out / "metrics.csv", proc)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, text
    assert "stop requested: checkpoint written at step" in text
    step = int(latest_checkpoint(out).name.split("_")[1])
    assert 0 < step < 100000


def test_non_finite_steps_are_skipped_counted_and_bounded(data, cache, args, tmp_path, monkeypatch, capsys):
    real_forward = SimCroP.forward
    calls = {"n": 0}
    poisoned = {2}

    def forward(self, batch):
        calls["n"] += 1
        out = real_forward(self, batch)
        if calls["n"] in poisoned:
            out["mlm"] = out["mlm"] * float("nan")
        return out

    monkeypatch.setattr(SimCroP, "forward", forward)
    out = tmp_path / "run"
    assert main(args(data, cache, out, "--steps", "4")) == 0
    captured = capsys.readouterr()
    assert "step 2: non-finite loss" in captured.out and "1 step(s) skipped" in captured.out
    state = torch.load(latest_checkpoint(out) / "train_state.pt", weights_only=True)
    assert state["skipped_steps"] == 1
    calls["n"] = 0
    poisoned.update(range(1, 100))
    code = main(args(data, cache, tmp_path / "run2", "--steps", "10", "--max-bad-steps", "3"))
    assert code == 2
    assert "3 steps in a row had a non-finite loss" in capsys.readouterr().err


def test_out_of_memory_gives_a_message_with_what_to_change(data, cache, args, tmp_path, monkeypatch, capsys):
    def forward(self, batch):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(SimCroP, "forward", forward)
    assert main(args(data, cache, tmp_path / "run", "--steps", "2")) == 2
    err = capsys.readouterr().err
    assert "out of memory" in err and "preset tiny" in err and "batch size 2" in err and "--grad-checkpointing" in err


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_checkpoint_carrying_code_is_refused(data, cache, args, tmp_path):
    out = tmp_path / "run"
    assert main(args(data, cache, out, "--steps", "1")) == 0
    marker = tmp_path / "pwned"
    exploit = _Exploit()
    exploit.marker = marker
    with open(latest_checkpoint(out) / "train_state.pt", "wb") as f:
        pickle.dump({"step": exploit}, f)
    with pytest.raises(CheckpointError, match="cannot load safely"):
        load_checkpoint(latest_checkpoint(out))
    assert main(args(data, cache, out, "--steps", "2", "--resume", "auto")) == 2
    assert not marker.exists()


def test_a_truncated_checkpoint_gives_a_clear_error(data, cache, args, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(args(data, cache, out, "--steps", "1")) == 0
    weights = latest_checkpoint(out) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert main(args(data, cache, out, "--steps", "2", "--resume", "auto")) == 2
    assert "model.safetensors: unreadable safetensors" in capsys.readouterr().err
