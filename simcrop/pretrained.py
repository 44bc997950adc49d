"""The public loading API: a pre-trained 3D ViT encoder out of a run, a checkpoint, a Hugging Face-style folder or
the SimCroP authors' weights, without the text tower or any training code (docs/interop.md).

    enc = simcrop.load_encoder("runs/tiny")                    # run folder, checkpoint folder, pretrained folder,
    x = simcrop.preprocess("ct.nii.gz", size=enc.img_size)     # or the authors' .pth -> [1, 1, X, Y, Z] in [-1, 1]
    tokens = enc.forward_features(x)                           # [1, 1 + N, D], cls first, no masking
    skips = enc.intermediate_layers(x, (1, 2, 3), reshape=True)  # UNETR-style grids [1, D, gx, gy, gz]
    enc.save_pretrained("out/encoder")                         # config.json + model.safetensors + README.md
    enc = simcrop.SimCroPEncoder.from_pretrained("out/encoder")

Loading never executes code and never touches the network: JSON, safetensors, torch.load(weights_only=True).
Anything that does not fit raises simcrop.checkpoint.CheckpointError, one line naming the file.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch

from simcrop.checkpoint import CheckpointError, atomic_write_bytes
from simcrop.factory import config_from_dict, resolve_checkpoint, resolve_device
from simcrop.interop import timm_vit
from simcrop.interop.common import check_state, encoder_geometry
from simcrop.models.vit3d import ViT3DEncoder
from simcrop.ops.reference import patch_grid

log = logging.getLogger("simcrop.pretrained")

FORMAT, FORMAT_VERSION = "simcrop-encoder", 1
SPACING_MM = (1.5, 1.5, 3.0)  # x, y, z after resampling (simcrop.prepare's default --spacing)
HU_CLIP = (-1000.0, 1000.0)  # then HU / 1000 -> [-1, 1] (simcrop.data.augment.hu_to_unit)
PREPROCESSING = {
    "layout": "[B, 1, X, Y, Z] float32",
    "orientation": "RAS+ (array axes point Right, Anterior, Superior)",
    "spacing_mm": list(SPACING_MM),
    "hu_clip": list(HU_CLIP),
    "intensity": "clip(HU, -1000, 1000) / 1000, in [-1, 1]",
    "crop": "the encoder's img_size: centre crop where larger, reflect pad where smaller",
}
TASKS = ("linear-probe", "zero-shot", "retrieval", "segment", "grounding")  # <task>.json written by simcrop.eval


# -- the encoder ---------------------------------------------------------------------------------------------------
class SimCroPEncoder(ViT3DEncoder):
    """simcrop's ViT3DEncoder (same weights, same state dict) plus where it came from, its preprocessing and the
    Hugging Face-style folder round trip. Use forward_features / intermediate_layers (ViT3DEncoder)."""

    def __init__(self, img_size, patch_size, in_chans=1, dim=768, depth=12, heads=12, mlp_ratio=4.0,
                 pos_embed: torch.Tensor | None = None, info: dict | None = None):
        super().__init__(tuple(img_size), tuple(patch_size), in_chans, dim, depth, heads, mlp_ratio)
        self.heads, self.mlp_ratio = heads, mlp_ratio
        self.pos_embed_kind = "sincos-3d"  # our fixed formula (a non-persistent buffer, recomputed on load)
        if pos_embed is not None:  # weights trained with another position code: kept, and saved explicitly
            with torch.no_grad():
                self.pos_embed.copy_(pos_embed.reshape(self.pos_embed.shape))
            self.pos_embed_kind = "stored"
        self.info = dict(info or {})

    @classmethod
    def from_geometry(cls, g: dict, **kw) -> SimCroPEncoder:
        return cls(g["img_size"], g["patch_size"], g["in_chans"], g["dim"], g["depth"], g["heads"], g["mlp_ratio"], **kw)

    def geometry(self) -> dict:
        return encoder_geometry(self)

    def preprocess(self, source, affine=None, spacing=None) -> torch.Tensor:
        """simcrop.preprocess(source, size=self.img_size, ...) on this encoder's device and dtype."""
        p = self.norm.weight
        return preprocess(source, self.img_size, affine, spacing).to(p.device, p.dtype)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write `directory`/{config.json, model.safetensors, README.md} (a Hugging Face model folder); returns it."""
        from safetensors.torch import save

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().float().contiguous().cpu() for k, v in self.state_dict().items()}
        if self.pos_embed_kind == "stored":
            state["pos_embed"] = self.pos_embed.detach().float().contiguous().cpu()
        config = {"format": FORMAT, "format_version": FORMAT_VERSION, "architecture": "simcrop.models.vit3d.ViT3DEncoder",
                  "encoder": self.geometry(), "pos_embed": self.pos_embed_kind,
                  "preprocessing": {**PREPROCESSING, "crop": list(self.img_size)},
                  "source": self.info.get("source", ""), "training": self.info.get("training"),
                  "evaluation": self.info.get("evaluation", [])}
        if self.info.get("ignored"):
            config["ignored"] = self.info["ignored"]
        atomic_write_bytes(out / "model.safetensors", save(state, metadata={"format": "pt", "simcrop_format": FORMAT}))
        atomic_write_bytes(out / "config.json", (json.dumps(config, indent=2) + "\n").encode())
        atomic_write_bytes(out / "README.md", model_card(config).encode())
        return out

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> SimCroPEncoder:
        """A folder written by save_pretrained -> the encoder, eval mode, on `device` (JSON + safetensors only)."""
        folder = Path(directory)
        cfg_file, weights = folder / "config.json", folder / "model.safetensors"
        config = _read_json(cfg_file)
        if config.get("format") != FORMAT:
            raise CheckpointError(f"{cfg_file}: not a simcrop encoder folder (format {config.get('format')!r}, "
                                  f"expected {FORMAT!r}; a run or checkpoint folder loads with simcrop.load_encoder)")
        if int(config.get("format_version", 0)) > FORMAT_VERSION:
            raise CheckpointError(f"{cfg_file}: format version {config['format_version']} is newer than this simcrop's")
        g = _geometry_from_config(config.get("encoder"), str(cfg_file))
        state = _read_safetensors(weights)
        pos = state.pop("pos_embed", None)
        if config.get("pos_embed") == "stored" and pos is None:
            raise CheckpointError(f"{weights}: missing key pos_embed (config.json says the position embedding is stored)")
        if pos is not None and config.get("pos_embed") != "stored":
            raise CheckpointError(f"{weights}: unexpected key pos_embed (config.json says {config.get('pos_embed')!r})")
        enc = cls.from_geometry(g, info={k: config.get(k) for k in ("source", "training", "evaluation", "ignored")
                                         if config.get(k) is not None})
        if pos is not None:
            check_state({"pos_embed": enc.pos_embed.shape}, {"pos_embed": pos}, str(weights), "the encoder of its config.json")
            with torch.no_grad():
                enc.pos_embed.copy_(pos)
            enc.pos_embed_kind = "stored"
        _load_strict(enc, state, str(weights))
        enc.info["loaded_from"] = str(folder)
        return _ready(enc, device, dtype)


# -- loading -------------------------------------------------------------------------------------------------------
def load_encoder(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, *,
                 heads: int | None = None, img_size=None) -> SimCroPEncoder:
    """The pre-trained 3D ViT encoder (eval mode, no gradients) of `path`, without the text tower.

    Args:
        path: a run folder (its newest checkpoint), a checkpoint folder (`<run>/checkpoints/step_*`), a folder
            written by save_pretrained, or a weights file in the SimCroP authors' / timm layout (.pth/.pt/.bin/
            .ckpt through torch.load(weights_only=True), or .safetensors; a pre-training checkpoint's decoder and
            text parts are left out, listed in `encoder.info["ignored"]`).
        device: 'cpu', 'cuda', 'auto', ...; dtype: e.g. torch.bfloat16 (default: the stored float32).
        heads, img_size: only for an authors' file, whose shapes hold neither the head count (default width / 64)
            nor a crop other than the cubic patch grid their patchify assumes.
    Returns SimCroPEncoder: forward_features(volume [B, 1, X, Y, Z]) -> [B, 1 + N, D], intermediate_layers(...).
    Raises CheckpointError (one line naming the file) for anything missing, unreadable, refused or that does not fit.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"{p}: not found")
    if p.is_file() and p.name == "model.safetensors" and (p.parent / "config.json").is_file():
        p = p.parent  # the weights file of a simcrop folder: load the folder
    if p.is_file():
        if p.suffix not in timm_vit.WEIGHT_SUFFIXES:
            raise CheckpointError(f"{p}: not a weights file ({', '.join(timm_vit.WEIGHT_SUFFIXES)}) nor a folder")
        return _ready(from_authors_file(p, heads, img_size), device, dtype)
    if heads is not None or img_size is not None:
        raise ValueError("heads / img_size apply only to a weights file in the authors' layout")
    cfg_file = p / "config.json"
    if cfg_file.is_file() and _read_json(cfg_file).get("format") == FORMAT:
        return SimCroPEncoder.from_pretrained(p, device, dtype)
    return _ready(from_checkpoint(p), device, dtype)


def from_checkpoint(path: str | os.PathLike) -> SimCroPEncoder:
    """A simcrop run or checkpoint folder -> its encoder: config.json + the encoder.* tensors of model.safetensors
    (the text tower, the decoders and train_state.pt are not read)."""
    ckpt = resolve_checkpoint(path)
    cfg_file, weights = ckpt / "config.json", ckpt / "model.safetensors"
    saved = _read_json(cfg_file)
    cfg = config_from_dict(saved, str(cfg_file))
    m = cfg.model
    g = {"img_size": list(m.img_size), "patch_size": list(m.patch_size), "in_chans": m.in_chans, "dim": m.enc_dim,
         "depth": m.enc_depth, "heads": m.enc_heads, "mlp_ratio": m.mlp_ratio}
    state, meta = _read_safetensors(weights, prefix="encoder.", with_metadata=True)
    run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt
    step = _int(meta.get("step"))
    info = {"source": f"simcrop checkpoint {ckpt}",
            "training": training_summary(saved, run, step, ckpt),
            "evaluation": evaluation_results(run)}
    enc = SimCroPEncoder.from_geometry(g, info=info)
    _load_strict(enc, state, str(weights), prefix="encoder.")
    enc.info["loaded_from"] = str(ckpt)
    return enc


def from_authors_file(path: str | os.PathLike, heads: int | None = None, img_size=None) -> SimCroPEncoder:
    """The SimCroP authors' weights (timm VisionTransformer naming, Conv3d patch embedding; a downstream ViT or a
    pre-training checkpoint's "model") -> our encoder. The file's pos_embed is kept as it is."""
    path = Path(path)
    state = timm_vit.read_weights_file(path)
    g, ours, pos, kind, ignored = timm_vit.from_timm(state, str(path), heads, img_size)
    summary = timm_vit.ignored_summary(ignored)
    if summary:
        log.info("%s: %s", path, summary)
    info = {"source": f"authors' / timm-layout weights {path}", "training": None, "evaluation": [],
            "ignored": summary}
    enc = SimCroPEncoder.from_geometry(g, pos_embed=pos if kind == "stored" else None, info=info)
    _load_strict(enc, ours, str(path))
    enc.info["loaded_from"] = str(path)
    return enc


def _ready(enc: SimCroPEncoder, device, dtype) -> SimCroPEncoder:
    enc.eval().requires_grad_(False)
    return enc.to(device=resolve_device(device), dtype=dtype) if dtype is not None else enc.to(resolve_device(device))


def _load_strict(enc: torch.nn.Module, state: dict, source: str, prefix: str = "") -> None:
    """Check every key and shape first (one-line error naming the first misfit), then load strictly."""
    expected = {prefix + k: v.shape for k, v in enc.state_dict().items()}
    check_state(expected, state, source, "the encoder of its config" if prefix else "the encoder")
    enc.load_state_dict({k[len(prefix):]: v for k, v in state.items()}, strict=True)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: file missing")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _read_safetensors(path: Path, prefix: str = "", with_metadata: bool = False):
    """The tensors of a safetensors file (only those under `prefix`, read lazily); CheckpointError naming it."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise CheckpointError(f"{path}: file missing")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: unreadable safetensors ({' '.join(str(exc).split())[:200]})") from None
    return (state, meta) if with_metadata else state


def _geometry_from_config(g, source: str) -> dict:
    keys = ("img_size", "patch_size", "in_chans", "dim", "depth", "heads", "mlp_ratio")
    if not isinstance(g, dict) or any(k not in g for k in keys):
        raise CheckpointError(f"{source}: 'encoder' must hold {', '.join(keys)}")
    try:
        out = {"img_size": [int(v) for v in g["img_size"]], "patch_size": [int(v) for v in g["patch_size"]],
               "in_chans": int(g["in_chans"]), "dim": int(g["dim"]), "depth": int(g["depth"]),
               "heads": int(g["heads"]), "mlp_ratio": float(g["mlp_ratio"])}
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: invalid 'encoder' entry ({exc})") from None
    if len(out["img_size"]) != 3 or len(out["patch_size"]) != 3 or out["dim"] % 6 or out["dim"] % max(out["heads"], 1):
        raise CheckpointError(f"{source}: invalid 'encoder' geometry {out}")
    try:
        patch_grid(tuple(out["img_size"]), tuple(out["patch_size"]))
    except ValueError as exc:
        raise CheckpointError(f"{source}: {exc}") from None
    return out


def _int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


# -- what the model card says --------------------------------------------------------------------------------------
def training_summary(saved: dict, run: Path, step: int | None, ckpt: Path) -> dict:
    """Preset, steps, data, text tower, losses and the final logged loss of a simcrop checkpoint."""
    m, d, t = saved.get("model", {}), saved.get("data", {}), saved.get("train", {})
    losses = [k for k in ("mim", "mlm", "align") if m.get(f"use_{k}", True)]
    out = {"preset": t.get("preset"), "checkpoint": ckpt.name, "step": step, "schedule_steps": t.get("steps"),
           "data": d.get("data") or f"built-in synthetic CT-report data ({d.get('synthetic_n')} cases)",
           "text_encoder": saved.get("text_encoder_id") or m.get("text_encoder"), "losses": losses,
           "batch_size": d.get("batch_size"), "accum_steps": t.get("accum_steps"),
           "world_size": saved.get("world_size"), "lr": t.get("lr"), "mask_ratio": m.get("mask_ratio"),
           "config": {g: saved[g] for g in ("model", "data", "train") if g in saved}}
    metrics = run / "metrics.csv"
    if metrics.is_file():
        try:
            with open(metrics, newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step")]
            row = next((r for r in reversed(rows) if _int(r["step"]) == step), rows[-1] if rows else None)
            if row:
                out["final_metrics"] = {k: float(v) for k, v in row.items() if k != "step" and v not in ("", None)
                                        and _is_number(v)}
        except (OSError, csv.Error, ValueError):
            pass  # a damaged log does not stop loading: the card just says less
    return out


def _is_number(v) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def evaluation_results(run: Path) -> list[dict]:
    """The headline numbers of every <task>.json that simcrop.eval wrote under <run>/eval/."""
    found = []
    root = run / "eval"
    if not root.is_dir():
        return found
    for f in sorted(root.rglob("*.json")):
        if f.stem not in TASKS:
            continue
        try:
            res = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            continue
        if not isinstance(res, dict):
            continue
        metrics = headline(f.stem, res)
        if metrics:
            found.append({"task": f.stem, "file": str(f.relative_to(run)), "checkpoint": Path(str(res.get("checkpoint", ""))).name,
                          "data": res.get("data"), "metrics": metrics})
    return found


def headline(task: str, res: dict) -> dict:
    """{metric: value} of one task's results (the numbers its .md table leads with)."""
    def num(v):
        return float(v) if _is_number(v) else None

    out: dict = {}
    if task == "linear-probe":
        for frac, r in (res.get("fractions") or {}).items():
            if isinstance(r, dict) and num(r.get("auroc")) is not None:
                out[f"auroc@{float(frac) * 100:g}%"] = num(r["auroc"])
    elif task == "zero-shot":
        out["auroc"] = num(res.get("auroc"))
    elif task == "retrieval":
        for k, v in (res.get("report_to_volume") or {}).items():
            out[f"report->volume R@{k}"] = num(v)
    elif task == "segment":
        out["dice"], out["dice_pooled"] = num(res.get("dice")), num(res.get("dice_pooled"))
    elif task == "grounding":
        block = (res.get("groups") or {}).get("all") or {}
        share = block.get("topk_share")
        out["topk_share"] = num(share.get("mean") if isinstance(share, dict) else share)
        out["lift"] = num(block.get("lift"))
    return {k: v for k, v in out.items() if v is not None}


def model_card(config: dict) -> str:
    """README.md of a save_pretrained folder: what the encoder is, how to feed it, how it was trained and scored."""
    g, pre, tr = config["encoder"], config["preprocessing"], config.get("training") or {}
    grid = [s // p for s, p in zip(g["img_size"], g["patch_size"])]
    lines = ["---", "library_name: simcrop", "tags: [medical-imaging, chest-ct, 3d, vision-transformer, simcrop]", "---", "",
             "# SimCroP 3D ViT encoder", "",
             f"A 3D ViT ({g['depth']} blocks, width {g['dim']}, {g['heads']} heads, MLP ratio {g['mlp_ratio']:g}) "
             f"over {'x'.join(map(str, g['patch_size']))}-voxel patches of a {'x'.join(map(str, g['img_size']))} crop "
             f"({'x'.join(map(str, grid))} = {math.prod(grid)} tokens + cls); position embedding: "
             f"{'3D sin-cos (fixed, recomputed on load)' if config['pos_embed'] == 'sincos-3d' else 'stored in model.safetensors'}.",
             f"Source: {config.get('source') or 'unknown'}.", "",
             "## Use", "", "```python", "import simcrop", "",
             'enc = simcrop.load_encoder("<this folder>")  # or simcrop.SimCroPEncoder.from_pretrained(...)',
             'x = enc.preprocess("ct.nii.gz")              # [1, 1, X, Y, Z]', "tokens = enc.forward_features(x)             # [1, 1 + N, D], cls first", "```", "",
             "Export: `python -m simcrop.export --checkpoint <this folder> --to monai-vit|timm --out FILE` "
             "(docs/interop.md in simcrop).", "", "## Preprocessing", ""]
    lines += [f"- {k}: {v}" for k, v in pre.items()]
    lines += ["", "## Training", ""]
    if tr:
        for key, label in (("preset", "preset"), ("step", "optimizer steps done"), ("schedule_steps", "schedule length (steps)"),
                           ("data", "data"), ("text_encoder", "frozen text encoder"), ("losses", "losses"),
                           ("batch_size", "batch per device"), ("accum_steps", "accumulation"), ("world_size", "devices"),
                           ("lr", "peak learning rate"), ("mask_ratio", "mask ratio"), ("checkpoint", "checkpoint")):
            if tr.get(key) is not None:
                value = ", ".join(tr[key]) if isinstance(tr[key], list) else tr[key]
                lines.append(f"- {label}: {value}")
        if tr.get("final_metrics"):
            lines.append("- last logged step: " + ", ".join(f"{k} {v:.4g}" for k, v in tr["final_metrics"].items()))
        if tr.get("config"):
            lines += ["", "<details><summary>full training config</summary>", "", "```json",
                      json.dumps(tr["config"], indent=2), "```", "", "</details>"]
    else:
        lines.append("Not recorded (weights imported from outside simcrop)." + (f" {config['ignored']}." if config.get("ignored") else ""))
    lines += ["", "## Evaluation", ""]
    evals = config.get("evaluation") or []
    if evals:
        lines += ["| task | checkpoint | metrics | file |", "| --- | --- | --- | --- |"]
        for e in evals:
            ms = ", ".join(f"{k} {v:.3f}" for k, v in e["metrics"].items())
            lines.append(f"| {e['task']} | {e.get('checkpoint') or ''} | {ms} | `{e['file']}` |")
    else:
        lines.append("No simcrop.eval results were found in the run folder.")
    return "\n".join(lines) + "\n"


# -- preprocessing -------------------------------------------------------------------------------------------------
def preprocess(source, size, affine=None, spacing=None) -> torch.Tensor:
    """A CT -> the encoder's input [1, 1, *size] float32 in [-1, 1]: RAS+, 1.5 x 1.5 x 3 mm, HU clipped to
    [-1000, 1000] (before resampling, as simcrop.prepare), / 1000, centre crop / reflect pad to `size` (the
    evaluation transform).

    Args:
        source: a NIfTI / NRRD file or a DICOM series folder (geometry from its header), or a HU array [X, Y, Z]
            (numpy or torch) with `affine` (4 x 4 voxel -> RAS mm) or `spacing` (mm; the axes already RAS+); an
            array with neither is taken as already RAS+ at 1.5 x 1.5 x 3 mm (e.g. a prepared volume).
        size: the crop, the encoder's img_size.
    """
    from simcrop.data.augment import center_crop_pad, hu_to_unit
    from simcrop.data.errors import DataError
    from simcrop.data.readers import Volume, read_volume, to_ras

    size = tuple(int(s) for s in size)
    try:
        if isinstance(source, (str, os.PathLike)):
            vol = to_ras(read_volume(source))
        else:
            array = source.detach().cpu().numpy() if isinstance(source, torch.Tensor) else np.asarray(source)
            if array.ndim != 3:
                raise DataError(f"preprocess: expected a HU volume [X, Y, Z], got shape {tuple(array.shape)}")
            if affine is None:
                affine = np.diag([*(spacing if spacing is not None else SPACING_MM), 1.0])
            vol = to_ras(Volume(np.asarray(array, dtype=np.float32), np.asarray(affine, dtype=np.float64), Path("<array>")))
        hu = np.clip(vol.array.astype(np.float32), *HU_CLIP)
        if not np.allclose(vol.spacing, SPACING_MM, rtol=0, atol=1e-6):
            from simcrop.data.prepare import resample

            hu, _ = resample(hu, vol.affine, SPACING_MM)
    except DataError as exc:
        raise ValueError(str(exc)) from None
    x = center_crop_pad(hu_to_unit(torch.from_numpy(np.ascontiguousarray(hu))), size)  # [*size]
    return x[None, None].contiguous()  # [1, 1, X, Y, Z]
