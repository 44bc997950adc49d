"""A stand-in for the SimCroP authors' downstream ViT (their Down-stream/Classification_Linear/models_vit.py): a
timm VisionTransformer with their PatchEmbed3D (a Conv3d applied to each patch vector) and their patchify3D, or,
where timm does not import, the same stack written out with timm's names and timm's math (explicit softmax
attention). forward_tokens returns every token after the final norm (theirs normalises cls only: LayerNorm is
per token, so this is the same number for cls and a stronger check)."""
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from functools import partial

import torch
import torch.nn as nn


class _Anything(type):
    """A class whose every attribute is another such class (what timm's import-time torchvision names get)."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything(name, (nn.Module,), {})


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything(name, (nn.Module,), {})


class _TorchvisionStandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def import_timm_vit():
    """timm.models.vision_transformer, or None when timm is not installed. timm's import pulls in torchvision
    (FrozenBatchNorm2d, datasets, transforms: nothing a ViT uses), and torchvision's PyPI wheels need a CUDA build
    of torch; where torchvision does not import, stand-in modules answer those names during timm's import only
    and are removed right after it (find_spec("torchvision") is None again)."""
    if importlib.util.find_spec("timm") is None:
        return None
    try:
        import timm.models.vision_transformer as tv

        return tv
    except Exception:
        pass
    for name in [n for n in sys.modules if n in ("timm", "torchvision") or n.startswith(("timm.", "torchvision."))]:
        del sys.modules[name]
    finder = _TorchvisionStandIn()
    sys.meta_path.insert(0, finder)
    try:
        import timm.models.vision_transformer as tv

        return tv
    except Exception:
        return None
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]


def patchify3d(imgs: torch.Tensor, p) -> torch.Tensor:
    """Their patchify3D: [N, 1, H, W, D] with H == W and h = w = d patches per axis -> [N, L, px*py*pz]."""
    assert imgs.shape[2] == imgs.shape[3] and imgs.shape[2] % p[0] == 0
    h = w = d = imgs.shape[2] // p[0]
    x = imgs.reshape(imgs.shape[0], 1, h, p[0], w, p[1], d, p[2])
    x = torch.einsum("nchpwqdr->nhwdpqrc", x)
    return x.reshape(imgs.shape[0], h * w * d, p[0] * p[1] * p[2] * 1)


class PatchEmbed3D(nn.Module):
    """Theirs: each patch vector [B, L, P] -> reshape (px, py, pz, C) -> Conv3d(kernel = stride = patch) -> [B, L, D]."""

    def __init__(self, patch_size, in_chans=1, embed_dim=768):
        super().__init__()
        self.patch_size, self.in_chans, self.embed_dim = tuple(patch_size), in_chans, embed_dim
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x):
        B, L, _ = x.shape
        x = x.reshape(B * L, *self.patch_size, self.in_chans).permute(0, 4, 1, 2, 3)
        x = self.proj(x).flatten(2).transpose(1, 2)
        return x.reshape(B, L, self.embed_dim)


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, num_heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def forward_tokens(model, x):
    """Their forward_features up to the final norm, on every token."""
    B = x.shape[0]
    x = model.patch_embed(patchify3d(x, model.patch_embed.patch_size))
    x = torch.cat((model.cls_token.expand(B, -1, -1), x), dim=1) + model.pos_embed
    for blk in model.blocks:
        x = blk(x)
    return model.norm(x)


class HandViT(nn.Module):
    def __init__(self, img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio=4.0):
        super().__init__()
        n = (img_size[0] // patch_size[0]) * (img_size[1] // patch_size[1]) * (img_size[2] // patch_size[2])
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, embed_dim), requires_grad=False)
        self.patch_embed = PatchEmbed3D(patch_size, 1, embed_dim)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    forward_tokens = forward_tokens


def build(backend, img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio=4.0):
    """backend 'timm' (None when timm does not import) or 'hand'."""
    if backend == "hand":
        return HandViT(img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio).eval()
    tv = import_timm_vit()
    if tv is None:
        return None

    class TimmViT(tv.VisionTransformer):  # as theirs: timm's init, then the 3D patch embedding and pos_embed
        def __init__(self):
            super().__init__(embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True,
                             norm_layer=partial(nn.LayerNorm, eps=1e-6), num_classes=0)
            n = (img_size[0] // patch_size[0]) * (img_size[1] // patch_size[1]) * (img_size[2] // patch_size[2])
            self.patch_embed = PatchEmbed3D(patch_size, 1, embed_dim)
            self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, embed_dim), requires_grad=False)

        forward_tokens = forward_tokens

    return TimmViT().eval()
