"""python -m simcrop.export: a pre-trained encoder in another tool's layout (docs/interop.md).

    python -m simcrop.export --checkpoint RUN --to monai-vit --out vit.safetensors   # monai.networks.nets.ViT
    python -m simcrop.export --checkpoint RUN --to monai-vit --no-cls --out vit.pt   # MONAI's UNETR .vit
    python -m simcrop.export --checkpoint RUN --to timm --out encoder.pth            # the authors' scripts
    python -m simcrop.export --checkpoint RUN --to pretrained --out DIR              # config.json + safetensors + card
    python -m simcrop.export --from timm --checkpoint their.pth --out DIR            # the authors' weights -> ours

--checkpoint takes anything simcrop.load_encoder takes (run, checkpoint or pretrained folder, or a weights file in
the authors' / timm layout). Files: .safetensors (flat), or .pt / .pth / .bin through torch.save (monai-vit: the flat
state dict; timm: {"model": state dict}, what the authors' loaders read).
"""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

from simcrop.checkpoint import CheckpointError, atomic_write_bytes
from simcrop.config import ConfigError, parse_triple

TARGETS = ("monai-vit", "timm", "pretrained")
FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="simcrop.export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--checkpoint", required=True, help="run / checkpoint / pretrained folder, or an authors' weights file")
    p.add_argument("--to", choices=TARGETS, default=None, help="target layout (default: pretrained with --from timm)")
    p.add_argument("--from", dest="source", choices=("auto", "simcrop", "timm"), default="auto",
                   help="layout of --checkpoint: simcrop folders, or a timm / authors' weights file (auto: by path)")
    p.add_argument("--out", required=True, help="output file (.safetensors, .pt, .pth, .bin) or folder (pretrained)")
    p.add_argument("--no-cls", action="store_true",
                   help="monai-vit: no cls token (ViT(classification=False), as MONAI's UNETR builds it)")
    p.add_argument("--num-classes", type=int, default=2, help="monai-vit: classes of the new (zero) classification head")
    p.add_argument("--post-activation", default="Tanh", help="monai-vit: ViT's post_activation ('Tanh' or 'none')")
    p.add_argument("--heads", type=int, default=None, help="authors' file: attention heads (default: width / 64)")
    p.add_argument("--img-size", type=lambda s: parse_triple(s, int, positive=True), default=None,
                   help="authors' file: crop x,y,z (default: the cubic patch grid of their patchify)")
    return p


def run(args) -> list[str]:
    """Do the export; returns the lines to print."""
    from simcrop.pretrained import load_encoder

    src = Path(args.checkpoint)
    if args.source == "timm" and not src.is_file():
        raise CheckpointError(f"{src}: --from timm needs a weights file (.pth, .pt, .bin, .ckpt, .safetensors)")
    if args.source == "simcrop" and src.is_file():
        raise CheckpointError(f"{src}: --from simcrop needs a run, checkpoint or pretrained folder")
    target = args.to or ("pretrained" if args.source == "timm" else None)
    if target is None:
        raise ConfigError("--to is required (monai-vit, timm or pretrained)")
    kw = {"heads": args.heads, "img_size": args.img_size} if src.is_file() else {}
    enc = load_encoder(src, "cpu", **kw)
    out = Path(args.out)
    lines = []
    if enc.info.get("ignored"):
        lines.append(f"{src}: {enc.info['ignored']}")
    if target == "pretrained":
        enc.save_pretrained(out)
        lines.append(f"wrote {out}/ (config.json, model.safetensors, README.md): load with simcrop.load_encoder({str(out)!r})")
        return lines
    if out.suffix not in FILE_SUFFIXES:
        raise ConfigError(f"--out {out}: expected a {', '.join(FILE_SUFFIXES)} file for --to {target}")
    out.parent.mkdir(parents=True, exist_ok=True)
    if target == "monai-vit":
        from simcrop.interop.monai_vit import monai_vit_kwargs, to_monai_vit

        post = None if args.post_activation.lower() == "none" else args.post_activation
        state = to_monai_vit(enc, not args.no_cls, args.num_classes, post)
        kwargs = monai_vit_kwargs(enc, not args.no_cls, args.num_classes, post)
        atomic_write_bytes(out, _flat_bytes(state, out, "monai-vit"))
        call = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        lines += [f"wrote {out}: {len(state)} tensors for monai.networks.nets.ViT({call})",
                  "  then set every LayerNorm's eps to 1e-6 (MONAI's are 1e-5): "
                  "simcrop.interop.monai_vit.set_layernorm_eps(vit); load with strict=True"]
    else:
        from simcrop.interop.timm_vit import save_timm_file, to_timm

        state = to_timm(enc)
        atomic_write_bytes(out, save_timm_file(state, out))
        g = enc.geometry()
        lines.append(f"wrote {out}: {len(state)} tensors in the authors' / timm ViT layout "
                     f"(embed_dim {g['dim']}, depth {g['depth']}, num_heads {g['heads']}, patch {tuple(g['patch_size'])}, "
                     f"crop {tuple(g['img_size'])}" + (", under 'model'" if out.suffix != ".safetensors" else "") + ")")
    return lines


def _flat_bytes(state, out: Path, layout: str) -> bytes:
    if out.suffix == ".safetensors":
        from safetensors.torch import save

        return save(state, metadata={"format": "pt", "layout": layout})
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    try:
        for line in run(args):
            print(line)
    except (CheckpointError, ConfigError, ValueError, ImportError) as exc:
        print(f"{p.prog}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
