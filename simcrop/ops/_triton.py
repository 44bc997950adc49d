"""What simcrop's two Triton ops (simcrop/ops/topk_align.py, cross_granularity_attention.py) share: where their
kernels can run, launch arithmetic, input checks, launching on the current stream, ahead-of-time compilation.

The kernel modules (kernels/<op>.py, installed as simcrop.kernels.<op>) are imported lazily, by a plain
`from simcrop.kernels import <op>` inside the op's launch functions: `import simcrop.ops` never imports Triton.
Triton decides interpreter vs compiler when a kernel is decorated, i.e. when its module is imported, so
TRITON_INTERPRET=1 must be set before that import; the CPU path is offered only while TRITON_INTERPRET is set AND
the kernels were decorated under it (`unavailable`).
"""
from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType
from typing import Any, NamedTuple

import torch
from torch import Tensor

from simcrop.ops.backend import BackendUnavailable

HAS_TRITON = importlib.util.find_spec("triton") is not None  # decided once, without importing Triton

_TRUE = ("1", "true", "yes", "on", "y")  # the values Triton's own TRITON_INTERPRET knob accepts
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the kernels read (fp32 accumulation)


def has_triton() -> bool:
    """Triton is installed (`pip install 'simcrop[triton]'`)."""
    return HAS_TRITON


def interpret_requested() -> bool:
    """TRITON_INTERPRET is set in this process now."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE


# -- launch arithmetic --------------------------------------------------------------------------------------------
def pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1): Triton block shapes are powers of two."""
    return 1 << max(int(n) - 1, 0).bit_length()


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive b: programs along one grid axis."""
    return -(-a // b)


# -- input checks (the messages name the op: "<op> (triton): ...") -------------------------------------------------
def check_float(name: str, **tensors: Tensor) -> None:
    """TypeError unless every tensor is float32, bfloat16 or float16."""
    for label, t in tensors.items():
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}: {label} must be float32, bfloat16 or float16, got {t.dtype}")


def check_same_device(name: str, ref_label: str, ref: Tensor, **others: Tensor | None) -> None:
    """ValueError unless every tensor of `others` (None = absent, skipped) is on ref's device."""
    for label, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name}: {label} is on {t.device} but {ref_label} is on {ref.device}")


def _fix_interpreter_index() -> None:
    """Triton <= 3.6's interpreter turns a runtime scalar into a Python int with int(<1-element 1-D array>), which
    NumPy >= 2.4 refuses: every `for i in range(0, n)` with a runtime n fails (triton-lang/triton#9171, fixed
    upstream with .squeeze()). Re-patch tl.tensor.__index__ the same way while kernels are interpreted."""
    import numpy as np
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_simcrop_index_fix", False):
        return
    try:
        int(np.zeros(1, dtype=np.int32))
        return  # this NumPy still converts 1-element arrays
    except TypeError:
        pass

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    _patch_lang_tensor._simcrop_index_fix = True
    interpreter._patch_lang_tensor = _patch_lang_tensor


def is_interpreted(kernel) -> bool:
    """The @triton.jit kernel was decorated under TRITON_INTERPRET (it runs in the interpreter)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def unavailable(op: str, kernel: str, device: torch.device) -> str | None:
    """None when simcrop.kernels.<op>.<kernel> can run on `device`, else a one-line reason."""
    if not HAS_TRITON:
        return "Triton is not installed (pip install 'simcrop[triton]')"
    if device.type == "cuda":
        return None
    if device.type != "cpu":
        return f"the Triton kernels run on CUDA devices (or on CPU under TRITON_INTERPRET=1), not on {device.type}"
    if not interpret_requested():
        return "Triton runs on CPU tensors only in its interpreter: set TRITON_INTERPRET=1 before importing simcrop"
    module = sys.modules.get(f"simcrop.kernels.{op}")
    if module is not None and not is_interpreted(getattr(module, kernel)):
        return f"simcrop.kernels.{op} was imported before TRITON_INTERPRET=1 was set (its kernels target GPUs)"
    return None


def require(op: str, kernel: str, device: torch.device) -> None:
    """BackendUnavailable with the reason unless simcrop.kernels.<op>.<kernel> can run on `device`."""
    reason = unavailable(op, kernel, device)
    if reason is not None:
        raise BackendUnavailable(f"{op} (triton) cannot run on {device}: {reason}")


class Launch(NamedTuple):
    """One kernel launch: kernel name in its simcrop.kernels module, grid, positional args, constexprs + options."""

    kernel: str
    grid: tuple[int, ...]
    args: tuple
    meta: dict[str, Any]


def launch(module: ModuleType, spec: Launch) -> None:
    """Run `spec` with the kernels of `module` (a simcrop.kernels.<op>) on the current stream of its first tensor's
    device (Triton launches on the current device); never synchronises."""
    kernel = getattr(module, spec.kernel)
    if is_interpreted(kernel):
        _fix_interpreter_index()  # before the interpreter runs it: the interpreter patches tl.tensor per launch
    device = spec.args[0].device
    if device.type == "cuda":
        with torch.cuda.device(device):
            kernel[spec.grid](*spec.args, **spec.meta)
    else:
        kernel[spec.grid](*spec.args, **spec.meta)


def compile_for_target(module: ModuleType, spec: Launch, arch: int = 90) -> dict[str, Any]:
    """Compile `spec`'s kernel ahead of time for sm_<arch> (Triton's bundled ptxas; NO GPU needed), with the
    argument types and constexprs the launch would use. Returns {kernel, registers, spill_bytes, shared_bytes}.
    Needs the compiling (not interpreted) kernels: run it in a process without TRITON_INTERPRET."""
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import mangle_type

    fn = getattr(module, spec.kernel)
    if is_interpreted(fn):
        raise RuntimeError("compile_for_target needs kernels imported without TRITON_INTERPRET")
    values = dict(zip(fn.arg_names, spec.args))
    values.update({k: v for k, v in spec.meta.items() if k in fn.arg_names})
    options = {k: v for k, v in spec.meta.items() if k not in fn.arg_names}
    signature, constexprs = {}, {}
    for param in fn.params:
        if param.is_constexpr:
            signature[param.name], constexprs[param.name] = "constexpr", values[param.name]
        else:
            signature[param.name] = mangle_type(values[param.name])
    compiled = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", arch, 32), options=options)
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        log = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}a" if arch >= 90 else f"--gpu-name=sm_{arch}", ptx,
                              "-o", os.path.join(tmp, "k.cubin")], capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    return {
        "kernel": spec.kernel,
        "registers": int(regs.group(1)) if regs else None,
        "spill_bytes": int(spills.group(1)) if spills else None,
        "shared_bytes": compiled.metadata.shared,
    }
