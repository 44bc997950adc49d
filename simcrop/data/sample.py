"""One pre-training sample from an HU volume and its report: the single builder every dataset uses.

    (HU volume [X, Y, Z], text tensors, index, epoch) -> {volume [1, X, Y, Z], mask_noise [N], findings_ids,
    findings_mask, sentence_ids [Lf], report_ids (with [MASK]s), report_mask, mlm_labels [Lr], index []
    (+ findings_feats [Lf, H] when the text tensors carry cached features)}

Every random choice comes from one generator seeded by (seed, epoch, index), drawn in a fixed order: the volume's
crop / flips / shift (simcrop.data.augment), then the MAE noise, then the MLM mask. So a sample is the same
whichever dataset, loader (torch or DALI, which draws the volume's part itself), worker, rank or resumed run makes
it. `PretrainDataset` (CT-RATE layout) and `PreparedPretrainDataset` (prepared folder, optionally with cached
tokens + features) differ only in where the HU volume and the text tensors come from.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from simcrop.config import Config
from simcrop.data.augment import AugmentConfig, center_crop_pad, hu_to_unit, random_augment
from simcrop.data.errors import DataError
from simcrop.data.text import mask_report_tokens, tokenize_findings, tokenize_report
from simcrop.ops.reference import patch_grid

#: Keys of the text tensors a sample is built from (`tokenize_text`, or a cache giving the same).
TEXT_KEYS = ("findings_ids", "findings_mask", "sentence_ids", "report_ids", "report_mask")


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


def tokenize_text(tokenizer, findings: str, impression: str | None, spec: SampleSpec) -> dict[str, torch.Tensor]:
    """A report -> its unmasked text tensors: findings_ids, findings_mask (bool), sentence_ids [Lf] (0 = special /
    pad); report_ids, report_mask (bool) [Lr] ([CLS] findings impression [SEP]). Raises ValueError (the caller
    names the file) for empty findings or findings with no sentence that fits."""
    f = tokenize_findings(tokenizer, findings, spec.findings_max_len, spec.max_sentences)
    r = tokenize_report(tokenizer, findings, impression, spec.report_max_len)
    return {
        "findings_ids": f["input_ids"],  # [Lf]
        "findings_mask": f["attention_mask"].bool(),
        "sentence_ids": f["sentence_ids"],  # [Lf]
        "report_ids": r["input_ids"],  # [Lr]
        "report_mask": r["attention_mask"].bool(),
    }


class SampleBuilder:
    """Builds pre-training samples for one (tokenizer, spec); holds only what the draws need (pickles small).

    Args:
        tokenizer: the text encoder's tokenizer (its special ids are never masked; it must have a [MASK] token).
        spec: the sample settings (sizes, MLM ratio, augmentation, seed).
    """

    def __init__(self, tokenizer, spec: SampleSpec):
        self.spec = spec
        self.num_patches = int(np.prod(patch_grid(spec.img_size, spec.patch_size)))
        self.special_ids = list(tokenizer.all_special_ids)
        self.mask_token_id = tokenizer.mask_token_id
        if self.mask_token_id is None:
            raise DataError(f"text tokenizer {getattr(tokenizer, 'name_or_path', '?')} has no [MASK] token")

    def generator(self, index: int, epoch: int) -> torch.Generator:
        """The sample's generator, seeded by (spec.seed, epoch, index)."""
        return sample_generator(self.spec.seed, epoch, index)

    def volume(self, hu: torch.Tensor | np.ndarray, gen: torch.Generator, train: bool) -> torch.Tensor:
        """HU [X, Y, Z] (any real dtype) -> [1, *img_size] float32 in [-1, 1] (+ shift): random crop / flips /
        shift drawn from gen when train, else centre crop + reflect pad (no draws)."""
        x = hu_to_unit(torch.as_tensor(hu))  # [X, Y, Z] in [-1, 1]
        s = self.spec
        x = random_augment(x, s.augment, gen) if train else center_crop_pad(x, s.img_size)
        return x[None]  # [1, X, Y, Z]

    def text(self, text: dict[str, torch.Tensor], index: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """Everything but the volume: MAE noise, then the MLM mask, drawn from gen (after the volume's draws).

        text: the TEXT_KEYS tensors (`tokenize_text` or a cache of them), plus findings_feats [Lf, H] when cached.
        """
        s = self.spec
        noise = torch.rand(self.num_patches, generator=gen)  # [N] MAE noise
        masked_ids, labels = mask_report_tokens(
            text["report_ids"][None], text["report_mask"][None].long(), self.special_ids, self.mask_token_id,
            s.mlm_ratio, gen, s.mlm_loss_on,
        )  # [1, Lr] each
        out = {
            "mask_noise": noise,
            "findings_ids": text["findings_ids"],  # [Lf]
            "findings_mask": text["findings_mask"],
            "sentence_ids": text["sentence_ids"],  # [Lf], 0 = special/pad
            "report_ids": masked_ids[0],  # [Lr] with [MASK]s
            "report_mask": text["report_mask"],
            "mlm_labels": labels[0],  # [Lr], -100 = not counted
            "index": torch.tensor(index),
        }
        if "findings_feats" in text:
            out["findings_feats"] = text["findings_feats"]  # [Lf, H]
        return out

    def __call__(self, hu: torch.Tensor | np.ndarray, text: dict[str, torch.Tensor], index: int, epoch: int,
                 train: bool) -> dict[str, torch.Tensor]:
        """HU volume [X, Y, Z] + text tensors -> the sample of (index, epoch) (keys: see the module docstring)."""
        gen = self.generator(index, epoch)
        volume = self.volume(hu, gen, train)  # [1, X, Y, Z]; its draws come first
        return {"volume": volume, **self.text(text, index, gen)}
