"""python -m simcrop.data.synthetic: write a synthetic dataset in CT-RATE's layout.

    python -m simcrop.data.synthetic --out DIR                      # the realistic phantoms, 320 cases
    python -m simcrop.data.synthetic --variant testbed --out DIR    # the grounding testbed, 1280 cases
    python -m simcrop.data.synthetic --variant testbed              # into the cache folder; prints its path
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

from simcrop.data.synthetic.cache import ensure_default_dataset
from simcrop.data.synthetic.writer import VARIANTS, variant_defaults, write_dataset


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m simcrop.data.synthetic",
                                 description="Write a synthetic chest-CT/report dataset in CT-RATE's layout: the "
                                             "realistic phantoms (default) or the grounding testbed.")
    ap.add_argument("--variant", default="default", choices=VARIANTS,
                    help="default: realistic phantoms; testbed: large lesions of four looks (docs/data.md)")
    ap.add_argument("--out", default="",
                    help="output directory (must not exist or be empty); without it the dataset goes into the "
                         "cache folder (reused when already there) and its path is printed on stdout")
    ap.add_argument("--cache-dir", default="", help="cache folder without --out ($SIMCROP_CACHE, ~/.cache/simcrop)")
    ap.add_argument("--n", type=int, default=None, help="number of cases (default: the variant's, 320 / 1280)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--val-fraction", type=float, default=None, help="default: the variant's (0.2 / 0.4)")
    ap.add_argument("--shape", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                    help="default: the variant's (80 80 40 / 72 72 36)")
    ap.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("SX", "SY", "SZ"),
                    help="mm; default: the variant's (4 4 8 for both)")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    if not args.out:
        out = ensure_default_dataset(args.cache_dir or None, args.n, args.seed, args.shape, args.spacing,
                                     args.val_fraction, verbose=True, variant=args.variant)
        print(f"{args.variant} dataset ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        print(out)
        return 0
    n = variant_defaults(args.variant)["n"] if args.n is None else args.n
    try:
        out = write_dataset(args.out, n, args.seed, args.val_fraction, args.shape, args.spacing,
                            overwrite=args.overwrite, variant=args.variant)
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {n} cases to {out} in {time.perf_counter() - t0:.1f} s")
    return 0
