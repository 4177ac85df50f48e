"""Inputs of the perturbation engines: token cells and gene targets (ids, Ensembl IDs, symbols)."""

from __future__ import annotations

import json
import logging
import pickle
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import GeneMatchError, InputFileError

log = logging.getLogger(__name__)

SPECIAL_NAMES = ("<pad>", "<mask>", "<cls>", "<eos>")


def _bundled(name: str) -> Path:
    return Path(str(resources.files("scfm_fast") / "data" / "geneformer_v1" / name))


@lru_cache(maxsize=8)
def _load_pickle(path: str) -> dict:
    p = Path(path)
    if not p.exists():
        msg = f"{p}: dictionary pickle not found"
        raise InputFileError(msg)
    with open(p, "rb") as f:
        d = pickle.load(f)
    if not isinstance(d, dict):
        msg = f"{p}: expected a pickled dict, got {type(d).__name__}"
        raise InputFileError(msg)
    return d


def load_dict(source: str | Path | dict | None, default: str) -> dict:
    """A dict given directly, read from a pickle path, or the bundled Geneformer V1 one."""
    if isinstance(source, dict):
        return source
    return _load_pickle(str(source) if source is not None else str(_bundled(default)))


class GeneResolver:
    """Map gene targets (token ids, Ensembl IDs, symbols) to token ids, and token ids back to Ensembl.

    Parameters
    ----------
    token_dictionary
        Ensembl ID -> token id (dict or pickle path); default: bundled Geneformer V1 ``token_dictionary.pkl``.
    gene_name_map
        Symbol -> Ensembl ID (dict or pickle path); default: bundled ``gene_name_id_dict.pkl``.
    orthologs
        ``"mouse-to-human"``, an ortholog table path or a dict (mouse id/symbol -> human Ensembl ID), for
        cells tokenized with ``--orthologs``: mouse targets then resolve as the tokenizer resolved them.
    """

    def __init__(self, token_dictionary: str | Path | dict | None = None,
                 gene_name_map: str | Path | dict | None = None,
                 orthologs: str | Path | dict | None = None) -> None:
        self._tok_src = token_dictionary
        self._name_src = gene_name_map
        self._orth_src = orthologs

    @property
    def token_dict(self) -> dict:
        return load_dict(self._tok_src, "token_dictionary.pkl")

    @property
    def name_map(self) -> dict:
        return load_dict(self._name_src, "gene_name_id_dict.pkl")

    @property
    def ortholog_map(self) -> dict | None:
        if self._orth_src is None or isinstance(self._orth_src, dict):
            return self._orth_src
        return _load_orthologs(str(self._orth_src))

    def special_token_ids(self) -> list[int]:
        return [int(self.token_dict[s]) for s in SPECIAL_NAMES if s in self.token_dict]

    def ensembl_of(self) -> dict[int, str]:
        return {int(v): k for k, v in self.token_dict.items()}

    def symbol_of(self) -> dict[int, str]:
        """Token id -> gene symbol (the first symbol of the name map that names its Ensembl ID)."""
        td = self.token_dict
        out: dict[int, str] = {}
        for sym, ens in self.name_map.items():
            t = td.get(ens)
            if t is not None:
                out.setdefault(int(t), str(sym))
        return out

    def resolve_one(self, gene: int | str) -> int | None:
        """Token id of one target, or ``None`` when it is not in the vocabulary."""
        if isinstance(gene, (int, np.integer)):
            return int(gene)
        g = str(gene).strip()
        if g.lstrip("-").isdigit():
            return int(g)
        td = self.token_dict
        if g in td:
            return int(td[g])
        base = g.split(".")[0]
        orth = self.ortholog_map
        if base.upper().startswith("ENS"):
            ens = base if base in td or orth is None else orth.get(base)
            return int(td[ens]) if ens is not None and ens in td else None
        ens = self.name_map.get(g)
        if ens is None:
            # as the tokenizer: with orthologs, "Actb" maps through the table, never by case to a human symbol
            ens = orth.get(g) if orth is not None else self.name_map.get(g.upper())
        return int(td[ens]) if ens is not None and ens in td else None

    def resolve(self, genes: Any, *, combine: bool = False) -> tuple[list[tuple[int, ...]] | None, list[str]]:
        """Turn a ``genes=`` argument into token groups; returns ``(groups or None for 'all', unknown)``.

        ``"all"`` -> ``None``; a gene -> ``[(tok,)]``; a list -> one group per item (an item that is a
        tuple/list is a group perturbed together); ``combine=True`` -> the whole list as one group.
        """
        if isinstance(genes, str) and genes == "all":
            return None, []
        items: Sequence = [genes] if isinstance(genes, (str, int, np.integer)) else list(genes)
        groups: list[tuple[int, ...]] = []
        unknown: list[str] = []
        for item in items:
            members = [item] if isinstance(item, (str, int, np.integer)) else list(item)
            toks = [self.resolve_one(m) for m in members]
            bad = [str(m) for m, t in zip(members, toks) if t is None]
            if bad:
                unknown.extend(bad)
                continue
            groups.append(tuple(int(t) for t in toks))
        if combine and groups:
            merged = tuple(dict.fromkeys(t for g in groups for t in g))
            groups = [merged]
        if not groups:
            msg = f"none of the requested genes {list(items)[:10]} could be resolved to token ids"
            raise GeneMatchError(msg)
        if unknown:
            log.warning("skipping %d genes not in the token dictionary: %s", len(unknown), unknown[:20])
        return groups, unknown


def iter_cells(tokens: Any) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(cell_index, input_ids)`` from a token dataset dir, a pyarrow Table or a list of arrays."""
    import pyarrow as pa

    if isinstance(tokens, (str, Path)):
        import pyarrow.dataset as ds

        p = Path(tokens)
        if not p.exists():
            msg = f"{p}: token dataset directory not found"
            raise InputFileError(msg)
        from ..store.schema import MANIFEST

        if p.is_dir() and (p / MANIFEST).is_file():
            from ..store.reader import read_manifest

            read_manifest(p)  # an unfinished dataset is refused (its missing cells would pass unnoticed)
        dset = ds.dataset(str(p), format="parquet")
        tokens = dset.to_table(columns=[c for c in ("input_ids", "cell_index") if c in dset.schema.names])
    if isinstance(tokens, pa.Table):
        if "input_ids" not in tokens.column_names:
            msg = f"token table lacks an 'input_ids' column (has {tokens.column_names})"
            raise InputFileError(msg)
        col = tokens.column("input_ids").combine_chunks()
        offs = col.offsets.to_numpy()
        vals = col.values.to_numpy(zero_copy_only=False).astype(np.int64)
        if "cell_index" in tokens.column_names:
            idx = tokens.column("cell_index").to_numpy()
        else:
            idx = np.arange(tokens.num_rows)
        for i in range(tokens.num_rows):
            yield int(idx[i]), vals[offs[i]:offs[i + 1]]
        return
    if isinstance(tokens, np.ndarray) and tokens.ndim == 2:
        tokens = list(tokens)
    for i, t in enumerate(tokens):
        yield i, np.asarray(t, dtype=np.int64)


def as_cell_list(tokens: Any) -> list[tuple[int, np.ndarray]]:
    return list(iter_cells(tokens))


@lru_cache(maxsize=4)
def _load_orthologs(source: str) -> dict:
    from ..vocab import load_ortholog_map

    return load_ortholog_map(source)


def dataset_config(tokens: Any) -> dict:
    """The tokenizer config a token dataset directory's manifest, or a token table's schema metadata
    (:func:`~scfm_fast.tokenize_anndata`), records (``{}`` for other inputs)."""
    import pyarrow as pa

    if isinstance(tokens, pa.Table):
        from ..store.schema import table_config

        return table_config(tokens)
    if not isinstance(tokens, (str, Path)):
        return {}
    if Path(tokens).is_file():  # a saved tokenize_anndata table keeps its config in the Parquet schema
        import pyarrow.parquet as pq

        from ..store.schema import table_config

        return table_config(pq.read_schema(str(tokens)).empty_table())
    from ..store.schema import MANIFEST

    man = Path(tokens) / MANIFEST
    return json.loads(man.read_text()).get("config", {}) if man.is_file() else {}


def check_dictionary(tokens: Any, token_dictionary: str | Path | dict | None) -> None:
    """Refuse a token dictionary other than the one a token dataset directory was tokenized with.

    Its token ids would name other genes: ``"Aamp"`` would perturb whichever gene holds AAMP's V1 id.
    A dict given directly cannot be compared and is trusted.
    """
    want = dataset_config(tokens).get("dictionary_hashes", {}).get("token_dictionary")
    if want is None or isinstance(token_dictionary, dict):
        return
    from ..vocab.dictionaries import check_token_dictionary

    path = Path(token_dictionary) if token_dictionary is not None else _bundled("token_dictionary.pkl")
    if path.is_file():
        check_token_dictionary(path, want, dataset=str(tokens) if isinstance(tokens, (str, Path)) else "the token table")


def dataset_special_ids(tokens: Any) -> list[int] | None:
    """Special token ids recorded in a token dataset directory's manifest (``None``: not known from it)."""
    spec = dataset_config(tokens).get("special_tokens")
    return sorted({int(v) for v in spec.values()}) if spec else None


def dataset_orthologs(tokens: Any) -> str | None:
    """The ``--orthologs`` a token dataset directory was tokenized with (``None``: none or not known)."""
    orth = dataset_config(tokens).get("orthologs")
    return None if orth in (None, "None") else str(orth)  # the manifest stores str(None)


def unique_special(ids: Iterable[int] | None, resolver: GeneResolver, tokens: Any = None) -> list[int]:
    """Explicit special ids, else the token dataset's own (its manifest), else the dictionary's."""
    if ids is not None:
        return sorted({int(i) for i in ids})
    # the dataset's record wins over the (default: bundled V1) dictionary, which lacks V2's <cls>/<eos>
    own = dataset_special_ids(tokens)
    return own if own is not None else resolver.special_token_ids()
