"""python -m simcrop.train end to end on small synthetic data (tiny preset, tiny-bert text encoder)."""
import csv
import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from simcrop.data.synthetic import write_dataset
from simcrop.train import main


@pytest.fixture
def data(synthetic_data) -> Path:
    return synthetic_data


@pytest.fixture
def args(train_args):
    """args(data, cache, out, *extra): the shared train_args with this module's call shape."""
    return lambda data, cache, out, *extra: train_args(out, *extra, data=data)


def losses(out: Path) -> list[float]:
    with open(out / "metrics.csv", newline="") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoints" / f"step_{step:08d}" / "model.safetensors"))


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_train_writes_checkpoint_metrics_and_plot(data, cache, args, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(args(data, cache, out, "--steps", "3")) == 0
    printed = capsys.readouterr().out
    assert "checkpoint" in printed and "loss plot" in printed
    assert len(losses(out)) == 3
    assert (out / "loss.png").stat().st_size > 1000
    state = weights(out, 3)
    assert any(k.startswith("encoder.blocks.0") for k in state)
    assert not any("text_encoder" in k for k in state)  # the frozen tower is not part of the checkpoint
    assert (out / "checkpoints" / "LATEST").read_text() == "step_00000003"


def test_resume_continues_exactly(data, cache, args, tmp_path):
    """train 4 steps == train 2 (same schedule), resume, train 2: same parameters, same losses."""
    full, split = tmp_path / "full", tmp_path / "split"
    assert main(args(data, cache, full, "--steps", "4")) == 0
    assert main(args(data, cache, split, "--steps", "4", "--stop-after", "2")) == 0
    assert len(losses(split)) == 2
    assert main(args(data, cache, split, "--steps", "4", "--resume", "auto")) == 0
    assert losses(split) == losses(full)
    a, b = weights(full, 4), weights(split, 4)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_compiled_training_matches_eager(data, cache, args, tmp_path):
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert main(args(data, cache, eager, "--steps", "2", "--dropout", "0")) == 0
    assert main(args(data, cache, compiled, "--steps", "2", "--dropout", "0", "--compile")) == 0
    assert losses(compiled) == pytest.approx(losses(eager), rel=1e-4)


def test_loss_decreases(data, cache, args, tmp_path):
    out = tmp_path / "run"
    assert main(args(data, cache, out, "--steps", "40", "--lr", "1e-3", "--warmup-steps", "4")) == 0
    values = losses(out)
    assert sum(values[-4:]) / 4 < 0.8 * sum(values[:4]) / 4, values


def test_refuses_to_overwrite_a_previous_run(data, cache, args, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(args(data, cache, out, "--steps", "1")) == 0
    before = tree_digest(out)
    assert main(args(data, cache, out, "--steps", "1")) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert tree_digest(out) == before


def _edit_reports(src: Path, dst: Path, name_suffix: str, findings: str) -> Path:
    shutil.copytree(src, dst)
    path = dst / "dataset" / "radiology_text_reports" / "train_reports.csv"
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
        fields = list(rows[0].keys())
    target = next(r for r in rows if r["VolumeName"].endswith(name_suffix))
    target["Findings_EN"] = findings
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return dst


@pytest.mark.parametrize("case", ["missing_path", "empty_report", "no_sentence", "small_volume", "k_too_large"])
def test_bad_input_gives_one_line_error_and_damages_nothing(case, data, cache, args, tmp_path, tmp_path_factory, capsys):
    out = tmp_path / "run"
    assert main(args(data, cache, out, "--steps", "1")) == 0
    before = tree_digest(out)
    extra, bad_data, expect = [], data, ""
    if case == "missing_path":
        bad_data, expect = tmp_path / "nowhere", "does not exist"
    elif case == "empty_report":
        bad_data, expect = _edit_reports(data, tmp_path / "d", "_1.nii.gz", "  "), "empty findings section"
    elif case == "no_sentence":
        bad_data, expect = _edit_reports(data, tmp_path / "d", "_1.nii.gz", ". . ."), "no sentence"
    elif case == "small_volume":
        bad_data = write_dataset(tmp_path / "small", n=4, seed=0, shape=(24, 24, 12), spacing=(12.0, 12.0, 24.0))
        expect = "shape does not fit the preset"
    else:
        extra, expect = ["--topk", "17"], "topk K = 17 is larger than the 16 visible patches"
    code = main(args(bad_data, cache, out, "--steps", "2", "--resume", "auto", *extra))
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("simcrop.train: error")]
    assert code == 2 and len(err) == 1 and expect in err[0], err
    if case in ("empty_report", "no_sentence"):
        assert "train_reports.csv" in err[0]  # names the file
    if case == "small_volume":
        assert ".nii.gz" in err[0]
    assert tree_digest(out) == before


def test_resume_refuses_a_checkpoint_of_another_model(data, cache, args, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(args(data, cache, out, "--steps", "1")) == 0
    assert main(args(data, cache, out, "--steps", "2", "--resume", "auto", "--enc-depth", "2")) == 2
    assert "other model settings (enc_depth)" in capsys.readouterr().err


def test_a_training_step_leaves_the_text_encoder_frozen_in_eval_mode(data, cache, args, tmp_path):
    from simcrop.config import make_config
    from simcrop.pretraining import Trainer

    cfg = make_config("tiny", data=str(data), cache_dir=str(cache), out=str(tmp_path / "run"),
                      text_encoder="tiny-bert", batch_size=2, progress=False)
    trainer = Trainer(cfg, log=lambda *a: None)
    trainer.wrapped.train()
    batch = trainer.features(next(trainer.batches()))
    trainer._micro_step(batch)
    assert not trainer.text.training and not any(m.training for m in trainer.text.modules())
    assert all(p.grad is None and not p.requires_grad for p in trainer.text.parameters())
    no_grad = [n for n, p in trainer.model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, no_grad


def test_a_quick_run_without_warmup_flag_follows_the_run_length(data, cache, args, tmp_path, capsys):
    argv = args(data, cache, tmp_path / "run", "--steps", "4")
    i = argv.index("--warmup-steps")
    del argv[i:i + 2]  # the preset's 30 warm-up steps would contradict --steps 4
    assert main(argv) == 0
    assert "steps 0 -> 4 (warm-up 0)" in capsys.readouterr().out
    assert len(losses(tmp_path / "run")) == 4


def test_tensorboard_log_has_every_scalar_the_plot_and_the_config(data, cache, args, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main(args(data, cache, out, "--steps", "4", "--stop-after", "2", "--log-to", "csv,tensorboard")) == 0
    assert main(args(data, cache, out, "--steps", "4", "--resume", "auto", "--log-to", "csv,tensorboard")) == 0
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for key in ("loss", "mim", "align", "mlm", "lr", "grad_norm", "volumes_per_s"):
        events = acc.Scalars(f"train/{key}")
        # the resumed run purged nothing it did not rewrite: one event per step, equal to the CSV
        assert [e.step for e in events] == [1, 2, 3, 4], (key, [e.step for e in events])
        assert [e.value for e in events] == pytest.approx([float(r[key]) for r in rows], rel=1e-5), key
    assert "loss_plot" in tags["images"]
    image = acc.Images("loss_plot")[-1]
    assert image.width > 100 and image.height > 100
    assert any(t.startswith("config") for t in tags["tensors"])  # add_text is stored as a tensor summary


def test_resume_accepts_a_checkpoint_that_predates_a_new_default_off_field(data, cache, args, tmp_path):
    """A checkpoint written before an extension's field existed resumes: the missing field counts as its default."""
    import json

    out = tmp_path / "run"
    assert main(args(data, cache, out, "--steps", "2", "--stop-after", "1")) == 0
    ckpt = out / "checkpoints" / "step_00000001" / "config.json"
    saved = json.loads(ckpt.read_text())
    del saved["model"]["w_align_soft"], saved["model"]["align_within"]  # as an older simcrop wrote it
    ckpt.write_text(json.dumps(saved))
    assert main(args(data, cache, out, "--steps", "2", "--resume", "auto")) == 0
    assert len(losses(out)) == 2


def test_adamw_implementations_agree(data, cache, args, tmp_path):
    """fused (the default) and foreach give the update of the one-parameter-at-a-time reference loop (one step
    from the same weights and gradients: later steps would amplify rounding through the forward pass)."""
    runs = {}
    for impl in ("loop", "foreach", "fused"):
        out = tmp_path / impl
        assert main(args(data, cache, out, "--steps", "1", "--dropout", "0", "--adamw-impl", impl)) == 0
        runs[impl] = weights(out, 1)
    for impl in ("foreach", "fused"):
        for k, ref in runs["loop"].items():
            assert torch.allclose(runs[impl][k], ref, rtol=1e-5, atol=1e-6), (impl, k)
