"""The ablation command end to end with a tiny budget: variants, table, CSV, chart; a rerun reuses everything."""
import csv
import json

from simcrop.experiments.ablation import main


def test_ablation_tiny_budget(eval_data, eval_cache, tmp_path):
    out, work = tmp_path / "docs", tmp_path / "work"
    argv = ["--out", str(out), "--work", str(work), "--data", str(eval_data), "--cache-dir", str(eval_cache),
            "--variants", "random,mim,full", "--steps", "1", "--text-encoder", "tiny-bert",
            "--train-args", "--batch-size 2 --warmup-steps 1", "--probe-epochs", "2", "--probe-repeats", "1",
            "--skip", "segment,zeroshot", "--figures", "0"]
    assert main(argv) == 0
    rows = list(csv.DictReader(open(out / "ablation.csv")))
    assert [r["variant"] for r in rows] == ["random", "mim", "full"]
    by = {r["variant"]: r for r in rows}
    assert by["mim"]["ground_lesion_share"] == "" and by["full"]["ground_normal_chance"] != ""  # no heads: n/a
    assert by["mim"]["fusion_normal_share"] == "" and by["full"]["fusion_normal_share"] != ""  # no fusion: n/a
    assert by["full"]["align_discrimination"] != "" and by["mim"]["align_discrimination"] == ""
    assert by["random"]["pretrain_s"] == "0.0000" and by["full"]["probe_auroc_100"] != ""
    md = (out / "ablation.md").read_text()
    assert "| random |" in md and "| full |" in md and "n/a" in md
    assert (out / "ablation.png").read_bytes()[:4] == b"\x89PNG"
    # the step-0 "random" checkpoint is the untrained full model, with its text encoder recorded
    cfg = json.loads((work / "random" / "run" / "checkpoints" / "step_00000000" / "config.json").read_text())
    assert cfg["model"]["use_align"] and cfg["text_encoder_id"].startswith("tiny-bert-")
    # the mim variant really switched the other losses off
    cfg = json.loads((work / "mim" / "run" / "config.json").read_text())
    assert not cfg["model"]["use_mlm"] and not cfg["model"]["use_align"]
    # rerunning finds every run and result in --work
    stamp = (work / "full" / "eval" / "linear-probe.json").stat().st_mtime_ns
    assert main(argv) == 0
    assert (work / "full" / "eval" / "linear-probe.json").stat().st_mtime_ns == stamp
