"""Session set-up shared by every test.

Without a GPU, Triton kernels run only in Triton's interpreter, and TRITON_INTERPRET must be set before any
@triton.jit decorator runs (torch.compile imports Triton too), so it is set here, at session start. The
`auto` kernel backend never picks interpreted Triton for CPU tensors, so other tests still use the reference
on CPU; the Triton tests ask for `fused` explicitly.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Path:
    """14 synthetic cases in CT-RATE layout (12 train, 2 valid), shared by the training tests."""
    from simcrop.data.synthetic import write_dataset

    return write_dataset(tmp_path_factory.mktemp("synthetic") / "ds", n=14, seed=3)


@pytest.fixture(scope="session")
def cache(tmp_path_factory) -> Path:
    """One cache folder (tiny-bert built once per session)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def train_args(synthetic_data, cache):
    """train_args(out, *extra, data=None, cache_dir=None) -> argv for the trainer's command line: tiny preset,
    tiny-bert, batch 2, no progress bar, 1 warm-up step (the one training-test set-up; later flags win)."""

    def make(out, *extra, data=None, cache_dir=None):
        return ["--data", str(data or synthetic_data), "--cache-dir", str(cache_dir or cache), "--out", str(out),
                "--text-encoder", "tiny-bert", "--batch-size", "2", "--no-progress", "--warmup-steps", "1",
                "--log-every", "1", *extra]

    return make
