"""The experiments' shared command-line wrapper: parse, run with a flushing log, and turn the library's
one-line errors into `<prog>: error: <message>` on stderr with exit status 2 (no traceback)."""
from __future__ import annotations

import sys
from typing import Callable

from simcrop.checkpoint import CheckpointError
from simcrop.config import ConfigError
from simcrop.data.errors import DataError
from simcrop.eval.errors import EvalError
from simcrop.pretraining import TrainingStopped

EXPECTED_ERRORS = (EvalError, DataError, CheckpointError, ConfigError, TrainingStopped, FileNotFoundError)


def run_command(prog: str, parser, run: Callable, argv: list[str] | None) -> int:
    """parser.parse_args(argv) -> run(args, log) -> 0; an expected error -> 2. args.argv keeps the flags."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        run(args, lambda *a, **k: print(*a, **k, flush=True))
    except EXPECTED_ERRORS as exc:
        print(f"{prog}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    return 0
