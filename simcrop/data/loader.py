"""`make_loader(kind='auto'|'dali'|'torch', ...)`: the training batch stream, logged with what was chosen.

'auto' takes DALI when nvidia-dali imports and the dataset is a prepared folder (PreparedPretrainDataset), else
the torch DataLoader. An explicit kind that cannot run raises LoaderUnavailable (nothing falls back silently).
Both yield the same batches (keys, shapes, dtypes and values; see simcrop/data/dali.py).
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch

from simcrop.data.dali import DaliLoader, has_dali
from simcrop.data.prepared import PreparedPretrainDataset
from simcrop.data.torch_loader import torch_loader

KINDS = ("auto", "dali", "torch")


class LoaderUnavailable(RuntimeError):
    """The requested loader cannot run here (the message says why)."""


def resolve_kind(kind: str, dataset) -> tuple[str, str]:
    """(kind to use, why)."""
    if kind not in KINDS:
        raise LoaderUnavailable(f"loader must be one of {', '.join(KINDS)}, got {kind!r}")
    prepared = isinstance(dataset, PreparedPretrainDataset)
    if kind == "torch":
        return "torch", "requested"
    if kind == "dali":
        if not has_dali():
            raise LoaderUnavailable("--loader dali: nvidia-dali is not installed (pip install nvidia-dali-cuda130)")
        if not prepared:
            raise LoaderUnavailable("--loader dali reads prepared data: run python -m simcrop.prepare and pass "
                                    "the prepared folder as --data")
        return "dali", "requested"
    if not prepared:
        return "torch", "auto: the data is not a prepared folder"
    if not has_dali():
        return "torch", "auto: nvidia-dali is not installed"
    return "dali", "auto: prepared data and nvidia-dali available"


def make_loader(kind: str, dataset, batch_size: int, seed: int, start_batch: int = 0, rank: int = 0,
                world_size: int = 1, num_workers: int = 0, device: str | torch.device = "cpu",
                log: Callable = print, **dali_kwargs) -> Iterator[dict]:
    """An infinite iterator of batches following ResumableBatches(len(dataset), batch_size, seed, start_batch,
    rank, world_size). device: where the DALI pipeline runs (cuda:N -> GPU pipeline, else CPU); the torch
    loader pins memory for CUDA. dali_kwargs: num_threads, chunk_batches, prefetch."""
    device = torch.device(device)
    chosen, why = resolve_kind(kind, dataset)
    if chosen == "dali":
        device_id = (device.index or 0) if device.type == "cuda" else None
        loader = DaliLoader(dataset, batch_size, seed, start_batch, rank, world_size, device_id=device_id,
                            **dali_kwargs)
        where = f"GPU pipeline on cuda:{device_id}" if device_id is not None else "CPU pipeline"
        log(f"data loader: dali ({where}, {loader.num_threads} threads; {why})")
        return iter(loader)
    log(f"data loader: torch (DataLoader, {num_workers} worker(s); {why})")
    return torch_loader(dataset, batch_size, seed, start_batch, rank, world_size, num_workers,
                        pin_memory=device.type == "cuda")
