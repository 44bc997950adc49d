"""Training-step throughput: the tiny preset through the real Trainer, and the whole step at the paper's shape.

`pytest bench/bench_train_step.py --benchmark-only` (`-k paper` for the paper's shape only, `-k "not paper"`
for the tiny cases). Providers `<eager|compiled>-<reference|auto>[-bf16][-gc]`: torch.compile or not,
--kernels reference (plain PyTorch, the unfused baseline) or auto, --amp bf16, --grad-checkpointing.
- model_step (tiny): forward + backward + AdamW on one fixed batch (text features precomputed);
- full_step (tiny): Trainer.train_step over the built-in synthetic data, i.e. loading + augmenting + text
  encoder + model + optimizer;
- step (tiny, paper): Trainer.train_step on a generated batch (bench/_step.py: a random volume, a realistic
  tokenised report, no data loading), the frozen text tower included; the paper's shape is vit_b at
  224 x 224 x 112 with a BERT-base-sized frozen tower, batch 2 on CPU and 14 on CUDA (SIMCROP_BENCH_BATCH),
  providers SIMCROP_BENCH_STEP_PROVIDERS (default: bench/_step.py's default_providers).
extra_info: steps/s and volumes/s (only when timed); for `step` also s/step, model GFLOP per step
(simcrop.models.flops), achieved TFLOP/s, MFU on CUDA against the card's dense bf16 peak, peak_total_MiB (CPU:
peak resident set size over the timed rounds; CUDA: max_memory_allocated over one step), the word-piece counts,
and on CUDA the host-device synchronisations of one step (compiled providers). Timing: bench/_timing.py.
"""
import os

import pytest

from simcrop.config import make_config
from simcrop.pretraining import Trainer

from . import _step
from ._timing import DEVICE, measure, record_rate

BATCH = 4
TINY_PROVIDERS = ["eager-reference", "eager-auto", "compiled-auto"]


@pytest.fixture(scope="module")
def trainer_factory(tmp_path_factory):
    cache = os.environ.get("SIMCROP_CACHE") or str(tmp_path_factory.mktemp("cache"))

    def make(provider: str) -> Trainer:
        p = _step.provider(provider)
        out = tmp_path_factory.mktemp("run")
        cfg = make_config("tiny", out=str(out), cache_dir=cache, synthetic_n=64, compile=p.compile, progress=False,
                          kernels=p.kernels, adamw_impl=p.adamw_impl, amp=p.amp, grad_checkpointing=p.grad_checkpointing, batch_size=BATCH,
                          steps=10_000, text_encoder=os.environ.get("SIMCROP_BENCH_TEXT", "minilm"))
        return Trainer(cfg, log=lambda *_: None)

    return make


def _record_rates(benchmark, batch: int = BATCH) -> None:
    record_rate(benchmark, "steps_per_s", 1.0)
    record_rate(benchmark, "volumes_per_s", batch)


def _model_step(trainer: Trainer, batch):
    out = trainer.forward(batch)
    out["loss"].backward()
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return out["loss"]


@pytest.mark.parametrize("provider", TINY_PROVIDERS)
def test_model_step(benchmark, trainer_factory, provider):
    trainer = trainer_factory(provider)
    batch = trainer.features(next(trainer.batches()))
    measure(benchmark, lambda: _model_step(trainer, batch), 10, trainer.device,  # warm-up: compilation
            group="tiny model step (fwd+bwd+AdamW)", provider=provider)
    _record_rates(benchmark)


@pytest.mark.parametrize("provider", TINY_PROVIDERS)
def test_full_step(benchmark, trainer_factory, provider):
    trainer = trainer_factory(provider)
    batches = trainer.batches()
    measure(benchmark, lambda: trainer.train_step(batches), 10, trainer.device,
            group="tiny full train step (data + text + model)", provider=provider)
    _record_rates(benchmark)


# rounds (timed, warm-up) per shape and device: a paper-shape step is ~25-40 s on a 2-core CPU
STEP_ROUNDS = {("tiny", "cpu"): (5, 2), ("paper", "cpu"): (2, 1), ("tiny", "cuda"): (10, 2), ("paper", "cuda"): (5, 2)}


@pytest.mark.parametrize("provider", _step.default_providers(DEVICE))
@pytest.mark.parametrize("shape", ["tiny", "paper"])
def test_step(benchmark, shape, provider):
    case = _step.make_case(shape, provider, DEVICE)
    try:
        rounds, warmup = STEP_ROUNDS[(shape, DEVICE.type)]
        group = (f"{shape} step ({case.cfg.train.preset}, batch {case.batch_size}, "
                 f"{'x'.join(map(str, case.cfg.model.img_size))}): text + fwd + bwd + AdamW")
        measure(benchmark, case.run, rounds, DEVICE, group=group, warmup=warmup, memory=True, **case.info())
        if benchmark.stats is not None:  # timed (not a --benchmark-disable smoke run)
            benchmark.extra_info.update(_step.rates(benchmark.stats.stats.median, case))
        if DEVICE.type == "cuda" and case.provider.compile:
            benchmark.extra_info.update(_step.host_syncs(case.run))
    finally:
        case.close()
