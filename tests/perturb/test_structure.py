"""perturb/'s module graph: no import cycle, engines never import the screen driver or the public API."""

from __future__ import annotations

import ast
from pathlib import Path

import scfm_fast.perturb as pkg

PKG = Path(pkg.__file__).parent
ENGINES = ("reference", "exact", "approx")


def _imports() -> dict[str, set[str]]:
    """Module -> the perturb modules it imports (at any depth of the file, lazy imports included)."""
    mods = {p.stem for p in PKG.glob("*.py") if p.stem != "__init__"}
    graph: dict[str, set[str]] = {}
    for m in mods:
        deps: set[str] = set()
        for node in ast.walk(ast.parse((PKG / f"{m}.py").read_text())):
            if isinstance(node, ast.ImportFrom):
                name = node.module or ""
                if node.level == 1:  # from .x import y / from . import x
                    deps |= {name.split(".")[0]} if name else {a.name for a in node.names}
                elif name.startswith("scfm_fast.perturb."):
                    deps.add(name.split(".")[2])
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[2] for a in node.names if a.name.startswith("scfm_fast.perturb.")}
        graph[m] = deps & mods
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return [*path, m, d]
            if d not in state and (found := visit(d, [*path, m])):
                return found
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m, [])):
            return found
    return None


def test_no_import_cycle_inside_perturb():
    assert _cycle(_imports()) is None, f"import cycle: {' -> '.join(_cycle(_imports()))}"


def test_the_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_engines_import_neither_the_driver_nor_the_api():
    graph = _imports()
    for e in ENGINES:
        assert not graph[e] & {"api", "screen", "_cli", "_workers", "_output"}, (e, graph[e])
