"""Pre-training samples: augmented volume + tokenised report + MAE and MLM masks, one per (index, epoch).

Every random choice of a sample (crop, flips, shift, MAE noise, MLM mask) comes from a generator seeded by
(seed, epoch, index), so a sample is the same whichever worker, rank or resumed run draws it. The batch
order comes from ResumableBatches, a function of (seed, epoch) that can start at any micro-batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from simcrop.config import Config
from simcrop.data.augment import AugmentConfig, center_crop_pad, check_fits, hu_to_unit, random_augment
from simcrop.data.ctrate import CTRateItem, DataError, load_hu, volume_shape
from simcrop.data.text import mask_report_tokens, tokenize_findings, tokenize_report
from simcrop.ops.reference import patch_grid


def sample_generator(seed: int, epoch: int, index: int, stream: int = 0) -> torch.Generator:
    """A torch.Generator that depends only on (seed, epoch, index, stream)."""
    state = np.random.SeedSequence([seed, epoch, index, stream]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


@dataclass(frozen=True)
class SampleSpec:
    """What a sample needs from the config (kept small so worker processes pickle little)."""

    img_size: tuple[int, int, int]
    patch_size: tuple[int, int, int]
    findings_max_len: int
    report_max_len: int
    max_sentences: int
    mlm_ratio: float
    mlm_loss_on: str
    augment: AugmentConfig
    seed: int

    @staticmethod
    def from_config(cfg: Config) -> "SampleSpec":
        m, d = cfg.model, cfg.data
        return SampleSpec(
            m.img_size, m.patch_size, m.findings_max_len, m.report_max_len, m.max_sentences, m.mlm_ratio,
            m.mlm_loss_on,
            AugmentConfig(m.img_size, d.crop_scale_min, d.flip_prob, d.shift_prob, d.shift_max),
            cfg.train.seed,
        )


class PretrainDataset(Dataset):
    """Items of CT-RATE layout -> training samples; indexed by (index, epoch) pairs.

    Reports are tokenised and every volume header is checked at construction, so bad input fails before
    training starts, with the file and the problem named.
    """

    def __init__(self, items: Sequence[CTRateItem], tokenizer, spec: SampleSpec, train: bool = True,
                 reports_csv: str = "reports CSV"):
        self.items, self.tokenizer, self.spec, self.train = list(items), tokenizer, spec, train
        self.num_patches = int(np.prod(patch_grid(spec.img_size, spec.patch_size)))
        self.special_ids = list(tokenizer.all_special_ids)
        self.mask_token_id = tokenizer.mask_token_id
        if self.mask_token_id is None:
            raise DataError(f"text tokenizer {getattr(tokenizer, 'name_or_path', '?')} has no [MASK] token")
        self.findings, self.reports = [], []
        for item in self.items:
            try:
                self.findings.append(tokenize_findings(tokenizer, item.findings, spec.findings_max_len,
                                                       spec.max_sentences))
                self.reports.append(tokenize_report(tokenizer, item.findings, item.impression, spec.report_max_len))
            except ValueError as exc:
                raise DataError(f"{reports_csv}: {item.name}: {exc}") from None
            reason = check_fits(volume_shape(item), spec.img_size)
            if reason:
                raise DataError(f"{item.path}: shape does not fit the preset: {reason}")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        index, epoch = key
        item, spec = self.items[index], self.spec
        gen = sample_generator(spec.seed, epoch, index)
        x = hu_to_unit(torch.from_numpy(load_hu(item)))  # [X, Y, Z] in [-1, 1]
        x = random_augment(x, spec.augment, gen) if self.train else center_crop_pad(x, spec.img_size)
        noise = torch.rand(self.num_patches, generator=gen)  # [N] MAE noise
        rep = self.reports[index]
        masked_ids, labels = mask_report_tokens(
            rep["input_ids"][None], rep["attention_mask"][None], self.special_ids, self.mask_token_id,
            spec.mlm_ratio, gen, spec.mlm_loss_on,
        )  # [1, Lr] each
        fnd = self.findings[index]
        return {
            "volume": x[None],  # [1, X, Y, Z]
            "mask_noise": noise,
            "findings_ids": fnd["input_ids"],  # [Lf]
            "findings_mask": fnd["attention_mask"].bool(),
            "sentence_ids": fnd["sentence_ids"],  # [Lf], 0 = special/pad
            "report_ids": masked_ids[0],  # [Lr] with [MASK]s
            "report_mask": rep["attention_mask"].bool(),
            "mlm_labels": labels[0],  # [Lr], -100 = not counted
            "index": torch.tensor(index),
        }


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
