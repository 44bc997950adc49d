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
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from simcrop.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from simcrop.config import Config, ConfigError, add_config_arguments, config_from_args
from simcrop.data.ctrate import DataError, dataset_dir, read_split
from simcrop.data.loader import LoaderUnavailable, make_loader
from simcrop.data.prepared import build_prepared_data, is_prepared, prepared_corpus
from simcrop.data.pretrain import PretrainDataset, SampleSpec
from simcrop.distributed import (
    all_reduce_sum,
    any_rank,
    full_model_state,
    full_optimizer_state,
    init_distributed,
    load_full_state,
    rank0_first,
    shutdown,
    wrap_model,
)
from simcrop.ops.backend import BackendUnavailable, describe

METRIC_FIELDS = ("step", "lr", "loss", "mim", "align", "mlm", "grad_norm", "volumes_per_s", "elapsed_s")
# a resumed run must share its checkpoint's model settings (training settings such as steps may change)
_RESUME_MAY_CHANGE = ("kernels",)


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
        if "findings_feats" not in batch:  # prepared data may carry them (the findings are never masked)
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
    if is_prepared(root):
        return prepared_corpus(root, split)
    return [f"{it.findings} {it.impression}".strip() for it in read_split(root, split)]


def build_text_encoder(cfg: Config, root: Path | None):
    from simcrop.models.text import FrozenTextEncoder

    corpus = report_corpus(root) if (cfg.model.text_encoder == "tiny-bert" and root is not None) else None
    return FrozenTextEncoder(cfg.model.text_encoder, cache_dir=cache_dir(cfg), corpus=corpus,
                             trust_remote_code=cfg.model.trust_remote_code)


def data_root(cfg: Config) -> Path:
    """The configured data folder, or the built-in synthetic dataset (generated on first use)."""
    if cfg.data.data and is_prepared(cfg.data.data):
        return Path(cfg.data.data)
    if cfg.data.data:
        dataset_dir(cfg.data.data)  # fails early with a clear message
        return Path(cfg.data.data)
    from simcrop.data.synthetic import ensure_default_dataset

    return ensure_default_dataset(cache_dir(cfg), n=cfg.data.synthetic_n)


def build_model(cfg: Config, text) -> torch.nn.Module:
    from simcrop.models.simcrop import SimCroP

    return SimCroP(cfg.model, text.hidden_size, text.vocab_size, text.word_embeddings)


def check_resume_config(saved: dict, cfg: Config, path: Path) -> None:
    now, before = cfg.to_dict()["model"], saved.get("model", {})
    diff = [k for k in now if k not in _RESUME_MAY_CHANGE
            and json.dumps(before.get(k), default=list) != json.dumps(now[k], default=list)]
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


class StopRequested:
    """SIGTERM / SIGINT set a flag; the loop finishes the step, writes a checkpoint and exits 0."""

    def __init__(self):
        self.flag = False
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some test runners): signals stay as they are
                pass
        return self

    def _handle(self, signum, frame):
        if self.flag and signum == signal.SIGINT:  # a second Ctrl-C interrupts at once
            raise KeyboardInterrupt
        self.flag = True

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class TrainingStopped(RuntimeError):
    """The run cannot go on (too many non-finite steps, out of memory); the message says what to change."""


def oom_message(cfg: Config, device: torch.device) -> str:
    t, d = cfg.train, cfg.data
    return (
        f"out of memory on {device} with preset {t.preset}, batch size {d.batch_size} per device, "
        f"img_size {cfg.model.img_size}: try --grad-checkpointing, a smaller --batch-size with a larger "
        f"--accum-steps (same global batch), --amp bf16 on GPU, or --fsdp under torchrun"
    )


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


class Trainer:
    """Owns model, optimizer, data stream and the step function; `run()` trains to cfg.train.steps.

    Data-parallel under torchrun: every rank draws its slice of the same global batch; the loss terms are
    re-weighted by global counts (hidden patches, valid sentences, labelled tokens) so that the gradient equals
    that of one process holding the whole global batch. Rank 0 alone logs and writes.
    """

    def __init__(self, cfg: Config, log=print):
        t = cfg.train
        self.cfg = cfg
        self.dist, dist_device = init_distributed(t.device)
        self.log = log if self.dist.is_main else (lambda *a, **k: None)
        self.device = dist_device or resolve_device(t.device)
        self.out = Path(t.out)
        self.resume_from = self._find_resume()
        seed_everything(t.seed)
        with rank0_first(self.dist):  # synthetic data and tiny-bert caches are built once
            self.root = data_root(cfg)
            self.text = build_text_encoder(cfg, self.root).to(self.device)
        if is_prepared(self.root):
            self.dataset = build_prepared_data(cfg, self.text, self.root, log=self.log)
        else:
            self.dataset = build_data(cfg, self.text.tokenizer, self.root)
        self.model = build_model(cfg, self.text).to(self.device)
        self.model.set_grad_checkpointing(t.grad_checkpointing)
        self.wrapped = wrap_model(self.model, self.dist, self.device, t.fsdp)
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2), fused=False
        )
        self.kernels = describe(cfg.model.kernels, self.device)
        self.step, self.bad_steps, self.skipped_steps = 0, 0, 0
        if self.resume_from is not None:
            self._load(self.resume_from)
        self.features = TextFeatures(self.text)
        self.forward = torch.compile(self.wrapped) if t.compile else self.wrapped
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
        expected = set(self.model.state_dict())
        if set(model_state) != expected:
            missing, unexpected = sorted(expected - set(model_state)), sorted(set(model_state) - expected)
            raise CheckpointError(f"{path}: weights do not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]})")
        try:
            load_full_state(self.wrapped, self.optimizer, model_state, state["optimizer"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise CheckpointError(f"{path}: cannot restore the training state ({str(exc).splitlines()[0]})") from exc
        set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.log(f"resumed from {path} at step {self.step}")

    def save(self) -> Path | None:
        """Write a checkpoint (collective under FSDP: every rank calls it; rank 0 writes)."""
        model_state = full_model_state(self.wrapped)
        optim_state = full_optimizer_state(self.wrapped, self.optimizer)
        if not self.dist.is_main:
            return None
        state = {"optimizer": optim_state, "rng": rng_state(), "step": self.step,
                 "skipped_steps": self.skipped_steps, "text_encoder": self.text.name}
        cfg = self.cfg.to_dict()
        cfg["text_encoder_id"] = self.text.name
        cfg["world_size"] = self.dist.world_size
        return save_checkpoint(self.out, self.step, model_state, state, cfg)

    def batches(self):
        """Infinite iterator of this rank's micro-batches, starting where self.step left off."""
        t, d = self.cfg.train, self.cfg.data
        return make_loader(d.loader, self.dataset, d.batch_size, t.seed, start_batch=self.step * t.accum_steps,
                           rank=self.dist.rank, world_size=self.dist.world_size, num_workers=d.num_workers,
                           device=self.device, log=self.log)

    def _micro_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Forward + backward of one micro-batch; returns the [3] global-mean terms (detached, float64)."""
        t = self.cfg.train
        counts = self.model.term_counts(batch)  # [3] local hidden patches, sentences, tokens
        global_counts = all_reduce_sum(counts.to(self.device), self.dist).cpu()
        # term_r * c_r / C is rank r's share of the global mean; x world because DDP averages gradients
        share = counts / global_counts.clamp_min(1)
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            out = self.forward(batch)
        m = self.cfg.model
        weights = (m.w_mim, m.w_align, m.w_mlm)
        terms = [out[k] for k in ("mim", "align", "mlm")]
        loss = sum(w * term * float(s * self.dist.world_size) for w, term, s in zip(weights, terms, share))
        (loss / t.accum_steps).backward()
        return torch.stack([term.detach().double().cpu() for term in terms]) * share

    def train_step(self, batches) -> dict[str, float]:
        """One optimizer step over accum_steps micro-batches. A non-finite loss or gradient skips the update
        (counted); the step still consumes its data and schedule slot."""
        t = self.cfg.train
        self.wrapped.train()
        lr = lr_at(self.step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        terms = torch.zeros(3, dtype=torch.float64)
        for _ in range(t.accum_steps):
            batch = self.features(to_device(next(batches), self.device))
            terms += self._micro_step(batch) / t.accum_steps
        terms = all_reduce_sum(terms.to(self.device), self.dist).cpu()  # global means
        m = self.cfg.model
        loss = float(m.w_mim * terms[0] + m.w_align * terms[1] + m.w_mlm * terms[2])
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, t.clip_grad if t.clip_grad > 0 else float("inf")))
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
            self.bad_steps = 0
        else:
            self.bad_steps += 1
            self.skipped_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {"loss": loss, "mim": float(terms[0]), "align": float(terms[1]), "mlm": float(terms[2]),
                "lr": lr, "grad_norm": grad_norm, "skipped": not finite}

    def run(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        main = self.dist.is_main
        metrics_csv, png = self.out / "metrics.csv", self.out / "loss.png"
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            trim_metrics(metrics_csv, self.step)
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=list))
        n_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        world = self.dist.world_size
        self.log(
            f"simcrop.train: preset {t.preset}, {n_params / 1e6:.2f}M trainable parameters, device {self.device}, "
            f"amp {self.amp or 'off'}, compile {t.compile}"
            + (f", {world} ranks ({'FSDP2' if t.fsdp else 'DDP'})" if world > 1 else "") + "\n"
            f"  data {self.root} ({len(self.dataset)} training volumes), text encoder {self.text.name} (frozen)\n"
            f"  global batch {cfg.data.batch_size} per device x {world} device(s) x {t.accum_steps} accumulation = "
            f"{cfg.data.batch_size * world * t.accum_steps} volumes/step, steps {self.step} -> {t.steps}\n"
            f"  kernels ({cfg.model.kernels}): " + ", ".join(f"{k}={v}" for k, v in self.kernels.items())
        )
        from tqdm import tqdm

        batches = self.batches()
        bar = tqdm(total=t.steps, initial=self.step, disable=not (t.progress and main), dynamic_ncols=True,
                   file=sys.stderr)
        pending, t0, last = [], time.perf_counter(), time.perf_counter()
        end = min(t.steps, self.step + t.stop_after) if t.stop_after else t.steps
        global_batch = cfg.data.batch_size * world * t.accum_steps
        stopped_by_signal = False
        with StopRequested() as stop:
            while self.step < end:
                try:
                    m = self.train_step(batches)
                except Exception as exc:
                    if _is_oom(exc):
                        raise TrainingStopped(oom_message(cfg, self.device)) from exc
                    raise
                now = time.perf_counter()
                m.update(step=self.step, volumes_per_s=global_batch / (now - last), elapsed_s=now - t0)
                last = now
                if m.pop("skipped"):
                    self.log(f"step {self.step}: non-finite loss ({m['loss']}) or gradient norm ({m['grad_norm']}): "
                             f"update skipped ({self.skipped_steps} skipped so far, {self.bad_steps} in a row)")
                    if self.bad_steps >= t.max_bad_steps:
                        bar.close()
                        raise TrainingStopped(
                            f"{self.bad_steps} steps in a row had a non-finite loss or gradient (last at step "
                            f"{self.step}); lower --lr, raise --warmup-steps or check the data. The last good "
                            f"checkpoint is {latest_checkpoint(self.out)}"
                        )
                pending.append({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in m.items()})
                bar.update(1)
                bar.set_postfix_str(
                    f"loss {m['loss']:.3f} mim {m['mim']:.3f} align {m['align']:.3f} mlm {m['mlm']:.3f} "
                    f"{m['volumes_per_s']:.1f} vol/s"
                )
                stopped_by_signal = any_rank(stop.flag, self.dist, self.device)
                at_checkpoint = self.step % t.ckpt_every == 0 or self.step == end or stopped_by_signal
                if main and (self.step % t.log_every == 0 or at_checkpoint):
                    write_metrics(metrics_csv, pending)
                    pending = []
                if at_checkpoint:
                    self.save()
                if stopped_by_signal:
                    self.log(f"stop requested: checkpoint written at step {self.step}, exiting")
                    break
        bar.close()
        result = {"checkpoint": latest_checkpoint(self.out), "metrics": metrics_csv, "plot": png,
                  "elapsed_s": time.perf_counter() - t0, "skipped_steps": self.skipped_steps,
                  "stopped": stopped_by_signal}
        if main:
            write_metrics(metrics_csv, pending)
            plot_losses(metrics_csv, png)
        return result


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
    except (ConfigError, DataError, CheckpointError, BackendUnavailable, TrainingStopped, LoaderUnavailable,
            FileNotFoundError) as exc:
        message = " ".join(str(exc).split())  # one line
        print(f"simcrop.train: error: {message}", file=sys.stderr)
        return 2
    finally:
        shutdown()
    if trainer.dist.is_main:
        skipped = f", {result['skipped_steps']} step(s) skipped (non-finite)" if result["skipped_steps"] else ""
        print(
            f"{'stopped' if result['stopped'] else 'done'} in {result['elapsed_s']:.0f} s: "
            f"{summarize(result['metrics'])}{skipped}\n"
            f"  checkpoint {result['checkpoint']}\n  metrics    {result['metrics']}\n  loss plot  {result['plot']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
