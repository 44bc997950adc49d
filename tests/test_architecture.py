"""The layering of docs/architecture.md, checked on the source: every import (module-level or inside a
function) of every module under simcrop/ and kernels/ goes down or sideways, never up, and never in a cycle."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# rank of each layer: a module may import modules of its own rank or lower (docs/architecture.md)
LAYERS = [
    (0, ("simcrop.kernels",)),
    (1, ("simcrop.ops",)),
    (2, ("simcrop.paths", "simcrop.config", "simcrop.checkpoint", "simcrop.distributed")),
    (3, ("simcrop.models",)),
    (4, ("simcrop.data",)),
    (5, ("simcrop.factory", "simcrop.run_log", "simcrop.interop", "simcrop.pretrained")),
    (6, ("simcrop.pretraining", "simcrop.eval")),
    (7, ("simcrop.experiments",)),
    (8, ("simcrop.train", "simcrop.prepare", "simcrop.eval.cli", "simcrop.eval.__main__", "simcrop.export",
         "simcrop.embed")),
]
FACADE = "simcrop"  # simcrop/__init__.py: the public API, above everything (it imports lazily)
ENTRY_POINTS = {"simcrop.train", "simcrop.prepare", "simcrop.eval.cli", "simcrop.eval.__main__", "simcrop.export",
                "simcrop.embed"}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "kernels":
        parts[0:1] = ["simcrop", "kernels"]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_modules() -> dict[str, Path]:
    files = list((ROOT / "simcrop").rglob("*.py")) + list((ROOT / "kernels").rglob("*.py"))
    return {module_name(f): f for f in files}


MODULES = source_modules()


def resolve(target: str) -> str | None:
    """The longest known module that `target` names (a symbol import names its module)."""
    while target:
        if target in MODULES:
            return target
        target = target.rpartition(".")[0]
    return None


def imports_of(name: str) -> set[str]:
    tree = ast.parse(MODULES[name].read_text())
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            m = resolve(t) if t.startswith("simcrop.") else None
            if m and m != name:
                found.add(m)
    # `simcrop` itself (the public facade) and a module's own packages run anyway: not edges
    return {m for m in found if m != "simcrop" and not name.startswith(m + ".")}


GRAPH = {name: imports_of(name) for name in MODULES}


def rank(name: str) -> int:
    if name == FACADE:
        return 9
    best, best_len = None, -1
    for r, prefixes in LAYERS:
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and len(p) > best_len:
                best, best_len = r, len(p)
    if best is None:
        raise AssertionError(f"{name} is in no layer of docs/architecture.md: add it to LAYERS and the doc")
    return best


def test_every_module_has_a_layer():
    for name in MODULES:
        rank(name)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_go_down_or_sideways(name):
    up = sorted(m for m in GRAPH[name] if rank(m) > rank(name))
    assert not up, f"{name} (layer {rank(name)}) imports {up} from a higher layer"


def test_nothing_imports_an_entry_point():
    for name, targets in GRAPH.items():
        bad = sorted(t for t in targets & ENTRY_POINTS if name not in ENTRY_POINTS or t == "simcrop.train")
        assert not bad or name == "simcrop.eval.__main__", f"{name} imports the entry point(s) {bad}"


def test_models_ops_kernels_import_nothing_from_data():
    for name, targets in GRAPH.items():
        if rank(name) <= 3:
            assert not any(t.startswith("simcrop.data") for t in targets), (name, targets)


def test_no_import_cycle():
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])


def test_the_checker_sees_lazy_imports():
    """The graph holds function-level imports too (the checks above would pass vacuously otherwise)."""
    assert "simcrop.kernels.topk_align" in GRAPH["simcrop.ops.topk_align"] or \
        any(t.startswith("simcrop.kernels") for t in GRAPH["simcrop.ops.topk_align"])
    assert "simcrop.models.simcrop" in GRAPH["simcrop.factory"]  # imported inside build_model
