"""The tokenize front ends forward their spec options through ``spec_options`` (one list: the signature of
``TokenizerSpec.build``): each takes every one of them, with the same default."""

from __future__ import annotations

import inspect

import pytest

from scfm_fast.tokenizer.in_memory import tokenize_anndata
from scfm_fast.tokenizer.pipeline import tokenize_corpus
from scfm_fast.tokenizer.spec import TokenizerSpec, spec_option_names, spec_options


@pytest.mark.parametrize("front", [tokenize_anndata, tokenize_corpus])
def test_front_ends_take_every_spec_option_with_builds_default(front):
    build = inspect.signature(TokenizerSpec.build).parameters
    params = inspect.signature(front).parameters
    assert set(spec_option_names()) == set(build)
    for name in spec_option_names():
        assert name in params, (front.__name__, name)
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, (front.__name__, name)
        assert params[name].default == build[name].default, (front.__name__, name)


def test_spec_options_picks_the_build_keywords_and_refuses_a_short_list():
    opts = {name: object() for name in spec_option_names()}
    assert spec_options({**opts, "adata": 1, "chunk_size": 5}) == opts
    with pytest.raises(TypeError, match=r"lacks the TokenizerSpec options \['species'\]"):
        spec_options({k: v for k, v in opts.items() if k != "species"})
