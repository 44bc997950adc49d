"""A supervised reference classifier: which findings can a model trained WITH labels detect in what the encoder
sees? E3 (docs/ablation.md) averages the linear probe's AUROC over those classes only; a class nobody can detect
at this resolution only adds noise to every variant alike.

Protocol (fixed before E3 was run): the `train` split is divided (stratified, seed 0) into 80 % training and 20 %
validation; the `valid` split (the probes' test set) is not touched. Input: the evaluation transform (centre
crop to the preset's img_size, HU -> [-1, 1]). Model: a small 3D CNN, four conv3x3x3-BN-ReLU blocks (8, 16, 32, 64
channels, max-pool 2 after the first three), global max and mean pooling, a linear layer; BCE, AdamW lr 1e-3,
weight decay 1e-4, batch 8, a fixed number of epochs (no selection on the validation part). A class is
"detectable" when its validation AUROC at the last epoch is >= the threshold (0.75).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from simcrop.eval import metrics as M
from simcrop.eval.data import labels_csv, load_volume, read_items, read_labels
from simcrop.eval.linear_probe import stratified_subset


@dataclass
class ReferenceSettings:
    epochs: int = 12
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    val_fraction: float = 0.2
    threshold: float = 0.75
    seed: int = 0


class ReferenceCNN(nn.Module):
    """[B, 1, X, Y, Z] -> [B, C] logits."""

    def __init__(self, classes: int, widths=(8, 16, 32, 64)):
        super().__init__()
        layers, cin = [], 1
        for i, w in enumerate(widths):
            layers += [nn.Conv3d(cin, w, 3, padding=1, bias=False), nn.BatchNorm3d(w), nn.ReLU(inplace=True)]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool3d(2))
            cin = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(2 * cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x).flatten(2)  # [B, W, voxels]
        return self.head(torch.cat([f.amax(2), f.mean(2)], 1))


def _predict(net: nn.Module, x: torch.Tensor, batch: int) -> np.ndarray:
    net.eval()
    with torch.no_grad():
        return torch.cat([torch.sigmoid(net(x[i:i + batch])) for i in range(0, len(x), batch)]).numpy()


def detectable_classes(root, img_size, s: ReferenceSettings = ReferenceSettings(), log=print) -> dict:
    """Train the reference on the train split's 80 %, score its 20 % -> {'classes', 'val_auroc_per_class',
    'detectable', 'threshold', 'n_train', 'n_val', 'epochs', 'seconds', 'train_loss'}."""
    t0 = time.perf_counter()
    items = read_items(root, "train")
    table = read_labels(labels_csv(root, "train", "auto"), [it.name for it in items], "multilabel")
    y = np.asarray(table.values, np.float32)
    log(f"supervised reference: loading {len(items)} training volumes of {root}")
    x = torch.stack([load_volume(it, img_size) for it in items])  # [N, 1, X, Y, Z]
    val = stratified_subset(y, s.val_fraction, np.random.default_rng(s.seed))
    train = np.setdiff1d(np.arange(len(items)), val)
    torch.manual_seed(s.seed)
    net = ReferenceCNN(y.shape[1])
    opt = torch.optim.AdamW(net.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    loss_fn = nn.BCEWithLogitsLoss()
    gen = torch.Generator().manual_seed(s.seed)
    xt, yt = x[train], torch.as_tensor(y[train])
    losses = []
    for epoch in range(1, s.epochs + 1):
        net.train()
        total = 0.0
        for idx in torch.randperm(len(train), generator=gen).split(s.batch_size):
            loss = loss_fn(net(xt[idx]), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        losses.append(total / len(train))
        log(f"  epoch {epoch}/{s.epochs}: train BCE {losses[-1]:.4f} ({time.perf_counter() - t0:.0f} s)")
    probs = _predict(net, x[val], 2 * s.batch_size)
    res = M.multilabel_metrics(probs, y[val])
    per = [float(v) for v in res["auroc_per_class"]]
    detectable = [c for c, a in zip(table.names, per) if np.isfinite(a) and a >= s.threshold]
    log("  validation AUROC: " + ", ".join(f"{c} {a:.3f}" for c, a in zip(table.names, per))
        + f" -> detectable (>= {s.threshold}): {', '.join(detectable) or 'none'}")
    return {"classes": list(table.names), "val_auroc_per_class": per, "detectable": detectable,
            "threshold": s.threshold, "n_train": int(len(train)), "n_val": int(len(val)), "epochs": s.epochs,
            "train_loss": losses, "seconds": time.perf_counter() - t0}
