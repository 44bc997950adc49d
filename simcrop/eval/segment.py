"""Segmentation: a UNETR decoder on the pre-trained 3D ViT (SimCroP's protocol), trained with DiceCE,
evaluated by sliding-window inference (overlap 0.5) and Dice per class without background.

Differences from the authors' code, on purpose: the position embedding is our fixed 3D sin-cos (x, y AND z;
theirs ignored depth), recomputed for the ROI's patch grid when the ROI differs from the pre-training crop
(sin-cos positions are a formula of the patch index, so the pre-trained weights see the same code for the
same position); any patch size that is a power of two up to 16 per axis works (the paper's 16 x 16 x 8 gives
the decoder one fewer 2x upsampling along z: the first up-step is 2 x 2 x 1); skip features come from blocks
evenly spaced over the depth (3/6/9/12 of 12; 1/2/3/4 of the tiny preset's 4), the deepest one after the
encoder's final LayerNorm as in MONAI's UNETR.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn as nn

from simcrop.eval import metrics as M
from simcrop.eval.data import SegCase, load_seg_image, pad_min
from simcrop.eval.errors import EvalError
from simcrop.models.vit3d import ViT3DEncoder


def skip_blocks(depth: int) -> tuple[int, int, int, int]:
    """1-based blocks whose outputs feed the decoder: evenly spaced, ending at the last (12 -> 3, 6, 9, 12)."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    return tuple(max(1, (depth * i + 2) // 4) for i in (1, 2, 3, 4))  # type: ignore[return-value]


def up_factors(patch) -> list[tuple[int, int, int]]:
    """Per-axis 2x / 1x factors of the decoder's 4 up-steps (coarse -> fine); their product is the patch."""
    exps = []
    for p in patch:
        e = int(round(math.log2(p))) if p > 0 else -1
        if e < 0 or e > 4 or 2**e != p:
            raise EvalError(f"UNETR decoder needs patch sides that are powers of two up to 16, got {tuple(patch)}")
        exps.append(e)
    return [tuple(2 if k > 4 - e else 1 for e in exps) for k in (1, 2, 3, 4)]  # type: ignore[misc]


def encoder_for_roi(cfg_model, pretrained: ViT3DEncoder, roi) -> ViT3DEncoder:
    """A copy of the pre-trained encoder for `roi` voxels: same weights, position embedding recomputed for the
    ROI's grid (a non-persistent buffer, so load_state_dict leaves the new one in place)."""
    enc = ViT3DEncoder(tuple(roi), pretrained.patch_size, pretrained.in_chans, pretrained.dim, pretrained.depth,
                       cfg_model.enc_heads, cfg_model.mlp_ratio)
    enc.load_state_dict(pretrained.state_dict())
    return enc


class _PrUp(nn.Module):
    """MONAI's UnetrPrUpBlock with one up-factor per step: transposed conv, then (transposed conv + residual
    conv block) per further step."""

    def __init__(self, cin: int, cout: int, factors, norm: str):
        super().__init__()
        from monai.networks.blocks.dynunet_block import UnetResBlock, get_conv_layer

        def up(a, b, f):
            return get_conv_layer(3, a, b, kernel_size=f, stride=f, conv_only=True, is_transposed=True)

        self.init = up(cin, cout, factors[0])
        self.blocks = nn.ModuleList(
            [nn.Sequential(up(cout, cout, f), UnetResBlock(3, cout, cout, kernel_size=3, stride=1, norm_name=norm))
             for f in factors[1:]]
        )

    def forward(self, x):
        x = self.init(x)
        for blk in self.blocks:
            x = blk(x)
        return x


class UNETR(nn.Module):
    """[B, C, *roi] -> logits [B, classes, *roi]; encoder = our ViT3DEncoder built for the ROI."""

    def __init__(self, encoder: ViT3DEncoder, classes: int, feature_size: int = 16, norm: str = "instance"):
        super().__init__()
        from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrUpBlock

        self.encoder = encoder
        self.skips = skip_blocks(encoder.depth)
        f, D, fs = up_factors(encoder.patch_size), encoder.dim, feature_size
        self.factors = f
        self.encoder1 = UnetrBasicBlock(3, encoder.in_chans, fs, kernel_size=3, stride=1, norm_name=norm, res_block=True)
        self.encoder2 = _PrUp(D, 2 * fs, f[0:3], norm)
        self.encoder3 = _PrUp(D, 4 * fs, f[0:2], norm)
        self.encoder4 = _PrUp(D, 8 * fs, f[0:1], norm)
        self.decoder5 = UnetrUpBlock(3, D, 8 * fs, kernel_size=3, upsample_kernel_size=f[0], norm_name=norm, res_block=True)
        self.decoder4 = UnetrUpBlock(3, 8 * fs, 4 * fs, kernel_size=3, upsample_kernel_size=f[1], norm_name=norm, res_block=True)
        self.decoder3 = UnetrUpBlock(3, 4 * fs, 2 * fs, kernel_size=3, upsample_kernel_size=f[2], norm_name=norm, res_block=True)
        self.decoder2 = UnetrUpBlock(3, 2 * fs, fs, kernel_size=3, upsample_kernel_size=f[3], norm_name=norm, res_block=True)
        self.out = UnetOutBlock(3, fs, classes)

    def _grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, 1 + N, D] -> [B, D, gx, gy, gz] (token order n = (ix * gy + iy) * gz + iz)."""
        B, _, D = tokens.shape
        gx, gy, gz = self.encoder.grid
        return tokens[:, 1:].reshape(B, gx, gy, gz, D).permute(0, 4, 1, 2, 3).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, hs = self.encoder.forward_volume(x, return_blocks=self.skips[:3])  # [B, 1 + N, D], 3 x same
        enc1 = self.encoder1(x)  # [B, fs, X, Y, Z]
        enc2 = self.encoder2(self._grid(hs[0]))  # level 3 (R/2)
        enc3 = self.encoder3(self._grid(hs[1]))  # level 2 (R/4)
        enc4 = self.encoder4(self._grid(hs[2]))  # level 1 (R/8)
        dec = self.decoder5(self._grid(tokens), enc4)
        dec = self.decoder4(dec, enc3)
        dec = self.decoder3(dec, enc2)
        dec = self.decoder2(dec, enc1)
        return self.out(dec)


def build_unetr(model, roi, classes: int, feature_size: int = 16, seed: int = 0) -> UNETR:
    patch = model.encoder.patch_size
    if len(roi) != 3 or any(r <= 0 or r % p for r, p in zip(roi, patch)):
        raise EvalError(f"--roi {tuple(roi)} must be a positive multiple of the patch size {tuple(patch)} on every axis")
    torch.manual_seed(seed)
    return UNETR(encoder_for_roi(model.cfg, model.encoder, roi), classes, feature_size)


# -- training and inference --------------------------------------------------------------------------------------
class _Cache:
    """Decoded (image, label) pairs, the most recent `max_items` kept (synthetic volumes are ~1 MB each)."""

    def __init__(self, cases: list[SegCase], max_items: int = 256):
        self.cases, self.data, self.max_items = cases, {}, max_items

    def get(self, i: int):
        if i not in self.data:
            if len(self.data) >= self.max_items:
                self.data.pop(next(iter(self.data)))
            img = load_seg_image(self.cases[i])
            lab = self.cases[i].label()
            if lab.shape != img.shape:
                raise EvalError(f"{self.cases[i].name}: label shape {lab.shape} differs from image shape {img.shape}")
            self.data[i] = (torch.from_numpy(np.ascontiguousarray(img)), torch.from_numpy(lab.astype(np.uint8)))
        return self.data[i]


def _sample(img: torch.Tensor, lab: torch.Tensor, roi, gen: torch.Generator, fg_prob: float):
    """A random ROI crop (centred on a random foreground voxel with probability fg_prob); pads with air / 0."""
    img, lab = pad_min(img, roi, -1.0), pad_min(lab, roi, 0)
    shape = img.shape
    fg = torch.rand((), generator=gen) < fg_prob
    if fg and bool((lab > 0).any()):
        idx = torch.nonzero(lab > 0)
        c = idx[int(torch.randint(len(idx), (1,), generator=gen))]
        start = [int(min(max(int(c[a]) - roi[a] // 2, 0), shape[a] - roi[a])) for a in range(3)]
    else:
        start = [int(torch.randint(shape[a] - roi[a] + 1, (1,), generator=gen)) for a in range(3)]
    sl = tuple(slice(s, s + r) for s, r in zip(start, roi))
    return img[sl], lab[sl]


def train_segmenter(net: UNETR, cases: list[SegCase], roi, steps: int, batch_size: int = 2, lr: float = 3e-4,
                    device="cpu", seed: int = 0, freeze_encoder: bool = False, fg_prob: float = 0.5, log=print):
    from monai.losses import DiceCELoss

    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    net.to(device).train()
    if freeze_encoder:
        net.encoder.requires_grad_(False)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-5)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    cache, gen = _Cache(cases), torch.Generator().manual_seed(seed)
    losses, t0 = [], time.perf_counter()
    for step in range(steps):
        xs, ys = [], []
        for _ in range(batch_size):
            img, lab = cache.get(int(torch.randint(len(cases), (1,), generator=gen)))
            x, y = _sample(img, lab, roi, gen, fg_prob)
            xs.append(x[None])
            ys.append(y[None].long())
        x, y = torch.stack(xs).to(device), torch.stack(ys).to(device)  # [B, 1, *roi]
        loss = loss_fn(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if (step + 1) % max(1, steps // 5) == 0 or step + 1 == steps:
            log(f"  segment step {step + 1}/{steps}: DiceCE {np.mean(losses[-20:]):.4f} ({time.perf_counter() - t0:.0f} s)")
    return losses


@torch.no_grad()
def predict(net: UNETR, image: torch.Tensor, roi, device="cpu", sw_batch_size: int = 4) -> torch.Tensor:
    """image [X, Y, Z] in [-1, 1] -> label map [X, Y, Z] (argmax of sliding-window logits, overlap 0.5)."""
    from monai.inferers import sliding_window_inference

    net.eval()
    logits = sliding_window_inference(image[None, None].to(device), tuple(roi), sw_batch_size, net, overlap=0.5,
                                      mode="gaussian", padding_mode="constant", cval=-1.0)
    return logits.argmax(1)[0].cpu()


def evaluate_segmenter(net: UNETR, cases: list[SegCase], roi, classes: list[str], device="cpu") -> dict:
    per_case, inter, total = [], np.zeros(len(classes)), np.zeros(len(classes))
    cache = _Cache(cases)
    for i in range(len(cases)):
        img, lab = cache.get(i)
        pred = predict(net, img, roi, device).numpy()
        target = lab.numpy().astype(np.int64)
        per_case.append(M.dice_per_class(pred, target, len(classes)))
        for c in range(1, len(classes)):
            inter[c] += ((pred == c) & (target == c)).sum()
            total[c] += (pred == c).sum() + (target == c).sum()
        cache.data.pop(i)
    per_class = [M.nanmean(v) for v in zip(*per_case)]
    pooled = [float(2 * inter[c] / total[c]) if total[c] else float("nan") for c in range(1, len(classes))]
    return {"classes": classes[1:], "dice_per_class": per_class, "dice": M.nanmean(per_class),
            "dice_pooled_per_class": pooled, "dice_pooled": M.nanmean(pooled), "n_test": len(cases),
            "cases": [c.name for c in cases], "dice_per_case": per_case}  # [n_test][classes], NaN: class absent


def markdown(res: dict, title: str) -> str:
    from simcrop.eval.report import fmt, md_table

    rows = [[c, fmt(d), fmt(p)] for c, d, p in zip(res["classes"], res["dice_per_class"], res["dice_pooled_per_class"])]
    return "\n\n".join([
        f"# Segmentation (UNETR) — {title}",
        f"Target **{res['target']}**; ROI {res['roi']}, skip blocks {res['skip_blocks']}, "
        f"{res['steps']} steps of DiceCE at batch {res['batch_size']} on {res['n_train']} training volumes "
        f"({'frozen' if res['freeze_encoder'] else 'fine-tuned'} encoder), sliding-window inference (overlap 0.5) on "
        f"{res['n_test']} test volumes. Mean Dice without background **{fmt(res['dice'])}** (per case, then per "
        f"class; pooled over all test voxels: {fmt(res['dice_pooled'])}).",
        md_table(["class", "Dice (mean over cases)", "Dice (pooled voxels)"], rows),
    ])
