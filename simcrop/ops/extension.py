"""The compiled extension simcrop._C (csrc/): loading, and whether its CPU / CUDA kernels can run here.

The extension holds only torch.library operators (torch.ops.simcrop.*), so it is loaded with
torch.ops.load_library on the built file that importlib finds for `simcrop._C`, never imported as a module.
A missing or broken build is not an error here: check_device() says why, and the backend switch
(simcrop.ops.backend) reports it or raises when the fused backend was requested.
"""
from __future__ import annotations

import importlib.util

import torch

from simcrop.ops.backend import BackendUnavailable

NOT_BUILT = "extension not built: run pip install --no-build-isolation -e ."

_loaded: bool | None = None
_reason: str | None = None
_cuda = False  # CUDA kernels registered (read once at load: plain Python state, so torch.compile traces through)


def _load() -> bool:
    global _loaded, _reason, _cuda
    if _loaded is None:
        spec = importlib.util.find_spec("simcrop._C")
        if spec is None or not spec.origin:
            _loaded, _reason = False, NOT_BUILT
        else:
            try:
                torch.ops.load_library(spec.origin)
                _loaded = True
                _cuda = torch._C._dispatch_has_kernel_for_dispatch_key("simcrop::masked_mse", "CUDA")
            except (OSError, RuntimeError) as exc:  # e.g. built against another torch: undefined symbols
                _loaded = False
                _reason = (
                    f"extension {spec.origin} failed to load ({exc}); rebuild: pip install --no-build-isolation -e ."
                )
    return _loaded


def has_ext() -> bool:
    """True when simcrop._C is built and loaded (its CPU kernels are always there)."""
    return _load()


def ext_reason() -> str | None:
    """Why the extension is not available (None when it is)."""
    _load()
    return _reason


def has_cuda_ext() -> bool:
    """True when the loaded extension was compiled with its CUDA kernels (setup.py: torch.version.cuda + CUDA_HOME)."""
    return has_ext() and _cuda


def check_device(device: torch.device | str) -> str | None:
    """None when the C++/CUDA kernels can run on `device`, else a one-line reason (the `check` of register_fused)."""
    device = torch.device(device)
    if not has_ext():
        return _reason
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        if has_cuda_ext():
            return None
        return (
            "simcrop._C was built without its CUDA kernels (build with a CUDA torch and CUDA_HOME set, "
            "or SIMCROP_FORCE_CUDA=1: pip install --no-build-isolation -e .)"
        )
    return f"simcrop._C has no kernels for {device.type} tensors (CPU and CUDA only)"


def require(device: torch.device | str, op: str) -> None:
    """Raise BackendUnavailable when the extension cannot run `op` on `device`."""
    reason = check_device(device)
    if reason is not None:
        raise BackendUnavailable(f"{op}: {reason}")
