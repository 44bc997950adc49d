"""Pre-training samples of CT-RATE-layout data (augmented volume + tokenised report + MAE and MLM masks, one per
(index, epoch)), and the resumable batch order.

The sample itself is made by simcrop.data.sample.SampleBuilder, the one builder `PreparedPretrainDataset` uses
too: every random choice (crop, flips, shift, MAE noise, MLM mask) comes from a generator seeded by
(seed, epoch, index), so a sample is the same whichever worker, rank or resumed run draws it. The batch
order comes from ResumableBatches, a function of (seed, epoch) that can start at any micro-batch.
SampleSpec and sample_generator live in simcrop.data.sample and are re-exported here.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch.utils.data import Dataset

from simcrop.data.augment import check_fits
from simcrop.data.ctrate import CTRateItem, load_hu, volume_shape
from simcrop.data.errors import DataError
from simcrop.data.sample import SampleBuilder, SampleSpec, sample_generator, tokenize_text

__all__ = ["PretrainDataset", "ResumableBatches", "SampleSpec", "sample_generator"]


class PretrainDataset(Dataset):
    """Items of CT-RATE layout -> training samples; indexed by (index, epoch) pairs.

    Reports are tokenised and every volume header is checked at construction, so bad input fails before
    training starts, with the file and the problem named.
    """

    def __init__(self, items: Sequence[CTRateItem], tokenizer, spec: SampleSpec, train: bool = True,
                 reports_csv: str = "reports CSV"):
        self.items, self.tokenizer, self.spec, self.train = list(items), tokenizer, spec, train
        self.builder = SampleBuilder(tokenizer, spec)
        self.texts = []  # per item: the unmasked text tensors (simcrop.data.sample.tokenize_text)
        for item in self.items:
            try:
                self.texts.append(tokenize_text(tokenizer, item.findings, item.impression, spec))
            except ValueError as exc:
                raise DataError(f"{reports_csv}: {item.name}: {exc}") from None
            reason = check_fits(volume_shape(item), spec.img_size)
            if reason:
                raise DataError(f"{item.path}: shape does not fit the preset: {reason}")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        """(index, epoch) -> the sample (keys and shapes: simcrop.data.sample)."""
        index, epoch = key
        return self.builder(load_hu(self.items[index]), self.texts[index], index, epoch, self.train)


class ResumableBatches:
    """Infinite batch sampler; yields lists of (index, epoch).

    Epoch e visits a permutation seeded by (seed, e) in GLOBAL batches of batch_size x world_size volumes
    (drop_last); rank r takes slice r of each global batch, so the world together sees exactly what one process
    with batch_size x world_size would. start_batch skips that many micro-batches of this rank (exact resume).
    """

    def __init__(self, n: int, batch_size: int, seed: int, start_batch: int = 0, rank: int = 0, world_size: int = 1):
        if n < batch_size * world_size:
            raise DataError(f"dataset has {n} volumes, fewer than the global batch {batch_size} x {world_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start_batch, self.rank, self.world_size = start_batch, rank, world_size
        self.per_epoch = n // (batch_size * world_size)  # global batches per epoch

    def batch(self, g: int) -> list[tuple[int, int]]:
        """Rank-batch number g = global_batch * world_size + rank -> its (index, epoch) list."""
        global_batch, rank = divmod(g, self.world_size)
        epoch, j = divmod(global_batch, self.per_epoch)
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
        start = (j * self.world_size + rank) * self.batch_size
        return [(int(i), epoch) for i in perm[start : start + self.batch_size]]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        b = self.start_batch
        while True:
            yield self.batch(b * self.world_size + self.rank)
            b += 1
