"""The synthetic dataset's bytes are pinned: the same seed and parameters write the same files.

The digests below were computed with the single-file simcrop/data/synthetic.py, before it became the package
simcrop/data/synthetic/ (issue 11); a change of any written content (anatomy, findings, wording, layout) fails here.
A deliberate change of the output should bump GENERATOR_VERSION (it names the cache folders) and re-pin.
"""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import pytest

from simcrop.data.synthetic import write_dataset


def tree_digest(root: Path) -> str:
    """sha256 over the sorted relative paths and contents of every file under root.

    .nii.gz files count by their decompressed payload: the writer's gzip header carries no time stamp (mtime 0),
    but the compressed bytes depend on the zlib build, not on the generator.
    """
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        data = p.read_bytes()
        if p.name.endswith(".gz"):
            data = gzip.decompress(data)
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


@pytest.mark.parametrize("kwargs,n_files,digest", [
    # default grid; the 6 cases hold every finding
    (dict(n=6, seed=0), 29, "e962c33d36457758deb5c7dfd91d38a017520f086603574aa8ab847cedb00459"),
    # a 48 x 48 x 32 mm field of view: lesions that cannot be placed and sentences whose region is outside it
    (dict(n=4, seed=1, val_fraction=0.5, shape=(6, 6, 4), spacing=(8.0, 8.0, 8.0)), 23,
     "0442ca2e84d78e8516ab2d08b478952ab253f41f19ebc10901bc534b9ed3524a"),
], ids=["default", "tiny-grid"])
def test_written_dataset_is_byte_identical_to_the_pinned_one(tmp_path, kwargs, n_files, digest):
    out = write_dataset(tmp_path / "ds", **kwargs)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) == n_files
    for p in files:
        if p.name.endswith(".gz"):
            assert p.read_bytes()[4:8] == b"\0\0\0\0"  # gzip MTIME field: no time stamp
    assert tree_digest(out) == digest
