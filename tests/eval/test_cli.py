"""Every task from the command line on a tiny checkpoint, with fast settings; the loader; one-line errors."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from simcrop.eval import load_pretrained
from simcrop.eval.cli import main
from simcrop.eval.errors import EvalError


def run(task, ckpt, data, cache, out, *extra):
    return main([task, "--checkpoint", str(ckpt), "--data", str(data), "--cache-dir", str(cache), "--out", str(out),
                 "--quiet", *extra])


def results(out, task):
    md = (out / f"{task}.md").read_text()
    assert md.startswith("#")
    return json.loads((out / f"{task}.json").read_text())


def test_load_pretrained_rebuilds_the_model(tiny_run, tiny_checkpoint, eval_cache):
    cfg, model, text = load_pretrained(tiny_run, cache_dir=eval_cache)  # a run folder: its newest checkpoint
    assert cfg.train.preset == "tiny" and cfg.model.img_size == (64, 64, 32)
    assert text.name.startswith("tiny-bert-") and not model.training
    saved = load_file(str(tiny_checkpoint / "model.safetensors"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k


def test_tiny_bert_missing_from_cache_is_a_clear_error(tiny_checkpoint, tmp_path):
    with pytest.raises(EvalError, match="tiny-bert-.* is not in .*--cache-dir"):
        load_pretrained(tiny_checkpoint, cache_dir=tmp_path)


def test_linear_probe(tiny_checkpoint, eval_data, eval_cache, tmp_path):
    out = tmp_path / "lp"
    assert run("linear-probe", tiny_checkpoint, eval_data, eval_cache, out, "--epochs", "4", "--eval-every", "2",
               "--repeats", "1", "--fractions", "0.5,1") == 0
    r = results(out, "linear-probe")
    assert r["classes"] == ["nodule", "mass", "ground_glass_opacity", "consolidation", "pleural_effusion", "cardiomegaly"]
    assert set(r["fractions"]) == {"0.5", "1"}
    assert r["n_val"] + r["n_pool"] == r["n_train_split"] and r["n_test"] == 2  # test = the valid split only
    run0 = r["fractions"]["1"]["runs"][0]
    assert run0["selected"]["epoch"] in (2, 4) and 0 <= run0["test"]["accuracy"] <= 1
    # features were cached: a second run reads them
    assert any((eval_cache / "eval-features").glob("features-*.pt"))


def test_zero_shot_and_retrieval(tiny_checkpoint, eval_data, eval_cache, tmp_path):
    out = tmp_path / "zs"
    assert run("zero-shot", tiny_checkpoint, eval_data, eval_cache, out) == 0
    r = results(out, "zero-shot")
    assert set(r["auroc_per_class"]) == set(r["prompts"]) and len(r["prompts"]) == 6
    assert run("retrieval", tiny_checkpoint, eval_data, eval_cache, out) == 0
    r = results(out, "retrieval")
    assert r["n"] == 2 and r["report_to_volume"]["5"] == 1.0 and r["chance"]["1"] == 0.5


def test_grounding_writes_scores_and_pictures(tiny_checkpoint, eval_data, eval_cache, tmp_path):
    out = tmp_path / "gr"
    assert run("grounding", tiny_checkpoint, eval_data, eval_cache, out, "--figures", "1", "--diagnose", "2") == 0
    r = results(out, "grounding")
    assert r["k"] == 4 and r["groups"]["all"]["n"] > 0
    d = r["diagnostic"]  # L_align under training conditions
    assert 0 <= d["discrimination_topk"] <= 1 and 0 < d["discrimination_chance"] < 1 and d["draws"] == 2
    for rec in r["sentences"]:
        if "skipped" not in rec:
            assert 0 <= rec["topk_share"] <= 1 and 0 < rec["chance"] <= 1 and rec["group"] in ("lesion", "normal")
            # the synthetic volumes have air around the body at the crop's corners
            assert 0 <= rec["background_share"] <= 1 and 0 < rec["background_chance"] < 1
            assert 0 <= rec["control_share"] <= 1 and 0 <= rec["control_auroc"] <= 1
    assert len(r["figures"]) == 1
    png = out / "grounding" / "valid_1_a_1.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 10_000


def test_segment(tiny_checkpoint, eval_cache, tmp_path):
    from simcrop.data.synthetic import write_dataset

    small = write_dataset(tmp_path / "small", n=5, seed=1, shape=(40, 40, 20), spacing=(8.0, 8.0, 16.0))
    out = tmp_path / "seg"
    assert run("segment", tiny_checkpoint, small, eval_cache, out, "--steps", "2", "--seg-batch-size", "1",
               "--feature-size", "8", "--max-test", "1", "--target", "anatomy", "--roi", "32,32,16") == 0
    r = results(out, "segment")
    assert r["skip_blocks"] == [1, 2, 3, 4] and r["roi"] == [32, 32, 16]
    assert len(r["classes"]) == 11 and r["classes"][0] == "body"  # the 12 anatomy labels without 'outside'
    assert 0 <= r["dice"] <= 1


def test_segment_on_user_pairs(tiny_checkpoint, eval_data, eval_cache, tmp_path):
    import nibabel as nib
    import numpy as np

    rows = ["image,label,split"]
    for i, split in enumerate(("train", "train", "test")):
        img = np.full((40, 36, 18), -800, np.int16)
        lab = np.zeros(img.shape, np.uint8)
        lab[10:25, 12:30, 4:12] = 1
        img[lab > 0] = 40
        nib.save(nib.Nifti1Image(img, np.eye(4)), tmp_path / f"img{i}.nii.gz")
        nib.save(nib.Nifti1Image(lab, np.eye(4)), tmp_path / f"lab{i}.nii.gz")
        rows.append(f"img{i}.nii.gz,lab{i}.nii.gz,{split}")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "seg"
    assert run("segment", tiny_checkpoint, eval_data, eval_cache, out, "--pairs", str(tmp_path / "pairs.csv"),
               "--steps", "1", "--seg-batch-size", "1", "--feature-size", "8", "--roi", "32,32,16") == 0
    r = results(out, "segment")
    assert r["n_train"] == 2 and r["n_test"] == 1 and r["classes"] == ["class_1"]


def last_line(capsys) -> str:
    """The error: the last line of stderr, starting with the program name (nothing else on stderr after it)."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith("simcrop.eval: error: ")
    return lines[-1]


def test_errors_are_one_line(tiny_checkpoint, eval_data, eval_cache, tmp_path, capsys):
    assert run("linear-probe", tmp_path / "nope", eval_data, eval_cache, tmp_path / "o") == 2
    err = last_line(capsys)
    assert err.startswith("simcrop.eval: error:") and "checkpoint not found" in err

    odd = tmp_path / "odd"
    shutil.copytree(tiny_checkpoint, odd)
    cfg = json.loads((odd / "config.json").read_text())
    cfg["train"]["preset"] = "vit_h"
    (odd / "config.json").write_text(json.dumps(cfg))
    assert run("zero-shot", odd, eval_data, eval_cache, tmp_path / "o") == 2
    assert "unknown preset 'vit_h'" in last_line(capsys)

    bare = tmp_path / "bare"
    shutil.copytree(eval_data, bare, ignore=shutil.ignore_patterns("synthetic_ground_truth"))
    assert run("grounding", tiny_checkpoint, bare, eval_cache, tmp_path / "o") == 2
    assert "no per-sentence ground-truth regions" in last_line(capsys)
    assert run("segment", tiny_checkpoint, bare, eval_cache, tmp_path / "o", "--steps", "1") == 2
    assert "segmentation needs synthetic data or --pairs" in last_line(capsys)


def test_grounding_with_user_masks_matches_the_synthetic_format(tiny_checkpoint, eval_data, eval_cache, tmp_path):
    """Regions given as mask NIfTIs (the documented user format) score exactly as the synthetic ground truth."""
    import nibabel as nib
    import numpy as np

    from simcrop.data.synthetic import region_mask

    gt = eval_data / "dataset" / "synthetic_ground_truth"
    rec = json.loads((gt / "valid_sentences.jsonl").read_text().splitlines()[0])
    name = rec["VolumeName"]
    anat, les = (nib.load(str(gt / "valid" / f"{name}_{k}.nii.gz")) for k in ("anatomy", "lesions"))
    sentences = []
    (tmp_path / "masks").mkdir()
    for j, s in enumerate(rec["sentences"]):
        mask = region_mask(np.asarray(anat.dataobj), np.asarray(les.dataobj), s).astype(np.uint8)
        nib.save(nib.Nifti1Image(mask, anat.affine), tmp_path / "masks" / f"s{j}.nii.gz")
        sentences.append({"text": s["text"], "finding": s["finding"], "mask": f"masks/s{j}.nii.gz"})
    (tmp_path / "regions.jsonl").write_text(json.dumps({"VolumeName": name, "sentences": sentences}) + "\n")
    mine, synth = tmp_path / "mine", tmp_path / "synth"
    assert run("grounding", tiny_checkpoint, eval_data, eval_cache, mine, "--regions", str(tmp_path / "regions.jsonl"),
               "--figures", "0") == 0
    assert run("grounding", tiny_checkpoint, eval_data, eval_cache, synth, "--max-cases", "1", "--figures", "0") == 0
    a, b = results(mine, "grounding")["sentences"], results(synth, "grounding")["sentences"]
    assert a == b and len(a) == len(rec["sentences"])


def test_linear_probe_multiclass_from_a_user_csv(tiny_checkpoint, eval_data, eval_cache, tmp_path):
    import csv

    for split in ("train", "valid"):
        rows = list(csv.DictReader(open(eval_data / "dataset" / "synthetic_ground_truth" / f"{split}_labels.csv")))
        with open(tmp_path / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["VolumeName", "grade"])
            for i, r in enumerate(rows):
                w.writerow([r["VolumeName"], ["low", "high"][i % 2]])
    out = tmp_path / "lp"
    assert run("linear-probe", tiny_checkpoint, eval_data, eval_cache, out, "--labels", str(tmp_path / "{split}.csv"),
               "--label-column", "grade", "--fractions", "1", "--epochs", "2", "--eval-every", "1") == 0
    r = results(out, "linear-probe")
    assert r["kind"] == "multiclass" and r["classes"] == ["high", "low"]
    assert 0 <= r["fractions"]["1"]["accuracy"] <= 1
