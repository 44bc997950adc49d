"""simcrop.config: presets, command-line overrides, the one 3-vector parser, one-line validation errors."""
import argparse

import pytest

from simcrop.config import ConfigError, add_config_arguments, config_from_args, make_config, parse_triple


def test_presets_and_overrides():
    tiny, paper = make_config("tiny"), make_config("vit_b")
    assert tiny.model.img_size == (64, 64, 32) and tiny.model.topk == 4 and tiny.data.batch_size == 4
    assert paper.model.img_size == (224, 224, 112) and paper.model.enc_dim == 768 and paper.train.accum_steps == 8
    assert make_config("tiny", topk=2, lr=1e-3).model.topk == 2
    with pytest.raises(ConfigError, match="unknown preset 'vit_h'"):
        make_config("vit_h")
    with pytest.raises(ConfigError, match="unknown config field 'depth'"):
        make_config("tiny", depth=3)


def test_every_field_is_a_flag():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    cfg = config_from_args(parser.parse_args(["--img-size", "96x96x48", "--no-use-mlm", "--topk", "8",
                                              "--mask-ratio", "0.5", "--out", "runs/x"]))
    assert cfg.model.img_size == (96, 96, 48) and not cfg.model.use_mlm and cfg.model.topk == 8
    assert cfg.train.out == "runs/x" and cfg.train.preset == "tiny"
    with pytest.raises(SystemExit):
        parser.parse_args(["--img-size", "96,96"])


@pytest.mark.parametrize("text, kind, expected", [
    ("64,64,32", int, (64, 64, 32)), ("64x64x32", int, (64, 64, 32)), (" 8, 8 ,4 ", int, (8, 8, 4)),
    ("1.5,1.5,3", float, (1.5, 1.5, 3.0)), ("0.7x0.7x1.25", float, (0.7, 0.7, 1.25)),
])
def test_parse_triple(text, kind, expected):
    assert parse_triple(text, kind) == expected


@pytest.mark.parametrize("text, kind, positive", [
    ("64,64", int, False), ("1,2,3,4", int, False), ("a,b,c", int, False), ("1.5,1,1", int, False),
    ("1.5,0,3", float, True), ("-1,1,1", float, True),
])
def test_parse_triple_rejects(text, kind, positive):
    with pytest.raises(argparse.ArgumentTypeError, match="expected three"):
        parse_triple(text, kind, positive=positive)


def test_topk_larger_than_visible_patches_is_a_config_error():
    with pytest.raises(ConfigError, match="topk K = 17 is larger than the 16 visible patches"):
        make_config("tiny", topk=17)


def test_patch_grid_errors_come_from_the_one_check():
    with pytest.raises(ConfigError, match=r"patch size \(16, 16, 8\) does not divide volume size \(60, 64, 32\) "
                                          r"\(axis x\)"):
        make_config("tiny", img_size=(60, 64, 32))


@pytest.mark.parametrize("overrides, message", [
    (dict(mask_ratio=1.0), "mask_ratio must be in"), (dict(enc_dim=100, enc_heads=4), "divisible by 6"),
    (dict(enc_heads=5), "not divisible by enc_heads"), (dict(kernels="cuda"), "kernels must be"),
    (dict(tau=0.0), "tau must be > 0"), (dict(loader="nvjpeg"), "loader must be"),
    (dict(steps=10, warmup_steps=11), "warmup_steps must be in 0..steps"),
])
def test_invalid_values_are_one_line_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        make_config("tiny", **overrides)
    assert "\n" not in str(err.value)


def test_warmup_follows_the_run_length_unless_given():
    assert make_config("tiny").train.warmup_steps == 30 and make_config("vit_b").train.warmup_steps == 2240
    assert make_config("tiny", steps=4).train.warmup_steps == 0  # a quick run just works
    assert make_config("tiny", steps=50).train.warmup_steps == 5
    assert make_config("tiny", steps=4, warmup_steps=2).train.warmup_steps == 2
    with pytest.raises(ConfigError, match=r"warmup_steps must be in 0..steps \(4\), got 30"):
        make_config("tiny", steps=4, warmup_steps=30)  # an explicit contradiction stays an error


def test_log_to_targets_are_checked():
    assert make_config("tiny", log_to="csv,tensorboard").train.log_to == "csv,tensorboard"
    with pytest.raises(ConfigError, match="log_to: unknown mlflow"):
        make_config("tiny", log_to="csv,mlflow")


def test_the_testbed_preset_trains_on_the_testbed_by_default(monkeypatch, tmp_path):
    import simcrop.data.synthetic as synthetic
    from simcrop import factory

    seen = {}
    monkeypatch.setattr(synthetic, "ensure_default_dataset",
                        lambda cache, n, variant: seen.update(cache=cache, n=n, variant=variant) or tmp_path)
    cfg = make_config("testbed", cache_dir=str(tmp_path))
    assert cfg.data.flip_prob == 0 and cfg.model.patch_size == (8, 8, 4)
    assert factory.data_root(cfg) == tmp_path
    assert seen == {"cache": tmp_path, "n": 1280, "variant": "testbed"}
    factory.data_root(make_config("tiny", cache_dir=str(tmp_path)))
    assert seen["variant"] == "default" and seen["n"] == 320
    with pytest.raises(ConfigError, match="synthetic_variant must be"):
        make_config("tiny", synthetic_variant="lungs")
