"""simcrop's ViT3DEncoder -> monai.networks.nets.ViT (state dict, constructor arguments, the one fix-up).

What MONAI's ViT computes (monai 1.6.1, read from networks/nets/vit.py and networks/blocks/), beside ours:
  patch_embedding   Conv3d(kernel = stride = patch) on [B, C, X, Y, Z] -> [B, D, gx, gy, gz] -> flatten(2) -> [B, N, D]:
                    token n = (ix * gy + iy) * gz + iz, our order; our Linear over the patch vector (dx, dy, dz, c)
                    is that Conv3d with weight [D, C, px, py, pz] (common.linear_to_conv)
                    + position_embeddings [1, N, D] on the patch tokens only ("learnable": a Parameter we fill
                    with our fixed 3D sin-cos values)
  cls_token         prepended AFTER the position embedding (only when classification=True, or when the attribute
                    exists): ours adds pos_embed[0] (zeros) to cls, so the exported cls is cls_token + pos_embed[:, :1]
  blocks            x + attn(norm1(x)), then x + mlp(norm2(x)); attn.qkv = Linear(D, 3D, bias=qkv_bias) split as
                    (qkv, heads, Dh) like ours (qkv_bias=True needed), softmax(q k^T Dh^-0.5) v, out_proj;
                    mlp = linear1 -> GELU (nn.GELU, exact erf, ours too) -> linear2; dropout 0 by default
                    norm_cross_attn: a LayerNorm every block owns even without cross-attention (unused): exported
                    as the identity (weight 1, bias 0) so that strict loading finds it
  norm              LayerNorm(D) after the last block
  forward           (x, hidden_states_out): x = norm(tokens) [B, (1 +) N, D], or classification_head(x[:, 0]) when
                    classification=True; hidden_states_out = every block's output, before the final norm
  LayerNorm eps     every MONAI LayerNorm uses torch's default 1e-5 and no argument changes it; ours (and timm's
                    ViT, and the SimCroP authors') use 1e-6: set_layernorm_eps(vit) after building, or tokens
                    differ (docs/interop.md gives the size of the difference)

    sd = to_monai_vit(encoder)                              # cls token + a zero classification head (2 classes)
    vit = ViT(**monai_vit_kwargs(encoder)); set_layernorm_eps(vit); vit.load_state_dict(sd, strict=True)
    logits, hidden = vit(volume); tokens = vit.norm(hidden[-1])   # == encoder.forward_features(volume)
    unetr.vit.load_state_dict(to_monai_vit(encoder, cls_token=False), strict=True)   # MONAI's UNETR (no cls)
"""
from __future__ import annotations

import torch
import torch.nn as nn

from simcrop.interop.common import detached, encoder_geometry, linear_to_conv

LAYERNORM_EPS = 1e-6  # ours; MONAI's LayerNorms are built with 1e-5


def monai_vit_kwargs(encoder, cls_token: bool = True, num_classes: int = 2, post_activation: str | None = "Tanh") -> dict:
    """The monai.networks.nets.ViT arguments under which to_monai_vit(encoder, ...) loads with strict=True.

    cls_token=True -> classification=True (MONAI then owns a cls token and a classification head of num_classes,
    with Tanh unless post_activation is not "Tanh"); cls_token=False -> classification=False (no cls token: what
    MONAI's UNETR builds; its patch tokens then differ from ours, which attended to cls during pre-training)."""
    g = encoder_geometry(encoder)
    kw = {"in_channels": g["in_chans"], "img_size": tuple(g["img_size"]), "patch_size": tuple(g["patch_size"]),
          "hidden_size": g["dim"], "mlp_dim": int(round(g["dim"] * g["mlp_ratio"])), "num_layers": g["depth"],
          "num_heads": g["heads"], "proj_type": "conv", "pos_embed_type": "learnable", "classification": cls_token,
          "qkv_bias": True, "dropout_rate": 0.0, "spatial_dims": 3}
    if cls_token:
        kw.update(num_classes=num_classes, post_activation=post_activation)
    return kw


def to_monai_vit(encoder, cls_token: bool = True, num_classes: int = 2, post_activation: str | None = "Tanh"
                 ) -> dict[str, torch.Tensor]:
    """ViT3DEncoder -> the state dict of monai.networks.nets.ViT(**monai_vit_kwargs(encoder, same arguments)).

    The classification head (cls_token=True) is new: zeros, to be trained on the target task."""
    g = encoder_geometry(encoder)
    D = g["dim"]
    pos = encoder.pos_embed  # [1, 1 + N, D]
    sd: dict[str, torch.Tensor] = {
        "patch_embedding.position_embeddings": pos[:, 1:],  # [1, N, D]
        "patch_embedding.patch_embeddings.weight": linear_to_conv(encoder.patch_embed.weight, g["patch_size"], g["in_chans"]),
        "patch_embedding.patch_embeddings.bias": encoder.patch_embed.bias,
    }
    for i, blk in enumerate(encoder.blocks):
        p = f"blocks.{i}."
        sd.update({
            p + "mlp.linear1.weight": blk.mlp[0].weight, p + "mlp.linear1.bias": blk.mlp[0].bias,
            p + "mlp.linear2.weight": blk.mlp[2].weight, p + "mlp.linear2.bias": blk.mlp[2].bias,
            p + "norm1.weight": blk.norm1.weight, p + "norm1.bias": blk.norm1.bias,
            p + "attn.out_proj.weight": blk.attn.proj.weight, p + "attn.out_proj.bias": blk.attn.proj.bias,
            p + "attn.qkv.weight": blk.attn.qkv.weight, p + "attn.qkv.bias": blk.attn.qkv.bias,
            p + "norm2.weight": blk.norm2.weight, p + "norm2.bias": blk.norm2.bias,
            p + "norm_cross_attn.weight": torch.ones(D, dtype=blk.norm1.weight.dtype),  # unused by MONAI's forward
            p + "norm_cross_attn.bias": torch.zeros(D, dtype=blk.norm1.bias.dtype),
        })
    sd["norm.weight"], sd["norm.bias"] = encoder.norm.weight, encoder.norm.bias
    if cls_token:
        sd["cls_token"] = encoder.cls_token + pos[:, :1]  # MONAI adds no position to cls
        head = "classification_head.0." if post_activation == "Tanh" else "classification_head."
        sd[head + "weight"] = torch.zeros(num_classes, D, dtype=encoder.norm.weight.dtype)
        sd[head + "bias"] = torch.zeros(num_classes, dtype=encoder.norm.weight.dtype)
    return detached(sd)


def set_layernorm_eps(module: nn.Module, eps: float = LAYERNORM_EPS) -> int:
    """Set eps of every nn.LayerNorm under `module` (MONAI builds them with 1e-5); returns how many."""
    n = 0
    for m in module.modules():
        if isinstance(m, nn.LayerNorm):
            m.eps = eps
            n += 1
    return n


def build_monai_vit(encoder, cls_token: bool = True, num_classes: int = 2, post_activation: str | None = "Tanh"):
    """A monai.networks.nets.ViT holding the encoder's weights (strict load, LayerNorm eps fixed, eval mode)."""
    try:
        import einops  # noqa: F401  (MONAI's attention needs it; `pip install monai` does not bring it)
        from monai.networks.nets import ViT
    except ImportError as exc:
        raise ImportError(f"MONAI's ViT needs the monai and einops packages ({exc}); pip install monai einops") from None
    vit = ViT(**monai_vit_kwargs(encoder, cls_token, num_classes, post_activation))
    set_layernorm_eps(vit)
    vit.load_state_dict(to_monai_vit(encoder, cls_token, num_classes, post_activation), strict=True)
    return vit.eval()
