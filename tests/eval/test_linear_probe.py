"""The linear-probe protocol on hand-made features: separable classes are learnt, splits never overlap."""
import numpy as np
import pytest

from simcrop.eval import linear_probe as LP


def _features(y: np.ndarray, dim: int, rng) -> np.ndarray:
    """Features where class c shifts dimension c: linearly separable."""
    x = rng.normal(0, 1.0, (len(y), dim)).astype(np.float32)
    onehot = y if y.ndim == 2 else np.eye(y.max() + 1)[y]
    x[:, : onehot.shape[1]] += 4.0 * onehot
    return x + 10.0  # an offset shared by all volumes (as pooled tokens have): the z-score removes it


@pytest.mark.parametrize("kind", ["multilabel", "multiclass"])
def test_probe_learns_separable_features(kind):
    rng = np.random.default_rng(0)
    y = (rng.random((300, 4)) < 0.3).astype(int) if kind == "multilabel" else rng.integers(0, 3, 300)
    x = _features(y, 16, rng)
    s = LP.ProbeSettings(fractions=(0.1, 1.0), lrs=(1e-2,), epochs=100, eval_every=20, repeats=2, batch_size=64)
    res = LP.run_probe(x[:200], y[:200], x[200:], y[200:], kind, [f"c{i}" for i in range(4 if kind == "multilabel" else 3)], s,
                       log=lambda *a: None)
    assert res["n_val"] + res["n_pool"] == 200 and res["n_test"] == 100
    assert res["fractions"]["1"]["auroc"] > 0.95
    assert res["fractions"]["0.1"]["auroc"] > 0.7  # about 14 labelled volumes
    assert len(res["fractions"]["0.1"]["runs"]) == 2 and len(res["fractions"]["1"]["runs"]) == 1
    assert res["fractions"]["1"]["runs"][0]["selected"]["epoch"] in (20, 40, 60, 80, 100)


def test_validation_is_carved_from_train_only():
    rng = np.random.default_rng(1)
    y = (rng.random((50, 3)) < 0.4).astype(int)
    val = LP.stratified_subset(y, 0.2, np.random.default_rng(0))
    pool = np.setdiff1d(np.arange(50), val)
    assert len(val) >= 10 and not set(val) & set(pool) and len(val) + len(pool) == 50
