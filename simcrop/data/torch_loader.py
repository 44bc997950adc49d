"""The torch loader: a DataLoader over a dataset indexed by (index, epoch) — `PretrainDataset` (raw CT-RATE
layout) or `PreparedPretrainDataset` (prepared folder) — with `ResumableBatches` as its batch sampler.

The volume path is `simcrop.data.augment` (hu_to_unit, random_augment / center_crop_pad) inside the dataset;
nothing here changes a sample, so its outputs are the reference the DALI loader must reproduce exactly.
Batches: volume [B, 1, X, Y, Z] float32, mask_noise [B, N], findings_ids / findings_mask / sentence_ids [B, Lf],
report_ids / report_mask / mlm_labels [B, Lr], index [B] (+ findings_feats [B, Lf, H] from cached features).
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from simcrop.data.pretrain import ResumableBatches


def torch_loader(dataset: Dataset, batch_size: int, seed: int, start_batch: int = 0, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, pin_memory: bool = False) -> Iterator[dict]:
    """Infinite iterator of collated batches; start_batch skips that many of this rank's batches (resume)."""
    sampler = ResumableBatches(len(dataset), batch_size, seed, start_batch=start_batch, rank=rank,
                               world_size=world_size)
    loader = DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),  # keeps the global RNG (dropout) untouched
    )
    return iter(loader)
