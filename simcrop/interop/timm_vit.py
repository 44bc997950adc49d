"""simcrop's ViT3DEncoder <-> the SimCroP authors' downstream ViT: timm VisionTransformer naming, Conv3d patches.

The authors' layout (their Down-stream/Classification_Linear/models_vit.py, a timm VisionTransformer subclass):
  cls_token [1, 1, D]    pos_embed [1, 1 + N, D] (added to cls too, row 0)    norm.{weight,bias} (eps 1e-6)
  patch_embed.proj.{weight [D, C, px, py, pz], bias}: a Conv3d with kernel = stride = patch, applied to each
      patch vector reshaped to (px, py, pz, C) -- their patchify3D orders it (dh, dw, dd, c), which is our
      (dx, dy, dz, c) with (H, W, D) = our (X, Y, Z)
  blocks.{i}.{norm1, attn.qkv (bias), attn.proj, norm2, mlp.fc1, mlp.fc2}: timm's Block, GELU (exact), eps 1e-6
Their patchify3D takes [N, 1, H, W, D], asserts H == W and uses h = w = d = H // px patches per axis: the patch
grid is a cube (224 x 224 x 112 with 16 x 16 x 8 -> 14^3; the tiny preset's 64 x 64 x 32 -> 4^3), which is how
the crop size of a file in this layout is inferred. Their released position embedding encodes only H (sin, even
channels) and W (cos, odd channels), not D: imported weights keep the file's pos_embed as it is ("stored").
A pre-training checkpoint is a .pth whose "model" holds those keys plus the MIM decoder (decoder_*, mask_token)
and the text side; everything outside the encoder's names is left out and summarised.
"""
from __future__ import annotations

import io
import math
import pickle
import re
from pathlib import Path

import torch

from simcrop.checkpoint import CheckpointError
from simcrop.interop.common import (
    check_state,
    conv_to_linear,
    detached,
    encoder_geometry,
    linear_to_conv,
    summarize_keys,
)
from simcrop.models.vit3d import sincos_3d

ENCODER_NAMES = ("cls_token", "pos_embed", "patch_embed", "blocks", "norm")  # top-level names of the encoder
BLOCK_KEYS = {  # timm name -> ours, per block
    "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias",
    "attn.qkv.weight": "attn.qkv.weight", "attn.qkv.bias": "attn.qkv.bias",
    "attn.proj.weight": "attn.proj.weight", "attn.proj.bias": "attn.proj.bias",
    "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias",
    "mlp.fc1.weight": "mlp.0.weight", "mlp.fc1.bias": "mlp.0.bias",
    "mlp.fc2.weight": "mlp.2.weight", "mlp.fc2.bias": "mlp.2.bias",
}
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")


# -- ours -> theirs ------------------------------------------------------------------------------------------------
def to_timm(encoder) -> dict[str, torch.Tensor]:
    """ViT3DEncoder -> the authors' / timm-style state dict (pos_embed holds the encoder's position embedding)."""
    g = encoder_geometry(encoder)
    sd: dict[str, torch.Tensor] = {
        "cls_token": encoder.cls_token,  # [1, 1, D]
        "pos_embed": encoder.pos_embed,  # [1, 1 + N, D], row 0 = cls
        "patch_embed.proj.weight": linear_to_conv(encoder.patch_embed.weight, g["patch_size"], g["in_chans"]),
        "patch_embed.proj.bias": encoder.patch_embed.bias,
    }
    for i, blk in enumerate(encoder.blocks):
        ours = blk.state_dict()
        sd.update({f"blocks.{i}.{theirs}": ours[mine] for theirs, mine in BLOCK_KEYS.items()})
    sd["norm.weight"], sd["norm.bias"] = encoder.norm.weight, encoder.norm.bias
    return detached(sd)


# -- theirs -> ours ------------------------------------------------------------------------------------------------
def read_weights_file(path: str | Path) -> dict:
    """A weights file -> its flat state dict; loading never executes code: torch.load(weights_only=True) for
    pickles (.pth/.pt/.bin/.ckpt: a dict, its "model" or "state_dict" entry when present), safetensors otherwise.
    CheckpointError naming the file for anything unreadable, refused or not a state dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: unreadable safetensors ({' '.join(str(exc).split())})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only refuses globals: code would have run on a plain load
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        why = next((ln for ln in lines if "unsupported" in ln.lower() and "weights_only" not in ln), "")
        why = f" ({why[:200]})" if why else ""
        raise CheckpointError(f"{path}: refused by torch.load(weights_only=True): the pickle holds more than weights, "
                              f"loading it would run code{why}") from None
    except Exception as exc:  # truncation, bad zip, not a pickle
        first = " ".join(str(exc).split())[:200]
        raise CheckpointError(f"{path}: cannot load safely ({type(exc).__name__}: {first})") from None
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise CheckpointError(f"{path}: not a state dict (expected a dict of tensors, or one under 'model')")
    if obj and all(k.startswith("module.") for k in obj):  # saved from DistributedDataParallel
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def split_encoder(state: dict) -> tuple[dict, list[str]]:
    """(the encoder's entries, the other keys: decoder, text side, heads, ...) by top-level name."""
    enc = {k: v for k, v in state.items() if k.split(".")[0] in ENCODER_NAMES}
    return enc, [k for k in state if k.split(".")[0] not in ENCODER_NAMES]


def timm_geometry(enc: dict, source: str, heads: int | None = None, img_size=None) -> dict:
    """Constructor arguments of the encoder a timm-layout state dict holds. Shapes give width, depth, patch and
    MLP size; the head count is not in any shape (default: width / 64, ViT-B's 12 and the tiny preset's 3); the
    crop is inferred from the token count for a cubic patch grid (the authors' patchify3D) unless given."""
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight"):
        if key not in enc:
            raise CheckpointError(f"{source}: missing key {key} (not the authors' / timm ViT layout)")
        if not isinstance(enc[key], torch.Tensor):
            raise CheckpointError(f"{source}: key {key} holds a {type(enc[key]).__name__}, not a tensor")
    w = enc["patch_embed.proj.weight"]
    if w.dim() != 5:
        raise CheckpointError(f"{source}: key patch_embed.proj.weight has shape {list(w.shape)}, expected a Conv3d "
                              f"weight [D, C, px, py, pz]")
    dim, in_chans, patch = int(w.shape[0]), int(w.shape[1]), tuple(int(s) for s in w.shape[2:])
    blocks = {int(m.group(1)) for k in enc if (m := re.match(r"blocks\.(\d+)\.", k))}
    depth = max(blocks) + 1 if blocks else 0
    hidden = int(enc["blocks.0.mlp.fc1.weight"].shape[0])
    if heads is None:
        if dim % 64:
            raise CheckpointError(f"{source}: width {dim} is not a multiple of 64: give the head count (heads=...)")
        heads = dim // 64
    if dim % heads:
        raise CheckpointError(f"{source}: width {dim} is not divisible by {heads} heads")
    n_tokens = int(enc["pos_embed"].shape[1]) - 1 if enc["pos_embed"].dim() == 3 else -1
    if img_size is None:
        g = round(n_tokens ** (1 / 3)) if n_tokens > 0 else 0
        if g < 1 or g**3 != n_tokens:
            raise CheckpointError(f"{source}: pos_embed holds {n_tokens} patch tokens, not a cubic grid: give the "
                                  f"crop size (img_size=...)")
        img_size = tuple(g * p for p in patch)
    img_size = tuple(int(s) for s in img_size)
    if any(s % p for s, p in zip(img_size, patch)) or math.prod(s // p for s, p in zip(img_size, patch)) != n_tokens:
        raise CheckpointError(f"{source}: crop {list(img_size)} with patch {list(patch)} does not give the "
                              f"{n_tokens} tokens of pos_embed")
    if dim % 6:
        raise CheckpointError(f"{source}: width {dim} is not divisible by 6 (simcrop's 3D sin-cos embedding)")
    return {"img_size": list(img_size), "patch_size": list(patch), "in_chans": in_chans, "dim": dim, "depth": depth,
            "heads": int(heads), "mlp_ratio": hidden / dim}


def expected_timm_shapes(g: dict) -> dict[str, tuple]:
    """Every key and shape of the authors' encoder of geometry g (to_timm's output), in to_timm's order."""
    D, hidden = g["dim"], int(round(g["dim"] * g["mlp_ratio"]))
    n = math.prod(s // p for s, p in zip(g["img_size"], g["patch_size"]))
    shapes = {"cls_token": (1, 1, D), "pos_embed": (1, 1 + n, D),
              "patch_embed.proj.weight": (D, g["in_chans"], *g["patch_size"]), "patch_embed.proj.bias": (D,)}
    per_block = {"norm1.weight": (D,), "norm1.bias": (D,), "attn.qkv.weight": (3 * D, D), "attn.qkv.bias": (3 * D,),
                 "attn.proj.weight": (D, D), "attn.proj.bias": (D,), "norm2.weight": (D,), "norm2.bias": (D,),
                 "mlp.fc1.weight": (hidden, D), "mlp.fc1.bias": (hidden,), "mlp.fc2.weight": (D, hidden),
                 "mlp.fc2.bias": (D,)}
    for i in range(g["depth"]):
        shapes.update({f"blocks.{i}.{k}": s for k, s in per_block.items()})
    shapes["norm.weight"], shapes["norm.bias"] = (D,), (D,)
    return shapes


def from_timm(state: dict, source: str, heads: int | None = None, img_size=None):
    """The authors' / timm-style state dict -> (geometry, our ViT3DEncoder state dict, pos_embed [1, 1 + N, D],
    pos_kind 'sincos-3d' | 'stored', the ignored keys). CheckpointError naming `source` and the first key that
    does not fit; keys outside the encoder's names (decoder, text side, classifier heads) are only listed."""
    enc, ignored = split_encoder(state)
    g = timm_geometry(enc, source, heads, img_size)
    check_state(expected_timm_shapes(g), enc, source, what=f"a {g['depth']}-block ViT of width {g['dim']}")
    ours = {"cls_token": enc["cls_token"], "patch_embed.weight": conv_to_linear(enc["patch_embed.proj.weight"]),
            "patch_embed.bias": enc["patch_embed.proj.bias"]}
    for i in range(g["depth"]):
        ours.update({f"blocks.{i}.{mine}": enc[f"blocks.{i}.{theirs}"] for theirs, mine in BLOCK_KEYS.items()})
    ours["norm.weight"], ours["norm.bias"] = enc["norm.weight"], enc["norm.bias"]
    pos = enc["pos_embed"].float()
    grid = tuple(s // p for s, p in zip(g["img_size"], g["patch_size"]))
    ref = sincos_3d(g["dim"], grid)[None]  # [1, 1 + N, D]
    kind = "sincos-3d" if torch.allclose(pos, ref, atol=1e-6, rtol=0) else "stored"
    return g, {k: v.float() for k, v in detached(ours).items()}, pos.clone(), kind, ignored


def ignored_summary(ignored: list[str]) -> str:
    """One line: what an import left out."""
    return f"left out {len(ignored)} tensor(s) outside the encoder: {summarize_keys(ignored)}" if ignored else ""


def save_timm_file(state: dict[str, torch.Tensor], path: Path) -> bytes:
    """Bytes of the file the authors' scripts read: .pth/.pt/.bin = torch.save({"model": state}) (their loaders
    take checkpoint['model']), .safetensors = the flat state dict."""
    if path.suffix == ".safetensors":
        from safetensors.torch import save

        return save(state, metadata={"format": "pt", "layout": "timm-vit3d"})
    buf = io.BytesIO()
    torch.save({"model": state}, buf)
    return buf.getvalue()
