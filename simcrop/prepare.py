"""`python -m simcrop.prepare --src ... --out ...`: raw CT + reports -> the prepared format (docs/data.md).

Thin entry: the work is in simcrop/data/prepare.py. Exit codes: 0 done; 1 --strict and some input was
rejected; 2 a fatal problem (bad arguments, missing source, unreadable manifest), printed as one line.
"""
from __future__ import annotations

import argparse
import math
import sys

from simcrop.config import parse_triple
from simcrop.data.errors import DataError
from simcrop.data.manifest import format_help
from simcrop.data.prepare import Settings, run_prepare


def _spacing(text: str) -> tuple[float, float, float]:
    values = parse_triple(text, float, positive=True)
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected three finite positive numbers, got {text!r}")
    return values


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the options' help, and the epilog (the manifest format) with its own line breaks."""


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m simcrop.prepare", description=__doc__.splitlines()[0],
                                 formatter_class=_HelpFormatter, epilog=format_help())
    ap.add_argument("--src", required=True, help="CT-RATE folder, or a manifest .csv / .tsv / .jsonl (below)")
    ap.add_argument("--out", required=True, help="prepared folder (created; rerun to resume)")
    ap.add_argument("--format", default="auto", choices=("auto", "ctrate", "manifest"))
    ap.add_argument("--splits", default="", help="CT-RATE splits, e.g. train,valid ('' = those with reports)")
    ap.add_argument("--workers", type=int, default=0, help="volume worker processes (0 = in this process)")
    ap.add_argument("--strict", action="store_true", help="exit 1 when any input was rejected")
    ap.add_argument("--spacing", type=_spacing, default=Settings.spacing, help="target voxel size x,y,z (mm)")
    ap.add_argument("--assume-spacing", type=_spacing, default=None, metavar="X,Y,Z",
                    help="voxel size (mm) for the axes of volumes whose header gives a zero or missing spacing "
                         "(default %(default)s: such volumes are rejected, 'missing spacing')")
    ap.add_argument("--min-slices", type=int, default=Settings.min_slices, help="reject fewer slices (after resampling)")
    ap.add_argument("--text-encoder", default=Settings.text_encoder,
                    help="frozen encoder for tokens + cached findings features: minilm, tiny-bert, a folder, a "
                         "hub name in the local cache, or none")
    ap.add_argument("--preset", default="vit_b", help="take the text lengths from this training preset")
    ap.add_argument("--findings-max-len", type=int, default=None, help="override the preset's value")
    ap.add_argument("--report-max-len", type=int, default=None, help="override the preset's value")
    ap.add_argument("--max-sentences", type=int, default=None, help="override the preset's value")
    ap.add_argument("--feats-dtype", default="float16", choices=("float16", "float32"))
    ap.add_argument("--trust-remote-code", action="store_true")
    ap.add_argument("--cache-dir", default="", help="tiny-bert build folder ('' = $SIMCROP_CACHE or ~/.cache/simcrop)")
    ap.add_argument("--device", default="auto", help="text encoder device: auto | cpu | cuda")
    ap.add_argument("--volume-engine", default=None, choices=("fast", "reference"),
                    help="per-volume path: fast (stored dtype, views, slice-wise resampling) or reference (the "
                         "plain float32 path; the same output); default $SIMCROP_PREPARE_ENGINE, else fast")
    ap.add_argument("--verify", default="sha256", choices=("sha256", "size"),
                    help="how finished items are checked on a rerun")
    ap.add_argument("--limit", type=int, default=0, help="only the first N inputs (0 = all)")
    ap.add_argument("--no-progress", dest="progress", action="store_false",
                    help="no progress bars (ours, nor the text encoder's loading bars)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        from simcrop.config import ConfigError, make_config

        try:
            model = make_config(args.preset).model
        except ConfigError as exc:
            raise DataError(f"--preset: {exc}") from None
        settings = Settings(
            spacing=args.spacing, min_slices=args.min_slices, text_encoder=args.text_encoder,
            findings_max_len=args.findings_max_len or model.findings_max_len,
            report_max_len=args.report_max_len or model.report_max_len,
            max_sentences=args.max_sentences or model.max_sentences, feats_dtype=args.feats_dtype,
            trust_remote_code=args.trust_remote_code, cache_dir=args.cache_dir, assume_spacing=args.assume_spacing,
            **({"volume_engine": args.volume_engine} if args.volume_engine else {}),
        )
        splits = [s for s in args.splits.split(",") if s] or None
        res = run_prepare(args.src, args.out, args.format, settings, workers=args.workers, splits=splits,
                          verify=args.verify, device=args.device, progress=args.progress, limit=args.limit)
    except (DataError, FileNotFoundError) as exc:
        print(f"simcrop.prepare: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(f"prepared {res['items']} volume(s) into {res['out']} in {res['elapsed_s']:.1f} s "
          f"({res['prepared']} new, {res['kept']} kept), {res['rejected']} rejected")
    for r in res["rejects"][:20]:
        print(f"  rejected {r['split']}/{r['name']}: {r['reason']}")
    if len(res["rejects"]) > 20:
        print(f"  ... {len(res['rejects']) - 20} more in {res['out']}/rejects.jsonl")
    return 1 if args.strict and res["rejects"] else 0


if __name__ == "__main__":
    sys.exit(main())
