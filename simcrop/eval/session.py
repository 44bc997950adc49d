"""One evaluation's context: a loaded checkpoint, its data folder, the output folder and the feature cache.

    s = EvalSession("runs/tiny", data="", out="")   # the checkpoint's own training data, <run>/eval/<ckpt>
    tasks.run_linear_probe(s, ProbeSettings())

Loading is simcrop.factory's; this module turns its CheckpointError / DataError into EvalError (one line naming
the file) so every task fails the same way.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from simcrop import factory
from simcrop.checkpoint import CheckpointError
from simcrop.data.errors import DataError
from simcrop.eval.errors import EvalError


def load_pretrained(checkpoint_dir: str | os.PathLike, device: str | torch.device = "cpu",
                    cache_dir: str | os.PathLike | None = None, text_encoder: str | None = None):
    """simcrop.factory.load_pretrained -> (cfg, model in eval mode, frozen text encoder), raising EvalError."""
    try:
        return factory.load_pretrained(checkpoint_dir, device, cache_dir, text_encoder)
    except CheckpointError as exc:
        raise EvalError(str(exc)) from None


class EvalSession:
    """A loaded checkpoint + data folder + output folder for one task.

    Args:
        checkpoint: `<out>/checkpoints/step_*` or a run folder (its newest checkpoint).
        data: CT-RATE-layout folder ('' = the checkpoint's training data, else the built-in synthetic dataset).
        out: results folder ('' = <run>/eval/<checkpoint name>).
        device: auto | cpu | cuda | cuda:N.
        cache_dir: tiny-bert builds, synthetic data and the feature cache ('' = the checkpoint config's).
        text_encoder: override the recorded text encoder (a local folder).
        batch_size: volumes per encoder forward.
        feature_cache: reuse pooled features across tasks (keyed by the checkpoint's fingerprint).
    """

    def __init__(self, checkpoint: str | os.PathLike, data: str = "", out: str = "", device: str = "auto",
                 cache_dir: str = "", text_encoder: str = "", batch_size: int = 4, feature_cache: bool = True,
                 log=print):
        self.log = log
        try:
            self.ckpt = factory.resolve_checkpoint(checkpoint)
            self.device = factory.resolve_device(device)
        except CheckpointError as exc:
            raise EvalError(str(exc)) from None
        self.cfg, self.model, self.text = load_pretrained(self.ckpt, self.device, cache_dir or None,
                                                          text_encoder or None)
        self.cache = factory.cache_dir(self.cfg, cache_dir or None)
        try:
            self.root = factory.data_root(self.cfg, data or None, self.cache)
        except DataError as exc:
            raise EvalError(str(exc)) from None
        self.out = Path(out) if out else self.ckpt.parent.parent / "eval" / self.ckpt.name
        self.batch_size = batch_size
        self.feature_cache = self.cache / "eval-features" if feature_cache else None
        self.title = f"{self.ckpt} ({self.cfg.train.preset}, text encoder {self.text.name})"
        log(f"simcrop.eval: checkpoint {self.ckpt} (preset {self.cfg.train.preset}, "
            f"losses {'+'.join(k for k in ('mim', 'mlm', 'align') if getattr(self.cfg.model, 'use_' + k))}), "
            f"data {self.root}, device {self.device}")

    def features(self, items):
        from simcrop.eval.features import volume_features

        return volume_features(self.model, items, self.cfg.model.img_size, self.device, self.batch_size,
                               self.feature_cache, factory.checkpoint_fingerprint(self.ckpt), self.log)

    def write(self, task: str, results: dict, markdown: str):
        from simcrop.eval.report import write_results

        results = {"task": task, "checkpoint": str(self.ckpt), "data": str(self.root), "preset": self.cfg.train.preset,
                   "text_encoder": self.text.name, **results}
        js, md = write_results(self.out, task, results, markdown)
        self.log(f"wrote {js} and {md}")
        return results
