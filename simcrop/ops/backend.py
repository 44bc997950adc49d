"""One switch for every operator: `reference` (pure PyTorch), `fused` (Triton / C++ / CUDA), or `auto`.

A fused implementation registers itself with `register_fused(op, impl, check)`; `check(device)` returns None
when the implementation can run on that device, else a one-line reason. Nothing falls back silently:
`fused` raises `BackendUnavailable` with the reason; `auto` picks fused where `check` passes and reference
otherwise, and `describe()` reports what was chosen so the caller can log it.
An implementation registered with `auto_on_cpu=False` (Triton: on CPU it runs only in its interpreter, a test
tool) is never chosen by `auto` for CPU tensors; `fused` still runs it there when `check` passes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from simcrop.ops import reference

BACKENDS = ("auto", "fused", "reference")
OP_NAMES = ("masked_patchify", "masked_mse", "topk_align", "cross_granularity_attention")


class BackendUnavailable(RuntimeError):
    """A requested operator backend cannot run here."""


@dataclass(frozen=True)
class _Fused:
    impl: Callable
    check: Callable[[torch.device], "str | None"]
    name: str  # e.g. "triton", "c++/cuda"
    auto_on_cpu: bool = True


_FUSED: dict[str, _Fused] = {}


def register_fused(op: str, impl: Callable, check: Callable[[torch.device], "str | None"], name: str,
                   auto_on_cpu: bool = True) -> None:
    """Make `impl` the fused implementation of `op` (same signature as simcrop.ops.reference.<op>)."""
    if op not in OP_NAMES:
        raise ValueError(f"unknown operator {op!r}; known: {', '.join(OP_NAMES)}")
    _FUSED[op] = _Fused(impl, check, name, auto_on_cpu)


def _fused_reason(op: str, device: torch.device, backend: str = "fused") -> "str | None":
    fused = _FUSED.get(op)
    if fused is None:
        return f"no fused implementation of {op} is installed in this build"
    if backend == "auto" and device.type == "cpu" and not fused.auto_on_cpu:
        return f"{fused.name} runs on CPU only in its interpreter (a test tool): auto keeps the reference"
    return fused.check(device)


def resolve(op: str, backend: str, device: torch.device) -> tuple[Callable, str]:
    """The implementation of `op` for `backend` on `device`, and its name ('reference', 'triton', ...)."""
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "reference":
        return getattr(reference, op), "reference"
    reason = _fused_reason(op, device, backend)
    if reason is None:
        return _FUSED[op].impl, _FUSED[op].name
    if backend == "fused":
        raise BackendUnavailable(f"--kernels fused: {op} cannot run on {device}: {reason}")
    return getattr(reference, op), "reference"


def describe(backend: str, device: torch.device) -> dict[str, str]:
    """{op: chosen implementation (and why reference, under auto)} for logging at start-up."""
    out = {}
    for op in OP_NAMES:
        _, name = resolve(op, backend, device)
        if name == "reference" and backend == "auto":
            name = f"reference ({_fused_reason(op, device, backend)})"
        out[op] = name
    return out
