"""What a training run writes besides checkpoints: the metrics CSV (one row per step) and the loss plot (always),
optionally TensorBoard event files and an offline W&B run (`--log-to csv,tensorboard,wandb`), and a summary.

    log = RunLog(out, "csv,tensorboard", cfg.to_dict(), start_step=0)
    log.step({"step": 1, "loss": 3.2, ...})   # every METRIC_FIELDS value; trackers get the scalars at once
    log.flush()                               # the CSV rows so far (at log_every and at checkpoints)
    log.close()                               # CSV, loss.png, the plot as a TensorBoard image
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np

from simcrop.config import ConfigError

METRIC_FIELDS = ("step", "lr", "loss", "mim", "align", "mlm", "grad_norm", "volumes_per_s", "elapsed_s")
SCALARS = ("loss", "mim", "align", "mlm", "lr", "grad_norm", "volumes_per_s")  # what trackers receive per step


class RunLog:
    """The run folder's logs; one instance on the main rank. `targets`: comma list of csv | tensorboard | wandb
    (csv is always on). TensorBoard events go to <out>/tensorboard (a resumed run purges the events after its
    checkpoint's step, as the CSV is trimmed); W&B runs offline into <out>/wandb and only if wandb is installed."""

    def __init__(self, out: Path, targets: str, config: dict, start_step: int = 0):
        self.out = Path(out)
        self.csv, self.png = self.out / "metrics.csv", self.out / "loss.png"
        self.pending: list[dict] = []
        wanted = set(filter(None, targets.split(",")))
        trim_metrics(self.csv, start_step)
        self.tb = self.wandb = None
        if "tensorboard" in wanted:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:  # torch's writer needs the tensorboard package
                raise ConfigError(f"--log-to tensorboard needs the tensorboard package ({exc}); "
                                  f"pip install tensorboard") from None
            purge = start_step + 1 if start_step else None  # a resumed run rewrites the steps after its checkpoint
            self.tb = SummaryWriter(str(self.out / "tensorboard"), purge_step=purge)
            self.tb.add_text("config", "```json\n" + json.dumps(config, indent=2, default=list) + "\n```", start_step)
        if "wandb" in wanted:
            try:
                import wandb
            except ImportError:
                raise ConfigError("--log-to wandb needs the wandb package, which is not installed (it is optional: "
                                  "pip install wandb, or log to csv,tensorboard)") from None
            os.environ.setdefault("WANDB_MODE", "offline")
            self.wandb = wandb.init(dir=str(self.out), config=config, mode=os.environ["WANDB_MODE"],
                                    resume="allow" if start_step else None)

    def step(self, row: dict) -> None:
        """One optimizer step's METRIC_FIELDS values (floats and the int step)."""
        self.pending.append({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        scalars = {k: float(row[k]) for k in SCALARS if k in row}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"train/{k}", v, row["step"])
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in scalars.items()}, step=row["step"])

    def flush(self) -> None:
        write_metrics(self.csv, self.pending)
        self.pending = []
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        self.flush()
        plot_losses(self.csv, self.png)
        if self.tb is not None:
            if self.png.is_file():
                import matplotlib.image

                image = matplotlib.image.imread(str(self.png))[..., :3]  # [H, W, 3] float in [0, 1]
                with open(self.csv, newline="") as f:
                    last = max((int(r["step"]) for r in csv.DictReader(f)), default=0)
                self.tb.add_image("loss_plot", image, last, dataformats="HWC")
            self.tb.close()
        if self.wandb is not None:
            if self.png.is_file():
                import wandb

                self.wandb.log({"loss_plot": wandb.Image(str(self.png))})
            self.wandb.finish()


def write_metrics(path: Path, rows: list[dict]) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
        if new:
            w.writeheader()
        w.writerows(rows)


def trim_metrics(path: Path, step: int) -> None:
    """Keep only rows up to `step` (a resumed run rewrites what came after its checkpoint)."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def plot_losses(metrics_csv: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(metrics_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    steps = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("loss", "mim", "align", "mlm"):
        ax.plot(steps, [float(r[key]) for r in rows], label=key, lw=2 if key == "loss" else 1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("SimCroP pre-training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png.with_name(png.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png)


def summarize(metrics_csv: Path) -> str:
    with open(metrics_csv, newline="") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    if len(losses) < 10:
        return f"final loss {losses[-1]:.4f}" if losses else "no steps"
    k = max(1, len(losses) // 10)
    return f"mean loss first 10% {np.mean(losses[:k]):.4f} -> last 10% {np.mean(losses[-k:]):.4f}"
