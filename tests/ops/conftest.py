"""Fixtures of the Triton operator tests (test_topk_align.py, test_cross_granularity_attention.py).

All are opt-in (none is autouse), so the other tests in this folder are untouched. In particular TRITON_INTERPRET
is set only while a module that asks for `triton_device` runs, and restored afterwards: with it unset, the
`auto` backend keeps choosing the reference on CPU for every other test of the session.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

AOT_PRELUDE = """
import json, torch
from simcrop.ops import _triton

def report(op, specs, arch=90):
    module = _triton.kernel_module(op)
    for spec in specs:
        print(json.dumps(_triton.compile_for_target(module, spec, arch)))
"""


@pytest.fixture(scope="module")
def triton_device():
    """Where this module's Triton kernels run: CUDA when present, else CPU through Triton's interpreter.

    TRITON_INTERPRET=1 is set for the module only, before the kernels are first imported (simcrop imports them
    lazily, on the first launch)."""
    if torch.cuda.is_available():
        yield torch.device("cuda")
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        from simcrop.ops._triton import unavailable

        reason = unavailable("topk_align", "topk_align_fwd_kernel", torch.device("cpu"))
        if reason is not None:
            pytest.fail(f"the Triton kernels cannot run in the interpreter here: {reason}")
        yield torch.device("cpu")


def _poisoned_empty(*size, **kwargs):
    """torch.empty, filled with NaN (floats) or -7 (integers): every output element must be written."""
    t = torch.empty(*size, **kwargs)
    if t.device.type != "meta":
        t.fill_(float("nan") if t.is_floating_point() else -7)
    return t


@pytest.fixture
def poison(monkeypatch):
    """poison(module): outputs allocated by that simcrop.ops module start as NaN / -7."""
    return lambda module: monkeypatch.setattr(module, "_alloc", _poisoned_empty)


@pytest.fixture
def aot_compile():
    """aot_compile(code) -> [{kernel, registers, spill_bytes, shared_bytes}]: runs `code` in a fresh process without
    TRITON_INTERPRET, where `report(op, launches)` compiles each launch for sm_90 (no GPU needed)."""

    def run(code: str) -> list[dict]:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        proc = subprocess.run(
            [sys.executable, "-c", AOT_PRELUDE + code], env=env, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]

    return run
