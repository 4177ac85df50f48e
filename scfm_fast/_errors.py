"""Exception types. Every message names the file, the cell or gene, and what to do about it."""

from __future__ import annotations


class ScfmError(Exception):
    """Base class of scfm_fast's own errors."""


class InputFileError(ScfmError, ValueError):
    """A source file is missing, empty, malformed or lacks a requested element."""


class GeneMatchError(ScfmError, ValueError):
    """Too few of the input genes could be matched to the model's vocabulary."""


class CountDataError(ScfmError, ValueError):
    """Counts are not raw counts (negative, NaN/Inf, non-integer) or a cell total is unusable."""


class StoreError(ScfmError, RuntimeError):
    """A token store is incomplete, inconsistent with the requested run, or cannot be resumed."""


class BackendUnavailableError(ScfmError, RuntimeError):
    """A compute backend the user asked for explicitly cannot be used here."""


class UsageError(ScfmError, ValueError):
    """Options that are malformed or cannot be combined."""
