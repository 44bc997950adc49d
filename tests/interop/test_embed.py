"""python -m simcrop.embed: rows equal forward_features pooled by hand, on synthetic and prepared data; npz and
parquet; resumable (finished batches are kept); bad input is one line."""
import json

import numpy as np
import pytest
import torch

from simcrop.data.augment import center_crop_pad, hu_to_unit
from simcrop.data.ctrate import load_hu, read_split
from simcrop.embed import embed, main, read_embeddings
from simcrop.pretrained import load_encoder


def by_hand(run, data_root, split):
    """The expected rows: the evaluation transform, forward_features, mean of patch tokens and cls."""
    enc = load_encoder(run)
    rows = {}
    for it in read_split(data_root, split):
        x = center_crop_pad(hu_to_unit(torch.from_numpy(load_hu(it))), tuple(enc.img_size))[None, None]
        with torch.no_grad():
            t = enc.forward_features(x)[0]
        rows[it.name] = (t[1:].mean(0).numpy(), t[0].numpy())
    return rows


def test_rows_equal_forward_features_pooled_by_hand(interop_run, synthetic_data, tmp_path):
    out = tmp_path / "emb.npz"
    assert main(["--checkpoint", str(interop_run), "--out", str(out), "--splits", "valid", "--aligned",
                 "--batch-size", "1", "--no-progress"]) == 0  # --data '' = the checkpoint's training data
    got = read_embeddings(out)
    want = by_hand(interop_run, synthetic_data, "valid")
    assert list(got["name"]) == list(want) and set(got["split"]) == {"valid"}
    for i, name in enumerate(got["name"]):
        np.testing.assert_allclose(got["mean"][i], want[name][0], atol=1e-5)
        np.testing.assert_allclose(got["cls"][i], want[name][1], atol=1e-5)
    assert got["aligned"].shape == (len(want), 128)  # the tiny preset's proj_dim
    assert not (tmp_path / "emb.npz.partial").exists()


def test_parquet_equals_npz_and_a_rerun_resumes(interop_run, synthetic_data, tmp_path, monkeypatch):
    npz, pq = tmp_path / "a.npz", tmp_path / "a.parquet"
    embed(str(interop_run), str(synthetic_data), str(npz), ["train", "valid"], batch_size=4, progress=False,
          log=lambda *a: None)
    # an interrupted run: kill it after its first batch, then run again
    import simcrop.embed as E

    calls = {"n": 0}
    real = E.embed_batch

    def dies_after_one(*a, **k):
        calls["n"] += 1
        if calls["n"] > 1:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(E, "embed_batch", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        embed(str(interop_run), str(synthetic_data), str(pq), ["train", "valid"], batch_size=4, progress=False,
              log=lambda *a: None)
    assert len(list((tmp_path / "a.parquet.partial").glob("batch_*.npz"))) == 1
    monkeypatch.setattr(E, "embed_batch", real)
    logs = []
    embed(str(interop_run), str(synthetic_data), str(pq), ["train", "valid"], batch_size=4, progress=False,
          log=logs.append)
    assert "(4 done before)" in logs[0]
    a, b = read_embeddings(npz), read_embeddings(pq)
    assert list(a["name"]) == list(b["name"]) and len(a["name"]) == 14
    for k in ("mean", "cls"):
        np.testing.assert_allclose(a[k], b[k], atol=1e-6)


def test_prepared_folder(interop_run, synthetic_data, tmp_path):
    from simcrop.data.prepare import Settings, run_prepare

    prep = tmp_path / "prep"
    run_prepare(synthetic_data, prep, settings=Settings(text_encoder="none", spacing=(4.0, 4.0, 8.0)),
                progress=False, log=lambda *a: None)
    out = tmp_path / "p.npz"
    embed(str(interop_run), str(prep), str(out), ["valid"], progress=False, log=lambda *a: None)
    rows = read_embeddings(out)
    want = {k.removesuffix(".nii.gz"): v for k, v in by_hand(interop_run, synthetic_data, "valid").items()}
    assert sorted(rows["name"]) == sorted(want)  # prepared items are named without the file suffix
    for i, name in enumerate(rows["name"]):  # same grid (4 x 4 x 8 mm), int16 HU: equal up to rounding
        np.testing.assert_allclose(rows["mean"][i], want[name][0], atol=2e-3)


def test_bad_input_is_one_line(interop_run, tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.npz")]) == 2
    assert main(["--checkpoint", str(interop_run), "--out", str(tmp_path / "x.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("simcrop.embed: error: ") for line in err)
    assert "nowhere" in err[0] and "x.csv: unknown output format" in err[1]
    cfg = json.loads((interop_run / "config.json").read_text())
    assert cfg["model"]["use_align"]  # the run has g_v; --aligned on a run without it is refused (see docstring)
