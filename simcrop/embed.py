"""`python -m simcrop.embed --checkpoint RUN --data DIR --out FILE`: one embedding row per volume.

Rows (in data order): `name`, `split`, `mean` = mean of the encoder's patch tokens [D], `cls` = its cls token
[D], and with `--aligned` (checkpoints trained with L_align) `aligned` = mean over patches of g_v(patch tokens)
[Dp], the image side of the alignment space (the pooled embedding of zero-shot / retrieval). The volume goes
through the evaluation transform: HU -> [-1, 1] (clip at +-1000), centre crop / pad to the checkpoint's crop,
no masking.

--data: a prepared folder (python -m simcrop.prepare), a folder in CT-RATE's layout read as stored (the
built-in synthetic data), or '' = the data the checkpoint was trained on. --out: `.npz` (always) or `.parquet`
(needs pyarrow). Batched, with a progress bar, and resumable: finished batches are kept in `<out>.partial/`
(each written atomically) and a rerun embeds only the volumes not done yet; the final file is written
atomically and the partial folder removed. Bad input ends with `simcrop.embed: error: <file>: <problem>`, exit 2.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from simcrop.checkpoint import CheckpointError, atomic_write_bytes
from simcrop.data.errors import DataError

FORMATS = (".npz", ".parquet")


@dataclass
class VolumeRef:
    name: str
    split: str
    load: Callable[[], np.ndarray]  # -> HU float32 [X, Y, Z], RAS+


def prepared_volumes(root: Path, splits: list[str]) -> list[VolumeRef]:
    """The prepared items (int16 HU .npy at 1.5 x 1.5 x 3 mm) of `splits`, in manifest order."""
    from simcrop.data.prepared import read_prepared

    _, entries = read_prepared(root)

    def loader(path: Path):
        return lambda: np.load(path).astype(np.float32)

    return [VolumeRef(e["name"], e["split"], loader(root / e["volume"]["file"])) for e in entries
            if e["split"] in splits]


def ctrate_volumes(root: Path, splits: list[str]) -> list[VolumeRef]:
    """The volumes of a CT-RATE-layout folder (reoriented to RAS+, rescaled to HU, not resampled)."""
    from simcrop.data.ctrate import dataset_dir, load_hu, read_split

    refs = []
    for split in splits:
        if not (dataset_dir(root) / split).is_dir():
            continue
        refs += [VolumeRef(it.name, split, (lambda it=it: load_hu(it))) for it in read_split(root, split)]
    return refs


def find_volumes(root: Path, splits: list[str]) -> list[VolumeRef]:
    from simcrop.data.prepared import is_prepared

    refs = prepared_volumes(root, splits) if is_prepared(root) else ctrate_volumes(root, splits)
    if not refs:
        raise DataError(f"{root}: no volume in split(s) {', '.join(splits)}")
    names = [r.name for r in refs]
    if len(set(names)) != len(names):
        raise DataError(f"{root}: volume names repeat across splits; embed one split at a time (--splits)")
    return refs


def aligned_head(run: str, device: torch.device, dtype: torch.dtype):
    """g_v of a checkpoint (the SimCroP feature head on the image side) as a module, or CheckpointError."""
    from safetensors import safe_open

    from simcrop.factory import config_from_dict, resolve_checkpoint
    from simcrop.models.simcrop import FeatureHead

    ckpt = resolve_checkpoint(run)
    cfg = config_from_dict(json.loads((ckpt / "config.json").read_text()), str(ckpt / "config.json"))
    if not cfg.model.use_align:
        raise CheckpointError(f"{ckpt}: trained without L_align, so it has no alignment head g_v (drop --aligned)")
    head = FeatureHead(cfg.model.enc_dim, cfg.model.proj_dim)
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        state = {k[len("head_v."):]: f.get_tensor(k) for k in f.keys() if k.startswith("head_v.")}
    head.load_state_dict(state, strict=True)
    return head.eval().requires_grad_(False).to(device=device, dtype=dtype)


@torch.no_grad()
def embed_batch(encoder, head, volumes: torch.Tensor) -> dict[str, np.ndarray]:
    """volumes [B, 1, X, Y, Z] in [-1, 1] -> {'mean' [B, D], 'cls' [B, D](, 'aligned' [B, Dp])} float32."""
    tokens = encoder.forward_features(volumes)  # [B, 1 + N, D]
    patches = tokens[:, 1:]
    out = {"mean": patches.mean(1), "cls": tokens[:, 0]}
    if head is not None:
        out["aligned"] = head(patches).mean(1)  # [B, Dp]
    return {k: v.float().cpu().numpy() for k, v in out.items()}


def _partial_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def _done_rows(partial: Path) -> dict[str, dict]:
    """Rows of the finished batches in `partial` (a half-written batch file is never there: atomic writes)."""
    rows = {}
    for f in sorted(partial.glob("batch_*.npz")):
        with np.load(f, allow_pickle=False) as z:
            for i, name in enumerate(z["name"]):
                rows[str(name)] = {k: z[k][i] for k in z.files}
    return rows


def _write_npz(path: Path, columns: dict[str, np.ndarray]) -> None:
    import io

    buf = io.BytesIO()
    np.savez(buf, **columns)
    atomic_write_bytes(path, buf.getvalue())


def _write_parquet(path: Path, columns: dict[str, np.ndarray]) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: writing .parquet needs pyarrow (pip install pyarrow), or write .npz") from None
    table = pa.table({k: (list(v) if v.ndim == 2 else v) for k, v in columns.items()})
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, str(tmp))
    os.replace(tmp, path)


def read_embeddings(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """An embeddings file -> {'name' [R], 'split' [R], 'mean' [R, D], 'cls' [R, D](, 'aligned' [R, Dp])}."""
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    import pyarrow.parquet as pq

    table = pq.read_table(str(path))
    return {k: (np.stack(table[k].to_numpy(zero_copy_only=False)) if k not in ("name", "split")
                else np.asarray(table[k].to_pylist())) for k in table.column_names}


def embed(checkpoint: str, data: str, out: str, splits: list[str] | None = None, aligned: bool = False,
          batch_size: int = 4, device: str = "auto", progress: bool = True, log=print) -> Path:
    """Embed every volume of `data` with the encoder of `checkpoint` into `out` (see the module docstring)."""
    from tqdm import tqdm

    from simcrop.data.augment import center_crop_pad, hu_to_unit
    from simcrop.factory import config_from_dict, data_root, resolve_checkpoint, resolve_device
    from simcrop.pretrained import load_encoder

    out_path = Path(out)
    if out_path.suffix not in FORMATS:
        raise DataError(f"{out_path}: unknown output format (use {' or '.join(FORMATS)})")
    dev = resolve_device(device)
    encoder = load_encoder(checkpoint, device=dev)
    dtype = next(encoder.parameters()).dtype
    head = aligned_head(checkpoint, dev, dtype) if aligned else None
    ckpt = resolve_checkpoint(checkpoint)
    cfg = config_from_dict(json.loads((ckpt / "config.json").read_text()), str(ckpt / "config.json"))
    root = data_root(cfg, data or None)
    refs = find_volumes(root, splits or ["train", "valid"])
    size = tuple(encoder.img_size)
    partial = _partial_dir(out_path)
    partial.mkdir(parents=True, exist_ok=True)
    (partial / "settings.json").write_text(json.dumps({"checkpoint": str(ckpt), "data": str(root),
                                                       "aligned": aligned, "size": list(size)}))
    done = _done_rows(partial)
    todo = [r for r in refs if r.name not in done]
    log(f"simcrop.embed: {len(refs)} volumes of {root} ({len(done)} done before), encoder of {ckpt}, crop {size}, "
        f"device {dev}")
    bar = tqdm(total=len(refs), initial=len(refs) - len(todo), disable=not progress, unit="vol", file=sys.stderr)
    n_batch = len(list(partial.glob("batch_*.npz")))
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        vols = []
        for r in chunk:
            try:
                hu = torch.from_numpy(r.load())
            except (OSError, ValueError) as exc:
                raise DataError(f"{r.name}: cannot read the volume ({exc})") from None
            vols.append(center_crop_pad(hu_to_unit(hu), size)[None])
        batch = torch.stack(vols).to(device=dev, dtype=dtype)  # [b, 1, X, Y, Z]
        cols = embed_batch(encoder, head, batch)
        cols.update(name=np.array([r.name for r in chunk]), split=np.array([r.split for r in chunk]))
        _write_npz(partial / f"batch_{n_batch:06d}.npz", cols)
        n_batch += 1
        for i, r in enumerate(chunk):
            done[r.name] = {k: v[i] for k, v in cols.items()}
        bar.update(len(chunk))
    bar.close()
    keys = ["name", "split", "mean", "cls"] + (["aligned"] if aligned else [])
    missing = [k for k in keys if any(k not in done[r.name] for r in refs)]
    if missing:
        raise DataError(f"{partial}: earlier batches lack {', '.join(missing)} (another --aligned setting?); "
                        f"delete the folder to start again")
    columns = {k: np.stack([done[r.name][k] for r in refs]) for k in keys}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    (_write_npz if out_path.suffix == ".npz" else _write_parquet)(out_path, columns)
    shutil.rmtree(partial)
    log(f"wrote {out_path}: {len(refs)} rows, mean/cls [{columns['mean'].shape[1]}]"
        + (f", aligned [{columns['aligned'].shape[1]}]" if aligned else ""))
    return out_path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m simcrop.embed", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="run folder, checkpoint folder or pretrained folder")
    ap.add_argument("--data", default="", help="prepared or CT-RATE-layout folder ('' = the checkpoint's data)")
    ap.add_argument("--out", required=True, help="embeddings file: .npz or .parquet")
    ap.add_argument("--splits", default="train,valid", help="comma list of splits to embed")
    ap.add_argument("--aligned", action="store_true", help="also the alignment-space embedding (needs g_v)")
    ap.add_argument("--batch-size", type=int, default=4, help="volumes per encoder forward")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    from simcrop.config import ConfigError

    try:
        embed(args.checkpoint, args.data, args.out, [s for s in args.splits.split(",") if s], args.aligned,
              args.batch_size, args.device, not args.no_progress)
    except (CheckpointError, DataError, ConfigError, FileNotFoundError) as exc:
        print(f"simcrop.embed: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
