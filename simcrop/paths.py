"""The one cache-folder rule (a leaf: imports nothing from simcrop).

The cache holds the built-in synthetic dataset, tiny-bert builds and evaluation feature caches:
the configured folder, else $SIMCROP_CACHE, else ~/.cache/simcrop.
"""
from __future__ import annotations

import os
from pathlib import Path


def cache_root(configured: str | os.PathLike | None = None) -> Path:
    """`configured` (a config's cache_dir or a --cache-dir) if set, else $SIMCROP_CACHE, else ~/.cache/simcrop."""
    chosen = configured or os.environ.get("SIMCROP_CACHE") or Path.home() / ".cache" / "simcrop"
    return Path(chosen).expanduser()
