"""SimCroP pre-training: `python -m simcrop.train [--compile] [--preset tiny|vit_b] [--field value ...]`.

With no arguments: the tiny preset on the built-in synthetic CT-report data (generated on first use into the
cache folder), a few hundred steps on the CPU. Writes <out>/metrics.csv, <out>/loss.png and checkpoints
(<out>/checkpoints, see simcrop.checkpoint); `--resume auto` continues the newest one exactly.
The loop is simcrop.pretraining.Trainer; this file is only the command line.
"""
from __future__ import annotations

import argparse
import sys

from simcrop.checkpoint import CheckpointError
from simcrop.config import ConfigError, add_config_arguments, config_from_args
from simcrop.data.errors import DataError
from simcrop.data.loader import LoaderUnavailable
from simcrop.distributed import shutdown
from simcrop.ops.backend import BackendUnavailable
from simcrop.pretraining import Trainer, TrainingStopped
from simcrop.run_log import summarize


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simcrop.train", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
        trainer = Trainer(cfg)
        result = trainer.run()
    except (ConfigError, DataError, CheckpointError, BackendUnavailable, TrainingStopped, LoaderUnavailable,
            FileNotFoundError) as exc:
        message = " ".join(str(exc).split())  # one line
        print(f"simcrop.train: error: {message}", file=sys.stderr)
        return 2
    finally:
        shutdown()
    if trainer.dist.is_main:
        skipped = f", {result['skipped_steps']} step(s) skipped (non-finite)" if result["skipped_steps"] else ""
        print(
            f"{'stopped' if result['stopped'] else 'done'} in {result['elapsed_s']:.0f} s: "
            f"{summarize(result['metrics'])}{skipped}\n"
            f"  checkpoint {result['checkpoint']}\n  metrics    {result['metrics']}\n  loss plot  {result['plot']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
