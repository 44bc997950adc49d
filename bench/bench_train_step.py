"""Training-step throughput of the tiny preset: eager vs torch.compile (inductor), on whatever device is here.

`pytest bench/bench_train_step.py --benchmark-only`. Two views:
- model_step: forward + backward + AdamW on one fixed batch (text features precomputed): what compile changes;
- full_step: Trainer.train_step, i.e. loading + augmenting + text encoder + model + optimizer.
Each benchmark reports steps/s in extra_info (and volumes/s = steps/s x batch size).
"""
import os

import pytest
import torch

from simcrop.config import make_config
from simcrop.train import Trainer

BATCH = 4


@pytest.fixture(scope="module")
def trainer_factory(tmp_path_factory):
    cache = os.environ.get("SIMCROP_CACHE") or str(tmp_path_factory.mktemp("cache"))

    def make(compile_: bool) -> Trainer:
        out = tmp_path_factory.mktemp("run")
        cfg = make_config("tiny", out=str(out), cache_dir=cache, synthetic_n=64, compile=compile_, progress=False,
                          batch_size=BATCH, steps=10_000, text_encoder=os.environ.get("SIMCROP_BENCH_TEXT", "minilm"))
        return Trainer(cfg, log=lambda *_: None)

    return make


def _model_step(trainer: Trainer, batch):
    out = trainer.forward(batch)
    out["loss"].backward()
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return out["loss"]


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_model_step(benchmark, trainer_factory, mode):
    trainer = trainer_factory(mode == "compiled")
    batch = trainer.features(next(trainer.batches()))
    for _ in range(2):  # warm-up (compilation)
        _model_step(trainer, batch)
    benchmark.group = "tiny model step (fwd+bwd+AdamW)"
    benchmark.pedantic(_model_step, args=(trainer, batch), rounds=10, iterations=1)
    if benchmark.stats is not None:  # None under --benchmark-disable (smoke run)
        benchmark.extra_info["steps_per_s"] = 1.0 / benchmark.stats.stats.median
    if benchmark.stats is not None:  # None under --benchmark-disable (smoke run)
        benchmark.extra_info["volumes_per_s"] = BATCH / benchmark.stats.stats.median
    benchmark.extra_info["device"] = str(trainer.device)


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_full_step(benchmark, trainer_factory, mode):
    trainer = trainer_factory(mode == "compiled")
    batches = trainer.batches()
    for _ in range(2):
        trainer.train_step(batches)
    benchmark.group = "tiny full train step (data + text + model)"
    benchmark.pedantic(trainer.train_step, args=(batches,), rounds=10, iterations=1)
    if benchmark.stats is not None:  # None under --benchmark-disable (smoke run)
        benchmark.extra_info["steps_per_s"] = 1.0 / benchmark.stats.stats.median
    if benchmark.stats is not None:  # None under --benchmark-disable (smoke run)
        benchmark.extra_info["volumes_per_s"] = BATCH / benchmark.stats.stats.median
    benchmark.extra_info["threads"] = torch.get_num_threads()
