"""Rebuild a pre-trained SimCroP model from a checkpoint folder: `load_pretrained(dir) -> (cfg, model, text)`.

The checkpoint's config.json holds the full config dict (model / data / train groups) and `text_encoder_id`,
the stable name of the frozen text tower it was trained with (simcrop.models.text.text_encoder_id):
- 'minilm' -> the packaged all-MiniLM-L6-v2;
- 'tiny-bert' -> the id is the cached build's folder name `tiny-bert-<hash>`, looked up in the cache folder
  (the config's cache_dir, else $SIMCROP_CACHE, else ~/.cache/simcrop, or the one passed here);
- a local folder or a hub name already in the local Hugging Face cache -> loaded as such, offline.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from simcrop.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from simcrop.config import PRESETS, Config, ConfigError, make_config


class EvalError(Exception):
    """A problem with the evaluation's inputs; the message is one line naming the file or option."""


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder (holding model.safetensors) or a run folder (its newest checkpoint)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise EvalError(f"{p}: checkpoint not found")
    if (p / "model.safetensors").is_file():
        return p
    if p.is_dir():
        latest = latest_checkpoint(p)
        if latest is not None:
            return latest
    raise EvalError(f"{p}: not a checkpoint folder (no model.safetensors) nor a run folder with checkpoints/")


def config_from_dict(saved: dict, source: str = "config.json") -> Config:
    """The Config a checkpoint was trained with; EvalError for an unknown preset or unknown fields."""
    if not isinstance(saved, dict) or not all(isinstance(saved.get(g), dict) for g in ("model", "data", "train")):
        raise EvalError(f"{source}: not a simcrop config (needs 'model', 'data' and 'train' groups)")
    preset = saved["train"].get("preset")
    if preset not in PRESETS:
        raise EvalError(f"{source}: checkpoint of unknown preset {preset!r} (this simcrop knows: {', '.join(PRESETS)})")
    base = make_config(preset)
    overrides = {}
    for group in ("model", "data", "train"):
        known = getattr(base, group)
        for key, value in saved[group].items():
            if key == "preset":
                continue
            if not hasattr(known, key):
                raise EvalError(f"{source}: unknown config field {group}.{key} (checkpoint from another simcrop version?)")
            current = getattr(known, key)
            overrides[key] = tuple(value) if isinstance(current, tuple) and isinstance(value, list) else value
    try:
        return make_config(preset, **overrides)
    except ConfigError as exc:
        raise EvalError(f"{source}: invalid config ({exc})") from None


def default_cache_dir(cfg: Config) -> Path:
    """Where simcrop.train put tiny-bert builds and synthetic data for this config."""
    return Path(cfg.data.cache_dir or os.environ.get("SIMCROP_CACHE") or Path.home() / ".cache" / "simcrop").expanduser()


def load_text_encoder(cfg: Config, encoder_id: str | None, cache_dir: str | os.PathLike | None = None,
                      override: str | None = None, source: str = "config.json"):
    """The frozen text tower of a checkpoint (see the module docstring for the name resolution)."""
    from transformers.utils import logging as hf_logging

    from simcrop.models.text import FrozenTextEncoder

    hf_logging.disable_progress_bar()  # no "Loading weights" bars in evaluation logs
    name = override or cfg.model.text_encoder
    if not override and name == "tiny-bert":
        if not encoder_id or not str(encoder_id).startswith("tiny-bert-"):
            raise EvalError(f"{source}: text encoder 'tiny-bert' without its recorded build (text_encoder_id)")
        roots = [Path(cache_dir).expanduser()] if cache_dir else [default_cache_dir(cfg)]
        for root in roots:
            folder = root / encoder_id
            if (folder / "config.json").is_file():
                name = str(folder)
                break
        else:
            raise EvalError(
                f"{source}: the checkpoint's text encoder {encoder_id} is not in {roots[0]}; pass --cache-dir "
                f"(the folder simcrop.train built it in) or --text-encoder <its folder>"
            )
    try:
        text = FrozenTextEncoder(name, cache_dir=cache_dir or default_cache_dir(cfg),
                                 trust_remote_code=cfg.model.trust_remote_code)
    except (FileNotFoundError, ValueError, OSError, RuntimeError) as exc:
        raise EvalError(f"{source}: cannot load text encoder {name!r}: {' '.join(str(exc).split())}") from None
    if not override and cfg.model.text_encoder == "tiny-bert":
        text.name = encoder_id  # the recorded id, not the folder it was found in
    return text


def load_pretrained(checkpoint_dir: str | os.PathLike, device: str | torch.device = "cpu",
                    cache_dir: str | os.PathLike | None = None, text_encoder: str | None = None):
    """checkpoint folder (or run folder) -> (cfg, model in eval mode, frozen text encoder), on `device`.

    Args:
        checkpoint_dir: `<out>/checkpoints/step_*` or `<out>` (its newest checkpoint).
        cache_dir: where to look for a 'tiny-bert' build (default: the config's cache dir).
        text_encoder: override the recorded text encoder (a folder); must have the same width and vocabulary.
    """
    from simcrop.models.simcrop import SimCroP

    path = resolve_checkpoint(checkpoint_dir)
    cfg_file = path / "config.json"
    try:
        state, _, saved = load_checkpoint(path, map_location="cpu")
    except CheckpointError as exc:
        raise EvalError(str(exc)) from None
    cfg = config_from_dict(saved, str(cfg_file))
    text = load_text_encoder(cfg, saved.get("text_encoder_id"), cache_dir, text_encoder, str(cfg_file))
    model = SimCroP(cfg.model, text.hidden_size, text.vocab_size, text.word_embeddings)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:300]
        raise EvalError(f"{path / 'model.safetensors'}: weights do not fit the model of its config.json ({first})") from None
    model.eval().requires_grad_(False)
    return cfg, model.to(device), text.to(device)


def checkpoint_fingerprint(path: Path) -> str:
    """Identity of a checkpoint's weights for feature caches: folder, size and mtime of model.safetensors."""
    f = Path(path) / "model.safetensors"
    st = f.stat()
    return json.dumps([str(f.resolve()), st.st_size, st.st_mtime_ns])
