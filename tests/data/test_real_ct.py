"""Real chest CT: the two lung CTs with tumour masks of the pyradiomics 3.0.1 source distribution (fetched from
PyPI into $SIMCROP_CACHE or ~/.cache/simcrop at test time, never committed) go through prepare; and synthetic
CT-RATE data goes through prepare into two training steps of the tiny preset with the DALI loader."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from simcrop.data.prepare import Settings, run_prepare
from simcrop.data.prepared import read_jsonl, read_prepared
from simcrop.data.readers import axcodes, read_nrrd, spacing_of, to_ras

PYRADIOMICS = "pyradiomics==3.0.1"
FILES = ("lung1_image.nrrd", "lung1_label.nrrd", "lung2_image.nrrd", "lung2_label.nrrd")


def _cache() -> Path:
    env = os.environ.get("SIMCROP_CACHE")
    # absolute: the manifests written below name these files, and relative manifest paths mean "beside the manifest"
    return ((Path(env).expanduser() if env else Path.home() / ".cache" / "simcrop") / "pyradiomics-3.0.1").resolve()


@pytest.fixture(scope="module")
def lung_ct() -> Path:
    """Folder holding lung{1,2}_{image,label}.nrrd (downloaded and extracted once)."""
    folder = _cache() / "data"
    if all((folder / f).is_file() for f in FILES):
        return folder
    _cache().mkdir(parents=True, exist_ok=True)
    dl = _cache() / f"download-{os.getpid()}"
    try:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                               PYRADIOMICS, "-d", str(dl), "-q", "--disable-pip-version-check"],
                              capture_output=True, text=True, timeout=600)
        sdists = sorted(dl.glob("pyradiomics-3.0.1.tar.gz"))
        if proc.returncode != 0 or not sdists:
            pytest.skip(f"cannot fetch {PYRADIOMICS} from PyPI (registry unreachable?): "
                        f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
        tmp = _cache() / f"data.tmp-{os.getpid()}"
        tmp.mkdir(exist_ok=True)
        with tarfile.open(sdists[0]) as tar:
            for f in FILES:
                member = tar.getmember(f"pyradiomics-3.0.1/data/{f}")
                (tmp / f).write_bytes(tar.extractfile(member).read())
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)  # atomic: a concurrent run sees all four files or none
    except subprocess.TimeoutExpired:
        pytest.skip(f"fetching {PYRADIOMICS} from PyPI timed out")
    finally:
        shutil.rmtree(dl, ignore_errors=True)
    return folder


def test_lung_ct_prepare_geometry_hu_and_tumour_mask(lung_ct, tmp_path):
    rows = [
        {"volume": str(lung_ct / "lung1_image.nrrd"), "masks": {"tumour": str(lung_ct / "lung1_label.nrrd")},
         "findings": "There is a spiculated mass in the lung. No pleural effusion.", "impression": "Lung mass."},
        {"volume": str(lung_ct / "lung2_image.nrrd"), "masks": {"tumour": str(lung_ct / "lung2_label.nrrd")},
         "findings": "A large mass is seen. The heart is normal in size.", "impression": "Mass."},
    ]
    (tmp_path / "lung.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = run_prepare(tmp_path / "lung.jsonl", tmp_path / "out", settings=Settings(text_encoder="none"),
                      progress=False, log=lambda *a: None)
    assert res["rejected"] == 0 and res["items"] == 2
    _, entries = read_prepared(tmp_path / "out")
    for e in entries:
        affine = np.array(e["affine"])
        assert spacing_of(affine) == pytest.approx((1.5, 1.5, 3.0))
        assert axcodes(affine) == ("R", "A", "S")
        vol = np.load(tmp_path / "out" / e["volume"]["file"])
        assert vol.dtype == np.int16 and vol.min() >= -1000 and vol.max() <= 1000
        assert vol.min() == -1000 and vol.max() > 200  # air and dense tissue survive
        rec = e["masks"]["tumour"]
        mask = np.load(tmp_path / "out" / rec["file"]).astype(bool)
        assert mask.shape == vol.shape
        assert vol[mask].mean() > -300, "the resampled mask no longer covers the tumour"
        src = read_nrrd(e["source"].replace("_image", "_label"))
        src_mm3 = np.count_nonzero(src.array) * np.prod(src.spacing)
        assert mask.sum() * 1.5 * 1.5 * 3.0 == pytest.approx(src_mm3, rel=0.15)
        # the tumour stays where it was (world RAS mm), within a prepared voxel
        ras = to_ras(src)
        centre = lambda m, a: (a @ np.r_[np.array(np.nonzero(m)).mean(axis=1), 1.0])[:3]  # noqa: E731
        np.testing.assert_allclose(centre(mask, affine), centre(ras.array > 0, ras.affine), atol=1.5)
        # and the image too: mean HU inside the original tumour is close to the prepared one
        img = to_ras(read_nrrd(e["source"]))
        assert vol[mask].mean() == pytest.approx(np.clip(img.array, -1000, 1000)[ras.array > 0].mean(), abs=60)


def test_train_tiny_preset_two_steps_from_prepared_synthetic(tmp_path, monkeypatch):
    """The integration the lead wires into train.py, done here with monkeypatches: prepared folder as --data,
    tiny-bert from the prepared corpus, PreparedPretrainDataset, make_loader('dali'), cached findings features."""
    import torch

    import simcrop.pretraining as T
    from simcrop.config import make_config
    from simcrop.data.loader import make_loader
    from simcrop.data.prepared import build_prepared_data, is_prepared
    from simcrop.data.synthetic import write_dataset

    src = write_dataset(tmp_path / "src", n=6)
    cache = tmp_path / "cache"
    res = run_prepare(src, tmp_path / "prep", settings=Settings(text_encoder="tiny-bert", findings_max_len=112,
                                                                 report_max_len=128, max_sentences=16,
                                                                 cache_dir=str(cache)),
                      progress=False, log=lambda *a: None)
    assert res["items"] == 6 and not read_jsonl(tmp_path / "prep" / "rejects.jsonl")

    encoders, used_cache, logs = [], [], []
    build_text_encoder = T.build_text_encoder

    def text_encoder(cfg, root):
        enc = build_text_encoder(cfg, root)
        encoders.append(enc)
        return enc

    def features(self, batch):  # TextFeatures.__call__: skip the findings pass when they come cached
        batch = dict(batch)
        used_cache.append("findings_feats" in batch)
        if "findings_feats" not in batch:
            batch["findings_feats"] = self.encode(batch["findings_ids"], batch["findings_mask"])
        batch["report_feats"] = self.encode(batch["report_ids"], batch["report_mask"])
        return batch

    def batches(self):
        t, d = self.cfg.train, self.cfg.data
        return make_loader("dali", self.dataset, d.batch_size, t.seed, start_batch=self.step * t.accum_steps,
                           rank=self.dist.rank, world_size=self.dist.world_size, num_workers=d.num_workers,
                           device=self.device, log=logs.append)

    monkeypatch.setattr(T, "data_root", lambda cfg: Path(cfg.data.data) if is_prepared(cfg.data.data) else None)
    monkeypatch.setattr(T, "build_text_encoder", text_encoder)
    monkeypatch.setattr(T, "build_data", lambda cfg, tok, root, split="train":
                        build_prepared_data(cfg, encoders[-1], root, split, log=logs.append))
    monkeypatch.setattr(T.TextFeatures, "__call__", features)
    monkeypatch.setattr(T.Trainer, "batches", batches)
    cfg = make_config("tiny", data=str(tmp_path / "prep"), cache_dir=str(cache), out=str(tmp_path / "run"),
                      text_encoder="tiny-bert", batch_size=2, steps=2, warmup_steps=1, log_every=1, progress=False,
                      device="cpu")
    result = T.Trainer(cfg, log=logs.append).run()
    with open(result["metrics"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(np.isfinite(float(r["loss"])) for r in rows)
    assert used_cache and all(used_cache)
    assert any("cached tokens + findings features" in m for m in logs)
    assert any(m.startswith("data loader: dali (CPU pipeline") for m in logs)
    assert torch.load(Path(result["checkpoint"]) / "train_state.pt", weights_only=True)["step"] == 2
