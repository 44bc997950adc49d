"""Pre-train one experiment run at most once: a finished run is reused, an interrupted one resumes, and the
training seconds are recorded beside it (<run>/../pretrain_seconds.json; a resumed run's seconds add up)."""
from __future__ import annotations

import json
import time
from pathlib import Path

from simcrop.checkpoint import latest_checkpoint
from simcrop.pretraining import Trainer


def pretrain(cfg, log) -> tuple[Path, float]:
    """-> (the run's final checkpoint, pre-training seconds)."""
    run = Path(cfg.train.out)
    timing = run.parent / "pretrain_seconds.json"
    done = latest_checkpoint(run)
    before = json.loads(timing.read_text())["seconds"] if timing.is_file() else 0.0
    if done is not None and done.name == f"step_{cfg.train.steps:08d}" and timing.is_file():
        return done, before
    if done is not None:
        cfg.train.resume = "auto"
    t0 = time.perf_counter()
    Trainer(cfg, log=log).run()
    seconds = before + time.perf_counter() - t0
    timing.write_text(json.dumps({"seconds": seconds}))
    final = latest_checkpoint(run)
    if final is None or final.name != f"step_{cfg.train.steps:08d}":
        raise RuntimeError(f"{run}: pre-training stopped before step {cfg.train.steps} (newest: {final})")
    return final, seconds
