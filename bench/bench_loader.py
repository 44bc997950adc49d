"""Data throughput: the DALI CPU pipeline vs the torch DataLoader on the same prepared data, and `prepare`.

`pytest bench/bench_loader.py --benchmark-only [-s]`. Prepared synthetic CT (80 x 80 x 40 at 4 x 4 x 8 mm ->
213 x 213 x 106 int16 at 1.5 x 1.5 x 3 mm, 9.6 MB each), training augmentation on, cached tiny-bert features:
- loader: volumes/s for the tiny preset's 64 x 64 x 32 crop (batch 4) and the paper's 224 x 224 x 112 crop
  (batch 2; the volumes are smaller than the crop, so it reflect-pads), torch with 0 and 2 worker processes,
  DALI CPU with 2 threads. Both loaders produce identical batches (tests/data/test_loaders.py), so this compares
  the cost of the same work.
- prepare: volumes/min of `run_prepare` (decode, RAS, resample, int16 .npy, sha256), in-process and 2 workers.
- loader at real geometry (test_loader_real, SIMCROP_BENCH_CT=real|small as bench_prepare.py): the paper's crop
  224 x 224 x 112, batch 2, ONE core each: the prepared folder (bench/_ct_phantom.py's 512 x 512 x 300 phantom twice
  + the two pyradiomics chest CTs, prepared once) read by the torch loader (0 workers, 1 torch thread) and by DALI
  CPU (1 thread), against the on-the-fly MONAI pipeline of the SimCroP authors' code that re-reads the raw volume
  every epoch (LoadImaged -> EnsureChannelFirstd -> Orientationd RAS -> Spacingd (1.5, 1.5, 3) ->
  ScaleIntensityRanged [-1000, 1000] -> [-1, 1] clip -> RandScaleCropd 0.8-1 -> RandSpatialCropd 224x224x112 ->
  SpatialPadd reflect -> RandFlipd x3 (p 0.2) -> RandShiftIntensityd (0.1, p 0.1); monai DataLoader, 0 workers, 1
  thread). extra_info: volumes_per_s_per_core and x_vs_monai_onthefly (measured in the same run).
Throughput lands in extra_info (volumes_per_s / volumes_per_min, only when timed: bench/_timing.py). Quote numbers
with the machine and its load. A summary of the real-geometry comparison is printed at the end.
"""
from __future__ import annotations

import dataclasses
import json
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

from ._ct_phantom import bench_ct_size, phantom_nifti, real_chest_ct
from ._timing import capped, print_summary, record_rate

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
    record_rate(benchmark, "volumes_per_s", PER_ROUND * batch, ndigits=2)
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
    record_rate(benchmark, "volumes_per_min", N * 60, ndigits=1)
    benchmark.extra_info["load_avg_1min"] = round(os.getloadavg()[0], 2)


# ---------------------------------------------------------------------------------------------------------------
# real geometry, one core: prepared folder (torch, DALI CPU) vs MONAI on the fly
# ---------------------------------------------------------------------------------------------------------------
REAL_KINDS = ["monai-onthefly", "torch-1core", "dali-cpu-1thread"]  # monai first: the others' ratios need it
REAL_CROP, REAL_BATCH = (224, 224, 112), 2
REAL_BATCHES = {"monai-onthefly": 2, "torch-1core": 12, "dali-cpu-1thread": 12}  # batches per timed round
_REAL: dict = {}


@pytest.fixture(scope="module")
def real(tmp_path_factory, request):
    """(raw volume paths, prepared folder) of the real-geometry set: the phantom twice, the pyradiomics CTs."""
    root = tmp_path_factory.mktemp("bench_loader_real")
    size = bench_ct_size()
    phantom = str(phantom_nifti(size))
    paths = [phantom, phantom]
    folder = real_chest_ct()
    if folder is not None:
        paths += [str(folder / "lung1_image.nrrd"), str(folder / "lung2_image.nrrd")]
    rows = [{"volume": p, "name": f"case{i}", "findings": "The lungs are clear. No effusion.",
             "impression": "Normal."} for i, p in enumerate(paths)]
    (root / "cases.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_prepare(root / "cases.jsonl", root / "prep", settings=Settings(text_encoder="none"), progress=False,
                log=lambda *a: None)
    yield paths, root / "prep", size
    if _REAL:
        rows = [[k, i.get("volumes_per_s_per_core"), i.get("x_vs_monai_onthefly")] for k, i in _REAL.items()]
        print_summary(request, f"loading at real geometry ({size}), crop {REAL_CROP}, batch {REAL_BATCH}, 1 core "
                               f"each, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
                      ["loader", "volumes/s/core", "x vs monai on the fly"], rows)


def _monai_onthefly(paths: list[str]):
    """The SimCroP authors' MONAI pipeline (module docstring), an infinite iterator of batches."""
    import warnings

    warnings.filterwarnings("ignore")
    from monai.data import DataLoader, Dataset
    from monai.transforms import (Compose, EnsureChannelFirstd, LoadImaged, Orientationd, RandFlipd,
                                  RandScaleCropd, RandShiftIntensityd, RandSpatialCropd, ScaleIntensityRanged,
                                  Spacingd, SpatialPadd)

    k = "image"
    chain = Compose([
        LoadImaged(k, image_only=True), EnsureChannelFirstd(k), Orientationd(k, axcodes="RAS"),
        Spacingd(k, pixdim=(1.5, 1.5, 3.0), mode="bilinear"),
        ScaleIntensityRanged(k, a_min=-1000, a_max=1000, b_min=-1.0, b_max=1.0, clip=True),
        RandScaleCropd(k, roi_scale=0.8, max_roi_scale=1.0, random_size=True),
        RandSpatialCropd(k, roi_size=REAL_CROP, random_size=False), SpatialPadd(k, REAL_CROP, mode="reflect"),
        RandFlipd(k, prob=0.2, spatial_axis=0), RandFlipd(k, prob=0.2, spatial_axis=1),
        RandFlipd(k, prob=0.2, spatial_axis=2), RandShiftIntensityd(k, offsets=0.1, prob=0.1),
    ])
    chain.set_random_state(0)
    loader = DataLoader(Dataset([{k: p} for p in paths], chain), batch_size=REAL_BATCH, shuffle=True,
                        num_workers=0)
    while True:
        for batch in loader:
            assert tuple(batch[k].shape) == (REAL_BATCH, 1, *REAL_CROP), batch[k].shape
            yield batch


@pytest.mark.parametrize("kind", REAL_KINDS)
def test_loader_real(benchmark, real, encoder, kind):
    import torch

    if kind.startswith("dali") and not has_dali():
        pytest.skip("nvidia-dali is not installed")
    paths, prep, size = real
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if kind == "monai-onthefly":
            it = _monai_onthefly(paths)
        else:
            spec = SampleSpec.from_config(make_config("tiny", text_encoder="tiny-bert"))
            spec = dataclasses.replace(spec, img_size=REAL_CROP,
                                       augment=dataclasses.replace(spec.augment, size=REAL_CROP))
            ds = PreparedPretrainDataset(prep, encoder.tokenizer, spec, train=True)  # tokens made here (no cache)
            it = make_loader(kind.split("-")[0], ds, REAL_BATCH, seed=0, num_workers=0, log=lambda *a: None,
                             **({"num_threads": 1} if kind.startswith("dali") else {}))
        n_batches = REAL_BATCHES[kind]
        rounds, warmup = capped(2 if kind == "monai-onthefly" else 3, 1)
        for _ in range(max(warmup, 1)):  # pipeline build, first reads
            next(it)

        def take():
            for _ in range(n_batches):
                next(it)

        benchmark.group = f"loader real geometry ({size}) {REAL_CROP} batch {REAL_BATCH}, 1 core"
        benchmark.pedantic(take, rounds=rounds, iterations=1)
    finally:
        torch.set_num_threads(threads)
    info = {"size": size, "cores": 1, "volumes": len(paths), "load_avg_1min": round(os.getloadavg()[0], 2)}
    if benchmark.stats is not None:
        info["volumes_per_s_per_core"] = round(n_batches * REAL_BATCH / benchmark.stats.stats.median, 3)
        base = _REAL.get("monai-onthefly", {}).get("volumes_per_s_per_core")
        if base and kind != "monai-onthefly":
            info["x_vs_monai_onthefly"] = round(info["volumes_per_s_per_core"] / base, 1)
    benchmark.extra_info.update(info)
    _REAL[kind] = info
