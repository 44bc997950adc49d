"""The pre-training loop: `Trainer(cfg).run()` trains SimCroP to cfg.train.steps and writes the run folder.

<out>/metrics.csv, <out>/loss.png (simcrop.run_log) and checkpoints (<out>/checkpoints, simcrop.checkpoint);
`resume="auto"` continues the newest one exactly. The command line is the `train` module beside this one;
the model, the text tower, the device and the data folder come from simcrop.factory.
"""
from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import time
from pathlib import Path

import torch

from simcrop.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from simcrop.config import Config, ConfigError, ModelConfig
from simcrop.data.ctrate import dataset_dir, read_split
from simcrop.data.loader import make_loader
from simcrop.data.prepared import build_prepared_data, is_prepared
from simcrop.data.pretrain import PretrainDataset, SampleSpec
from simcrop.distributed import (
    all_reduce_sum,
    any_rank,
    full_model_state,
    full_optimizer_state,
    init_distributed,
    load_full_state,
    rank0_first,
    wrap_model,
)
from simcrop.factory import build_model, build_text_encoder, data_root, resolve_device, seed_everything
from simcrop.models.text import TextFeatures
from simcrop.ops.backend import describe
from simcrop.run_log import RunLog

# a resumed run must share its checkpoint's model settings (training settings such as steps may change)
_RESUME_MAY_CHANGE = ("kernels",)


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


# AdamW's three implementations in torch (the same update; fused: one kernel over all parameters, foreach: a few
# multi-tensor ops, loop: one parameter at a time, the reference); tests/test_train.py checks they agree
ADAMW_IMPLS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False, "fused": False}}


def resolve_adamw_impl(name: str, sharded: bool) -> str:
    """'auto' -> fused (CPU and CUDA kernels exist in torch >= 2.4), foreach under FSDP2 (sharded DTensor
    parameters); an explicit choice is kept."""
    if name != "auto":
        return name
    return "foreach" if sharded else "fused"


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


def build_data(cfg: Config, tokenizer, root: Path, split: str = "train") -> PretrainDataset:
    """The PretrainDataset of one split of a CT-RATE-layout folder (validated up front)."""
    items = read_split(root, split)
    reports_csv = dataset_dir(root) / "radiology_text_reports" / f"{split}_reports.csv"
    return PretrainDataset(items, tokenizer, SampleSpec.from_config(cfg), train=split == "train",
                           reports_csv=str(reports_csv))


def check_resume_config(saved: dict, cfg: Config, path: Path) -> None:
    """A resumed run must keep its checkpoint's model settings. A field the checkpoint predates counts as its
    default (a newer simcrop adds extensions that are off by default)."""
    now, before = cfg.to_dict()["model"], saved.get("model", {})
    defaults = dataclasses.asdict(ModelConfig())
    diff = [k for k in now if k not in _RESUME_MAY_CHANGE
            and json.dumps(before.get(k, defaults[k]), default=list) != json.dumps(now[k], default=list)]
    if diff:
        raise CheckpointError(
            f"{path}: checkpoint was trained with other model settings ({', '.join(diff[:6])}); "
            f"pass the same preset/overrides or start a new --out"
        )


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


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
        self.adamw_impl = resolve_adamw_impl(t.adamw_impl, t.fsdp and self.dist.world_size > 1)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, t.weight_decay), lr=t.lr,
                                           betas=(t.beta1, t.beta2), **ADAMW_IMPLS[self.adamw_impl])
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

    def _extension_log(self) -> str:
        """Start-up lines naming the alignment extensions that are on (docs/method.md), '' when none is."""
        m, world = self.cfg.model, self.dist.world_size
        if not m.use_align:
            return ""
        lines = []
        if m.w_align_soft > 0:
            from simcrop.ops.backend import resolve

            _, impl = resolve("soft_pool_align", m.kernels, self.device)  # fails here, not mid-run, if unavailable
            lines.append(
                f"  alignment extension: cross-CT soft sentence-volume contrast, w_align_soft {m.w_align_soft}, "
                f"soft_pool_tau {m.soft_pool_tau}, tau {m.tau}; negatives: the {self.cfg.data.batch_size * world} "
                f"CTs of each global micro-batch" + (f" (all-gathered over {world} ranks)" if world > 1 else "")
                + f"; soft_pool_align={impl}"
            )
        if m.w_align_volume > 0:
            lines.append(f"  alignment extension: top-K sentence-volume contrast, w_align_volume {m.w_align_volume}; "
                         f"negatives: the {self.cfg.data.batch_size} CTs of each rank's micro-batch")
        if lines and not m.align_within:
            lines.append("  SPEC's within-CT L_align is OFF (--no-align-within): the align term is the extension(s) only")
        return "".join("\n" + line for line in lines)

    def run(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        main = self.dist.is_main
        run_log = None
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            run_log = RunLog(self.out, t.log_to, cfg.to_dict(), start_step=self.step)
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=list))
        n_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        world = self.dist.world_size
        self.log(
            f"simcrop pre-training: preset {t.preset}, {n_params / 1e6:.2f}M trainable parameters, device {self.device}, "
            f"amp {self.amp or 'off'}, compile {t.compile}, AdamW {self.adamw_impl}"
            + (f", {world} ranks ({'FSDP2' if t.fsdp else 'DDP'})" if world > 1 else "") + "\n"
            f"  data {self.root} ({len(self.dataset)} training volumes), text encoder {self.text.name} (frozen)\n"
            f"  global batch {cfg.data.batch_size} per device x {world} device(s) x {t.accum_steps} accumulation = "
            f"{cfg.data.batch_size * world * t.accum_steps} volumes/step, steps {self.step} -> {t.steps} "
            f"(warm-up {t.warmup_steps}), logs: {t.log_to}\n"
            f"  kernels ({cfg.model.kernels}): " + ", ".join(f"{k}={v}" for k, v in self.kernels.items())
            + self._extension_log()
        )
        from tqdm import tqdm

        batches = self.batches()
        bar = tqdm(total=t.steps, initial=self.step, disable=not (t.progress and main), dynamic_ncols=True,
                   file=sys.stderr)
        t0, last = time.perf_counter(), time.perf_counter()
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
                if main:
                    run_log.step(m)
                bar.update(1)
                bar.set_postfix_str(
                    f"loss {m['loss']:.3f} mim {m['mim']:.3f} align {m['align']:.3f} mlm {m['mlm']:.3f} "
                    f"{m['volumes_per_s']:.1f} vol/s"
                )
                stopped_by_signal = any_rank(stop.flag, self.dist, self.device)
                at_checkpoint = self.step % t.ckpt_every == 0 or self.step == end or stopped_by_signal
                if main and (self.step % t.log_every == 0 or at_checkpoint):
                    run_log.flush()
                if at_checkpoint:
                    self.save()
                if stopped_by_signal:
                    self.log(f"stop requested: checkpoint written at step {self.step}, exiting")
                    break
        bar.close()
        result = {"checkpoint": latest_checkpoint(self.out), "metrics": self.out / "metrics.csv",
                  "plot": self.out / "loss.png",
                  "elapsed_s": time.perf_counter() - t0, "skipped_steps": self.skipped_steps,
                  "stopped": stopped_by_signal}
        if main:
            run_log.close()
        return result
