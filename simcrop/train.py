"""SimCroP pre-training: `python -m simcrop.train [--compile] [--preset tiny|vit_b] [--field value ...]`.

With no arguments: the tiny preset on the built-in synthetic CT-report data (generated on first use into the
cache folder), a few hundred steps on the CPU. Writes <out>/metrics.csv, <out>/loss.png and checkpoints
(<out>/checkpoints, see simcrop.checkpoint); `--resume auto` continues the newest one exactly.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from simcrop.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from simcrop.config import Config, ConfigError, add_config_arguments, config_from_args
from simcrop.data.ctrate import DataError, dataset_dir, read_split
from simcrop.data.pretrain import PretrainDataset, ResumableBatches, SampleSpec
from simcrop.ops.backend import BackendUnavailable, describe

METRIC_FIELDS = ("step", "lr", "loss", "mim", "align", "mlm", "grad_norm", "volumes_per_s", "elapsed_s")
# trainable-config fields a resumed run must share with its checkpoint (the rest may change, e.g. steps)
_RESUME_MUST_MATCH = ("model",)


def cache_dir(cfg: Config) -> Path:
    return Path(cfg.data.cache_dir or os.environ.get("SIMCROP_CACHE") or Path.home() / ".cache" / "simcrop")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine")
    return device


def amp_dtype(cfg: Config, device: torch.device):
    if cfg.train.amp == "off" or (cfg.train.amp == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


def lr_at(step: int, cfg: Config) -> float:
    """Linear warm-up over warmup_steps, then half-cosine from lr to min_lr at `steps` (per iteration)."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return t.min_lr + (t.lr - t.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def param_groups(model: torch.nn.Module, weight_decay: float):
    """AdamW groups: decay on weight matrices only; none on biases, norms, tokens and embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or name.endswith(".bias") or "token" in name or "embeddings" in name
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def seed_everything(seed: int) -> None:
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """The global torch RNG states (dropout draws from them; data and masking use per-sample generators)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class TextFeatures:
    """Runs the frozen text encoder on a batch's findings and masked report (no autograd graph).

    The encoder sees only the columns up to the longest real sequence of the batch (padding is masked, so the
    real tokens' features do not change); the features are zero-padded back to the configured length so the
    trainable model always gets the same shapes (one compilation)."""

    def __init__(self, encoder):
        self.encoder = encoder

    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        L = ids.shape[1]
        used = int(mask.sum(1).max())
        feats = self.encoder(ids[:, :used], mask[:, :used].long())  # [B, used, H]
        return torch.nn.functional.pad(feats, (0, 0, 0, L - used))  # [B, L, H]

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        batch = dict(batch)
        batch["findings_feats"] = self.encode(batch["findings_ids"], batch["findings_mask"])
        batch["report_feats"] = self.encode(batch["report_ids"], batch["report_mask"])
        return batch


def build_data(cfg: Config, tokenizer, root: Path, split: str = "train") -> PretrainDataset:
    """The PretrainDataset of one split of a CT-RATE-layout folder (validated up front)."""
    items = read_split(root, split)
    reports_csv = dataset_dir(root) / "radiology_text_reports" / f"{split}_reports.csv"
    return PretrainDataset(items, tokenizer, SampleSpec.from_config(cfg), train=split == "train",
                           reports_csv=str(reports_csv))


def report_corpus(root: Path, split: str = "train") -> list[str]:
    """Report texts (findings + impression) that the tiny-bert tokenizer is trained on."""
    return [f"{it.findings} {it.impression}".strip() for it in read_split(root, split)]


def build_text_encoder(cfg: Config, root: Path | None):
    from simcrop.models.text import FrozenTextEncoder

    corpus = report_corpus(root) if (cfg.model.text_encoder == "tiny-bert" and root is not None) else None
    return FrozenTextEncoder(cfg.model.text_encoder, cache_dir=cache_dir(cfg), corpus=corpus,
                             trust_remote_code=cfg.model.trust_remote_code)


def data_root(cfg: Config) -> Path:
    """The configured data folder, or the built-in synthetic dataset (generated on first use)."""
    if cfg.data.data:
        dataset_dir(cfg.data.data)  # fails early with a clear message
        return Path(cfg.data.data)
    from simcrop.data.synthetic import ensure_default_dataset

    return ensure_default_dataset(cache_dir(cfg), n=cfg.data.synthetic_n)


def build_model(cfg: Config, text) -> torch.nn.Module:
    from simcrop.models.simcrop import SimCroP

    return SimCroP(cfg.model, text.hidden_size, text.vocab_size, text.word_embeddings)


def check_resume_config(saved: dict, cfg: Config, path: Path) -> None:
    now = cfg.to_dict()
    for group in _RESUME_MUST_MATCH:
        diff = [k for k in now[group] if json.dumps(saved.get(group, {}).get(k), default=list) != json.dumps(now[group][k], default=list)]
        if diff:
            raise CheckpointError(
                f"{path}: checkpoint was trained with other model settings ({', '.join(diff[:6])}); "
                f"pass the same preset/overrides or start a new --out"
            )


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


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


class Trainer:
    """Owns model, optimizer, data stream and the step function; `run()` trains to cfg.train.steps."""

    def __init__(self, cfg: Config, log=print):
        self.cfg, self.log = cfg, log
        t = cfg.train
        self.device = resolve_device(t.device)
        self.out = Path(t.out)
        self.resume_from = self._find_resume()
        seed_everything(t.seed)
        self.root = data_root(cfg)
        self.text = build_text_encoder(cfg, self.root).to(self.device)
        self.dataset = build_data(cfg, self.text.tokenizer, self.root)
        self.model = build_model(cfg, self.text).to(self.device)
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2), fused=False
        )
        self.kernels = describe(cfg.model.kernels, self.device)
        self.step = 0
        if self.resume_from is not None:
            self._load(self.resume_from)
        self.features = TextFeatures(self.text)
        self.forward = torch.compile(self.model) if t.compile else self.model
        self.amp = amp_dtype(cfg, self.device)

    def _find_resume(self) -> Path | None:
        t = self.cfg.train
        if not t.resume:
            if latest_checkpoint(self.out) is not None:
                raise ConfigError(
                    f"{self.out} already holds a run (checkpoints); pass --resume auto to continue it, "
                    f"or choose another --out"
                )
            return None
        if t.resume == "auto":
            path = latest_checkpoint(self.out)
            if path is None:
                self.log(f"--resume auto: no checkpoint in {self.out}/checkpoints, starting from scratch")
            return path
        path = Path(t.resume)
        if not path.is_dir():
            raise CheckpointError(f"{path}: checkpoint folder not found")
        return path

    def _load(self, path: Path) -> None:
        model_state, state, saved_cfg = load_checkpoint(path, map_location="cpu")
        check_resume_config(saved_cfg, self.cfg, path)
        missing, unexpected = self.model.load_state_dict(model_state, strict=False)
        if missing or unexpected:
            raise CheckpointError(f"{path}: weights do not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]})")
        self.optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.log(f"resumed from {path} at step {self.step}")

    def save(self) -> Path:
        state = {"optimizer": self.optimizer.state_dict(), "rng": rng_state(), "step": self.step,
                 "text_encoder": self.text.name}
        cfg = self.cfg.to_dict()
        cfg["text_encoder_id"] = self.text.name
        return save_checkpoint(self.out, self.step, self.model.state_dict(), state, cfg)

    def batches(self):
        t, d = self.cfg.train, self.cfg.data
        sampler = ResumableBatches(len(self.dataset), d.batch_size, t.seed, start_batch=self.step * t.accum_steps)
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=sampler, num_workers=d.num_workers, pin_memory=self.device.type == "cuda",
            persistent_workers=d.num_workers > 0,
            generator=torch.Generator().manual_seed(t.seed),  # keeps the global RNG (dropout) untouched
        )
        return iter(loader)

    def train_step(self, batches) -> dict[str, float]:
        """One optimizer step over accum_steps micro-batches; returns the mean loss terms and the grad norm."""
        t = self.cfg.train
        self.model.train()
        lr = lr_at(self.step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        sums = {"loss": 0.0, "mim": 0.0, "align": 0.0, "mlm": 0.0}
        for _ in range(t.accum_steps):
            batch = self.features(to_device(next(batches), self.device))
            with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                out = self.forward(batch)
            (out["loss"] / t.accum_steps).backward()
            for k in sums:
                sums[k] += float(out[k].detach()) / t.accum_steps
        if t.clip_grad > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.clip_grad))
        else:
            grad_norm = float(torch.norm(torch.stack([p.grad.norm() for p in self.model.parameters() if p.grad is not None])))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {**sums, "lr": lr, "grad_norm": grad_norm}

    def run(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        self.out.mkdir(parents=True, exist_ok=True)
        metrics_csv, png = self.out / "metrics.csv", self.out / "loss.png"
        trim_metrics(metrics_csv, self.step)
        (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=list))
        n_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.log(
            f"simcrop.train: preset {t.preset}, {n_params / 1e6:.2f}M trainable parameters, device {self.device}, "
            f"amp {self.amp or 'off'}, compile {t.compile}\n"
            f"  data {self.root} ({len(self.dataset)} training volumes), text encoder {self.text.name} (frozen)\n"
            f"  global batch {cfg.data.batch_size} x {t.accum_steps} accumulation = "
            f"{cfg.data.batch_size * t.accum_steps} volumes/step, steps {self.step} -> {t.steps}\n"
            f"  kernels ({cfg.model.kernels}): " + ", ".join(f"{k}={v}" for k, v in self.kernels.items())
        )
        from tqdm import tqdm

        batches = self.batches()
        bar = tqdm(total=t.steps, initial=self.step, disable=not t.progress, dynamic_ncols=True, file=sys.stderr)
        pending, t0, last = [], time.perf_counter(), time.perf_counter()
        end = min(t.steps, self.step + t.stop_after) if t.stop_after else t.steps
        while self.step < end:
            m = self.train_step(batches)
            now = time.perf_counter()
            m.update(step=self.step, volumes_per_s=cfg.data.batch_size * t.accum_steps / (now - last),
                     elapsed_s=now - t0)
            last = now
            pending.append({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in m.items()})
            bar.update(1)
            bar.set_postfix_str(
                f"loss {m['loss']:.3f} mim {m['mim']:.3f} align {m['align']:.3f} mlm {m['mlm']:.3f} "
                f"{m['volumes_per_s']:.1f} vol/s"
            )
            if not math.isfinite(m["loss"]):
                bar.close()
                raise FloatingPointError(f"non-finite loss {m['loss']} at step {self.step}")
            if self.step % t.log_every == 0 or self.step == end or self.step % t.ckpt_every == 0:
                write_metrics(metrics_csv, pending)
                pending = []
            if self.step % t.ckpt_every == 0 or self.step == end:
                self.save()
        bar.close()
        write_metrics(metrics_csv, pending)
        plot_losses(metrics_csv, png)
        ckpt = latest_checkpoint(self.out)
        return {"checkpoint": ckpt, "metrics": metrics_csv, "plot": png, "elapsed_s": time.perf_counter() - t0}


def summarize(metrics_csv: Path) -> str:
    with open(metrics_csv, newline="") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    if len(losses) < 10:
        return f"final loss {losses[-1]:.4f}" if losses else "no steps"
    k = max(1, len(losses) // 10)
    return f"mean loss first 10% {np.mean(losses[:k]):.4f} -> last 10% {np.mean(losses[-k:]):.4f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simcrop.train", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
        trainer = Trainer(cfg)
        result = trainer.run()
    except (ConfigError, DataError, CheckpointError, BackendUnavailable, FileNotFoundError) as exc:
        message = " ".join(str(exc).split())  # one line
        print(f"simcrop.train: error: {message}", file=sys.stderr)
        return 2
    print(
        f"done in {result['elapsed_s']:.0f} s: {summarize(result['metrics'])}\n"
        f"  checkpoint {result['checkpoint']}\n  metrics    {result['metrics']}\n  loss plot  {result['plot']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
