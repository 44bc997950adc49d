"""Checkpoints: model weights as safetensors, training state through torch.load(weights_only=True), written
atomically so that a crash or kill mid-write never damages an earlier checkpoint.

Layout: <out>/checkpoints/step_<8 digits>/{model.safetensors, train_state.pt, config.json}
        <out>/checkpoints/LATEST   the name of the newest complete checkpoint (replaced atomically)
A checkpoint folder is first written as <name>.tmp-<pid>, every file fsync'ed, then renamed into place.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated or from another configuration."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file + fsync + rename."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def save_checkpoint(out: Path, step: int, model_state: dict[str, torch.Tensor], train_state: dict[str, Any],
                    config: dict[str, Any]) -> Path:
    """Write checkpoint `step` under out/checkpoints and point LATEST at it; returns its folder."""
    root = Path(out) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    final, tmp = root / name, root / f"{name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    weights = {k: v.detach().contiguous().cpu() for k, v in model_state.items()}
    save_file(weights, str(tmp / "model.safetensors"), metadata={"step": str(step)})
    torch.save(train_state, tmp / "train_state.pt")
    (tmp / "config.json").write_text(json.dumps(config, indent=2, default=list))
    for f in tmp.iterdir():
        _fsync_file(f)
    _fsync_dir(tmp)
    if final.exists():  # a rerun of the same step: swap, never leave the name without a complete folder
        old = root / f"{name}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    atomic_write_bytes(root / "LATEST", name.encode())
    return final


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint under out/checkpoints (LATEST, else the highest step folder), or None."""
    root = Path(out) / "checkpoints"
    pointer = root / "LATEST"
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / "model.safetensors").is_file():
            return candidate
    steps = sorted(p for p in root.glob("step_*") if p.is_dir() and "." not in p.name) if root.is_dir() else []
    return steps[-1] if steps else None


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu"):
    """(model_state, train_state, config) of a checkpoint folder; CheckpointError naming the file on failure.
    Loading never executes code: safetensors for weights, torch.load(weights_only=True) for the rest."""
    path = Path(path)
    files = {n: path / n for n in ("model.safetensors", "train_state.pt", "config.json")}
    for n, f in files.items():
        if not f.is_file():
            raise CheckpointError(f"{f}: checkpoint file missing")
    try:
        model_state = load_file(str(files["model.safetensors"]), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{files['model.safetensors']}: unreadable safetensors ({exc})") from exc
    try:
        train_state = torch.load(files["train_state.pt"], map_location=map_location, weights_only=True)
    except Exception as exc:  # pickle errors, truncation, refused globals
        raise CheckpointError(f"{files['train_state.pt']}: cannot load safely ({str(exc).splitlines()[0]})") from exc
    try:
        config = json.loads(files["config.json"].read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{files['config.json']}: not valid JSON ({exc})") from exc
    return model_state, train_state, config
