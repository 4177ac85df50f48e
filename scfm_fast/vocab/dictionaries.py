"""Token and gene-median dictionaries (Geneformer's pickle format) and tokenization presets."""

from __future__ import annotations

import hashlib
import math
import pickle
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from pathlib import Path

import numpy as np

from .._errors import InputFileError

SPECIAL_TOKENS = ("<pad>", "<mask>", "<cls>", "<eos>")


def bundled_dir(name: str = "geneformer_v1") -> Path:
    """Folder of a dictionary set shipped inside the package (``scfm_fast/data/<name>``)."""
    return Path(str(resources.files("scfm_fast") / "data" / name))


@dataclass(frozen=True)
class Preset:
    """A model family's input layout."""

    name: str
    max_len: int
    cls: str | None
    eos: str | None
    dictionary_dir: str | None  # bundled dictionary set, or None when the user must supply one
    gene_name_map: str | None = None  # symbol table used for gene_name_map="auto" (None: Geneformer's)
    values: bool = False  # GeneCompass: a float32 value travels with each token

    @property
    def n_special(self) -> int:
        return int(self.cls is not None) + int(self.eos is not None)


PRESETS: dict[str, Preset] = {
    "geneformer-v1": Preset("geneformer-v1", 2048, None, None, "geneformer_v1"),
    # V2's gc104M dictionaries are not bundled: pass --token-dictionary/--gene-median.
    "geneformer-v2": Preset("geneformer-v2", 4096, "<cls>", "<eos>", None),
    # mouse-Geneformer: V1 layout over its own mouse Ensembl vocabulary (not distributed with its code:
    # pass --token-dictionary/--gene-median, e.g. from `scfm medians`); mouse symbols -> ENSMUSG ids
    "mouse-geneformer": Preset("mouse-geneformer", 2048, None, None, None, "ensembl-mouse"),
    # GeneCompass: one joint dictionary (ENSG and ENSMUSG keys), values beside the tokens
    "genecompass": Preset("genecompass", 2048, None, None, None, "ensembl-human+mouse", values=True),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        msg = f"unknown preset {name!r}; choose one of {sorted(PRESETS)}"
        raise ValueError(msg) from None


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_token_dictionary(path: str | Path, recorded: str | None, *, dataset: str) -> None:
    """Refuse a token dictionary file other than the one ``dataset`` was tokenized with (its manifest's
    ``dictionary_hashes["token_dictionary"]``, ``recorded``; ``None``: nothing to compare): its token
    ids would name other genes."""
    if recorded is not None and file_sha256(path) != recorded:
        from .._errors import UsageError

        msg = (f"{dataset}: tokenized with another token dictionary (sha256 {recorded[:12]}…) than {path}; pass "
               "the one it was tokenized with (--token-dictionary / token_dictionary=), or gene names and "
               "ensembl_id would map to the wrong token ids")
        raise UsageError(msg)


def load_pickle_dict(path: str | Path, *, what: str) -> dict:
    """Load a Geneformer dictionary pickle, with errors that name the file."""
    p = Path(path)
    if not p.exists():
        msg = f"{p}: {what} not found; pass the path of Geneformer's {what} pickle"
        raise InputFileError(msg)
    try:
        with open(p, "rb") as f:
            d = pickle.load(f)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        msg = f"{p}: could not read {what} as a pickle ({type(e).__name__}: {e})"
        raise InputFileError(msg) from e
    if not isinstance(d, dict) or not d:
        msg = f"{p}: {what} must be a non-empty dict pickle, got {type(d).__name__}"
        raise InputFileError(msg)
    return d


def _numbers(d: dict, cast: type[int] | type[float]) -> dict:
    """``{str(key): cast(value)}`` of ``d``, converted in one NumPy pass when the values are NumPy or Python
    numbers of ``cast``'s kind: Geneformer's pickles hold ``numpy.int16`` tokens and ``numpy.float64``
    medians, and ``cast`` on each cost ~20 ms per dictionary and run."""
    keys = list(d) if all(type(k) is str for k in d) else [str(k) for k in d]
    kinds = (int, np.integer) if cast is int else (int, float, np.integer, np.floating)
    if all(isinstance(v, kinds) and not isinstance(v, bool) for v in d.values()):
        values = np.fromiter(d.values(), dtype=np.int64 if cast is int else np.float64, count=len(d)).tolist()
    else:  # anything else (text, bool, fractional token ids): cast each, with cast's own errors
        values = [cast(v) for v in d.values()]
    return dict(zip(keys, values))


@dataclass
class GeneVocab:
    """A model's gene vocabulary: token ids plus each gene's corpus median.

    Only genes present in *both* dictionaries are tokenized (Geneformer's rule).
    """

    token_of: dict[str, int]
    median_of: dict[str, float]
    token_dictionary_path: str = ""
    gene_median_path: str = ""
    hashes: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, *, token_dictionary: str | Path | None = None, gene_median: str | Path | None = None,
             preset: str = "geneformer-v1") -> GeneVocab:
        """Load dictionaries, defaulting to the preset's bundled set.

        Parameters
        ----------
        token_dictionary, gene_median
            Paths to Geneformer-format pickles (gene id -> token id; gene id -> median).
        preset
            Used only to pick the bundled defaults.
        """
        pre = get_preset(preset)
        if token_dictionary is None or gene_median is None:
            if pre.dictionary_dir is None:
                msg = (f"preset {preset!r} has no bundled dictionaries; pass --token-dictionary and "
                       "--gene-median (Geneformer's gc104M pickles for V2; mouse-Geneformer's or GeneCompass's "
                       "own dictionaries, or ones built by `scfm medians`)")
                raise InputFileError(msg)
            base = bundled_dir(pre.dictionary_dir)
            token_dictionary = token_dictionary or base / "token_dictionary.pkl"
            gene_median = gene_median or base / "gene_median_dictionary.pkl"
        tok = load_pickle_dict(token_dictionary, what="token dictionary")
        med = load_pickle_dict(gene_median, what="gene median dictionary")
        token_of = _numbers(tok, int)
        median_of = _numbers(med, float)
        medians = np.fromiter(median_of.values(), dtype=np.float64, count=len(median_of))
        if not (np.isfinite(medians) & (medians > 0)).all():
            bad = [g for g, m in median_of.items() if not (math.isfinite(m) and m > 0)]
            msg = f"{gene_median}: {len(bad)} genes have a non-positive or non-finite median (e.g. {bad[:3]})"
            raise InputFileError(msg)
        return cls(token_of, median_of, str(token_dictionary), str(gene_median),
                   {"token_dictionary": file_sha256(token_dictionary),
                    "gene_median": file_sha256(gene_median)})

    @cached_property
    def size(self) -> int:
        return max(self.token_of.values()) + 1

    def special_id(self, name: str | None) -> int:
        """Token id of a special token, ``-1`` for ``None``; error if the dictionary lacks it."""
        if name is None:
            return -1
        if name not in self.token_of:
            msg = (f"{self.token_dictionary_path}: token dictionary has no {name!r} token; "
                   "this preset needs a dictionary with it (e.g. Geneformer V2's gc104M dictionary)")
            raise InputFileError(msg)
        return self.token_of[name]

    @cached_property
    def token_median(self) -> np.ndarray:
        """``float64`` median per token id; NaN where a token has no median (never tokenized)."""
        arr = np.full(self.size, np.nan, dtype=np.float64)
        for g, t in self.token_of.items():
            m = self.median_of.get(g)
            if m is not None:
                arr[t] = m
        return arr

    @cached_property
    def gene_of_token(self) -> dict[int, str]:
        return {t: g for g, t in self.token_of.items()}

    @cached_property
    def tokenized(self) -> dict[str, int]:
        """Token id of every gene that is tokenized (in both dictionaries, with a token id >= 0): one
        lookup per gene for :meth:`tokenizable`, which a run does for every gene of every input."""
        median_of = self.median_of
        return {g: t for g, t in self.token_of.items() if t >= 0 and g in median_of}

    def tokenizable(self, gene_id: str) -> int:
        """Token id of ``gene_id`` when it is tokenized (in both dictionaries), else ``-1``."""
        return self.tokenized.get(gene_id, -1)
