"""What the operator tests in this folder share: CUDA-only marking, the Triton device, output poisoning, the C++
extension requirement, ahead-of-time compilation of the Triton kernels.

- `@pytest.mark.cuda` (pyproject: "needs a CUDA GPU (skipped without one)"): every such test here gets a skipif
  mark without a GPU: it is collected and reported as skipped, never missing.
- The fixtures are opt-in (none is autouse), so each test file states what it needs. In particular
  TRITON_INTERPRET is set only while a module that asks for `triton_device` runs, and restored afterwards: with
  it unset, the `auto` backend keeps choosing the reference on CPU for every other test of the session.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from simcrop.ops.extension import ext_reason, has_ext

HERE = Path(__file__).resolve().parent
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

AOT_PRELUDE = """
import importlib, json, torch
from simcrop.ops import _triton

def report(op, specs, arch=90):
    module = importlib.import_module(f"simcrop.kernels.{op}")  # here without TRITON_INTERPRET: GPU kernels
    for spec in specs:
        print(json.dumps(_triton.compile_for_target(module, spec, arch)))
"""


def pytest_collection_modifyitems(config, items):
    """Tests of this folder marked `cuda` skip without a CUDA GPU (the hook sees the whole session: filter)."""
    for item in items:
        if item.get_closest_marker("cuda") is not None and item.path.is_relative_to(HERE):
            item.add_marker(NEEDS_CUDA)


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
def require_extension():
    """Fail (not skip) when simcrop._C is not built: the C++ op tests must run in CI
    (`pytestmark = pytest.mark.usefixtures("require_extension")`)."""
    if not has_ext():
        pytest.fail(f"simcrop._C is not available ({ext_reason()}); CI must build it first", pytrace=False)


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
