r"""Counts on disk: a backed ``.h5ad`` or a zarr store, read in contiguous chunks of cells.

An atlas does not fit in memory: ``anndata.read_h5ad(path, backed="r")`` (or
:func:`read_backed` for ``.h5ad`` and ``.zarr``) keeps the CSR arrays of ``X`` on disk, and
cellvi reads them a chunk of consecutive cells at a time, which is what a disk does fast:

* :func:`stream_stats` makes one pass over the matrix for everything set-up needs (the count
  checks, each cell's total for the library prior, a fingerprint), cached for the matrix;
* :class:`DiskCSR` reads rows ``[a, b)`` as one contiguous read of ``data`` and ``indices``,
  and any rows as one read per run of consecutive rows;
* :class:`ChunkedLoader` trains out of core: each epoch it shuffles the chunks of the training
  cells, reads ``buffer_chunks`` of them at a time into memory (one read each, in a background
  thread while the previous buffer trains), shuffles the cells within that buffer, and yields
  minibatches from it (the design of scverse's ``annbatch``, which needs Python 3.12 and its
  own sharded zarr collections, so cellvi does the same on the files users have). Memory stays
  O(buffer + model), whatever the number of cells.

Queries read cells in order, one contiguous range per minibatch, and can write their results
chunk by chunk to an ``.h5ad`` (:func:`write_rows_h5ad`).
"""

from __future__ import annotations

import os
import threading
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from ._sparse import check_compressed, check_index_range

__all__ = ["ChunkedLoader", "DiskCSR", "is_backed", "read_backed", "stream_stats",
           "write_rows_h5ad"]

#: Cells per contiguous read when streaming.
CHUNK_CELLS = 4096


def is_backed(X) -> bool:
    """Whether ``X`` is a matrix on disk (anndata's backed sparse dataset, h5py or zarr)."""
    if X is None or sp.issparse(X) or isinstance(X, np.ndarray):
        return False
    return hasattr(X, "group") or type(X).__module__.split(".")[0] in ("h5py", "zarr")


class DiskCSR:
    """Rows of an on-disk CSR matrix (``data``, ``indices``, ``indptr`` arrays), read by ranges.

    ``indptr`` (one int64 per cell) is read into memory once; ``data`` and ``indices`` stay on
    disk. A dense backed array (``h5py.Dataset``) is read by row ranges too.
    """

    def __init__(self, X):
        self.source = X
        group = getattr(X, "group", None)
        if group is not None:
            fmt = getattr(X, "format", "csr")
            if fmt != "csr":
                raise ValueError(
                    f"The counts on disk are stored as {fmt!r}; out-of-core reading needs CSR "
                    "(cells as rows). Write the file with a CSR matrix "
                    "(`adata.X = scipy.sparse.csr_matrix(adata.X)`)."
                )
            self.data, self.indices = group["data"], group["indices"]
            self.indptr = np.asarray(group["indptr"][:], dtype=np.int64)
            self.dense = None
            # indices are checked chunk by chunk in stream_stats: here only what is in memory
            check_compressed(int(self.data.shape[0]), self.indices, self.indptr,
                             tuple(int(n) for n in X.shape), where=_where(X),
                             indices_in_range=False)
        else:
            self.dense = X
            self.data = self.indices = self.indptr = None
        self.shape = tuple(int(s) for s in X.shape)
        self.dtype = np.dtype(getattr(X, "dtype", np.float32))

    @property
    def nnz(self) -> int:
        """Stored values (cells x genes for a dense array)."""
        return int(self.indptr[-1]) if self.indptr is not None else int(np.prod(self.shape))

    def rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows ``[start, stop)`` as an in-memory float32 CSR matrix (one contiguous read)."""
        n_genes = self.shape[1]
        if self.dense is not None:
            block = np.asarray(self.dense[start:stop], dtype=np.float32)
            return sp.csr_matrix(block)
        a, b = int(self.indptr[start]), int(self.indptr[stop])
        data = np.asarray(self.data[a:b], dtype=np.float32)
        indices = np.asarray(self.indices[a:b])
        indptr = self.indptr[start:stop + 1] - a
        return sp.csr_matrix((data, indices, indptr), shape=(stop - start, n_genes))

    def take(self, idx: np.ndarray) -> sp.csr_matrix:
        """Rows ``idx`` (any order) as float32 CSR: one read per run of consecutive rows."""
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size == 0:
            return sp.csr_matrix((0, self.shape[1]), dtype=np.float32)
        order = np.argsort(idx, kind="stable")
        sorted_idx = idx[order]
        breaks = np.flatnonzero(np.diff(sorted_idx) != 1) + 1
        parts = [self.rows(int(run[0]), int(run[-1]) + 1)
                 for run in np.split(sorted_idx, breaks)]
        block = sp.vstack(parts, format="csr") if len(parts) > 1 else parts[0]
        inverse = np.empty_like(order)
        inverse[order] = np.arange(order.size)
        return block[inverse] if not np.array_equal(order, np.arange(order.size)) else block

    def chunks(self, chunk: int = CHUNK_CELLS) -> Iterator[tuple[int, sp.csr_matrix]]:
        """Yield ``(first_row, rows)`` for consecutive chunks of ``chunk`` cells."""
        for start in range(0, self.shape[0], chunk):
            yield start, self.rows(start, min(self.shape[0], start + chunk))


@dataclass
class StreamStats:
    """What one pass over a matrix gives set-up (see :func:`stream_stats`)."""

    shape: tuple[int, int]
    nnz: int
    finite: bool
    minimum: float
    maximum: float
    integer: bool
    totals: np.ndarray
    crc: int


_stats_cache: dict = {}
_stats_lock = threading.Lock()


def _where(X) -> str:
    """Name a matrix on disk for messages: ``file:dataset`` when known."""
    group = getattr(X, "group", None)
    target = group if group is not None else X
    try:
        return f"{target.file.filename}:{target.name}"
    except (AttributeError, TypeError, ValueError):
        return "the counts on disk"


def _cache_key(X):
    """Where the matrix lives: (file, dataset, modification time, shape); None if unknown.

    A backed AnnData makes a new dataset object at each ``adata.X``, so the object itself is no
    key; a file changed on disk gets a new modification time, hence a new pass.
    """
    group = getattr(X, "group", None)
    target = group if group is not None else X
    try:
        filename = target.file.filename
        name = target.name
        return (os.path.realpath(filename), name, os.stat(filename).st_mtime_ns,
                tuple(X.shape))
    except (AttributeError, OSError, TypeError):
        store = getattr(target, "store", None)
        path = getattr(store, "path", None) or getattr(store, "root", None)
        return (str(path), getattr(target, "path", None), tuple(X.shape)) if path else None


def stream_stats(X, chunk: int = CHUNK_CELLS) -> StreamStats:
    """Read a matrix on disk once, chunk by chunk: checks, per-cell totals and a fingerprint.

    The result is cached for the matrix object, so the count checks, the library-size prior
    and the data fingerprint of a set-up share one pass. Memory: one chunk plus one float64 per
    cell.
    """
    key = _cache_key(X)
    if key is not None:
        with _stats_lock:
            cached = _stats_cache.get(key)
        if cached is not None:
            return cached
    disk = DiskCSR(X)
    totals = np.zeros(disk.shape[0])
    finite, integer = True, True
    lo, hi = np.inf, -np.inf
    crc = 0
    for start, rows in disk.chunks(chunk):
        v = rows.data
        check_index_range(rows.indices, disk.shape[1], where=_where(X))
        if v.size:
            finite &= bool(np.isfinite(v).all())
            lo, hi = min(lo, float(v.min())), max(hi, float(v.max()))
            if integer and finite:
                integer = bool(np.all(v == np.rint(v)))
            crc = zlib.crc32(np.ascontiguousarray(v[:: max(1, v.size // 4096)]).view(np.uint8),
                             crc)
        totals[start:start + rows.shape[0]] = np.asarray(rows.sum(axis=1)).ravel()
    stats = StreamStats(disk.shape, disk.nnz, finite, lo if lo < np.inf else 0.0,
                        hi if hi > -np.inf else 0.0, integer, totals, crc)
    if key is not None:
        with _stats_lock:
            _stats_cache[key] = stats
    return stats


def read_backed(path: str | os.PathLike):
    """Open an ``.h5ad`` or a ``.zarr`` AnnData with its counts ``X`` left on disk.

    ``.h5ad``: ``anndata.read_h5ad(path, backed="r")``. ``.zarr``: ``obs`` and ``var`` read,
    ``X`` opened as an on-disk sparse dataset (needs the ``zarr`` package and anndata >= 0.11).
    """
    import anndata

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist.")
    if path.suffix == ".h5ad":
        return anndata.read_h5ad(path, backed="r")
    if path.suffix == ".zarr" or (path / ".zgroup").exists() or (path / "zarr.json").exists():
        try:
            import zarr
            from anndata.io import read_elem
            try:
                from anndata.io import sparse_dataset
            except ImportError:  # anndata < 0.11.2
                from anndata.experimental import sparse_dataset
        except ImportError as err:
            raise ImportError(
                f"Reading {path} out of core needs the zarr package and anndata >= 0.11 "
                f"({err}); install cellvi[atlas]."
            ) from None
        group = zarr.open(str(path), mode="r")
        return anndata.AnnData(X=sparse_dataset(group["X"]), obs=read_elem(group["obs"]),
                               var=read_elem(group["var"]))
    raise ValueError(f"{path}: out-of-core reading takes an .h5ad file or a .zarr store.")


class ChunkedLoader:
    """Out-of-core minibatches: shuffled chunks of cells, read a buffer at a time.

    Parameters
    ----------
    source
        An on-disk source (:class:`cellvi.data._loader.BackedCellData`).
    indices
        The cells to iterate (e.g. the training split).
    batch_size
        Cells per minibatch.
    shuffle
        Shuffle the chunks each pass, and the cells within each buffer.
    rng
        The generator of the shuffles (the same seed gives the same epochs).
    chunk_cells, buffer_chunks
        Cells per contiguous read, and chunks per buffer (memory: about ``chunk_cells *
        buffer_chunks`` cells of CSR).
    drop_last_below
        Drop a final minibatch smaller than this (batch norm needs two cells).
    shard
        ``(rank, world)``: this process's share of every pass's chunks (data-parallel
        training).
    equal_shards
        With ``shard``, every process makes the same number of minibatches (the fewest any
        makes), as training in step needs; validation passes set it False.
    **batch_options
        ``device``, ``sparse``, ``nonzero``, ``transpose`` as for :func:`cellvi.data.iterate`.
    """

    def __init__(self, source, indices: np.ndarray, *, batch_size: int, shuffle: bool = True,
                 rng: np.random.Generator | None = None, chunk_cells: int = CHUNK_CELLS,
                 buffer_chunks: int = 8, drop_last_below: int = 0, shard=(0, 1),
                 equal_shards: bool = True, **batch_options):
        self.source = source
        self.indices = np.sort(np.asarray(indices, dtype=np.int64))
        self.batch_size, self.shuffle = batch_size, shuffle
        self.rng = rng if rng is not None else np.random.default_rng()
        self.chunk_cells, self.buffer_chunks = chunk_cells, buffer_chunks
        self.drop_last_below = drop_last_below
        self.rank, self.world = shard
        self.equal_shards = equal_shards
        self.batch_options = batch_options
        cuts = np.searchsorted(self.indices,
                               np.arange(0, source.n_obs + chunk_cells, chunk_cells))
        self.chunks = [self.indices[a:b] for a, b in zip(cuts[:-1], cuts[1:]) if b > a]

    def _plan(self) -> tuple[list[list[np.ndarray]], int | None]:
        """Return this pass's buffers (groups of chunks) and the steps every process makes."""
        order = (self.rng.permutation(len(self.chunks)) if self.shuffle
                 else np.arange(len(self.chunks)))
        limit = None
        if self.world > 1:  # same order on every process (same seed): split it round-robin
            sizes = np.array([len(self.chunks[i]) for i in order])
            per_rank = [int(sizes[r::self.world].sum()) for r in range(self.world)]
            if self.equal_shards:  # every process makes as many steps
                limit = min(per_rank) // self.batch_size
            order = order[self.rank::self.world]
        chunks = [self.chunks[i] for i in order]
        groups = [chunks[i:i + self.buffer_chunks]
                  for i in range(0, len(chunks), self.buffer_chunks)]
        return groups, limit

    def __len__(self) -> int:
        n = len(self.indices) // self.world
        return max(1, -(-n // self.batch_size))

    def _read(self, group: list[np.ndarray]):
        cells = np.concatenate(group)
        return cells, self.source.buffer(cells)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        from ._loader import iterate

        plan, limit = self._plan()
        made = 0
        leftover = None
        with ThreadPoolExecutor(max_workers=1) as pool:
            future = pool.submit(self._read, plan[0]) if plan else None
            for i in range(len(plan)):
                cells, buffer = future.result()
                if i + 1 < len(plan):
                    future = pool.submit(self._read, plan[i + 1])
                local = np.arange(len(cells))
                if self.shuffle:
                    local = self.rng.permutation(local)
                if leftover is not None:  # cells left over from the previous buffer go first
                    buffer = buffer.concat(leftover[0])
                    local = np.r_[np.arange(len(cells), len(cells) + leftover[1]), local]
                n_full = len(local) // self.batch_size * self.batch_size
                last = i == len(plan) - 1
                keep = len(local) if last else n_full
                for batch in iterate(buffer, local[:keep], batch_size=self.batch_size,
                                     drop_last_below=self.drop_last_below if last else 0,
                                     **self.batch_options):
                    if limit is not None and made >= limit:
                        return
                    made += 1
                    yield batch
                rest = local[n_full:] if not last else local[:0]
                leftover = (buffer.subset(rest), len(rest)) if len(rest) else None


def write_rows_h5ad(path: str | os.PathLike, n_rows: int, n_cols: int, rows_iter,
                    obs_names, var_names, *, dtype=np.float32) -> Path:
    """Write a dense ``n_rows x n_cols`` ``X`` to an ``.h5ad``, block by block as they come.

    ``rows_iter`` yields ``(start, block)`` with ``block`` a ``(rows, n_cols)`` array. The file
    is written under a temporary name and renamed when complete; ``anndata.read_h5ad`` reads it
    (``obs`` and ``var`` hold the names).
    """
    import anndata
    import h5py

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    # the obs names are written below, a slice at a time: converting all of them at once for
    # h5py took about 20 bytes per cell more at the peak (200 MB on 10 million cells)
    skeleton = anndata.AnnData(obs=pd.DataFrame(index=pd.Index(["0"], dtype=str)),
                               var=pd.DataFrame(index=pd.Index(var_names, dtype=str)))
    try:
        skeleton.write_h5ad(tmp)
        with h5py.File(tmp, "r+") as f:
            if "X" in f:
                del f["X"]
            attrs = dict(f["obs/_index"].attrs)
            del f["obs/_index"]
            names = f["obs"].create_dataset("_index", shape=(n_rows,),
                                            dtype=h5py.string_dtype("utf-8"))
            for k, v in attrs.items():
                names.attrs[k] = v
            step = 1 << 18
            for a in range(0, n_rows, step):
                names[a:a + step] = np.asarray(obs_names[a:a + step], dtype=object).astype(str)
            chunk_rows = max(1, min(n_rows, (1 << 20) // max(n_cols, 1)))
            X = f.create_dataset("X", shape=(n_rows, n_cols), dtype=dtype,
                                 chunks=(chunk_rows, n_cols) if n_rows else None)
            X.attrs["encoding-type"] = "array"
            X.attrs["encoding-version"] = "0.2.0"
            written = 0
            for start, block in rows_iter:
                block = np.asarray(block, dtype=dtype)
                X[start:start + block.shape[0]] = block
                written += block.shape[0]
            if written != n_rows:
                raise RuntimeError(f"wrote {written} of {n_rows} rows")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
