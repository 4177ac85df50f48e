"""What every concrete reader shares: path checks, the chunk loop, var access, context management."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .._errors import InputFileError
from ._anndata_elems import Frame
from ._csr import CSRBlock, rechunk
from ._nodes import ReadStats
from .base import CellChunk


class RowSource(Protocol):
    """A matrix readable as consecutive CSR row blocks (see :mod:`._sources`)."""

    n_rows: int
    n_cols: int

    def iter_blocks(self, start: int, chunk_size: int) -> Iterator[CSRBlock]: ...


def check_path(path: str | os.PathLike[str], *, kind: str, fix: str) -> str:
    """Fail early and clearly on a missing or empty source; return the path as ``str``.

    Parameters
    ----------
    path
        File or directory given by the user.
    kind
        Human-readable format name, used in messages ("h5ad file", "AnnData-Zarr store").
    fix
        What the user should do, appended to the messages.
    """
    p = Path(path)
    if not p.exists():
        msg = f"{p}: no such {kind}. Check the path. {fix}"
        raise InputFileError(msg)
    if p.is_file() and p.stat().st_size == 0:
        msg = f"{p}: the {kind} is empty (0 bytes); it was probably not written completely. {fix}"
        raise InputFileError(msg)
    if p.is_dir() and not any(p.iterdir()):
        msg = f"{p}: the {kind} is an empty directory. {fix}"
        raise InputFileError(msg)
    return str(p)


def open_error(path: str, err: OSError, *, kind: str, fix: str) -> InputFileError:
    """The error for a source that cannot be opened: the system's reason where it is one (too many open
    files, no permission), else a damaged file of this ``kind``."""
    code = getattr(err, "errno", None)
    if code in (errno.EMFILE, errno.ENFILE):
        try:
            import resource

            limit = f" (ulimit -n is {resource.getrlimit(resource.RLIMIT_NOFILE)[0]:,})"
        except (ImportError, OSError, ValueError):  # not on Linux / macOS
            limit = ""
        return InputFileError(
            f"{path}: cannot be opened: too many open files{limit}. The file itself is fine: raise the limit "
            "(e.g. ulimit -n 65536 in the shell that runs the job) or open fewer files at once"
        )
    if code in (errno.EACCES, errno.EPERM):
        return InputFileError(f"{path}: cannot be opened: permission denied; make the {kind} readable")
    return InputFileError(f"{path}: cannot be opened as HDF5 ({err}); the file is damaged or is no {kind}. {fix}")


#: ``gene_id_column`` value that selects the var index explicitly
VAR_INDEX = "index"

_REEXPORT = "the file is damaged (e.g. an interrupted copy or write): re-export / re-copy the file"


def structure_error(path: str, err: Exception) -> InputFileError:
    """The error for a file whose metadata or arrays cannot be read while opening it."""
    return InputFileError(f"{path}: cannot read the file's structure ({type(err).__name__}: {err}); {_REEXPORT}")


@contextlib.contextmanager
def reading_structure(path: str, close: Callable[[], None] | None = None) -> Iterator[None]:
    """Around a reader's set-up: ``close`` runs on any failure, and an error other than
    :class:`InputFileError` (damaged metadata or arrays raise many types) becomes one naming the file."""
    try:
        yield
    except BaseException as err:
        if close is not None:
            close()
        if isinstance(err, Exception) and not isinstance(err, InputFileError):
            raise structure_error(path, err) from err
        raise


def check_block(path: str, blk: CSRBlock) -> None:
    """Refuse a block whose ``indptr`` decreases or points past its entries, naming the first bad row."""
    ip = blk.indptr
    steps = np.diff(ip)
    if steps.size and steps.min() < 0:
        i = int(np.flatnonzero(steps < 0)[0])
        msg = (f"{path}: the matrix's indptr decreases at row {blk.start + i} ({int(ip[i])} -> {int(ip[i + 1])} "
               f"relative to row {blk.start}); {_REEXPORT}")
        raise InputFileError(msg)
    if ip.size and (ip[0] != 0 or int(ip[-1]) != blk.indices.shape[0] or blk.data.shape[0] != blk.indices.shape[0]):
        msg = (f"{path}: rows {blk.start}..{blk.start + blk.n_rows - 1}: indptr points to {int(ip[-1] - ip[0])} "
               f"entries but {blk.indices.shape[0]} indices / {blk.data.shape[0]} counts are stored; {_REEXPORT}")
        raise InputFileError(msg)


def _checked_blocks(path: str, blocks: Iterator[CSRBlock], start: int) -> Iterator[CSRBlock]:
    """The source's blocks, structurally checked; storage and decoding failures (h5py, zarr, codecs)
    become one :class:`InputFileError` naming the file and the rows being read."""
    row = start
    while True:
        try:
            blk = next(blocks)
        except StopIteration:
            return
        except InputFileError:
            raise
        except Exception as err:  # noqa: BLE001 - h5py / zarr / numcodecs raise many types for damage
            msg = f"{path}: cannot read the cells from row {row} on ({type(err).__name__}: {err}); {_REEXPORT}"
            raise InputFileError(msg) from err
        check_block(path, blk)
        row = blk.start + blk.n_rows
        yield blk


class ChunkedReader:
    """Base class of the concrete readers; implements the :class:`~.base.Reader` protocol.

    Subclasses set ``path``, ``n_obs``, ``n_vars``, ``_source`` (a row source), ``_obs`` and ``_var``
    (:class:`~._anndata_elems.Frame` s) and ``_var_names`` in their constructor, and release their
    handles in :meth:`_close`.
    """

    path: str
    n_obs: int
    n_vars: int
    stats: ReadStats
    _source: RowSource
    _obs: Frame
    _var: Frame
    _var_names: np.ndarray | None = None
    _gene_id_column: str | None = None
    _var_index_str: np.ndarray | None = None
    #: whether reads of the counts decode compressed storage chunks (Zarr, gzip / lzf h5ad): a read that
    #: ends inside one decodes it whole, so callers that can read larger blocks at once should (see
    #: ``tokenizer._pieces``); uncompressed h5ad is memory-mapped, with nothing to decode
    decodes_chunks: bool = False

    @property
    def var_names(self) -> np.ndarray:
        """Gene identifiers (``str``) of the gene axis, from ``gene_id_column`` or the var index."""
        if self._var_names is None:  # read on first use (see _use_gene_ids)
            if getattr(self, "_closed", False):
                msg = f"{self.path}: this reader was closed; open the file again with open_reader()"
                raise ValueError(msg)
            self._var_names = self._gene_ids(self._gene_id_column)
        return self._var_names

    def _use_gene_ids(self, gene_id_column: str | None) -> None:
        """Take the gene ids from ``gene_id_column`` (checked now) and read them on first use: a tokenize
        worker opens every file again only to read cells, and reading a 60,000-gene index costs tens of ms."""
        self._gene_id_column = gene_id_column
        self._var_names = None
        if not self._ids_from_index(gene_id_column):
            self._var.check_columns(
                [gene_id_column], hint=" Pass gene_id_column= one of them, or None to use the var index."
            )

    def _ids_from_index(self, gene_id_column: str | None) -> bool:
        # "index" names the var index explicitly (unless var has a column of that name)
        return gene_id_column is None or (gene_id_column == VAR_INDEX and VAR_INDEX not in self._var.columns)

    @property
    def obs_columns(self) -> list[str]:
        """Names of the per-cell metadata columns available in the source."""
        return self._obs.columns

    @property
    def obs_names_available(self) -> bool:
        """Whether the source stores cell names (otherwise chunks are indexed by row number)."""
        return self._obs.has_index

    @property
    def var_columns(self) -> list[str]:
        """Names of the per-gene metadata columns available in the source."""
        return self._var.columns

    def read_var_column(self, name: str) -> Any:
        """Whole per-gene column ``name`` as pandas holds it (the gene axis is small: read at once)."""
        return self._var.read_column(name)

    def read_var_values(self, name: str) -> np.ndarray:
        """Whole per-gene column ``name`` as a numpy array, categories as their labels, missing as None
        (no pandas import)."""
        return np.asarray(self._var.read_raw(name))

    def read_var_index(self) -> np.ndarray:
        """The var index (gene axis row names) as ``str``."""
        return self._var_index().copy()

    def _var_index(self) -> np.ndarray:
        # read once per reader: a run asks for it twice (gene ids, then the id-source check), and reading
        # a 60,000-gene index of variable-length strings costs tens of ms
        if self._var_index_str is None:
            self._var_index_str = np.asarray(self._var.read_index(0, self._var.length), dtype=object).astype(str)
        return self._var_index_str

    def _gene_ids(self, gene_id_column: str | None) -> np.ndarray:
        if self._ids_from_index(gene_id_column):
            return self._var_index().copy()
        values = self._var.read_raw(gene_id_column)
        return np.asarray([str(v) for v in np.asarray(values, dtype=object)], dtype=str)

    def _check_shapes(self) -> None:
        if self._obs.length != self.n_obs or self._var.length != self.n_vars:
            msg = (
                f"{self.path}: the matrix is {self.n_obs} x {self.n_vars} but {self._obs.what} has "
                f"{self._obs.length} rows and {self._var.what} has {self._var.length}; the file is "
                "inconsistent. Rewrite it with anndata."
            )
            raise InputFileError(msg)

    def iter_chunks(
        self, *, start: int = 0, chunk_size: int = 10_000, obs_columns: Sequence[str] = ()
    ) -> Iterator[CellChunk]:
        """Yield consecutive chunks of cells from row ``start`` to the end.

        Parameters
        ----------
        start
            First cell (row) to read, ``0 <= start <= n_obs``.
        chunk_size
            Cells per chunk; the last chunk may be shorter.
        obs_columns
            Per-cell metadata columns to return in ``chunk.obs``.

        Yields
        ------
        CellChunk
            CSR rows with ``int64`` indptr, ``int32`` indices and ``float32``/``float64`` counts as
            stored (explicit zeros may be kept).  Column indices are sorted within each row for dense
            and CSC sources, but are not guaranteed sorted for CSR sources (they are as stored).
        """
        if getattr(self, "_closed", False):
            msg = f"{self.path}: this reader was closed; open the file again with open_reader()"
            raise ValueError(msg)
        if int(chunk_size) < 1:
            msg = f"chunk_size must be >= 1, got {chunk_size}"
            raise ValueError(msg)
        if not 0 <= int(start) <= self.n_obs:
            msg = f"start must be in [0, {self.n_obs}] for {self.path}, got {start}"
            raise ValueError(msg)
        if isinstance(obs_columns, str):
            obs_columns = [obs_columns]
        columns = list(obs_columns)
        self._obs.check_columns(
            columns, hint=" Request only available columns, or add the column to the file first."
        )
        return self._chunks(int(start), int(chunk_size), columns)

    def _chunks(self, start: int, chunk_size: int, columns: list[str]) -> Iterator[CellChunk]:
        def with_obs() -> Iterator[CSRBlock]:
            for blk in _checked_blocks(self.path, self._source.iter_blocks(start, chunk_size), start):
                blk.obs = self._obs.read_block(blk.start, blk.start + blk.n_rows, columns)
                yield blk

        for blk in rechunk(with_obs(), chunk_size):
            yield CellChunk(
                start=blk.start, indptr=blk.indptr, indices=blk.indices, data=blk.data, obs=blk.obs
            )

    def _close(self) -> None:
        """Release file handles (subclasses)."""

    def close(self) -> None:
        """Release file handles; the reader cannot be used afterwards (closing twice is fine)."""
        self._closed = True
        self._close()

    def __enter__(self) -> ChunkedReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, n_obs={self.n_obs}, n_vars={self.n_vars})"
