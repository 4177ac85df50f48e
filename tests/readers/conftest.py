"""Fixtures for the reader tests: the reference AnnData and its copies in every source layout."""

from __future__ import annotations

import anndata as ad
import pytest

from ._build import Source, make_adata, write_sources


@pytest.fixture(scope="session")
def ref_adata() -> ad.AnnData:
    """The in-memory AnnData every source was written from."""
    return make_adata()


@pytest.fixture(scope="session")
def sources(ref_adata, tmp_path_factory) -> dict[str, Source]:
    """Every source layout, written once per session."""
    return write_sources(ref_adata, tmp_path_factory.mktemp("reader_sources"))
