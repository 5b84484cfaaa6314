"""Minibatches straight from the (sparse) count matrix, prepared one step ahead."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData

from cellvi import _native, keys

from ._setup import DataSummary, category_codes, check_counts, counts_location, get_counts


class CellData:
    """The arrays of one AnnData, read through a :class:`DataSummary`.

    Counts stay in their stored form (CSR or dense); :meth:`batch` gathers rows into a dense
    float32 tensor, so the whole dataset is never densified.

    Parameters
    ----------
    adata
        AnnData with the genes of ``summary``, in the same order.
    summary
        How to read it (from ``setup_anndata`` or a saved model).
    check
        Validate the counts (skipped when the AnnData is the one checked at setup).
    """

    def __init__(self, adata: AnnData, summary: DataSummary, *, check: bool = True):
        check_genes(adata, summary)
        X = get_counts(adata, summary.layer)
        if check:
            check_counts(X, where=counts_location(summary.layer))
        if sp.issparse(X):
            X = sp.csr_matrix(X, dtype=np.float32)
            X.sort_indices()
        else:
            X = np.ascontiguousarray(np.asarray(X), dtype=np.float32)
        self.X = X
        self.n_obs, self.n_vars = X.shape
        n = self.n_obs
        obs: dict[str, np.ndarray] = {
            keys.BATCH: category_codes(adata, summary.batch_key, summary.batch_categories),
            keys.LABELS: self._label_codes(adata, summary),
        }
        obs[keys.BATCH] = obs[keys.BATCH].reshape(n, 1)
        obs[keys.LABELS] = obs[keys.LABELS].reshape(n, 1)
        if summary.categorical_covariate_keys:
            obs[keys.CAT_COVS] = np.stack(
                [
                    category_codes(adata, k, cats)
                    for k, cats in zip(
                        summary.categorical_covariate_keys,
                        summary.categorical_covariate_categories,
                    )
                ],
                axis=1,
            )
        if summary.continuous_covariate_keys:
            cont = np.stack(
                [
                    pd.to_numeric(adata.obs[k], errors="coerce").to_numpy(np.float32)
                    for k in summary.continuous_covariate_keys
                ],
                axis=1,
            )
            if not np.all(np.isfinite(cont)):
                raise ValueError("Continuous covariates contain NaN or non-numeric values.")
            obs[keys.CONT_COVS] = cont
        if summary.size_factor_key is not None:
            sf = pd.to_numeric(adata.obs[summary.size_factor_key], errors="coerce")
            obs[keys.SIZE_FACTOR] = sf.to_numpy(np.float32).reshape(n, 1)
        obs[keys.INDICES] = np.arange(n, dtype=np.int64).reshape(n, 1)
        self.obs = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in obs.items()}

    @staticmethod
    def _label_codes(adata: AnnData, summary: DataSummary) -> np.ndarray:
        if summary.labels_key is None:
            return np.zeros(adata.n_obs, dtype=np.int64)
        if summary.labels_key not in adata.obs and "unlabeled_category" in summary.extra:
            # a query without labels: every cell is unlabelled
            unl = summary.extra["unlabeled_category"]
            return np.full(adata.n_obs, summary.label_categories.index(unl), dtype=np.int64)
        return category_codes(adata, summary.labels_key, summary.label_categories)

    def __len__(self) -> int:
        return self.n_obs

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
    ) -> dict[str, torch.Tensor]:
        """Rows ``idx`` as sparse CSR tensors, never dense.

        Returns ``{keys.X: (cells, genes) CSR}``, with ``keys.X_T``: its ``(genes, cells)``
        transpose (for gradients) when ``transpose``, and ``keys.INDICES_NONZERO``: the
        ``(2, nnz)`` (row, column) of the entries of ``keys.X`` in its order, when ``nonzero``.
        """
        n = len(idx)
        t = torch.from_numpy
        fast = (_native.gather_rows(self.X, idx, rows=nonzero, transpose=transpose)
                if sp.issparse(self.X) and _native.enabled() else None)
        if fast is not None:  # one C pass for the rows, their transpose and the positions
            out = {keys.X: torch.sparse_csr_tensor(
                t(fast["crow"]), t(fast["cols"]), t(fast["vals"]), (n, self.n_vars),
                check_invariants=False)}
            if transpose:
                out[keys.X_T] = torch.sparse_csr_tensor(
                    t(fast["tcrow"]), t(fast["tcols"]), t(fast["tvals"]), (self.n_vars, n),
                    check_invariants=False)
            if nonzero:
                out[keys.INDICES_NONZERO] = torch.stack([t(fast["rows"]), t(fast["cols"])])
            return out
        crow, cols, vals = self._gather(idx)
        out = {keys.X: torch.sparse_csr_tensor(t(crow), t(cols), t(vals), (n, self.n_vars),
                                               check_invariants=False)}
        if transpose:
            # CSC of the rows = CSR of the transpose (a counting sort, in scipy)
            csc = sp.csr_matrix((vals, cols, crow), shape=(n, self.n_vars)).tocsc()
            out[keys.X_T] = torch.sparse_csr_tensor(
                t(csc.indptr.astype(np.int64)), t(csc.indices.astype(np.int64)), t(csc.data),
                (self.n_vars, n), check_invariants=False,
            )
        if nonzero:
            rows = np.repeat(np.arange(n), np.diff(crow))
            out[keys.INDICES_NONZERO] = t(np.stack([rows, cols]))
        return out

    def batch(
        self, idx: np.ndarray, *, nonzero: bool = True, sparse: bool = False,
        transpose: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Return the minibatch of rows ``idx``, a dict of tensors keyed by :mod:`cellvi.keys`.

        ``nonzero`` adds the positions of the non-zero counts; ``sparse`` gives the counts as
        sparse CSR tensors (:meth:`sparse_counts`, with their transpose when ``transpose``)
        instead of a dense ``(cells, genes)`` tensor.
        """
        idx = np.asarray(idx, dtype=np.int64)
        t = torch.from_numpy(idx)
        out = {k: v[t] for k, v in self.obs.items()}
        if sparse:
            out.update(self.sparse_counts(idx, nonzero=nonzero, transpose=transpose))
        elif nonzero:
            x, positions = self.counts(idx)
            out[keys.INDICES_NONZERO] = torch.from_numpy(positions)
            out[keys.X] = torch.from_numpy(x)
        else:
            out[keys.X] = torch.from_numpy(self.dense_rows(idx))
        return out

    def library_sizes(self) -> np.ndarray:
        """Total counts per cell."""
        return np.asarray(self.X.sum(axis=1)).reshape(-1)


class DeviceCellData:
    """A :class:`CellData` copied once to ``device``, with minibatches gathered there.

    On a GPU this removes, from every step, the gathering of the minibatch on the host and its
    copy to the device: the training loop then only sends each minibatch's cell indices (see
    ``data_placement`` in :meth:`cellvi.model.SCVI.train`). The counts are kept as CSR
    (row pointers, column indices and values: 12 bytes per non-zero count, explicit zeros
    dropped), the per-cell arrays as they are. :meth:`batch` gives exactly what
    :meth:`CellData.batch` gives for the same cells, on ``device``.

    Parameters
    ----------
    data
        The host arrays.
    device
        Where to keep them.
    """

    def __init__(self, data: CellData, device: torch.device | str):
        self.device = torch.device(device)
        self.n_obs, self.n_vars = data.n_obs, data.n_vars
        X = data.X if sp.issparse(data.X) else sp.csr_matrix(data.X)
        if X.nnz and not X.data.all():  # explicit zeros are not non-zero counts
            X = X.copy()
            X.eliminate_zeros()
        dev = self.device
        self.crow = torch.from_numpy(X.indptr.astype(np.int64)).to(dev)
        self.cols = torch.from_numpy(X.indices.astype(np.int64)).to(dev)
        self.vals = torch.from_numpy(np.asarray(X.data, dtype=np.float32)).to(dev)
        self.obs = {k: v.to(dev) for k, v in data.obs.items()}
        self.row_nnz = np.diff(X.indptr).astype(np.int64)  # (cells,) on the host

    @staticmethod
    def nbytes(data: CellData) -> int:
        """Device memory that ``DeviceCellData(data, device)`` takes, in bytes."""
        X = data.X
        nnz = X.nnz if sp.issparse(X) else int(np.count_nonzero(X))
        obs = sum(v.numel() * v.element_size() for v in data.obs.values())
        return 12 * nnz + 8 * (data.n_obs + 1) + obs

    def __len__(self) -> int:
        return self.n_obs

    def batch(
        self, idx: np.ndarray, *, nonzero: bool = True, sparse: bool = False,
        transpose: bool = True, idx_on_device: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Minibatch of rows ``idx`` on the device; arguments as for :meth:`CellData.batch`.

        ``idx_on_device``: the same indices already on the device (:func:`iterate` sends an
        epoch's order at once). The minibatch's number of non-zero counts is summed on the
        host, so the gather never waits for the device.
        """
        dev = self.device
        idx = np.asarray(idx, dtype=np.int64)
        nnz = int(self.row_nnz[idx].sum())
        if idx_on_device is None:
            idx_on_device = torch.from_numpy(idx).to(dev, non_blocking=True)
        idx = idx_on_device
        n, n_genes = idx.numel(), self.n_vars
        out = {k: v[idx] for k, v in self.obs.items()}
        starts = self.crow[idx]
        lens = self.crow[idx + 1] - starts  # (n,) non-zero counts per cell
        crow = torch.zeros(n + 1, dtype=torch.int64, device=dev)
        torch.cumsum(lens, 0, out=crow[1:])
        rows = torch.repeat_interleave(torch.arange(n, device=dev), lens, output_size=nnz)
        pos = torch.arange(nnz, device=dev) + (starts - crow[:-1])[rows]  # (nnz,) in self.vals
        cols, vals = self.cols[pos], self.vals[pos]
        if sparse:
            out[keys.X] = torch.sparse_csr_tensor(crow, cols, vals, (n, n_genes),
                                                  check_invariants=False)
            if transpose:  # (genes, cells) CSR: entries by gene, then by position in idx
                order = torch.argsort(cols * n + rows)
                per_gene = torch.zeros(n_genes, dtype=torch.int64, device=dev).index_add_(
                    0, cols, torch.ones_like(cols))  # (bincount would wait for the device)
                tcrow = torch.zeros(n_genes + 1, dtype=torch.int64, device=dev)
                torch.cumsum(per_gene, 0, out=tcrow[1:])
                out[keys.X_T] = torch.sparse_csr_tensor(
                    tcrow, rows[order], vals[order], (n_genes, n), check_invariants=False)
        else:
            x = torch.zeros(n, n_genes, dtype=torch.float32, device=dev)
            x[rows, cols] = vals
            out[keys.X] = x
        if nonzero:
            out[keys.INDICES_NONZERO] = torch.stack([rows, cols])
        return out


def check_placement(placement: str) -> None:
    """Raise unless ``placement`` is a valid ``data_placement``."""
    if placement not in ("auto", "device", "host"):
        raise ValueError(
            f"data_placement must be 'auto', 'device' or 'host', got {placement!r}.")


def place_data(
    data: CellData, placement: str, device: torch.device | str
) -> CellData | DeviceCellData:
    """Return the arrays training reads minibatches from: ``data``, or its copy on ``device``.

    ``placement`` is ``"host"`` (``data``: each minibatch gathered on the host, then moved),
    ``"device"`` (a :class:`DeviceCellData` on ``device``) or ``"auto"``: on a CUDA device, the
    device when the copy takes at most a quarter of its free memory, else the host; on the CPU,
    the host (the compiled gather there is faster than tensor operations).
    """
    check_placement(placement)
    device = torch.device(device)
    if placement == "host" or (placement == "auto" and device.type != "cuda"):
        return data
    if placement == "auto":
        free, _ = torch.cuda.mem_get_info(device)
        if DeviceCellData.nbytes(data) > free // 4:
            return data
    return DeviceCellData(data, device)


def sparse_batches(module: torch.nn.Module, device: torch.device | str) -> bool:
    """Whether to hand ``module`` its counts as sparse CSR tensors on ``device``.

    Modules opt in with ``sparse_input = True``; the sparse kernels used (``embedding_bag``,
    CSR x dense products, ``segment_reduce``) exist on the CPU and CUDA devices.
    """
    return bool(getattr(module, "sparse_input", False)) and torch.device(device).type in (
        "cpu", "cuda")


def check_genes(adata: AnnData, summary: DataSummary) -> None:
    """Raise if ``adata``'s genes differ from the summary's, naming the differences."""
    names = [str(v) for v in adata.var_names]
    if names == summary.var_names:
        return
    ref = set(summary.var_names)
    got = set(names)
    missing = [g for g in summary.var_names if g not in got]
    extra = [g for g in names if g not in ref]
    if missing or extra:
        raise ValueError(
            f"The AnnData's genes differ from the model's ({len(summary.var_names)} genes): "
            f"{len(missing)} missing (e.g. {missing[:5]}), {len(extra)} unexpected "
            f"(e.g. {extra[:5]}). Subset or reorder it with `adata[:, model_genes]` where "
            "model_genes are the model's var_names."
        )
    raise ValueError(
        "The AnnData has the model's genes but in a different order; reorder it with "
        "`adata = adata[:, model.summary.var_names].copy()`."
    )


def iterate(
    data: CellData | DeviceCellData,
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
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield minibatches of ``indices``; for a GPU, the next one is gathered in a thread.

    ``drop_last_below`` drops a final minibatch with fewer cells than that (batch norm needs at
    least two cells). ``nonzero`` adds the positions of the non-zero counts (used by the
    likelihood; queries that only encode or decode skip them). ``sparse`` gives the counts as
    sparse CSR tensors (see :meth:`CellData.batch`), for modules that read them that way;
    ``transpose`` adds their transpose, which only gradients need. ``prefetch`` gathers the
    next minibatch in a background thread; by default only for a GPU: on the CPU the step's
    own threads use every core, and gathering a batch (~0.1 ms) in the main thread is faster
    than a loader thread that competes with them (measured 2-3% per epoch). From a
    :class:`DeviceCellData` the minibatches are gathered on its device, in this thread.
    """
    _native.tune_allocator()  # freed step memory is kept, not faulted in again every step
    indices = np.asarray(indices, dtype=np.int64)
    if shuffle:
        indices = (rng or np.random.default_rng()).permutation(indices)
    chunks = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    if chunks and len(chunks[-1]) < drop_last_below and len(chunks) > 1:
        chunks.pop()
    if not chunks:
        return
    if isinstance(data, DeviceCellData):  # resident: only the cell indices travel, at once
        order = torch.from_numpy(indices).to(data.device, non_blocking=True)
        for i, chunk in enumerate(chunks):  # chunk i is indices[i * batch_size :][:len(chunk)]
            yield data.batch(chunk, nonzero=nonzero, sparse=sparse, transpose=transpose,
                             idx_on_device=order[i * batch_size : i * batch_size + len(chunk)])
        return
    device = torch.device(device)
    pin = device.type == "cuda"

    def load(chunk: np.ndarray) -> dict[str, torch.Tensor]:
        b = data.batch(chunk, nonzero=nonzero, sparse=sparse, transpose=transpose)
        if pin:
            b = {k: v.pin_memory() if v.layout == torch.strided else v for k, v in b.items()}
        return b

    def to_device(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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
