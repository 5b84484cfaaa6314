"""Structural checks of compressed sparse matrices, before anything indexes them.

scipy builds a CSR/CSC matrix from ``(data, indices, indptr)`` without checking that the
indices lie inside the matrix (``check_format(full_check=False)``), and its C++ routines then
read and write out of bounds: a file with one bad column index crashed the process with
``malloc(): unsorted double linked list corrupted`` in a reader test. scipy's
``check_format(full_check=True)`` does check, but it also prunes the arrays in place, and a
user's matrix is never modified here; so the checks are written out: O(nnz), one min/max pass.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

__all__ = ["check_compressed", "check_index_range", "check_sparse_matrix"]


def check_compressed(n_data: int, indices, indptr, shape: tuple[int, int], *, where: str,
                     fmt: str = "csr", indices_in_range: bool = True) -> None:
    """Raise ``ValueError`` unless ``(indices, indptr)`` describe a valid ``fmt`` matrix.

    Parameters
    ----------
    n_data
        Length of the ``data`` array.
    indices, indptr
        The index arrays (``indices`` may be any array supporting ``min``/``max``; it is read
        once).
    shape
        ``(rows, columns)`` of the matrix.
    where
        What the matrix is, for the message (a file and a dataset, or ``"adata.X"``).
    fmt
        ``"csr"`` (``indptr`` runs over rows) or ``"csc"`` (over columns).
    indices_in_range
        Also check every index (reads ``indices``); False checks only ``indptr`` and the
        lengths, for arrays on disk whose indices are checked chunk by chunk
        (:func:`check_index_range`).
    """
    major, minor = (shape[0], shape[1]) if fmt == "csr" else (shape[1], shape[0])
    indptr = np.asarray(indptr)
    fix = "The matrix is damaged (a truncated or badly written file?): read or build it again."
    if indptr.ndim != 1 or indptr.size != major + 1:
        raise ValueError(
            f"{where}: indptr has {indptr.size} entries but a {fmt.upper()} matrix of shape "
            f"{tuple(shape)} needs {major + 1}. {fix}"
        )
    if major and (indptr[0] != 0 or np.any(np.diff(indptr) < 0)):
        raise ValueError(f"{where}: indptr does not start at 0 and never decrease. {fix}")
    nnz = int(indptr[-1]) if major else 0
    n_indices = int(np.shape(indices)[0])
    if nnz > min(n_data, n_indices):
        raise ValueError(
            f"{where}: indptr ends at {nnz} but there are only {n_data} values and "
            f"{n_indices} indices. {fix}"
        )
    if nnz and indices_in_range:
        check_index_range(np.asarray(indices[:nnz]), minor, where=where, fmt=fmt)


def check_index_range(indices: np.ndarray, n: int, *, where: str, fmt: str = "csr") -> None:
    """Raise ``ValueError`` unless every entry of ``indices`` lies in ``0 .. n - 1``."""
    if not indices.size:
        return
    lo, hi = int(indices.min()), int(indices.max())
    if lo < 0 or hi >= n:
        axis = "column" if fmt == "csr" else "row"
        raise ValueError(
            f"{where}: a {axis} index is {lo if lo < 0 else hi}, outside 0..{n - 1}. The matrix "
            "is damaged (a truncated or badly written file?): read or build it again."
        )


def check_sparse_matrix(X, *, where: str) -> None:
    """Check a scipy CSR/CSC matrix's structure (see :func:`check_compressed`); others pass."""
    if not sp.issparse(X) or X.format not in ("csr", "csc"):
        return
    check_compressed(len(X.data), X.indices, X.indptr, X.shape, where=where, fmt=X.format)
