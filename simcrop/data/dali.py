"""NVIDIA DALI loader for prepared data: the volume work (read the crop region, HU -> [-1, 1], reflect pad, flips,
intensity shift) runs in a DALI pipeline; order, sharding and every random draw are those of the torch path.

Design (docs/data.md):
- Sample order = `ResumableBatches` (seed, epoch permutation, rank / world_size, exact resume at any batch). A
  pipeline serves a chunk of `chunk_batches` batches: its `fn.readers.numpy` gets the chunk's file list of ALL
  ranks (rank-major) and reads shard `rank` of `world_size` (shard_id / num_shards) in order, without shuffling.
- Per sample, the crop window, pads, flips and shift are drawn in Python from the sample's generator
  (seed, epoch, index) with the same draws as `augment.random_augment` (see `augment_params`), and fed through
  `fn.external_source` as the reader's ROI (roi_start / roi_shape: only the window is read) and the ops'
  arguments. So DALI and the torch loader give IDENTICAL tensors, with or without augmentation.
- Reflect padding: DALI's pad/slice only fill constants, so it is built from slices, flips and concatenation
  (the same rounds as `augment.pad_to`).
- Text (tokens, MLM mask, MAE noise, cached findings features) is paired by index on the Python side
  (`PreparedPretrainDataset.text_sample`, same generator after the volume's draws).
CPU pipeline: device_id=None (works without a GPU); GPU pipeline: reader device 'gpu' (GPUDirect Storage when
available, else DALI's own staging) and all volume ops on the GPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from simcrop.data.augment import AugmentConfig
from simcrop.data.pretrain import ResumableBatches, sample_generator


def has_dali() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------------------------------------
# the per-sample plan: the draws of augment.random_augment / the geometry of augment.center_crop_pad
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class CropPlan:
    start: tuple[int, int, int]  # first voxel of the window read from the volume
    window: tuple[int, int, int]  # voxels read per axis (<= the crop size)
    rounds: list[tuple[tuple[int, int], ...]]  # reflect-pad rounds: per round, (lo, hi) per axis
    flips: tuple[int, int, int] = (0, 0, 0)
    shift: float = 0.0


def _randint(hi: int, gen: torch.Generator) -> int:  # == augment._randint
    return int(torch.randint(0, hi + 1, (1,), generator=gen).item())


def _uniform(lo: float, hi: float, gen: torch.Generator) -> float:  # == augment._uniform
    return lo + (hi - lo) * float(torch.rand((), generator=gen).item())


def pad_rounds(window, size) -> list[tuple[tuple[int, int], ...]]:
    """The reflect-pad rounds of augment.pad_to for a window -> size (each round pads < the current side)."""
    pads = [[(want - n) // 2 if want > n else 0, (want - n) - (want - n) // 2 if want > n else 0]
            for n, want in zip(window, size)]
    n = list(window)
    rounds = []
    while any(lo or hi for lo, hi in pads):
        step = tuple((min(lo, m - 1), min(hi, m - 1)) for (lo, hi), m in zip(pads, n))
        rounds.append(step)
        for a, (lo, hi) in enumerate(step):
            pads[a][0] -= lo
            pads[a][1] -= hi
            n[a] += lo + hi
    return rounds


def augment_params(shape, cfg: AugmentConfig, gen: torch.Generator) -> CropPlan:
    """The random draws of augment.random_augment for a volume of `shape`, in the same order from `gen`."""
    scaled = tuple(max(1, int(round(n * _uniform(cfg.scale_min, 1.0, gen)))) for n in shape)
    start1 = tuple(_randint(n - m, gen) for n, m in zip(shape, scaled))
    window = tuple(min(n, want) for n, want in zip(scaled, cfg.size))
    start2 = tuple(_randint(n - m, gen) for n, m in zip(scaled, window))
    flips = tuple(int(float(torch.rand((), generator=gen)) < cfg.flip_prob) for _ in range(3))
    shift = _uniform(-cfg.shift_max, cfg.shift_max, gen) if float(torch.rand((), generator=gen)) < cfg.shift_prob else 0.0
    start = tuple(a + b for a, b in zip(start1, start2))
    return CropPlan(start, window, pad_rounds(window, cfg.size), flips, shift)


def center_params(shape, size) -> CropPlan:
    """The geometry of augment.center_crop_pad."""
    start = tuple(max(n - want, 0) // 2 for n, want in zip(shape, size))
    window = tuple(min(n, want) for n, want in zip(shape, size))
    return CropPlan(start, window, pad_rounds(window, size))


def max_rounds(shapes, cfg: AugmentConfig, train: bool) -> int:
    """Reflect-pad rounds the pipeline must provide for these volume shapes (worst case of the scaled crop)."""
    worst = 0
    for shape in shapes:
        smallest = [max(1, int(round(n * (cfg.scale_min if train else 1.0)))) for n in shape]
        worst = max(worst, len(pad_rounds([min(m, w) for m, w in zip(smallest, cfg.size)], cfg.size)))
    return worst


def _plan_arrays(plan: CropPlan, n_rounds: int) -> tuple[np.ndarray, ...]:
    """CropPlan -> (start [3], window [3], pads [R, 3, 4], flips [3], shift []) for the external source.

    pads[r, a] = (left anchor, left length, right anchor, right length) of round r on axis a, in the coordinates of
    that round's input (left = flip(x[1 : 1 + lo]), right = flip(x[m - 1 - hi : m - 1]))."""
    pads = np.zeros((n_rounds, 3, 4), dtype=np.int32)
    n = list(plan.window)
    if len(plan.rounds) > n_rounds:
        raise ValueError(f"crop plan needs {len(plan.rounds)} reflect-pad rounds, the pipeline has {n_rounds}")
    for r, step in enumerate(plan.rounds):
        for a, (lo, hi) in enumerate(step):
            pads[r, a] = (1, lo, n[a] - 1 - hi, hi)
            n[a] += lo + hi
    for r in range(len(plan.rounds), n_rounds):
        pads[r, :, 0] = 0  # empty slices: nothing added
    return (np.asarray(plan.start, np.int32), np.asarray(plan.window, np.int32), pads,
            np.asarray(plan.flips, np.int32), np.asarray(plan.shift, np.float32))


# ---------------------------------------------------------------------------------------------------------------
# the pipeline
# ---------------------------------------------------------------------------------------------------------------
def build_pipeline(files: list[str], plans: list[list[tuple]], batch_size: int, n_rounds: int, train: bool,
                   shard_id: int = 0, num_shards: int = 1, device_id: int | None = None, num_threads: int = 2,
                   prefetch: int = 2):
    """A DALI pipeline over `files` (shard `shard_id` of `num_shards`, in order) whose iteration i outputs the
    volumes [B, 1, X, Y, Z] float32 of plans[i % len(plans)] (per sample: the arrays of `_plan_arrays`)."""
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    gpu = device_id is not None

    used = [0, 1] + ([2] if n_rounds else []) + ([3, 4] if train else [])  # start, window, pads, flips, shift

    def source(info):
        batch = plans[info.iteration % len(plans)]
        return tuple([sample[c] for sample in batch] for c in used)  # one list of B arrays per output

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                  prefetch_queue_depth=prefetch)
    def pipe():
        outs = dict(zip(used, fn.external_source(source=source, num_outputs=len(used), batch=True, batch_info=True)))
        start, window, pads, flips, shift = (outs.get(c) for c in range(5))
        v = fn.readers.numpy(device="gpu" if gpu else "cpu", files=files, roi_start=start, roi_shape=window,
                             shard_id=shard_id, num_shards=num_shards, random_shuffle=False, stick_to_shard=True,
                             name="reader")  # int16 [x, y, z], only the window
        # pads and flips only move voxels: done on int16 (half the bytes), normalised once at the end
        v = fn.expand_dims(fn.reshape(v, layout="DHW"), axes=[0], new_axis_names="C")  # [1, X, Y, Z] "CDHW"
        for r in range(n_rounds):  # reflect pad (augment.pad_to)
            for a in range(3):
                p = pads[r, a]
                kw = {"depthwise": int(a == 0), "vertical": int(a == 1), "horizontal": int(a == 2)}
                left = fn.flip(fn.slice(v, p[0:1], p[1:2], axes=[a + 1]), **kw)
                right = fn.flip(fn.slice(v, p[2:3], p[3:4], axes=[a + 1]), **kw)
                v = fn.cat(left, v, right, axis=a + 1)
        if train:
            v = fn.flip(v, depthwise=flips[0], vertical=flips[1], horizontal=flips[2])
        v = dmath.clamp(fn.cast(v, dtype=types.FLOAT), -1000.0, 1000.0) / 1000.0  # == augment.hu_to_unit
        if train:
            v = v + (shift.gpu() if gpu else shift)  # one fused arithmetic op with the line above
        return v

    p = pipe()
    p.build()
    return p


def _to_torch(out, device_id: int | None) -> torch.Tensor:
    """A DALI TensorList of equal-shape samples -> a torch tensor [B, ...] (a copy DALI may not overwrite)."""
    t = out.as_tensor()
    if device_id is None:
        return torch.from_numpy(np.array(t))
    from nvidia.dali.plugin.pytorch import feed_ndarray

    res = torch.empty(t.shape(), dtype=torch.float32, device=f"cuda:{device_id}")
    feed_ndarray(t, res, cuda_stream=torch.cuda.current_stream(device_id))
    return res


class DaliLoader:
    """Infinite iterator of batches from a PreparedPretrainDataset, volumes through DALI.

    Yields dicts like a DataLoader over the dataset with `ResumableBatches(len, batch_size, seed, start_batch,
    rank, world_size)`: volume [B, 1, X, Y, Z] float32 (on cuda:device_id for a GPU pipeline) and the text keys.
    """

    def __init__(self, dataset, batch_size: int, seed: int, start_batch: int = 0, rank: int = 0,
                 world_size: int = 1, device_id: int | None = None, num_threads: int | None = None,
                 chunk_batches: int = 256, prefetch: int = 2):
        if not has_dali():
            raise ImportError("the DALI loader needs nvidia-dali (pip install nvidia-dali-cuda130)")
        self.ds, self.batch_size, self.seed = dataset, batch_size, seed
        self.sampler = ResumableBatches(len(dataset), batch_size, seed, start_batch, rank, world_size)
        self.start_batch, self.rank, self.world_size = start_batch, rank, world_size
        self.device_id = device_id
        self.num_threads = num_threads or max(1, min(4, os.cpu_count() or 1))
        self.chunk_batches, self.prefetch = max(1, chunk_batches), prefetch
        self.shapes = [tuple(e["volume"]["shape"]) for e in dataset.items]
        self.n_rounds = max_rounds(self.shapes, dataset.spec.augment, dataset.train)

    def plan(self, index: int, epoch: int) -> tuple[CropPlan, torch.Generator]:
        """The sample's crop plan and its generator, advanced past the volume's draws (as in __getitem__)."""
        gen = sample_generator(self.ds.spec.seed, epoch, index)  # as the dataset draws (not the order seed)
        spec = self.ds.spec
        if self.ds.train:
            return augment_params(self.shapes[index], spec.augment, gen), gen
        return center_params(self.shapes[index], spec.img_size), gen

    def _chunk(self, first: int, k: int):
        """Pipeline + own batches for local batches first .. first + k - 1 of this rank."""
        w = self.world_size
        batches = {r: [self.sampler.batch((first + j) * w + r) for j in range(k)] for r in range(w)}
        files = [str(self.ds.volume_path(i)) for r in range(w) for b in batches[r] for i, _ in b]
        plans = [[_plan_arrays(self.plan(i, e)[0], self.n_rounds) for i, e in b] for b in batches[self.rank]]
        pipe = build_pipeline(files, plans, self.batch_size, self.n_rounds, self.ds.train, self.rank, w,
                              self.device_id, self.num_threads, self.prefetch)
        return pipe, batches[self.rank]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        first = self.start_batch
        while True:
            pipe, own = self._chunk(first, self.chunk_batches)
            try:
                for batch in own:
                    (volumes,) = pipe.run()
                    texts = [self.ds.text_sample(i, self.plan(i, e)[1]) for i, e in batch]
                    yield {"volume": _to_torch(volumes, self.device_id),
                           **torch.utils.data.default_collate(texts)}
            finally:
                del pipe
            first += self.chunk_batches
