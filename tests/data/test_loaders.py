"""The DALI CPU pipeline and the torch loader give the same batches (identical tensors, with and without
augmentation), shard by rank, resume at any batch; make_loader picks and logs the loader, errors are explicit."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from simcrop.config import make_config
from simcrop.data.augment import AugmentConfig, center_crop_pad, hu_to_unit, random_augment
from simcrop.data.dali import augment_params, build_pipeline, center_params, has_dali, max_rounds, _plan_arrays
from simcrop.data.loader import LoaderUnavailable, make_loader
from simcrop.data.prepare import Settings, run_prepare
from simcrop.data.prepared import PreparedPretrainDataset, prepared_corpus
from simcrop.data.pretrain import PretrainDataset, SampleSpec
from simcrop.data.synthetic import write_dataset

pytestmark = pytest.mark.skipif(not has_dali(), reason="nvidia-dali is not installed")

KEYS = ("volume", "mask_noise", "findings_ids", "findings_mask", "sentence_ids", "report_ids", "report_mask",
        "mlm_labels", "index", "findings_feats")


def test_pipeline_reproduces_random_augment_and_center_crop(tmp_path):
    """Odd shapes, several reflect-pad rounds, flips and shifts: DALI == augment.py bit for bit."""
    cfg = AugmentConfig((32, 24, 16), scale_min=0.5, flip_prob=0.5, shift_prob=0.5, shift_max=0.1)
    shapes = [(37, 29, 17), (9, 41, 5), (64, 70, 40), (33, 13, 30)]
    rng = np.random.default_rng(0)
    files, vols = [], []
    for i, shape in enumerate(shapes):
        v = rng.integers(-1500, 1500, shape).astype(np.int16)
        np.save(tmp_path / f"{i}.npy", v)
        files.append(str(tmp_path / f"{i}.npy"))
        vols.append(hu_to_unit(torch.from_numpy(v)))
    for train in (True, False):
        rounds = max_rounds(shapes, cfg, train)
        assert rounds >= 2  # the multi-round reflect padding is exercised
        expected, plans = [], []
        for seed in range(3):  # 3 batches of 4 = the 4 files 3 times
            batch = []
            for i, shape in enumerate(shapes):
                if train:
                    plan = augment_params(shape, cfg, torch.Generator().manual_seed(100 * seed + i))
                    expected.append(random_augment(vols[i], cfg, torch.Generator().manual_seed(100 * seed + i)))
                else:
                    plan = center_params(shape, cfg.size)
                    expected.append(center_crop_pad(vols[i], cfg.size))
                batch.append(_plan_arrays(plan, rounds))
            plans.append(batch)
        pipe = build_pipeline(files, plans, 4, rounds, train)
        got = [torch.from_numpy(np.array(pipe.run()[0].as_tensor())) for _ in range(3)]
        got = torch.cat(got)  # [12, 1, 32, 24, 16]
        assert got.shape == (12, 1, 32, 24, 16) and got.dtype == torch.float32
        for g, e in zip(got, expected):
            assert torch.equal(g[0], e)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Prepared synthetic data at 4.5 x 4.5 x 9 mm (71 x 71 x 35 voxels: the tiny 64 x 64 x 32 crop pads after
    a scaled crop) with tiny-bert tokens + features, and the encoder."""
    from simcrop.models.text import FrozenTextEncoder

    tmp = tmp_path_factory.mktemp("loaders")
    src = write_dataset(tmp / "src", n=7, seed=2)
    cache = tmp / "cache"
    run_prepare(src, tmp / "prep", settings=Settings(spacing=(4.5, 4.5, 9.0), text_encoder="tiny-bert",
                                                     findings_max_len=112, report_max_len=128, max_sentences=16,
                                                     cache_dir=str(cache)), progress=False, log=lambda *a: None)
    enc = FrozenTextEncoder("tiny-bert", cache_dir=cache, corpus=prepared_corpus(tmp / "prep"))
    return tmp / "prep", enc, src


def dataset(setup, train=True, **aug) -> PreparedPretrainDataset:
    prep, enc, _ = setup
    spec = SampleSpec.from_config(make_config("tiny", text_encoder="tiny-bert"))
    spec = dataclasses.replace(spec, augment=dataclasses.replace(spec.augment, **aug))
    return PreparedPretrainDataset(prep, enc.tokenizer, spec, train=train, split="train", encoder_name=enc.name)


def assert_same(a: dict, b: dict, keys=KEYS):
    assert list(a) == list(b) == list(keys)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("train", [False, True])
def test_dali_and_torch_loaders_give_identical_batches(setup, train):
    ds = dataset(setup, train, flip_prob=0.5, shift_prob=0.5)  # flips and shifts happen in these few samples
    logs = []
    torch_it = make_loader("torch", ds, 2, seed=7, log=logs.append)
    dali_it = make_loader("dali", ds, 2, seed=7, log=logs.append, chunk_batches=2)  # 4 batches cross a chunk
    assert logs[0].startswith("data loader: torch") and logs[1].startswith("data loader: dali (CPU pipeline")
    for _ in range(4):
        a, b = next(torch_it), next(dali_it)
        assert_same(a, b)
    v = b["volume"]
    assert v.shape == (2, 1, 64, 64, 32) and v.dtype == torch.float32
    assert v.min() >= -1.1 and v.max() <= 1.1
    assert b["findings_feats"].shape == (2, 112, 64) and b["mask_noise"].shape == (2, 64)


def test_sharding_and_resume(setup):
    ds = dataset(setup)
    seen = []
    for rank in (0, 1):
        ref = make_loader("torch", ds, 2, seed=3, rank=rank, world_size=2, log=lambda *a: None)
        it = make_loader("dali", ds, 2, seed=3, rank=rank, world_size=2, log=lambda *a: None, chunk_batches=2)
        for _ in range(3):
            a, b = next(ref), next(it)
            assert_same(a, b)
            seen.append(b["index"].tolist())
    assert seen[:1] != seen[3:4]  # ranks get different batches
    # resume: starting at batch 2 continues exactly
    full = make_loader("dali", ds, 2, seed=3, log=lambda *a: None)
    batches = [next(full) for _ in range(3)]
    resumed = next(make_loader("dali", ds, 2, seed=3, start_batch=2, log=lambda *a: None))
    assert_same(batches[2], resumed)


def test_make_loader_auto_and_errors(setup, monkeypatch):
    from simcrop.data import loader as loader_mod
    from simcrop.data.ctrate import read_split

    prep, enc, src = setup
    ds = dataset(setup)
    logs = []
    make_loader("auto", ds, 2, seed=0, log=logs.append)
    assert "dali" in logs[-1] and "auto" in logs[-1]
    raw = PretrainDataset(read_split(src, "train"), enc.tokenizer,
                          SampleSpec.from_config(make_config("tiny", text_encoder="tiny-bert")))
    batch = next(make_loader("auto", raw, 2, seed=0, log=logs.append))
    assert "torch" in logs[-1] and "not a prepared folder" in logs[-1]
    assert batch["volume"].shape == (2, 1, 64, 64, 32) and "findings_feats" not in batch
    with pytest.raises(LoaderUnavailable, match="prepared"):
        make_loader("dali", raw, 2, seed=0)
    with pytest.raises(LoaderUnavailable, match="loader must be one of"):
        make_loader("fast", ds, 2, seed=0)
    monkeypatch.setattr(loader_mod, "has_dali", lambda: False)
    make_loader("auto", ds, 2, seed=0, log=logs.append)
    assert "torch" in logs[-1] and "not installed" in logs[-1]
    with pytest.raises(LoaderUnavailable, match="not installed"):
        make_loader("dali", ds, 2, seed=0)


def test_prepared_dataset_errors(setup, tmp_path):
    from simcrop.data.errors import DataError

    prep, enc, _ = setup
    spec = SampleSpec.from_config(make_config("tiny", text_encoder="tiny-bert"))
    with pytest.raises(DataError, match="not a prepared folder"):
        PreparedPretrainDataset(tmp_path, enc.tokenizer, spec)
    with pytest.raises(DataError, match="cached text cannot be used: text encoder"):
        PreparedPretrainDataset(prep, enc.tokenizer, spec, encoder_name="other", use_cache="require")
    big = dataclasses.replace(spec, img_size=(224, 224, 112))
    with pytest.raises(DataError, match="does not fit the preset"):
        PreparedPretrainDataset(prep, enc.tokenizer, big)
    with pytest.raises(DataError, match="no prepared item in split 'test'"):
        PreparedPretrainDataset(prep, enc.tokenizer, spec, split="test")


@pytest.mark.parametrize("train", [False, True])
def test_raw_and_prepared_datasets_make_identical_samples(setup, monkeypatch, train):
    """Given the same HU volume and report, PretrainDataset (CT-RATE layout) and PreparedPretrainDataset (tokenising
    here, or from the cache) give the same samples: both go through simcrop.data.sample.SampleBuilder."""
    from simcrop.data import pretrain
    from simcrop.data.ctrate import read_split

    prep, enc, src = setup
    spec = SampleSpec.from_config(make_config("tiny", text_encoder="tiny-bert"))
    spec = dataclasses.replace(spec, augment=dataclasses.replace(spec.augment, flip_prob=0.5, shift_prob=0.5))
    ready = {c: PreparedPretrainDataset(prep, enc.tokenizer, spec, train=train, split="train", encoder_name=enc.name,
                                        use_cache=c) for c in ("off", "require")}
    names = [e["name"] for e in ready["off"].items]

    def stem(item):  # prepared names drop the extension
        return item.name.removesuffix(".nii.gz")

    monkeypatch.setattr(pretrain, "load_hu", lambda item: ready["off"].load_volume(names.index(stem(item))).numpy())
    items = read_split(src, "train")
    assert [stem(it) for it in items] == names and len(names) >= 3  # same items at the same indices
    raw = PretrainDataset(items, enc.tokenizer, spec, train=train)
    for i in range(len(items)):
        for epoch in (0, 2):
            a, b, c = raw[(i, epoch)], ready["off"][(i, epoch)], ready["require"][(i, epoch)]
            assert_same(a, b, KEYS[:-1])
            c.pop("findings_feats")  # the cache adds the text features, the rest is the same
            assert_same(a, c, KEYS[:-1])
