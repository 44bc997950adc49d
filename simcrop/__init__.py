"""simcrop: SimCroP vision-language pre-training of 3D chest-CT ViT encoders.

The public API, loaded lazily on first use (so that `import simcrop.ops` imports only torch; docs/interop.md):

    enc = simcrop.load_encoder(path, device="cpu", dtype=None)   # run / checkpoint / pretrained folder / authors' .pth
    x = simcrop.preprocess("ct.nii.gz", size=enc.img_size)        # [1, 1, X, Y, Z], RAS+, 1.5 x 1.5 x 3 mm, [-1, 1]
    tokens = enc.forward_features(x)                              # [1, 1 + N, D]
    enc.save_pretrained("dir"); simcrop.SimCroPEncoder.from_pretrained("dir")
"""
from __future__ import annotations

import importlib

_LAZY = {  # public name -> the module that defines it
    "load_encoder": "simcrop.pretrained",
    "preprocess": "simcrop.pretrained",
    "SimCroPEncoder": "simcrop.pretrained",
    "PREPROCESSING": "simcrop.pretrained",
    "CheckpointError": "simcrop.checkpoint",
}
__all__ = ["CheckpointError", "PREPROCESSING", "SimCroPEncoder", "load_encoder", "preprocess"]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'simcrop' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
