"""The factory: the one place that turns a config or a checkpoint folder into a device, a data root, a frozen
text tower and a SimCroP model (open_clip's `create_model_and_transforms` plays this part there).

Training (`simcrop.pretraining`), evaluation (`simcrop.eval`), the experiments and the public loading API all
call it; it imports the data and model layers, never an entry point.

    cfg = make_config("tiny")
    root = data_root(cfg)                        # --data, a prepared folder, or the built-in synthetic set
    text = build_text_encoder(cfg, root)         # frozen; tiny-bert is built from root's training reports
    model = build_model(cfg, text)
    cfg, model, text = load_pretrained(run_dir)  # a checkpoint (or run) folder -> the same three, eval mode

Checkpoint folders: `<out>/checkpoints/step_*` (model.safetensors + train_state.pt + config.json, see
simcrop.checkpoint) or a run folder `<out>` (its newest checkpoint). config.json holds the full config dict
(model / data / train groups) and `text_encoder_id`, the stable name of the frozen text tower
(simcrop.models.text.text_encoder_id):
- 'minilm' -> the packaged all-MiniLM-L6-v2;
- 'tiny-bert' -> the id is the cached build's folder name `tiny-bert-<hash>`, looked up in the cache folder;
- a local folder or a hub name already in the local Hugging Face cache -> loaded as such, offline.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from simcrop.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from simcrop.config import PRESETS, Config, ConfigError, make_config
from simcrop.paths import cache_root


# -- device, seeds, folders ---------------------------------------------------------------------------------------
def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu; an explicit cuda device without CUDA is a ConfigError."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine")
    return device


def seed_everything(seed: int) -> None:
    np.random.seed(seed)
    torch.manual_seed(seed)


def cache_dir(cfg: Config, override: str | os.PathLike | None = None) -> Path:
    """The cache folder of a config (simcrop.paths.cache_root); `override` (a --cache-dir) wins."""
    return cache_root(override or cfg.data.cache_dir)


def data_root(cfg: Config, data: str | os.PathLike | None = None, cache: str | os.PathLike | None = None) -> Path:
    """The data folder: `data` if given, else the config's --data, else the built-in synthetic dataset of the
    config's synthetic_variant in the cache folder (generated on first use). A given folder must be prepared (simcrop.prepare) or in CT-RATE's
    layout: DataError naming it otherwise."""
    from simcrop.data.ctrate import dataset_dir
    from simcrop.data.prepared import is_prepared

    chosen = data or cfg.data.data
    if chosen:
        if not is_prepared(chosen):
            dataset_dir(chosen)  # fails early with a clear message
        return Path(chosen)
    from simcrop.data.synthetic import ensure_default_dataset

    return ensure_default_dataset(cache_dir(cfg, cache), n=cfg.data.synthetic_n, variant=cfg.data.synthetic_variant)


def report_corpus(root: Path, split: str = "train") -> list[str]:
    """Report texts (findings + impression) of a split, which a 'tiny-bert' tokenizer is trained on."""
    from simcrop.data.ctrate import read_split
    from simcrop.data.prepared import is_prepared, prepared_corpus

    if is_prepared(root):
        return prepared_corpus(root, split)
    return [f"{it.findings} {it.impression}".strip() for it in read_split(root, split)]


# -- building ------------------------------------------------------------------------------------------------------
def build_text_encoder(cfg: Config, root: Path | None):
    """The frozen text tower of a config; 'tiny-bert' is built (cached) from root's training reports."""
    from simcrop.models.text import FrozenTextEncoder

    corpus = report_corpus(root) if (cfg.model.text_encoder == "tiny-bert" and root is not None) else None
    return FrozenTextEncoder(cfg.model.text_encoder, cache_dir=cache_dir(cfg), corpus=corpus,
                             trust_remote_code=cfg.model.trust_remote_code)


def build_model(cfg: Config, text) -> torch.nn.Module:
    """A freshly initialised SimCroP for a config and its frozen text tower (width, vocabulary, embeddings)."""
    from simcrop.models.simcrop import SimCroP

    return SimCroP(cfg.model, text.hidden_size, text.vocab_size, text.word_embeddings)


# -- loading -------------------------------------------------------------------------------------------------------
def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder (holding model.safetensors) or a run folder (its newest checkpoint)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"{p}: checkpoint not found")
    if (p / "model.safetensors").is_file():
        return p
    if p.is_dir():
        latest = latest_checkpoint(p)
        if latest is not None:
            return latest
    raise CheckpointError(f"{p}: not a checkpoint folder (no model.safetensors) nor a run folder with checkpoints/")


def config_from_dict(saved: dict, source: str = "config.json") -> Config:
    """The Config a checkpoint was trained with; CheckpointError for an unknown preset or unknown fields."""
    if not isinstance(saved, dict) or not all(isinstance(saved.get(g), dict) for g in ("model", "data", "train")):
        raise CheckpointError(f"{source}: not a simcrop config (needs 'model', 'data' and 'train' groups)")
    preset = saved["train"].get("preset")
    if preset not in PRESETS:
        raise CheckpointError(f"{source}: checkpoint of unknown preset {preset!r} "
                              f"(this simcrop knows: {', '.join(PRESETS)})")
    base = make_config(preset)
    overrides = {}
    for group in ("model", "data", "train"):
        known = getattr(base, group)
        for key, value in saved[group].items():
            if key == "preset":
                continue
            if not hasattr(known, key):
                raise CheckpointError(f"{source}: unknown config field {group}.{key} "
                                      f"(checkpoint from another simcrop version?)")
            current = getattr(known, key)
            overrides[key] = tuple(value) if isinstance(current, tuple) and isinstance(value, list) else value
    try:
        return make_config(preset, **overrides)
    except ConfigError as exc:
        raise CheckpointError(f"{source}: invalid config ({exc})") from None


def load_text_encoder(cfg: Config, encoder_id: str | None, cache: str | os.PathLike | None = None,
                      override: str | None = None, source: str = "config.json"):
    """The frozen text tower a checkpoint was trained with (see the module docstring for the name resolution)."""
    from transformers.utils import logging as hf_logging

    from simcrop.models.text import FrozenTextEncoder

    hf_logging.disable_progress_bar()  # no "Loading weights" bars in evaluation logs
    folder_root = cache_dir(cfg, cache)
    name = override or cfg.model.text_encoder
    if not override and name == "tiny-bert":
        if not encoder_id or not str(encoder_id).startswith("tiny-bert-"):
            raise CheckpointError(f"{source}: text encoder 'tiny-bert' without its recorded build (text_encoder_id)")
        folder = folder_root / encoder_id
        if not (folder / "config.json").is_file():
            raise CheckpointError(
                f"{source}: the checkpoint's text encoder {encoder_id} is not in {folder_root}; pass --cache-dir "
                f"(the folder simcrop's trainer built it in) or --text-encoder <its folder>"
            )
        name = str(folder)
    try:
        text = FrozenTextEncoder(name, cache_dir=folder_root, trust_remote_code=cfg.model.trust_remote_code)
    except (FileNotFoundError, ValueError, OSError, RuntimeError) as exc:
        raise CheckpointError(f"{source}: cannot load text encoder {name!r}: {' '.join(str(exc).split())}") from None
    if not override and cfg.model.text_encoder == "tiny-bert":
        text.name = encoder_id  # the recorded id, not the folder it was found in
    return text


def load_pretrained(checkpoint_dir: str | os.PathLike, device: str | torch.device = "cpu",
                    cache: str | os.PathLike | None = None, text_encoder: str | None = None):
    """checkpoint folder (or run folder) -> (cfg, model in eval mode, frozen text encoder), on `device`.

    Args:
        checkpoint_dir: `<out>/checkpoints/step_*` or `<out>` (its newest checkpoint).
        cache: where to look for a 'tiny-bert' build (default: the config's cache folder).
        text_encoder: override the recorded text encoder (a folder); must have the same width and vocabulary.
    Raises CheckpointError (one line naming the file) for anything that does not fit.
    """
    path = resolve_checkpoint(checkpoint_dir)
    cfg_file = path / "config.json"
    state, _, saved = load_checkpoint(path, map_location="cpu")
    cfg = config_from_dict(saved, str(cfg_file))
    text = load_text_encoder(cfg, saved.get("text_encoder_id"), cache, text_encoder, str(cfg_file))
    model = build_model(cfg, text)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:300]
        raise CheckpointError(f"{path / 'model.safetensors'}: weights do not fit the model of its config.json "
                              f"({first})") from None
    model.eval().requires_grad_(False)
    return cfg, model.to(resolve_device(device)), text.to(resolve_device(device))


def checkpoint_fingerprint(path: Path) -> str:
    """Identity of a checkpoint's weights for feature caches: folder, size and mtime of model.safetensors."""
    f = Path(path) / "model.safetensors"
    st = f.stat()
    return json.dumps([str(f.resolve()), st.st_size, st.st_mtime_ns])
