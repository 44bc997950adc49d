"""3D ViT encoder with MAE masking, and the MIM decoder (SimCroP image side).

Tokens come from patches (simcrop.ops patch layout: n = (ix * gy + iy) * gz + iz, P = px*py*pz*C); the linear
patch embedding is a Conv3d with kernel = stride = patch. Positions are fixed 3D sin-cos embeddings, one third
of the channels per axis.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from simcrop.ops.reference import patch_grid, patchify3d


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """positions [N] -> [N, dim]: (sin(p w_k), cos(p w_k)), w_k = 10000^(-k / (dim/2)), as MAE."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # [dim/2]
    angles = positions.double()[:, None] * omega[None, :]  # [N, dim/2]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_3d(dim: int, grid: tuple[int, int, int], cls_token: bool = True) -> torch.Tensor:
    """[1 + N, dim] (or [N, dim]) fixed 3D sin-cos embedding; channel thirds encode x, y and z."""
    if dim % 6:
        raise ValueError(f"3D sin-cos position embedding needs dim divisible by 6, got {dim}")
    gx, gy, gz = grid
    ix, iy, iz = torch.meshgrid(torch.arange(gx), torch.arange(gy), torch.arange(gz), indexing="ij")
    third = dim // 3
    emb = torch.cat(
        [sincos_1d(third, ix.flatten()), sincos_1d(third, iy.flatten()), sincos_1d(third, iz.flatten())], dim=1
    )  # [N, dim], token order n = (ix * gy + iy) * gz + iz
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()


class Attention(nn.Module):
    """Multi-head self-attention through F.scaled_dot_product_attention."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, key_padding: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, D], key_padding [B, T] bool (True = real) -> [B, T, D]."""
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # [3, B, H, T, Dh]
        mask = None if key_padding is None else key_padding[:, None, None, :]  # [B, 1, 1, T]
        out = F.scaled_dot_product_attention(
            qkv[0], qkv[1], qkv[2], attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )  # [B, H, T, Dh]
        return self.proj(out.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    """Pre-norm transformer block (ViT / MAE)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def init_weights(module: nn.Module) -> None:
    """MAE initialisation: xavier-uniform linears, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, grad_checkpointing: bool):
    """Apply blocks in order; returns (final output, [output of each block]) (UNETR keeps some of them)."""
    outs = []
    for blk in blocks:
        if grad_checkpointing and x.requires_grad:
            x = checkpoint(blk, x, use_reentrant=False)
        else:
            x = blk(x)
        outs.append(x)
    return x, outs


class ViT3DEncoder(nn.Module):
    """3D ViT on the visible patches of a volume: [B, N_keep, P] (+ their ids) -> [B, 1 + N_keep, D]."""

    def __init__(self, img_size, patch_size, in_chans=1, dim=768, depth=12, heads=12, mlp_ratio=4.0):
        super().__init__()
        self.img_size, self.patch_size, self.in_chans = tuple(img_size), tuple(patch_size), in_chans
        self.grid = patch_grid(self.img_size, self.patch_size)
        self.num_patches = self.grid[0] * self.grid[1] * self.grid[2]
        self.patch_dim = self.patch_size[0] * self.patch_size[1] * self.patch_size[2] * in_chans
        self.dim, self.depth = dim, depth
        self.patch_embed = nn.Linear(self.patch_dim, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_3d(dim, self.grid)[None], persistent=False)  # [1, 1 + N, D]
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.grad_checkpointing = False
        init_weights(self)
        nn.init.normal_(self.cls_token, std=0.02)

    def embed(self, patches: torch.Tensor, ids_keep: torch.Tensor | None) -> torch.Tensor:
        """patches [B, T, P] (T = N_keep, or N when ids_keep is None) -> tokens with cls [B, 1 + T, D]."""
        x = self.patch_embed(patches)  # [B, T, D]
        pos = self.pos_embed[:, 1:].expand(x.shape[0], -1, -1)  # [B, N, D]
        if ids_keep is not None:
            pos = torch.gather(pos, 1, ids_keep.unsqueeze(-1).expand(-1, -1, self.dim))  # [B, N_keep, D]
        x = x + pos
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)

    def forward(self, patches: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T, P] visible patches -> [B, 1 + T, D] normalised tokens (index 0 is cls)."""
        x = self.embed(patches, ids_keep)
        x, _ = run_blocks(self.blocks, x, self.grad_checkpointing)
        return self.norm(x)

    def forward_volume(self, volume: torch.Tensor, return_blocks: tuple[int, ...] = ()):
        """Unmasked encoding for downstream use: [B, C, X, Y, Z] -> tokens [B, 1 + N, D]
        (and the outputs of the 1-based blocks in return_blocks, without the final norm)."""
        if tuple(volume.shape[2:]) != self.img_size:
            raise ValueError(f"encoder expects volumes of {self.img_size} voxels, got {tuple(volume.shape[2:])}")
        x = self.embed(patchify3d(volume, self.patch_size), None)
        x, outs = run_blocks(self.blocks, x, self.grad_checkpointing)
        tokens = self.norm(x)
        if return_blocks:
            return tokens, [outs[i - 1] for i in return_blocks]
        return tokens

    def forward_features(self, volume: torch.Tensor) -> torch.Tensor:
        """The public name of forward_volume (timm's): [B, C, X, Y, Z] -> [B, 1 + N, D], no masking, index 0 is
        cls, final norm applied (docs/interop.md)."""
        return self.forward_volume(volume)

    def intermediate_layers(self, volume: torch.Tensor, layers, norm: bool = False, reshape: bool = False):
        """UNETR-style skips: the outputs of the 1-based blocks in `layers`, each [B, 1 + N, D] (without the final
        norm unless norm=True), or with reshape=True the patch tokens as grids [B, D, gx, gy, gz] (cls dropped)."""
        layers = tuple(int(i) for i in layers)
        bad = [i for i in layers if not 1 <= i <= self.depth]
        if bad:
            raise ValueError(f"layers must be 1-based block numbers in 1..{self.depth}, got {list(bad)}")
        if not layers:
            return []
        _, outs = self.forward_volume(volume, return_blocks=layers)
        if norm:
            outs = [self.norm(o) for o in outs]
        if reshape:
            gx, gy, gz = self.grid
            # [B, 1 + N, D] -> drop cls -> [B, gx, gy, gz, D] (token n = (ix * gy + iy) * gz + iz) -> [B, D, gx, gy, gz]
            outs = [o[:, 1:].reshape(o.shape[0], gx, gy, gz, self.dim).permute(0, 4, 1, 2, 3).contiguous() for o in outs]
        return outs


class MIMDecoder(nn.Module):
    """MAE decoder: encoder tokens [B, 1 + N_keep, D_enc] + ids_restore [B, N] -> patch predictions [B, N, P]."""

    def __init__(self, grid, enc_dim, patch_dim, dim=768, depth=4, heads=16, mlp_ratio=4.0):
        super().__init__()
        self.grid = tuple(grid)
        self.embed = nn.Linear(enc_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_3d(dim, self.grid)[None], persistent=False)  # [1, 1 + N, D]
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, patch_dim)
        self.grad_checkpointing = False
        init_weights(self)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, tokens: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)  # [B, 1 + N_keep, Dd]
        B, T, Dd = x.shape
        N = ids_restore.shape[1]
        masks = self.mask_token.expand(B, N + 1 - T, Dd)
        x_ = torch.cat([x[:, 1:], masks], dim=1)  # [B, N, Dd] in shuffled order
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, Dd))  # [B, N, Dd] patch order
        x = torch.cat([x[:, :1], x_], dim=1) + self.pos_embed  # [B, 1 + N, Dd]
        x, _ = run_blocks(self.blocks, x, self.grad_checkpointing)
        return self.pred(self.norm(x))[:, 1:]  # [B, N, P]
