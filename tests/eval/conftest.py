"""A tiny pre-trained checkpoint (tiny preset, tiny-bert, 2 steps) on 12 synthetic cases, shared by tests/eval."""
from pathlib import Path

import pytest

from simcrop.data.synthetic import write_dataset


@pytest.fixture(scope="session")
def eval_data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("eval_synthetic") / "ds", n=12, seed=5)


@pytest.fixture(scope="session")
def eval_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("eval_cache")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, eval_data, eval_cache, train_args) -> Path:
    from simcrop.train import main

    out = tmp_path_factory.mktemp("eval_run") / "run"
    rc = main(train_args(out, "--steps", "2", data=eval_data, cache_dir=eval_cache))
    assert rc == 0
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_run) -> Path:
    return tiny_run / "checkpoints" / "step_00000002"
