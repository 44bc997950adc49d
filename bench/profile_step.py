"""Where the time of a training step goes: a few steps under torch.profiler, summed by stage.

    python -m bench.profile_step --shape tiny|paper [--provider eager-auto] [--steps N] [--warmup N] [--batch N]
                                 [--data synthetic|generated] [--out profile.md] [--trace trace.json] [--sync-debug]

The step is simcrop.pretraining.Trainer.train_step: `--data synthetic` (the tiny shape's default) runs a real
Trainer over the built-in synthetic CT-report data (loading and augmentation included); `--data generated` (the
paper shape's default) runs the step of bench/_step.py on a generated batch (data = 0). Providers as in
bench/bench_train_step.py (`<eager|compiled>-<reference|auto>[-bf16][-gc]`).

Stages are profiler ranges: the model's (simcrop.models.simcrop.stage: simcrop.mask_patches, .encode, .mim,
.align, .mlm.fusion, .mlm.head), and three this tool adds around the Trainer's parts (simcrop.data, simcrop.
text_encoder, simcrop.grad_clip; AdamW's own Optimizer.step / zero_grad ranges). Each op's SELF time goes to the
innermost stage around it; a backward op goes to the stage of the forward op that made its autograd node (the
profiler's sequence numbers), so each stage's row holds its forward AND backward. On CPU the column is self CPU
time; on CUDA also the self device time of the kernels each op launched. `host` = time inside a stage but in no
op (Python, dispatch); "other host overhead" = the step's time outside every stage and op. Under torch.compile
the model is one graph: its stages show as one "model (compiled)" row. The profiler adds a little per op: read
shares, not absolute times (bench_train_step.py times the step without it).
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import platform
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from . import _step
from ._timing import device_name

ROWS = [  # (row, range names: exact, or a prefix when ending in '#' or ':')
    ("image encoder (masking + patch embedding + ViT)", ("simcrop.mask_patches", "simcrop.encode")),
    ("MIM decoder + loss", ("simcrop.mim",)),
    ("frozen text encoder (findings + report)", ("simcrop.text_encoder",)),
    ("fusion + text decoder", ("simcrop.mlm.fusion",)),
    ("MLM head + loss", ("simcrop.mlm.head",)),
    ("alignment (heads, top-K, InfoNCE)", ("simcrop.align",)),
    ("optimizer (grad clip + AdamW + zero_grad)", ("simcrop.grad_clip", "Optimizer.step#", "Optimizer.zero_grad#")),
    ("data + augmentation", ("simcrop.data",)),
    ("model (compiled: stages fused, forward + backward)", ("Torch-Compiled Region:", "CompiledFunction")),
]
OTHER_OPS = "other ops (loss weighting, term counts, copies)"
HOST = "other host overhead (outside every stage and op)"
STEP = "simcrop.step"
BACKWARD = "autograd::engine::evaluate_function: "


def _row_of_range(name: str) -> str | None:
    for row, keys in ROWS:
        for key in keys:
            if name == key or (key[-1] in "#:" and name.startswith(key)):
                return row
    if name.startswith(BACKWARD + "CompiledFunctionBackward"):
        return ROWS[-1][0]
    return None


def _is_range(name: str) -> bool:
    """A user range (its self time is host time inside a stage), not an op."""
    return name == STEP or name.startswith(("simcrop.", "Optimizer.")) or _row_of_range(name) == ROWS[-1][0]


def breakdown(events, steps: int) -> tuple[dict, float, float, bool]:
    """Profiler events -> ({row: [ops cpu ms, host ms, device ms] per step}, wall ms per step, device ms per step,
    on_cuda)."""
    cpu = [e for e in events if getattr(e, "device_type", None) is None or e.device_type.name == "CPU"]
    windows = [e.time_range for e in cpu if e.name == STEP]
    if not windows:
        raise RuntimeError("no simcrop.step range in the profile")
    t0, t1 = min(w.start for w in windows), max(w.end for w in windows)
    cpu = [e for e in cpu if t0 <= e.time_range.start <= t1]

    def under_backward(e) -> bool:
        while e is not None:
            if e.name.startswith(BACKWARD):
                return True
            e = e.cpu_parent
        return False

    def range_row(e) -> str | None:
        while e is not None:
            row = _row_of_range(e.name)
            if row is not None:
                return row
            e = e.cpu_parent
        return None

    forward_row = {}  # (thread, autograd sequence number) -> row of the forward op that made the node
    for e in cpu:
        if e.sequence_nr >= 0 and not under_backward(e):
            row = range_row(e)
            if row is not None:
                forward_row.setdefault((e.thread, e.sequence_nr), row)

    def row_of(e) -> str:
        node = e
        while node is not None:
            row = _row_of_range(node.name)
            if row is not None:
                return row
            if node.name.startswith(BACKWARD):
                return forward_row.get((node.fwd_thread, node.sequence_nr), OTHER_OPS)
            node = node.cpu_parent
        return OTHER_OPS

    table = defaultdict(lambda: [0.0, 0.0, 0.0])
    on_cuda = False
    for e in cpu:
        dev = getattr(e, "self_device_time_total", None)
        dev = getattr(e, "self_cuda_time_total", 0.0) if dev is None else dev
        on_cuda = on_cuda or dev > 0
        if e.name == STEP:
            table[HOST][1] += e.self_cpu_time_total
            continue
        row = row_of(e)
        table[row][1 if _is_range(e.name) else 0] += e.self_cpu_time_total
        table[row][2] += dev
    wall = sum(w.end - w.start for w in windows)
    per_step = {row: [v / steps / 1e3 for v in vals] for row, vals in table.items()}
    device = sum(v[2] for v in per_step.values())
    return per_step, wall / steps / 1e3, device, on_cuda


def markdown(per_step: dict, wall_ms: float, device_ms: float, on_cuda: bool) -> str:
    order = [r for r, _ in ROWS] + [OTHER_OPS, HOST]
    if on_cuda:
        lines = ["| stage | device ms | % of step | host ms (ops + outside ops) |", "|---|---|---|---|"]
        for row in order:
            ops, host, dev = per_step.get(row, (0.0, 0.0, 0.0))
            lines.append(f"| {row} | {dev:.1f} | {100 * dev / wall_ms:.1f}% | {ops:.1f} + {host:.1f} |")
        idle = wall_ms - device_ms
        lines.append(f"| device idle (waiting for the host: launches, syncs, Python) | {idle:.1f} | "
                     f"{100 * idle / wall_ms:.1f}% | |")
    else:
        lines = ["| stage | ms | % of step | of which outside ops (host) ms |", "|---|---|---|---|"]
        for row in order:
            ops, host, _ = per_step.get(row, (0.0, 0.0, 0.0))
            lines.append(f"| {row} | {ops + host:.1f} | {100 * (ops + host) / wall_ms:.1f}% | {host:.1f} |")
    lines.append(f"| **step (wall)** | {wall_ms:.1f} | 100% | |")
    return "\n".join(lines)


def top_ops(prof, on_cuda: bool, steps: int, n: int = 12) -> str:
    key = "self_device_time_total" if on_cuda else "self_cpu_time_total"
    avgs = [a for a in prof.key_averages() if not _is_range(a.key) and not a.key.startswith(BACKWARD)]
    avgs.sort(key=lambda a: -(getattr(a, key, 0) or 0))
    total = sum(getattr(a, key, 0) or 0 for a in avgs) or 1
    lines = [f"| op (top {n} by self {'device' if on_cuda else 'CPU'} time) | ms/step | % | calls/step |",
             "|---|---|---|---|"]
    for a in avgs[:n]:
        t = getattr(a, key, 0) or 0
        lines.append(f"| {a.key} | {t / steps / 1e3:.1f} | {100 * t / total:.1f}% | {a.count / steps:.0f} |")
    return "\n".join(lines)


# -- the step under profiler ranges ------------------------------------------------------------------------------
class _Ranged:
    """Calls `fn` inside a profiler range (TextFeatures of the Trainer)."""

    def __init__(self, fn, name: str):
        self.fn, self.name = fn, name

    def __call__(self, *args, **kwargs):
        with record_function(self.name):
            return self.fn(*args, **kwargs)


def _ranged_batches(batches):
    while True:
        with record_function("simcrop.data"):
            batch = next(batches)
        yield batch


@contextlib.contextmanager
def _ranged_grad_clip():
    """Trainer.train_step calls torch.nn.utils.clip_grad_norm_: time it as part of the optimizer row."""
    original = torch.nn.utils.clip_grad_norm_
    torch.nn.utils.clip_grad_norm_ = _Ranged(original, "simcrop.grad_clip")
    try:
        yield
    finally:
        torch.nn.utils.clip_grad_norm_ = original


def build(args, device: torch.device):
    """(trainer, batches iterator, StepCase or None) for the shape / data / provider asked for."""
    if args.data == "generated":
        case = _step.make_case(args.shape, args.provider, device, args.batch)
        return case.trainer, itertools.repeat(case.batch), case
    if args.shape != "tiny":
        raise SystemExit("profile_step: --data synthetic runs the tiny preset only (the paper shape: --data generated)")
    from simcrop.config import make_config
    from simcrop.pretraining import Trainer

    p = _step.provider(args.provider)
    out = tempfile.mkdtemp(prefix="simcrop-profile-")
    cfg = make_config("tiny", out=out, synthetic_n=64, compile=p.compile, kernels=p.kernels, amp=p.amp,
                      grad_checkpointing=p.grad_checkpointing, progress=False, steps=10_000, device=str(device),
                      batch_size=args.batch or 4, text_encoder=args.text_encoder)
    trainer = Trainer(cfg, log=lambda *_: None)
    return trainer, trainer.batches(), None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.profile_step", description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(_step.SHAPES), default="tiny")
    ap.add_argument("--provider", default="eager-auto", help="<eager|compiled>-<reference|auto>[-bf16][-gc]")
    ap.add_argument("--data", choices=["synthetic", "generated"], default=None,
                    help="synthetic: a real Trainer over the built-in data (tiny); generated: bench/_step.py's batch")
    ap.add_argument("--steps", type=int, default=3, help="profiled steps")
    ap.add_argument("--warmup", type=int, default=None, help="unprofiled steps first (default 1; 2 when compiled)")
    ap.add_argument("--batch", type=int, default=None, help="volumes per step (default as bench/_step.py)")
    ap.add_argument("--text-encoder", default="minilm", help="--data synthetic: the frozen text tower")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=None, help="write the tables as Markdown to this file")
    ap.add_argument("--trace", default=None, help="write a Chrome trace (JSON) of the profiled steps")
    ap.add_argument("--sync-debug", action="store_true",
                    help="then one step under torch.cuda.set_sync_debug_mode('warn'): count host-device syncs")
    args = ap.parse_args(argv)
    args.data = args.data or ("synthetic" if args.shape == "tiny" else "generated")
    prov = _step.provider(args.provider)
    warmup = args.warmup if args.warmup is not None else (2 if prov.compile else 1)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)

    trainer, batches, case = build(args, device)
    batches = _ranged_batches(batches)
    trainer.features = _Ranged(trainer.features, "simcrop.text_encoder")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def one_step():
        with record_function(STEP):
            trainer.train_step(batches)
            sync()

    with _ranged_grad_clip():
        unprofiled = None
        for _ in range(warmup):
            t = time.perf_counter()
            one_step()
            unprofiled = time.perf_counter() - t
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                one_step()
        syncs = _step.host_syncs(one_step) if args.sync_debug else None

    per_step, wall_ms, device_ms, on_cuda = breakdown(prof.events(), args.steps)
    bsz = case.batch_size if case else trainer.cfg.data.batch_size
    head = [
        f"# Step profile: {args.shape} shape, provider {args.provider}, {args.data} data, batch {bsz}",
        "",
        (f"{device_name(device)}; torch {torch.__version__}, "
         f"{torch.get_num_threads()} threads, Python {platform.python_version()}; {args.steps} profiled steps after "
         f"{warmup} warm-up; {time.strftime('%Y-%m-%d %H:%M')}. Command: `python -m bench.profile_step "
         f"{' '.join(sys.argv[1:] if argv is None else argv)}`"),
        "",
        f"Step: {wall_ms / 1e3:.3f} s profiled" + (f", {unprofiled:.3f} s the last unprofiled warm-up step"
                                                   if unprofiled else "") + ".",
    ]
    if case is not None:
        f = case.flops
        head.append(f"Model FLOPs/step {f.total / 1e9:.1f} GFLOP (simcrop.models.flops): "
                    f"{f.total / (wall_ms / 1e3) / 1e12:.3f} TFLOP/s under the profiler; word pieces "
                    f"{_step.text_stats(case.batch)}.")
    text = "\n".join(head) + "\n\n" + markdown(per_step, wall_ms, device_ms, on_cuda) + "\n\n" + \
        top_ops(prof, on_cuda, args.steps) + "\n"
    if syncs is not None:
        text += (f"\nHost-device syncs in one step (torch.cuda.set_sync_debug_mode): {syncs['syncs']}"
                 + (f" at {syncs.get('sync_sites')}" if syncs.get("sync_sites") else "")
                 + ("" if syncs["syncs"] is not None else " (no CUDA device: not checked)") + "\n")
    if case is not None:
        text += "\nModel FLOPs per component:\n\n" + case.flops.table() + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    if args.trace:
        prof.export_chrome_trace(args.trace)
    return 0


if __name__ == "__main__":
    sys.exit(main())
