"""The scaffold every bench/bench_*.py shares: where it runs, the provider switch, timing, and extra_info.

Not a benchmark itself (pytest collects test_*.py and bench_*.py only). Conventions:
- providers: `reference` (eager pure PyTorch), `compiled` (torch.compile(reference), one per function and process),
  and the fused op (`triton` / `extension`); `implementation()` picks one.
- `measure()` warms up (compilation, autotuning, caches), records the device, the thread count and, on CUDA, the
  peak memory of one call above what was allocated before it (`peak_MiB`), then times `rounds` calls
  (synchronised on CUDA). Rates derived from the timing (`record_rate`) are written only when the benchmark was
  timed: under `--benchmark-disable` (a smoke run) there are no stats.
- `measure(..., memory=True)` also records `peak_total_MiB`, the absolute peak of the process: on CUDA
  torch.cuda.max_memory_allocated over that one call, on CPU the peak resident set size over the timed rounds
  (`PeakRSS`; the whole-step benchmarks use it).
- SIMCROP_BENCH_SIZES=paper and SIMCROP_BENCH_PROVIDERS=reference,triton (comma lists) restrict sizes and providers.
- SIMCROP_BENCH_ROUNDS=N caps every benchmark's timed rounds and warm-up calls at N (N >= 1): dry runs
  (bench/gpu_check.sh --dry-run) time one round of everything, so the JSON and the tables are exercised.
"""
from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where the single-device suites run
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
INTERPRETED = DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET", "") == "1"  # Triton on CPU: not a time
DEVICES = [  # for suites that run on both: the CUDA cases skip without a GPU
    "cpu",
    pytest.param(
        "cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
    ),
]

_COMPILED: dict[Callable, Callable] = {}


def selected(variable: str, default: Iterable[str]) -> list[str]:
    """The comma list in the environment variable (SIMCROP_BENCH_SIZES, SIMCROP_BENCH_PROVIDERS), else `default`."""
    return [x for x in os.environ.get(variable, "").split(",") if x] or list(default)


def compiled(fn: Callable) -> Callable:
    """torch.compile(fn, dynamic=False), made once per function."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]


def implementation(provider: str, reference: Callable, fused: Callable, check: Callable, device=DEVICE,
                   size: str | None = None) -> Callable:
    """The function `provider` names: `reference`, `compiled` (torch.compile(reference)), or the fused op, whose
    `check(device)` must pass: a Triton op that cannot run here is skipped (and, in the interpreter, runs at the
    `small` size only); the C++ extension must be built, so it fails instead."""
    if provider == "reference":
        return reference
    if provider == "compiled":
        return compiled(reference)
    reason = check(torch.device(device))
    if provider == "triton":
        if reason is not None:
            pytest.skip(f"triton: {reason}")
        if INTERPRETED and size != "small":
            pytest.skip("triton in the interpreter: small size only")
    elif reason:
        pytest.fail(f"the {provider} cannot run on {device}: {reason}")
    return fused


def op_call(direction: str, fn: Callable, args: Sequence, wrt: Sequence[int]) -> Callable[[], Any]:
    """What one timed call does: `forward` = fn(*args); `backward` = autograd.grad of fn's (first) output w.r.t.
    args[i] for i in `wrt`, through ONE retained forward graph, with a fixed random upstream gradient."""
    if direction == "forward":
        return lambda: fn(*args)
    args = list(args)
    for i in wrt:
        args[i] = args[i].detach().requires_grad_(True)
    out = fn(*args)
    out = out[0] if isinstance(out, tuple) else out
    grad = torch.randn_like(out)
    leaves = [args[i] for i in wrt]
    return lambda: torch.autograd.grad(out, leaves, grad, retain_graph=True)


def op_info(provider: str) -> dict[str, Any]:
    """extra_info of the single-device op suites: dtype, and whether this is the Triton interpreter (no real time)."""
    return {"dtype": str(DTYPE).removeprefix("torch."), "interpreted": provider == "triton" and INTERPRETED}


def op_rounds(size: str) -> int:
    """Timed rounds of the single-device op suites: 30 on CUDA; on CPU 10 at the `small` size, else 3."""
    return 30 if DEVICE.type == "cuda" else (10 if size == "small" else 3)


def device_name(device) -> str:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)


class PeakRSS:
    """The peak resident set size of this process inside a `with` block: `.mib` after it (None where unknown).

    Linux: the kernel's high-water mark (VmHWM) is reset on entry through /proc/self/clear_refs and read on exit,
    so the peak is exact and belongs to the block; where the reset is refused, a thread samples VmRSS every 5 ms.
    """

    def __init__(self):
        self.mib: float | None = None
        self._stop = threading.Event()
        self._thread = None
        self._sampled = 0

    @staticmethod
    def _status(key: str) -> float | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        return int(line.split()[1]) / 1024  # kB -> MiB
        except OSError:
            return None
        return None

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._sampled = max(self._sampled, self._status("VmRSS") or 0)

    def __enter__(self) -> PeakRSS:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak RSS to the current RSS
        except OSError:
            self._sampled = self._status("VmRSS") or 0
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is None:
            self.mib = self._status("VmHWM")
        else:
            self._stop.set()
            self._thread.join()
            self.mib = max(self._sampled, self._status("VmRSS") or 0) or None


def capped(rounds: int, warmup: int) -> tuple[int, int]:
    """(rounds, warmup) under SIMCROP_BENCH_ROUNDS (a cap for dry runs), else as given."""
    cap = int(os.environ.get("SIMCROP_BENCH_ROUNDS", "0") or 0)
    return (max(1, min(rounds, cap)), min(warmup, cap)) if cap > 0 else (rounds, warmup)


def measure(benchmark, run: Callable[[], Any], rounds: int, device=DEVICE, group: str | None = None,
            warmup: int = 2, memory: bool = False, **info: Any) -> None:
    """Time `run`: `warmup` untimed calls, then the median over `rounds` calls (synchronised on CUDA). extra_info:
    device, threads, `info`, and on CUDA peak_MiB, the peak memory of one call above what was allocated before it;
    with `memory`, peak_total_MiB too (the process's absolute peak: CUDA allocator or CPU resident set size)."""
    device = torch.device(device)
    rounds, warmup = capped(rounds, warmup)
    if group is not None:
        benchmark.group = group
    benchmark.extra_info.update(device=device_name(device), threads=torch.get_num_threads(), **info)
    for _ in range(warmup):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        benchmark.extra_info["peak_MiB"] = round((peak - base) / 2**20, 2)
        if memory:
            benchmark.extra_info["peak_total_MiB"] = round(peak / 2**20, 1)

        def timed():
            run()
            torch.cuda.synchronize(device)
    else:
        timed = run
    if device.type == "cpu" and memory:
        with PeakRSS() as rss:
            benchmark.pedantic(timed, rounds=rounds, iterations=1)
        if rss.mib is not None:
            benchmark.extra_info["peak_total_MiB"] = round(rss.mib, 1)
    else:
        benchmark.pedantic(timed, rounds=rounds, iterations=1)


def record_rate(benchmark, key: str, per_call: float, ndigits: int | None = None) -> None:
    """extra_info[key] = per_call / median seconds (e.g. volumes/s), only when timed: no stats under
    --benchmark-disable (smoke run)."""
    if benchmark.stats is not None:
        rate = per_call / benchmark.stats.stats.median
        benchmark.extra_info[key] = rate if ndigits is None else round(rate, ndigits)


def print_summary(request, title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print a table to the terminal even while pytest captures output (for a module fixture's teardown: the
    side-by-side comparison of a suite, beside pytest-benchmark's own table). None prints as '-'."""
    def cell(v: Any) -> str:
        return "-" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))

    table = [list(header)] + [[cell(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["", title, *("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in table)]
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capman = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None:
        print("\n".join(lines))
        return
    with capman.global_and_fixture_disabled() if capman is not None else contextlib.nullcontext():
        for line in lines:
            reporter.write_line(line)
