"""API conventions of public functions (after scanpy's test_package_structure)."""

from __future__ import annotations

import inspect
import re

import pytest

import scfm_fast

FUNCS = [n for n in scfm_fast.__all__ if inspect.isfunction(getattr(scfm_fast, n))]
# kernel entry points keep flash-attn's positional varlen signature (q, k, v, cu_seqlens, max_seqlen)
FLASH_ATTN_STYLE = {"varlen_attention"}


def test_all_names_resolve():
    # every exported name exists, is documented, and is what its home module defines
    assert len(set(scfm_fast.__all__)) == len(scfm_fast.__all__)
    for name in scfm_fast.__all__:
        obj = getattr(scfm_fast, name)
        if inspect.isfunction(obj) or inspect.isclass(obj):
            assert obj.__module__.startswith("scfm_fast."), name
            assert inspect.getdoc(obj), f"{name} has no docstring"


@pytest.mark.parametrize("name", FUNCS)
def test_public_function_conventions(name):
    fn = getattr(scfm_fast, name)
    sig = inspect.signature(fn)
    positional = [p for p in sig.parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    assert len(positional) <= 3 or name in FLASH_ATTN_STYLE, f"{name}: options must be keyword-only"
    for p in positional:
        assert not isinstance(p.default, bool), f"{name}: boolean {p.name} must be keyword-only"
    doc = inspect.getdoc(fn) or ""
    assert doc, f"{name}: missing docstring"
    params = {p for p in sig.parameters if p not in ("self",)}
    assert not params or "Parameters\n----------" in doc, f"{name}: no Parameters section"
    if params:
        section = doc.split("Parameters\n----------", 1)[1]
        section = re.split(r"\n\n[A-Z][a-z]+\n-+", section)[0]
        documented = set()
        for line in section.splitlines():
            if line and not line.startswith(" "):
                documented.update(x.strip().lstrip("*") for x in line.split(":")[0].split(","))
        assert params <= documented, f"{name}: undocumented parameters {sorted(params - documented)}"
        assert documented <= params, f"{name}: documents missing parameters {sorted(documented - params)}"
