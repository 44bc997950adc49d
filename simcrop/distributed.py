"""torch.distributed plumbing for training: process group, model wrapping (DDP / FSDP2), full state dicts.

Launched by torchrun running the training command line (README; NCCL on GPU, gloo on CPU). Without torchrun's
environment (WORLD_SIZE unset or 1) everything here is a no-op and the model is used as is.
Checkpoints always hold FULL (unsharded) state dicts keyed by parameter name, written by rank 0, so a
checkpoint loads at any world size and with or without FSDP.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> tuple[DistInfo, torch.device | None]:
    """Join the process group torchrun describes; returns (info, the device this rank must use or None)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), None
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, local), torch.device("cuda", local) if use_cuda else torch.device("cpu")


@contextmanager
def rank0_first(info: DistInfo):
    """Rank 0 runs the block first (e.g. builds caches), the other ranks after it (then they find the cache)."""
    if info.enabled and not info.is_main:
        dist.barrier()
    yield
    if info.enabled and info.is_main:
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum of `values` over ranks (a copy; identity without distribution)."""
    out = values.clone()
    if info.enabled:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's x along dim 0; backward sums the gradient of all ranks and keeps the local slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)  # [W * n, ...]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # every rank's loss depends on every slice: d(sum_r loss_r) / d x_local = sum over ranks of their
        # gradient for this slice (all-reduce, then cut). DDP then AVERAGES parameter gradients over the W ranks,
        # which the trainer's x W on each rank's loss undoes (docs/method.md "Data parallelism").
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


@torch.compiler.disable  # collectives inside an autograd.Function: run eagerly (a graph break under compile)
def _all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    return _AllGatherWithGrad.apply(x)


def all_gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x [n, ...] on each rank -> (the ranks' x concatenated in rank order [W * n, ...], this rank's offset r * n).

    Differentiable: the gradient of the gathered tensor flows back to the local slice, summed over all ranks (so
    other ranks' losses that use this rank's features train it too). Every rank must pass the same shape (the
    trainer's per-device batch is fixed). Without an initialised process group (or with one rank): (x, 0).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    return _all_gather_with_grad(x), dist.get_rank() * x.shape[0]


def any_rank(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True when `flag` is True on at least one rank (all ranks get the same answer)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def wrap_model(model: torch.nn.Module, info: DistInfo, device: torch.device, fsdp: bool) -> torch.nn.Module:
    """DDP (default) or FSDP2 (fully_shard on every transformer block, then the root) for world_size > 1."""
    if not info.enabled:
        if fsdp:
            raise ValueError("--fsdp needs a distributed launch (torchrun --nproc_per_node=N ...)")
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for module in model.modules():
            if type(module).__name__ in ("Block", "BertLayer", "CrossGranularityFusion"):
                fully_shard(module)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP / torch.compile wrappers (FSDP2 modifies the module in place)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded parameters and buffers by name (complete on rank 0; collective under FSDP)."""
    return get_model_state_dict(unwrap(model), options=_FULL)


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Optimizer state keyed by parameter NAME (so it loads at any world size, with or without FSDP)."""
    return get_optimizer_state_dict(unwrap(model), optimizer, options=_FULL)


def load_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, model_state: dict,
                    optim_state: dict | None) -> None:
    """Load full state dicts (every rank holds them) into a possibly sharded model/optimizer."""
    opts = StateDictOptions(full_state_dict=True, strict=True)
    set_model_state_dict(unwrap(model), model_state, options=opts)
    if optimizer is not None and optim_state is not None:
        set_optimizer_state_dict(unwrap(model), optimizer, optim_state, options=StateDictOptions(full_state_dict=True))
