"""The MIM step's inputs, shared by bench_patchify.py (masked_patchify) and bench_masked_mse.py (masked_mse).

Shapes: tiny (B=4, 1x64x64x32) and the paper's (B=14, 1x224x224x112), patch 16x16x8, mask ratio 0.75.
Not a benchmark itself (pytest collects test_*.py and bench_*.py only).
"""
from __future__ import annotations

import math

import torch

from simcrop.ops import reference as R

PATCH = (16, 16, 8)
RATIO = 0.75
SHAPES = {"tiny": (4, 1, 64, 64, 32), "paper": (14, 1, 224, 224, 112)}
ROUNDS = {"tiny": 20, "paper": 5}  # timed rounds per size
PROVIDERS = ["reference", "compiled", "extension"]

_cache: dict = {}


def mim_inputs(size: str, device: str):
    """Volume x [B, 1, X, Y, Z] in [-1, 1], noise [B, N], prediction [B, N, P], mask [B, N] (1 = hidden), N_keep.
    Cached one case at a time: the paper's shape is ~0.3 GB per tensor."""
    key = (size, device)
    if key not in _cache:
        _cache.clear()
        gen = torch.Generator().manual_seed(0)
        shape = SHAPES[size]
        B, N, P = shape[0], math.prod(s // p for s, p in zip(shape[2:], PATCH)), math.prod(PATCH) * shape[1]
        x = (torch.rand(shape, generator=gen) * 2 - 1).to(device)
        noise = torch.rand(B, N, generator=gen).to(device)
        pred = torch.randn(B, N, P, generator=gen).to(device)
        _, mask, _ = R.random_masking(noise, R.num_visible(N, RATIO))
        _cache[key] = (x, noise, pred, mask, R.num_visible(N, RATIO))
    return _cache[key]
