"""SimCroP's volume augmentation in plain torch (the reference semantics the DALI pipeline must match).

Training: HU [-1000, 1000] -> [-1, 1] with clipping; random scaled crop (each side scale ~ U[scale_min, 1]);
random crop to the preset size; reflect pad where smaller; random flip on each axis with p; random intensity
shift (+U[-shift_max, shift_max]) with p. Evaluation: centre crop + reflect pad. Volumes are [X, Y, Z].
All randomness comes from the given torch.Generator, so a sample's augmentation is a function of its seed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

HU_MIN, HU_MAX = -1000.0, 1000.0


@dataclass(frozen=True)
class AugmentConfig:
    size: tuple[int, int, int]
    scale_min: float = 0.8
    flip_prob: float = 0.2
    shift_prob: float = 0.1
    shift_max: float = 0.1


def hu_to_unit(hu: torch.Tensor) -> torch.Tensor:
    """HU -> [-1, 1] float32: clip to [-1000, 1000], then divide by 1000."""
    return (hu.float().clamp(HU_MIN, HU_MAX) - (HU_MIN + HU_MAX) / 2) / ((HU_MAX - HU_MIN) / 2)


def check_fits(shape: tuple[int, ...], size: tuple[int, int, int]) -> str | None:
    """None when a [X, Y, Z] volume can be cropped/reflect-padded to `size`, else the reason.

    Reflect padding needs every side larger than the pad it receives, i.e. side > size / 2 (after the scaled
    crop, whose smallest side is scale_min x side; checked on the full side here, and padded again later).
    """
    if len(shape) != 3:
        return f"expected a 3D volume, got shape {tuple(shape)}"
    for axis, (n, want) in enumerate(zip(shape, size)):
        if 2 * n <= want:
            return (
                f"side {'xyz'[axis]} has {n} voxels, too small for the {tuple(size)} crop "
                f"(needs more than {want // 2} to reflect-pad)"
            )
    return None


def _randint(hi: int, gen: torch.Generator) -> int:
    """Uniform integer in [0, hi] (inclusive)."""
    return int(torch.randint(0, hi + 1, (1,), generator=gen).item())


def _uniform(lo: float, hi: float, gen: torch.Generator) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen).item())


def pad_to(x: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """[X, Y, Z] -> at least `size` on every side, reflect-padded symmetrically (extra voxel at the end)."""
    pads = []
    for n, want in zip(reversed(x.shape), reversed(size)):  # F.pad lists the last axis first
        total = max(want - n, 0)
        pads += [total // 2, total - total // 2]
    if not any(pads):
        return x
    # reflect needs pad < side on every axis: pad in rounds when the volume is much smaller
    while any(pads):
        step = []
        for (lo, hi), n in zip(zip(pads[::2], pads[1::2]), reversed(x.shape)):
            step += [min(lo, n - 1), min(hi, n - 1)]
        x = F.pad(x[None, None], step, mode="reflect")[0, 0]
        pads = [p - s for p, s in zip(pads, step)]
    return x


def crop(x: torch.Tensor, start: tuple[int, int, int], size: tuple[int, int, int]) -> torch.Tensor:
    (sx, sy, sz), (nx, ny, nz) = start, size
    return x[sx : sx + nx, sy : sy + ny, sz : sz + nz]


def center_crop_pad(x: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """Evaluation transform of a [X, Y, Z] volume: centre crop where larger, reflect pad where smaller."""
    start = tuple(max(n - want, 0) // 2 for n, want in zip(x.shape, size))
    x = crop(x, start, tuple(min(n, want) for n, want in zip(x.shape, size)))
    return pad_to(x, size)


def random_augment(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """Training transform of a [-1, 1] volume [X, Y, Z] -> [*cfg.size] (float32), driven by `gen`."""
    # random scaled crop: each side keeps a fraction U[scale_min, 1] at a random position
    scaled = tuple(max(1, int(round(n * _uniform(cfg.scale_min, 1.0, gen)))) for n in x.shape)
    x = crop(x, tuple(_randint(n - m, gen) for n, m in zip(x.shape, scaled)), scaled)
    # random crop to the preset size (where larger), then pad (where smaller)
    size = tuple(min(n, want) for n, want in zip(x.shape, cfg.size))
    x = crop(x, tuple(_randint(n - m, gen) for n, m in zip(x.shape, size)), size)
    x = pad_to(x, cfg.size)
    flips = [axis for axis in range(3) if float(torch.rand((), generator=gen)) < cfg.flip_prob]
    if flips:
        x = torch.flip(x, flips)
    if float(torch.rand((), generator=gen)) < cfg.shift_prob:
        x = x + _uniform(-cfg.shift_max, cfg.shift_max, gen)
    return x.contiguous()
