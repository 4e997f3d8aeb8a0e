"""The package's shape: imports flow one way (no cycles, lower layers never import higher ones)
and almost no imports of the package's own modules hide inside functions.

The import graph is read from the source with `ast`, independently of the code under test.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lipdub"

# Lowest first. A module may import modules of its own layer or below, never above.
LAYERS = [
    ("ground", ["lipdub.errors", "lipdub.device", "lipdub.progress", "lipdub.options", "lipdub.media",
                "lipdub.audio"]),
    ("models", ["lipdub.models"]),
    ("weights", ["lipdub.weights"]),
    ("faces", ["lipdub.faces"]),
    ("stages", ["lipdub.blend", "lipdub.restore", "lipdub.metrics", "lipdub.generate", "lipdub.speech",
                "lipdub.mask"]),
    ("jobs", ["lipdub.pipeline", "lipdub.enhance", "lipdub.evaluate", "lipdub.train", "lipdub.batch",
              "lipdub.avatar"]),
    ("top", ["lipdub.cli", "lipdub.serve", "lipdub.live", "lipdub.__main__", "lipdub"]),
]
MAX_DEFERRED = 10  # deferred imports of the package's own modules outside cli.py


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(current: str, is_package: bool, node: ast.ImportFrom, known: dict) -> list[str]:
    """The modules a from-import loads: `from . import x` loads the module x, `from .m import f` the module m."""
    if node.level:
        base = current.split(".") if is_package else current.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        stem = ".".join(base + ([node.module] if node.module else []))
    else:
        stem = node.module or ""
    return sorted({f"{stem}.{a.name}" if f"{stem}.{a.name}" in known else stem for a in node.names})


def imports(name: str, path: Path) -> list[tuple[str, bool, int]]:
    """(imported lipdub module, deferred?, line) for every import of the package in one file."""
    known = modules()
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []

    def visit(node: ast.AST, deferred: bool, type_checking: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = deferred or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            tc = type_checking or (isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test))
            if isinstance(child, (ast.Import, ast.ImportFrom)) and not tc:
                targets = ([a.name for a in child.names] if isinstance(child, ast.Import)
                           else _resolve(name, path.name == "__init__.py", child, known))
                for target in targets:
                    # the longest known module the target names (a from-import may name a function)
                    while target and target not in known:
                        target = target.rpartition(".")[0]
                    if target and target != name and target.startswith("lipdub"):
                        out.append((target, deferred, child.lineno))
            visit(child, inner, tc)

    visit(tree, False, False)
    return out


def graph() -> dict[str, set[str]]:
    return {name: {t for t, _, _ in imports(name, path)} for name, path in modules().items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in edges:
        if v not in index:
            strong(v)
    return out


def layer_of(name: str) -> int:
    best, depth = None, -1
    for number, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > depth:
                best, depth = number, len(prefix)
    if best is None:
        raise AssertionError(f"{name} is in no layer: add it to LAYERS")
    return best


def deferred_imports() -> list[str]:
    """One entry per deferred import statement (a statement naming two modules counts once)."""
    return sorted({f"{name}:{line}" for name, path in modules().items() if name != "lipdub.cli"
                   for _, deferred, line in imports(name, path) if deferred})


def test_the_checker_sees_a_cycle_and_a_deferred_import(tmp_path):
    """The graph reader is not blind: a known two-module cycle and a function-level import are found."""
    edges = {"a": {"b"}, "b": {"a"}, "c": {"a"}}
    assert cycles(edges) == [["a", "b"]]
    source = PACKAGE / "pipeline.py"
    found = imports("lipdub.pipeline", source)
    assert found, "pipeline imports nothing of the package?"


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_imports_point_down():
    upward = []
    for name, targets in graph().items():
        for target in targets:
            if layer_of(target) > layer_of(name):
                upward.append(f"{name} ({LAYERS[layer_of(name)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})")
    assert upward == []


def test_few_deferred_imports():
    found = deferred_imports()
    assert len(found) <= MAX_DEFERRED, "\n".join(found)


@pytest.mark.parametrize("name", sorted(modules()))
def test_every_module_has_a_layer(name):
    layer_of(name)
