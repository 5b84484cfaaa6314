"""Sources of minibatches: the columns of the data, gathered a minibatch at a time.

A **source** is what the training loop and the queries read rows from. Its protocol is small:

* ``n_obs``: the number of cells;
* ``batch(idx, *, nonzero, sparse, transpose) -> dict[str, Tensor]``: the minibatch of rows
  ``idx``, keyed by :mod:`cellvi.keys` (and by each field's key);
* ``resident``: True when the rows are gathered on ``device`` itself (then ``batch`` also takes
  ``idx_on_device``, and :func:`iterate` sends an epoch's cell order to the device once);
* ``to(device)``: a copy whose rows are gathered on ``device``.

:class:`CellData` is the in-memory source of one AnnData, built from the fields of its
:class:`~cellvi.data.DataSummary`; :class:`DeviceCellData` is its copy on a device. Each field
gives a :class:`Column` (the counts as CSR or dense, per-cell codes and values), and a column
slices itself: :class:`CountsColumn` gives the counts dense or as sparse CSR tensors with their
transpose and non-zero positions, :class:`ArrayColumn` any per-cell array. An on-disk source
needs only the same ``batch`` method.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.sparse as sp
import torch
from anndata import AnnData

from cellvi import _native, keys

from ._setup import DataSummary

Tensors = dict[str, torch.Tensor]


def sparse_keys(key: str) -> tuple[str, str]:
    """Keys of a count matrix's transpose and non-zero positions in a minibatch."""
    if key == keys.X:
        return keys.X_T, keys.INDICES_NONZERO
    return f"{key}_T", f"{key}_nonzero"


# ---------------------------------------------------------------------------------- columns
class ArrayColumn:
    """A per-cell array ``(cells, ...)`` (codes, covariates, a dense matrix), sliced by rows."""

    def __init__(self, key: str, values: np.ndarray):
        self.key = key
        self.values = torch.from_numpy(np.ascontiguousarray(values))

    @classmethod
    def constant(cls, key: str, n: int, value: int) -> ArrayColumn:
        """Return a ``(n, 1)`` int64 column of ``value`` for every cell, in 8 bytes (broadcast)."""
        out = cls.__new__(cls)
        out.key = key
        out.values = torch.full((1, 1), int(value), dtype=torch.int64).expand(int(n), 1)
        return out

    def gather(self, idx: torch.Tensor, **_) -> Tensors:
        """``{key: values[idx]}``."""
        return {self.key: self.values[idx]}

    def to(self, device: torch.device) -> ArrayColumn:
        """Return the same column on ``device``."""
        out = ArrayColumn.__new__(ArrayColumn)
        out.key, out.values = self.key, self.values.to(device)
        return out

    @property
    def nbytes(self) -> int:
        """Memory of the values."""
        return self.values.numel() * self.values.element_size()

    def subset(self, cells: np.ndarray) -> ArrayColumn:
        """Return the rows ``cells`` as a new column."""
        return ArrayColumn(self.key, self.values.numpy()[cells])

    def concat(self, other: ArrayColumn) -> ArrayColumn:
        """Return this column's rows followed by ``other``'s."""
        return ArrayColumn(self.key, np.concatenate([self.values.numpy(), other.values.numpy()]))


class CountsColumn:
    """A count matrix, kept as float32 CSR (sorted indices) or dense, never densified whole.

    :meth:`gather` returns, for rows ``idx``, either a dense ``(cells, genes)`` tensor or, with
    ``sparse=True``, a sparse CSR tensor with its ``(genes, cells)`` transpose (for gradients);
    with ``nonzero=True`` also the ``(2, nnz)`` (row, column) positions of the non-zero counts.
    """

    def __init__(self, key: str, X):
        self.key = key
        self.t_key, self.nonzero_key = sparse_keys(key)
        if sp.issparse(X):
            csr = sp.csr_matrix(X, dtype=np.float32)
            if not csr.has_sorted_indices:  # sort a copy: never the user's matrix in place
                csr = csr.copy()
                csr.sort_indices()
            X = csr
        else:
            X = np.ascontiguousarray(np.asarray(X), dtype=np.float32)
        self.X = X
        self.n_obs, self.n_vars = X.shape

    def dense_rows(self, idx: np.ndarray) -> np.ndarray:
        """Dense float32 ``(len(idx), genes)`` rows of the count matrix."""
        if isinstance(self.X, np.ndarray):
            return self.X[idx]
        return self.X[idx].toarray()

    def _gather(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """CSR pieces of rows ``idx``: row pointers, column indices and values (no zeros)."""
        X = self.X
        if isinstance(X, np.ndarray):
            rows, cols = np.nonzero(X[idx])
            vals = X[idx[rows], cols]
        elif len(idx) > 1 and idx[-1] - idx[0] == len(idx) - 1 and np.all(np.diff(idx) == 1):
            # a run of consecutive rows (queries in order): views of the CSR arrays
            a, b = X.indptr[idx[0]], X.indptr[idx[-1] + 1]
            cols, vals = X.indices[a:b], X.data[a:b]
            if (vals != 0).all():
                crow = (X.indptr[idx[0] : idx[-1] + 2] - a).astype(np.int64)
                return crow, cols.astype(np.int64), np.ascontiguousarray(vals, np.float32)
            rows = np.repeat(np.arange(len(idx)), np.diff(X.indptr[idx[0] : idx[-1] + 2]))
            keep = vals != 0
            rows, cols, vals = rows[keep], cols[keep], vals[keep]
        else:
            starts, ends = X.indptr[idx], X.indptr[idx + 1]
            lens = ends - starts
            offsets = np.repeat(starts - (np.cumsum(lens) - lens), lens)
            pos = np.arange(int(lens.sum())) + offsets  # positions in X.data of the entries
            rows = np.repeat(np.arange(len(idx)), lens)
            cols, vals = X.indices[pos], X.data[pos]
            keep = vals != 0  # explicit zeros stored in the matrix are not non-zeros
            if not keep.all():
                rows, cols, vals = rows[keep], cols[keep], vals[keep]
        crow = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=len(idx)), out=crow[1:])
        return crow, cols.astype(np.int64), np.ascontiguousarray(vals, dtype=np.float32)

    def counts(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Gather rows ``idx`` of the count matrix.

        Returns the dense float32 ``(len(idx), genes)`` rows and the ``(2, nnz)`` (row, column)
        positions of their non-zero entries.
        """
        crow, cols, vals = self._gather(idx)
        rows = np.repeat(np.arange(len(idx)), np.diff(crow))
        out = np.zeros((len(idx), self.n_vars), dtype=np.float32)
        out[rows, cols] = vals
        return out, np.stack([rows, cols])

    def sparse_counts(
        self, idx: np.ndarray, *, nonzero: bool = True, transpose: bool = True
    ) -> Tensors:
        """Rows ``idx`` as sparse CSR tensors, never dense.

        Returns ``{key: (cells, genes) CSR}``, with its ``(genes, cells)`` transpose (for
        gradients; ``keys.X_T`` for the counts) when ``transpose``, and the ``(2, nnz)`` (row,
        column) of its entries in its order (``keys.INDICES_NONZERO``) when ``nonzero``.
        """
        n = len(idx)
        t = torch.from_numpy
        fast = (_native.gather_rows(self.X, idx, rows=nonzero, transpose=transpose)
                if sp.issparse(self.X) and _native.enabled() else None)
        if fast is not None:  # one C pass for the rows, their transpose and the positions
            out = {self.key: torch.sparse_csr_tensor(
                t(fast["crow"]), t(fast["cols"]), t(fast["vals"]), (n, self.n_vars),
                check_invariants=False)}
            if transpose:
                out[self.t_key] = torch.sparse_csr_tensor(
                    t(fast["tcrow"]), t(fast["tcols"]), t(fast["tvals"]), (self.n_vars, n),
                    check_invariants=False)
            if nonzero:
                out[self.nonzero_key] = torch.stack([t(fast["rows"]), t(fast["cols"])])
            return out
        crow, cols, vals = self._gather(idx)
        out = {self.key: torch.sparse_csr_tensor(t(crow), t(cols), t(vals), (n, self.n_vars),
                                                 check_invariants=False)}
        if transpose:
            # CSC of the rows = CSR of the transpose (a counting sort, in scipy)
            csc = sp.csr_matrix((vals, cols, crow), shape=(n, self.n_vars)).tocsc()
            out[self.t_key] = torch.sparse_csr_tensor(
                t(csc.indptr.astype(np.int64)), t(csc.indices.astype(np.int64)), t(csc.data),
                (self.n_vars, n), check_invariants=False,
            )
        if nonzero:
            rows = np.repeat(np.arange(n), np.diff(crow))
            out[self.nonzero_key] = t(np.stack([rows, cols]))
        return out

    def gather(
        self, idx: torch.Tensor, *, idx_np: np.ndarray, nonzero: bool = True,
        sparse: bool = False, transpose: bool = True,
    ) -> Tensors:
        """Rows ``idx_np`` (``idx`` is the same as a tensor): dense, or sparse CSR tensors."""
        if sparse:
            return self.sparse_counts(idx_np, nonzero=nonzero, transpose=transpose)
        if nonzero:
            x, positions = self.counts(idx_np)
            return {self.nonzero_key: torch.from_numpy(positions), self.key: torch.from_numpy(x)}
        return {self.key: torch.from_numpy(self.dense_rows(idx_np))}

    def to(self, device: torch.device) -> DeviceCountsColumn:
        """Return the same counts as CSR on ``device``."""
        return DeviceCountsColumn(self, device)

    @property
    def nbytes(self) -> int:
        """Memory of the counts once on a device (12 bytes per non-zero count)."""
        X = self.X
        nnz = X.nnz if sp.issparse(X) else int(np.count_nonzero(X))
        return 12 * nnz + 8 * (self.n_obs + 1)

    def library_sizes(self) -> np.ndarray:
        """Total counts per cell."""
        return np.asarray(self.X.sum(axis=1)).reshape(-1)

    def subset(self, cells: np.ndarray) -> CountsColumn:
        """Return the rows ``cells`` as a new column."""
        return CountsColumn(self.key, self.X[cells])

    def concat(self, other: CountsColumn) -> CountsColumn:
        """Return this column's rows followed by ``other``'s."""
        if sp.issparse(self.X):
            return CountsColumn(self.key, sp.vstack([self.X, sp.csr_matrix(other.X)],
                                                    format="csr"))
        return CountsColumn(self.key, np.vstack([self.X, np.asarray(other.X)]))


class DiskCountsColumn:
    """A count matrix left on disk (a backed ``.h5ad`` or zarr store), read by row ranges.

    :meth:`gather` reads the minibatch's rows (one read per run of consecutive rows: one read
    for the in-order minibatches of the queries) and gives what :class:`CountsColumn` gives.
    Training reads it through :class:`cellvi.data._backed.ChunkedLoader` instead, a buffer of
    contiguous chunks at a time.
    """

    on_disk = True

    def __init__(self, key: str, X):
        from ._backed import DiskCSR

        self.key = key
        self.disk = DiskCSR(X)
        self.source = X
        self.n_obs, self.n_vars = self.disk.shape

    def gather(self, idx: torch.Tensor, *, idx_np: np.ndarray, **options) -> Tensors:
        """Rows ``idx_np`` as :meth:`CountsColumn.gather` gives them."""
        rows = CountsColumn(self.key, self.disk.take(idx_np))
        local = np.arange(len(idx_np), dtype=np.int64)
        return rows.gather(torch.from_numpy(local), idx_np=local, **options)

    def subset(self, cells: np.ndarray) -> CountsColumn:
        """Return the rows ``cells`` read into memory."""
        return CountsColumn(self.key, self.disk.take(cells))

    def to(self, device: torch.device):
        """Refuse: counts on disk are not copied to a device (they may not fit)."""
        raise ValueError("The counts are on disk: they cannot be copied to a device; use "
                         "data_placement='host' (minibatches are read and moved per step).")

    @property
    def nbytes(self) -> int:
        """Memory the counts would take in memory (12 bytes per non-zero count)."""
        return 12 * self.disk.nnz + 8 * (self.n_obs + 1)

    def library_sizes(self) -> np.ndarray:
        """Total counts per cell (one streaming pass, cached)."""
        from ._backed import stream_stats

        return stream_stats(self.source).totals


class DeviceCountsColumn:
    """A :class:`CountsColumn` copied to a device as CSR, rows gathered there.

    Row pointers, column indices and values: 12 bytes per non-zero count (explicit zeros
    dropped). :meth:`gather` gives exactly what :meth:`CountsColumn.gather` gives, on the
    device; the minibatch's number of non-zero counts is summed on the host (``row_nnz``), so
    the gather never waits for the device.
    """

    def __init__(self, host: CountsColumn, device: torch.device):
        self.key, self.t_key, self.nonzero_key = host.key, host.t_key, host.nonzero_key
        self.n_obs, self.n_vars = host.n_obs, host.n_vars
        X = host.X if sp.issparse(host.X) else sp.csr_matrix(host.X)
        if X.nnz and not X.data.all():  # explicit zeros are not non-zero counts
            X = X.copy()
            X.eliminate_zeros()
        self.crow = torch.from_numpy(X.indptr.astype(np.int64)).to(device)
        self.cols = torch.from_numpy(X.indices.astype(np.int64)).to(device)
        self.vals = torch.from_numpy(np.asarray(X.data, dtype=np.float32)).to(device)
        self.row_nnz = np.diff(X.indptr).astype(np.int64)  # (cells,) on the host

    def gather(
        self, idx: torch.Tensor, *, idx_np: np.ndarray, nonzero: bool = True,
        sparse: bool = False, transpose: bool = True,
    ) -> Tensors:
        """Rows ``idx`` (on the device; ``idx_np`` the same on the host)."""
        dev = idx.device
        nnz = int(self.row_nnz[idx_np].sum())
        n, n_genes = idx.numel(), self.n_vars
        out: Tensors = {}
        starts = self.crow[idx]
        lens = self.crow[idx + 1] - starts  # (n,) non-zero counts per cell
        crow = torch.zeros(n + 1, dtype=torch.int64, device=dev)
        torch.cumsum(lens, 0, out=crow[1:])
        rows = torch.repeat_interleave(torch.arange(n, device=dev), lens, output_size=nnz)
        pos = torch.arange(nnz, device=dev) + (starts - crow[:-1])[rows]  # (nnz,) in self.vals
        cols, vals = self.cols[pos], self.vals[pos]
        if sparse:
            out[self.key] = torch.sparse_csr_tensor(crow, cols, vals, (n, n_genes),
                                                    check_invariants=False)
            if transpose:  # (genes, cells) CSR: entries by gene, then by position in idx
                order = torch.argsort(cols * n + rows)
                per_gene = torch.zeros(n_genes, dtype=torch.int64, device=dev).index_add_(
                    0, cols, torch.ones_like(cols))  # (bincount would wait for the device)
                tcrow = torch.zeros(n_genes + 1, dtype=torch.int64, device=dev)
                torch.cumsum(per_gene, 0, out=tcrow[1:])
                out[self.t_key] = torch.sparse_csr_tensor(
                    tcrow, rows[order], vals[order], (n_genes, n), check_invariants=False)
        else:
            x = torch.zeros(n, n_genes, dtype=torch.float32, device=dev)
            x[rows, cols] = vals
            out[self.key] = x
        if nonzero:
            out[self.nonzero_key] = torch.stack([rows, cols])
        return out


# ---------------------------------------------------------------------------------- sources
class CellData:
    """The in-memory source of one AnnData, read through the fields of a :class:`DataSummary`.

    Counts stay in their stored form (CSR or dense); :meth:`batch` gathers rows, so the whole
    dataset is never densified. Every minibatch also holds ``keys.INDICES``, the rows' positions.

    Parameters
    ----------
    adata
        AnnData readable by ``summary``'s fields (the same genes, in the same order).
    summary
        How to read it (from ``setup_anndata`` or a saved model).
    check
        Check ``adata`` against every field first (skipped for the AnnData checked at setup).
    """

    resident = False
    device = torch.device("cpu")

    def __init__(self, adata: AnnData, summary: DataSummary, *, check: bool = True):
        if check:
            for f in summary.fields:
                f.check(adata)
        self.columns = {}
        for f in summary.fields:
            col = f.column(adata)
            if col is not None:
                self.columns[f.key] = col
        n = adata.n_obs
        self.columns[keys.INDICES] = ArrayColumn(
            keys.INDICES, np.arange(n, dtype=np.int64).reshape(n, 1))
        self.n_obs = n
        counts = self.columns.get(keys.X)
        self.n_vars = counts.n_vars if counts is not None else 0

    @property
    def X(self):
        """The count matrix (scipy CSR or dense numpy, float32)."""
        return self.columns[keys.X].X

    @property
    def obs(self) -> Tensors:
        """The per-cell arrays (codes, covariates, size factors, indices) as tensors."""
        return {k: c.values for k, c in self.columns.items() if isinstance(c, ArrayColumn)}

    def __len__(self) -> int:
        return self.n_obs

    def batch(
        self, idx: np.ndarray, *, nonzero: bool = True, sparse: bool = False,
        transpose: bool = True,
    ) -> Tensors:
        """Return the minibatch of rows ``idx``, a dict of tensors keyed by :mod:`cellvi.keys`.

        ``nonzero`` adds the positions of the non-zero counts; ``sparse`` gives the counts as
        sparse CSR tensors (:meth:`CountsColumn.sparse_counts`, with their transpose when
        ``transpose``) instead of a dense ``(cells, genes)`` tensor.
        """
        idx = np.asarray(idx, dtype=np.int64)
        t = torch.from_numpy(idx)
        out: Tensors = {}
        for col in self.columns.values():
            out.update(col.gather(t, idx_np=idx, nonzero=nonzero, sparse=sparse,
                                  transpose=transpose))
        return out

    def library_sizes(self) -> np.ndarray:
        """Total counts per cell."""
        return self.columns[keys.X].library_sizes()

    @property
    def out_of_core(self) -> bool:
        """Whether some column is read from disk (training then reads buffers of chunks)."""
        return any(getattr(c, "on_disk", False) for c in self.columns.values())

    @classmethod
    def from_columns(cls, columns: dict, n_obs: int) -> CellData:
        """Make an in-memory source of ready columns (a buffer of an on-disk source)."""
        data = cls.__new__(cls)
        data.columns, data.n_obs = dict(columns), int(n_obs)
        counts = data.columns.get(keys.X)
        data.n_vars = counts.n_vars if counts is not None else 0
        return data

    def buffer(self, cells: np.ndarray) -> CellData:
        """Return the rows ``cells`` (sorted positions) in memory, as a source of their own."""
        return CellData.from_columns({k: c.subset(cells) for k, c in self.columns.items()},
                                     len(cells))

    def subset(self, rows: np.ndarray) -> CellData:
        """Return the rows ``rows`` of an in-memory source, as a new source."""
        return self.buffer(rows)

    def concat(self, other: CellData) -> CellData:
        """Return this source's rows followed by ``other``'s (the same columns)."""
        return CellData.from_columns(
            {k: c.concat(other.columns[k]) for k, c in self.columns.items()},
            self.n_obs + other.n_obs)

    def nbytes(self) -> int:
        """Device memory that ``self.to(device)`` takes, in bytes."""
        return sum(c.nbytes for c in self.columns.values())

    def to(self, device: torch.device | str) -> DeviceCellData:
        """Return a copy whose minibatches are gathered on ``device``."""
        return DeviceCellData(self, device)


class DeviceCellData:
    """A :class:`CellData` copied once to ``device``, with minibatches gathered there.

    On a GPU this removes, from every step, the gathering of the minibatch on the host and its
    copy to the device: the training loop then only sends each minibatch's cell indices (see
    ``data_placement`` in :meth:`cellvi.model.SCVI.train`). :meth:`batch` gives exactly what
    :meth:`CellData.batch` gives for the same cells, on ``device``.

    Parameters
    ----------
    data
        The host source.
    device
        Where to keep it.
    """

    resident = True

    def __init__(self, data: CellData, device: torch.device | str):
        self.device = torch.device(device)
        self.n_obs, self.n_vars = data.n_obs, data.n_vars
        self.columns = {k: c.to(self.device) for k, c in data.columns.items()}

    @staticmethod
    def nbytes(data: CellData) -> int:
        """Device memory that ``DeviceCellData(data, device)`` takes, in bytes."""
        return data.nbytes()

    def __len__(self) -> int:
        return self.n_obs

    def batch(
        self, idx: np.ndarray, *, nonzero: bool = True, sparse: bool = False,
        transpose: bool = True, idx_on_device: torch.Tensor | None = None,
    ) -> Tensors:
        """Minibatch of rows ``idx`` on the device; arguments as for :meth:`CellData.batch`.

        ``idx_on_device``: the same indices already on the device (:func:`iterate` sends an
        epoch's order at once).
        """
        idx = np.asarray(idx, dtype=np.int64)
        if idx_on_device is None:
            idx_on_device = torch.from_numpy(idx).to(self.device, non_blocking=True)
        out: Tensors = {}
        for col in self.columns.values():
            out.update(col.gather(idx_on_device, idx_np=idx, nonzero=nonzero, sparse=sparse,
                                  transpose=transpose))
        return out

    def to(self, device: torch.device | str) -> DeviceCellData:
        """Itself when already on ``device``."""
        if torch.device(device) != self.device:
            raise ValueError(f"This source lives on {self.device}; build it again for {device}.")
        return self


def check_placement(placement: str) -> None:
    """Raise unless ``placement`` is a valid ``data_placement``."""
    if placement not in ("auto", "device", "host"):
        raise ValueError(
            f"data_placement must be 'auto', 'device' or 'host', got {placement!r}.")


def place_data(data, placement: str, device: torch.device | str):
    """Return the source training reads minibatches from: ``data``, or its copy on ``device``.

    ``placement`` is ``"host"`` (``data``: each minibatch gathered on the host, then moved),
    ``"device"`` (``data.to(device)``) or ``"auto"``: on a CUDA device, the device when the copy
    takes at most a quarter of its free memory, else the host; on the CPU, the host (the
    compiled gather there is faster than tensor operations).
    """
    check_placement(placement)
    device = torch.device(device)
    if getattr(data, "resident", False):
        return data
    if getattr(data, "out_of_core", False):
        if placement == "device":
            raise ValueError("The counts are on disk: data_placement='device' would load them "
                             "whole; use 'host' or 'auto'.")
        return data
    if placement == "host" or (placement == "auto" and device.type != "cuda"):
        return data
    if placement == "auto":
        free, _ = torch.cuda.mem_get_info(device)
        if data.nbytes() > free // 4:
            return data
    return data.to(device)


def sparse_batches(module: torch.nn.Module, device: torch.device | str) -> bool:
    """Whether to hand ``module`` its counts as sparse CSR tensors on ``device``.

    Modules opt in with ``sparse_input = True``; the sparse kernels used (``embedding_bag``,
    CSR x dense products, ``segment_reduce``) exist on the CPU and CUDA devices.
    """
    return bool(getattr(module, "sparse_input", False)) and torch.device(device).type in (
        "cpu", "cuda")


def check_genes(adata: AnnData, summary: DataSummary) -> None:
    """Raise if ``adata``'s genes differ from the summary's, naming the differences."""
    from .fields import check_genes as _check

    _check(adata, summary.var_names)


def iterate(
    data,
    indices: np.ndarray,
    *,
    batch_size: int,
    shuffle: bool = False,
    rng: np.random.Generator | None = None,
    drop_last_below: int = 0,
    device: torch.device | str = "cpu",
    nonzero: bool = True,
    sparse: bool = False,
    transpose: bool = True,
    prefetch: bool | None = None,
    shard: tuple[int, int] = (0, 1),
    equal_shards: bool = True,
) -> Iterator[Tensors]:
    """Yield minibatches of ``indices`` from a source; for a GPU, the next one in a thread.

    ``drop_last_below`` drops a final minibatch with fewer cells than that (batch norm needs at
    least two cells). ``nonzero`` adds the positions of the non-zero counts (used by the
    likelihood; queries that only encode or decode skip them). ``sparse`` gives the counts as
    sparse CSR tensors (see :meth:`CellData.batch`), for modules that read them that way;
    ``transpose`` adds their transpose, which only gradients need. ``shard=(rank, world)``
    keeps one process's share of the (shuffled) cells for data-parallel training; with
    ``equal_shards`` every process gets as many (the remainder is left out of the pass).
    ``prefetch`` gathers the
    next minibatch in a background thread; by default only for a GPU: on the CPU the step's
    own threads use every core, and gathering a batch (~0.1 ms) in the main thread is faster
    than a loader thread that competes with them (measured 2-3% per epoch). From a resident
    source (``data.resident``) the minibatches are gathered on its device, in this thread.
    """
    indices = np.asarray(indices, dtype=np.int64)
    if shuffle:
        indices = (rng or np.random.default_rng()).permutation(indices)
    rank, world = shard
    if world > 1:  # this process's share; with equal_shards every process gets as many cells
        share = indices[rank::world]
        indices = share[: len(indices) // world] if equal_shards else share
    chunks = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    if chunks and len(chunks[-1]) < drop_last_below and len(chunks) > 1:
        chunks.pop()
    if not chunks:
        return
    if getattr(data, "resident", False):  # only the cell indices travel, at once
        order = torch.from_numpy(indices).to(data.device, non_blocking=True)
        for i, chunk in enumerate(chunks):  # chunk i is indices[i * batch_size :][:len(chunk)]
            yield data.batch(chunk, nonzero=nonzero, sparse=sparse, transpose=transpose,
                             idx_on_device=order[i * batch_size : i * batch_size + len(chunk)])
        return
    device = torch.device(device)
    pin = device.type == "cuda"

    def load(chunk: np.ndarray) -> Tensors:
        b = data.batch(chunk, nonzero=nonzero, sparse=sparse, transpose=transpose)
        if pin:
            b = {k: v.pin_memory() if v.layout == torch.strided else v for k, v in b.items()}
        return b

    def to_device(b: Tensors) -> Tensors:
        if device.type == "cpu":
            return b
        return {k: v.to(device, non_blocking=True) for k, v in b.items()}

    if prefetch is None:
        prefetch = device.type != "cpu"
    if not prefetch or len(chunks) <= 2:  # for two batches a thread costs more than it hides
        for chunk in chunks:
            yield to_device(load(chunk))
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(load, chunks[0])
        for nxt in chunks[1:] + [None]:
            b = future.result()
            if nxt is not None:
                future = pool.submit(load, nxt)
            yield to_device(b)


class Loader:
    """A re-iterable run of :func:`iterate` over a source: one pass per ``iter()``.

    Shuffled loaders draw a new order from ``rng`` on each pass (the same seed gives the same
    sequence of epochs). ``len()`` is the number of minibatches of a pass.
    """

    def __init__(self, source, indices: np.ndarray, *, batch_size: int, shuffle: bool = False,
                 rng: np.random.Generator | None = None, drop_last_below: int = 0,
                 device: torch.device | str = "cpu", nonzero: bool = True, sparse: bool = False,
                 transpose: bool = True, shard: tuple[int, int] = (0, 1),
                 equal_shards: bool = True):
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)
        self.options = dict(batch_size=batch_size, shuffle=shuffle, drop_last_below=drop_last_below,
                            device=device, nonzero=nonzero, sparse=sparse, transpose=transpose,
                            shard=shard, equal_shards=equal_shards)
        self.rng = rng if rng is not None else np.random.default_rng()

    def __iter__(self) -> Iterator[Tensors]:
        return iterate(self.source, self.indices, rng=self.rng, **self.options)

    def __len__(self) -> int:
        n, b = len(self.indices) // self.options["shard"][1], self.options["batch_size"]
        k = -(-n // b)
        if k > 1 and n - (k - 1) * b < self.options["drop_last_below"]:
            k -= 1
        return k


class ZipLoader:
    """Minibatches of several loaders side by side: one tuple per step (multi-dataset models).

    A pass lasts as long as the longest loader; shorter ones start again (each new pass of a
    shuffled loader draws a new order), so every dataset contributes to every step.
    """

    def __init__(self, loaders):
        self.loaders = list(loaders)
        if not self.loaders:
            raise ValueError("ZipLoader needs at least one loader.")

    def __len__(self) -> int:
        return max(len(loader) for loader in self.loaders)

    def __iter__(self):
        n = len(self)
        iterators = [iter(loader) for loader in self.loaders]
        for _ in range(n):
            batches = []
            for i, it in enumerate(iterators):
                try:
                    batches.append(next(it))
                except StopIteration:
                    iterators[i] = iter(self.loaders[i])
                    batches.append(next(iterators[i]))
            yield tuple(batches)
