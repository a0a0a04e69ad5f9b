"""The package's shape: no import cycle between cryomag's modules, the layers' directions.

Module-level imports only (imports inside functions are deferred on purpose and cannot cycle
at import time; ``if TYPE_CHECKING:`` blocks are skipped).
"""

from __future__ import annotations

import ast
from pathlib import Path

import cryomag

SRC = Path(cryomag.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in SRC.rglob("*.py")}


def _top_level_imports(path: Path, name: str, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()

    def visit(body):
        for node in body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
                continue
            if isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for h in getattr(node, "handlers", []):
                    visit(h.body)
            elif isinstance(node, ast.Import):
                out.update(a.name for a in node.names if a.name in known)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                if mod in known:
                    out.add(mod)
                for a in node.names:
                    if f"{mod}.{a.name}" in known:
                        out.add(f"{mod}.{a.name}")

    visit(tree.body)
    out.discard(name)
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, comps = {}, {}, [], set(), []
    counter = [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
                comps.append(sorted(comp))

    for v in graph:
        if v not in index:
            strong(v)
    return comps


def test_no_import_cycle_between_modules():
    mods = _modules()
    known = set(mods)
    graph = {m: _top_level_imports(p, m, known) for m, p in mods.items()}
    # a package importing its own submodules is not a cycle of concepts
    for m in graph:
        graph[m] = {d for d in graph[m] if not d.startswith(m + ".")}
    assert _cycles(graph) == []


def test_the_numerical_core_does_not_import_io_execution_workflows_or_cli():
    mods = _modules()
    known = set(mods)
    core = ("cryomag.physics", "cryomag.fit")
    upper = ("cryomag.io", "cryomag.execution", "cryomag.workflows", "cryomag.cli",
             "cryomag.report")  # fmt: skip
    bad = []
    for m, p in mods.items():
        if m.startswith(core):
            bad += [(m, d) for d in _top_level_imports(p, m, known) if d.startswith(upper)]
    assert bad == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
