"""The hand-written stub scfm_fast/_core.pyi must describe the compiled module exactly."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from scfm_fast import _ext

STUB = Path(_ext.__file__).with_name("_core.pyi")

pytestmark = pytest.mark.skipif(_ext.core is None, reason=f"C++ core not built: {_ext.core_error}")


def _stub_tree() -> ast.Module:
    return ast.parse(STUB.read_text())


def _stub_names() -> set[str]:
    names = set()
    for node in _stub_tree().body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


def _module_names() -> set[str]:
    return {n for n in dir(_ext.core) if not n.startswith("_")}


def test_stub_names_match_module():
    assert _stub_names() == _module_names()


def test_stub_parameters_match_pybind_signatures():
    # pybind11 puts "name(arg: type, ...) -> ret" on the first docstring line
    for node in _stub_tree().body:
        if not isinstance(node, ast.FunctionDef):
            continue
        doc_line = getattr(_ext.core, node.name).__doc__.splitlines()[0]
        inner = doc_line[doc_line.index("(") + 1 : doc_line.rindex(") ->")]
        real = re.findall(r"(?:^|, )(\w+)(?=: |=|,|$)", inner) if inner else []
        assert [a.arg for a in node.args.args] == real, node.name


def test_stub_classes_match_bases():
    for node in _stub_tree().body:
        if isinstance(node, ast.ClassDef):
            obj = getattr(_ext.core, node.name)
            bases = {b.id for b in node.bases if isinstance(b, ast.Name)}
            assert bases <= {c.__name__ for c in obj.__mro__}, node.name
