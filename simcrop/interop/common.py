"""The check shared by every conversion: a state dict against the shapes a module expects, failing on the first
mismatching key with one line that names the file (simcrop.checkpoint.CheckpointError)."""
from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import torch

from simcrop.checkpoint import CheckpointError


def _shape(t) -> list[int]:
    return list(t.shape) if hasattr(t, "shape") else []


def check_state(expected: Mapping[str, torch.Size | tuple], given: Mapping[str, torch.Tensor], source: str,
                what: str = "the encoder") -> None:
    """CheckpointError naming `source` and the first key (in `expected`'s order) that is missing, not a tensor or of
    another shape; then the first unexpected key. Nothing is loaded here."""
    for key, shape in expected.items():
        if key not in given:
            raise CheckpointError(f"{source}: missing key {key} (expected by {what}, shape {list(shape)})")
        value = given[key]
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: key {key} holds a {type(value).__name__}, not a tensor")
        if tuple(value.shape) != tuple(shape):
            raise CheckpointError(f"{source}: key {key} has shape {_shape(value)}, {what} expects {list(shape)}")
        if not value.is_floating_point():
            raise CheckpointError(f"{source}: key {key} has dtype {value.dtype}, expected a floating-point tensor")
    extra = [k for k in given if k not in expected]
    if extra:
        raise CheckpointError(f"{source}: unexpected key {extra[0]} ({len(extra)} key(s) {what} does not have)")


def summarize_keys(keys) -> str:
    """'decoder_blocks (48), decoder_embed (2), text_encoder (201)': tensor counts per top-level name."""
    counts = Counter(str(k).split(".")[0] for k in keys)
    return ", ".join(f"{name} ({n})" for name, n in sorted(counts.items()))


def encoder_geometry(encoder) -> dict:
    """The constructor arguments of a ViT3DEncoder, read off the module (heads from its first block)."""
    heads = encoder.blocks[0].attn.heads if len(encoder.blocks) else getattr(encoder, "heads", 1)
    hidden = encoder.blocks[0].mlp[0].out_features if len(encoder.blocks) else int(encoder.dim * 4)
    return {"img_size": list(encoder.img_size), "patch_size": list(encoder.patch_size), "in_chans": encoder.in_chans,
            "dim": encoder.dim, "depth": encoder.depth, "heads": heads, "mlp_ratio": hidden / encoder.dim}


def linear_to_conv(weight: torch.Tensor, patch, in_chans: int) -> torch.Tensor:
    """Our patch embedding's Linear weight [D, px*py*pz*C] (patch vector ordered (dx, dy, dz, c), simcrop.ops
    patchify3d) -> the equivalent Conv3d weight [D, C, px, py, pz] (kernel = stride = patch)."""
    px, py, pz = patch
    return weight.reshape(weight.shape[0], px, py, pz, in_chans).permute(0, 4, 1, 2, 3)  # [D, C, px, py, pz]


def conv_to_linear(weight: torch.Tensor) -> torch.Tensor:
    """The inverse of linear_to_conv: Conv3d weight [D, C, px, py, pz] -> Linear weight [D, px*py*pz*C]."""
    return weight.permute(0, 2, 3, 4, 1).reshape(weight.shape[0], -1)  # [D, px, py, pz, C] -> [D, P]


def detached(state: dict) -> dict[str, torch.Tensor]:
    """Tensors detached, contiguous and on the CPU (ready for safetensors / torch.save)."""
    return {k: v.detach().contiguous().cpu().clone() for k, v in state.items()}
