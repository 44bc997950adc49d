"""Data throughput: the DALI CPU pipeline vs the torch DataLoader on the same prepared data, and `prepare`.

`pytest bench/bench_loader.py --benchmark-only [-s]`. Prepared synthetic CT (80 x 80 x 40 at 4 x 4 x 8 mm ->
213 x 213 x 106 int16 at 1.5 x 1.5 x 3 mm, 9.6 MB each), training augmentation on, cached tiny-bert features:
- loader: volumes/s for the tiny preset's 64 x 64 x 32 crop (batch 4) and the paper's 224 x 224 x 112 crop
  (batch 2; the volumes are smaller than the crop, so it reflect-pads), torch with 0 and 2 worker processes,
  DALI CPU with 2 threads. Both loaders produce identical batches (tests/data/test_loaders.py), so this compares
  the cost of the same work.
- prepare: volumes/min of `run_prepare` (decode, RAS, resample, int16 .npy, sha256), in-process and 2 workers.
Throughput lands in extra_info (volumes_per_s / volumes_per_min). Quote numbers with the machine and its load.
"""
from __future__ import annotations

import dataclasses
import os
import shutil

import pytest

from simcrop.config import make_config
from simcrop.data.dali import has_dali
from simcrop.data.loader import make_loader
from simcrop.data.prepare import Settings, run_prepare
from simcrop.data.prepared import PreparedPretrainDataset, prepared_corpus
from simcrop.data.pretrain import SampleSpec
from simcrop.data.synthetic import write_dataset

N = 10  # synthetic cases (8 train)
CROPS = {"tiny-64x64x32": ((64, 64, 32), 4), "vit_b-224x224x112": ((224, 224, 112), 2)}
KINDS = ["torch-0w", "torch-2w", "dali-cpu"]
PER_ROUND = 6  # batches per timed round
SETTINGS = dict(text_encoder="tiny-bert", findings_max_len=112, report_max_len=128, max_sentences=16)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_loader")
    src = write_dataset(root / "src", n=N, seed=1)
    cache = os.environ.get("SIMCROP_CACHE") or str(root / "cache")
    run_prepare(src, root / "prep", settings=Settings(cache_dir=cache, **SETTINGS), progress=False,
                log=lambda *a: None)
    return src, root / "prep", cache


@pytest.fixture(scope="module")
def encoder(data):
    from simcrop.models.text import FrozenTextEncoder

    _, prep, cache = data
    return FrozenTextEncoder("tiny-bert", cache_dir=cache, corpus=prepared_corpus(prep))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("crop", list(CROPS))
def test_loader(benchmark, data, encoder, crop, kind):
    if kind.startswith("dali") and not has_dali():
        pytest.skip("nvidia-dali is not installed")
    size, batch = CROPS[crop]
    spec = SampleSpec.from_config(make_config("tiny", text_encoder="tiny-bert"))
    spec = dataclasses.replace(spec, img_size=size, augment=dataclasses.replace(spec.augment, size=size))
    ds = PreparedPretrainDataset(data[1], encoder.tokenizer, spec, train=True, encoder_name=encoder.name)
    workers = 2 if kind == "torch-2w" else 0
    it = make_loader(kind.split("-")[0], ds, batch, seed=0, num_workers=workers, log=lambda *a: None,
                     **({"num_threads": 2} if kind.startswith("dali") else {}))
    for _ in range(2):  # warm-up: worker start / pipeline build
        next(it)

    def take():  # several batches per round: both loaders prefetch, one batch alone would time the queue
        for _ in range(PER_ROUND):
            next(it)

    benchmark.group = f"loader {crop} batch {batch} x {PER_ROUND} batches"
    benchmark.pedantic(take, rounds=4, iterations=1)
    if benchmark.stats is not None:  # None under --benchmark-disable (smoke run)
        benchmark.extra_info["volumes_per_s"] = round(PER_ROUND * batch / benchmark.stats.stats.median, 2)
    benchmark.extra_info["cpus"] = os.cpu_count()
    benchmark.extra_info["load_avg_1min"] = round(os.getloadavg()[0], 2)


@pytest.mark.parametrize("workers", [0, 2])
def test_prepare(benchmark, data, tmp_path, workers):
    src, _, cache = data
    out = tmp_path / "out"

    def fresh():
        shutil.rmtree(out, ignore_errors=True)
        return (), {}

    def run():
        run_prepare(src, out, settings=Settings(cache_dir=cache, **SETTINGS), workers=workers, progress=False,
                    log=lambda *a: None)

    benchmark.group = f"prepare {N} synthetic volumes (+ text features)"
    benchmark.pedantic(run, setup=fresh, rounds=3, iterations=1)
    if benchmark.stats is not None:  # None under --benchmark-disable (smoke run)
        benchmark.extra_info["volumes_per_min"] = round(N * 60 / benchmark.stats.stats.median, 1)
    benchmark.extra_info["load_avg_1min"] = round(os.getloadavg()[0], 2)
