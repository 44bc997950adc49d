"""The cached built-in datasets: one folder per variant, generator version and parameters, generated on first use.

``ensure_default_dataset()`` gives the realistic phantoms (``synthetic-v1-n320-s0-80x80x40``),
``ensure_testbed_dataset()`` the grounding testbed (``testbed-v1-n1280-s0-72x72x36``); both live in the one
cache folder (``simcrop.paths.cache_root``).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Sequence

from simcrop.data.synthetic.writer import GENERATOR_VERSION, variant_defaults, write_dataset
from simcrop.paths import cache_root


def dataset_dirname(n: int | None = None, seed: int = 0, shape: Sequence[int] | None = None,
                    spacing: Sequence[float] | None = None, val_fraction: float | None = None,
                    variant: str = "default") -> str:
    """<prefix>-v<version>-n<n>-s<seed>-<X>x<Y>x<Z>[-sp<sx>x<sy>x<sz>][-vf<f>] (suffixes only when they differ from
    the variant's defaults); prefix 'synthetic' (the realistic phantoms) or 'testbed'. None = the variant's
    default."""
    d = variant_defaults(variant)
    n = d["n"] if n is None else n
    shape = d["shape"] if shape is None else shape
    spacing = d["spacing"] if spacing is None else spacing
    val_fraction = d["val_fraction"] if val_fraction is None else val_fraction
    if variant == "default":
        prefix, version = "synthetic", GENERATOR_VERSION
    else:
        from simcrop.data.synthetic.testbed import TESTBED_VERSION

        prefix, version = variant, TESTBED_VERSION
    name = f"{prefix}-v{version}-n{n}-s{seed}-" + "x".join(str(int(s)) for s in shape)
    if tuple(float(s) for s in spacing) != tuple(float(s) for s in d["spacing"]):
        name += "-sp" + "x".join(f"{float(s):g}" for s in spacing)
    if float(val_fraction) != float(d["val_fraction"]):
        name += f"-vf{float(val_fraction):g}"
    return name


def ensure_default_dataset(
    cache_dir: str | os.PathLike | None = None,
    n: int | None = None,
    seed: int = 0,
    shape: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    val_fraction: float | None = None,
    verbose: bool = False,
    variant: str = "default",
) -> Path:
    """Path of the cached synthetic dataset of `variant` ('default': the realistic phantoms, 'testbed': the
    grounding testbed), generating it (atomically) on first use. None = the variant's default."""
    d = variant_defaults(variant)
    n = d["n"] if n is None else n
    shape = tuple(d["shape"] if shape is None else shape)
    spacing = tuple(d["spacing"] if spacing is None else spacing)
    val_fraction = d["val_fraction"] if val_fraction is None else val_fraction
    root = cache_root(cache_dir)  # the one cache-folder rule
    name = dataset_dirname(n, seed, shape, spacing, val_fraction, variant)
    out = root / name
    if (out / "SYNTHETIC_INFO.json").is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    # Remove leftovers of killed generations (older than an hour, so a concurrent writer is never disturbed).
    for stale in root.glob(f"{name}.tmp-*"):
        try:
            if time.time() - stale.stat().st_mtime > 3600:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass
    try:
        write_dataset(out, n, seed, val_fraction, shape, spacing, verbose=verbose, variant=variant)
    except FileExistsError:
        if (out / "SYNTHETIC_INFO.json").is_file():  # another process finished first
            return out
        raise
    return out


def ensure_testbed_dataset(
    cache_dir: str | os.PathLike | None = None,
    n: int | None = None,
    seed: int = 0,
    shape: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    val_fraction: float | None = None,
    verbose: bool = False,
) -> Path:
    """The cached grounding testbed (simcrop.data.synthetic.testbed; default 1280 cases = 768 train + 512
    valid), generated on first use: ensure_default_dataset(..., variant='testbed')."""
    return ensure_default_dataset(cache_dir, n, seed, shape, spacing, val_fraction, verbose, variant="testbed")
