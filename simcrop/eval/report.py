"""Writing results: one JSON (everything) and one Markdown (the tables a person reads) per task."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path


def fmt(x, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return "n/a" if not math.isfinite(x) else f"{x:.{digits}f}"
    return str(x)


def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _clean(obj):
    """JSON-safe: NaN/inf -> None, tuples -> lists, Paths -> str."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):
        return _clean(obj.item())
    return obj


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_results(out: Path, task: str, results: dict, markdown: str) -> tuple[Path, Path]:
    """<out>/<task>.json and <out>/<task>.md."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / f"{task}.json", out / f"{task}.md"
    _atomic_write(js, json.dumps(_clean(results), indent=2) + "\n")
    _atomic_write(md, markdown.rstrip() + "\n")
    return js, md
