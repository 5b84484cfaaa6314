"""Exact nearest neighbours of an embedding, and the checks every metric makes of its inputs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

__all__ = ["Neighbors", "nearest_neighbors"]


@dataclass(frozen=True)
class Neighbors:
    """The ``k`` nearest neighbours of every cell, the cell itself first.

    The same layout as ``scib_metrics.nearest_neighbors.NeighborsResults`` (which the metrics
    accept too): row ``i`` of ``indices`` holds the positions of cell ``i``'s neighbours in
    increasing distance, starting with ``i`` itself, and ``distances`` their Euclidean
    distances (not squared).

    Attributes
    ----------
    indices
        ``(cells, k)`` integer positions.
    distances
        ``(cells, k)`` Euclidean distances.
    """

    indices: np.ndarray
    distances: np.ndarray

    @property
    def n_samples(self) -> int:
        """Number of cells."""
        return int(self.indices.shape[0])

    @property
    def n_neighbors(self) -> int:
        """Neighbours per cell, the cell itself included."""
        return int(self.indices.shape[1])

    def subset_neighbors(self, n: int) -> Neighbors:
        """Return the ``n`` nearest neighbours of each cell (the first ``n`` columns)."""
        if not 1 <= n <= self.n_neighbors:
            raise ValueError(f"n must be in [1, {self.n_neighbors}], got {n}.")
        return Neighbors(self.indices[:, :n], self.distances[:, :n])


def as_embedding(X, name: str = "X") -> np.ndarray:
    """Return ``X`` as a finite float64 ``(cells, dims)`` array, or raise naming the problem."""
    if hasattr(X, "toarray"):
        X = X.toarray()
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"{name} must be a (cells, dimensions) matrix, got shape {X.shape}.")
    if X.shape[0] < 2:
        raise ValueError(f"{name} has {X.shape[0]} cell(s); a metric needs at least 2.")
    if not np.isfinite(X).all():
        raise ValueError(f"{name} has NaN or infinite values; embed the cells again.")
    return X


def as_codes(values, n: int, name: str) -> tuple[np.ndarray, int]:
    """Return the category codes of ``values`` (one per cell) and the number of categories."""
    values = np.asarray(values)
    if values.ndim != 1 or values.shape[0] != n:
        raise ValueError(f"{name} must hold one value per cell ({n}), got shape {values.shape}.")
    cat = pd.Categorical(values)
    if (cat.codes < 0).any():
        raise ValueError(f"{name} has missing values (NaN); fill or drop those cells first.")
    return cat.codes.astype(np.int64), len(cat.categories)


def nearest_neighbors(X, n_neighbors: int = 90, *, chunk_size: int = 1024) -> Neighbors:
    r"""Return the exact ``n_neighbors`` nearest neighbours of every row of ``X`` (itself first).

    Distances are Euclidean, computed in float64 chunk by chunk
    (:math:`\|a\|^2 + \|b\|^2 - 2 a \cdot b`, so memory is ``chunk_size x cells``); a cell is
    always its own first neighbour at distance 0, as with pynndescent, which scib-metrics uses.

    Parameters
    ----------
    X
        ``(cells, dims)`` embedding.
    n_neighbors
        Neighbours per cell, the cell itself included (at most the number of cells).
    chunk_size
        Rows per block of the distance computation.
    """
    X = as_embedding(X)
    n = X.shape[0]
    if isinstance(n_neighbors, bool) or int(n_neighbors) != n_neighbors or n_neighbors < 2:
        raise ValueError(f"n_neighbors must be an integer >= 2, got {n_neighbors!r}.")
    k = int(min(n_neighbors, n))
    x = torch.from_numpy(X)
    sq = (x * x).sum(1)
    idx_out = np.empty((n, k), dtype=np.int64)
    dist_out = np.empty((n, k), dtype=np.float64)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        d2 = sq[start:stop, None] + sq[None, :] - 2.0 * (x[start:stop] @ x.T)
        d2.clamp_(min=0.0)
        rows = torch.arange(stop - start)
        d2[rows, rows + start] = -1.0  # the cell itself first, at distance 0
        vals, idx = torch.topk(d2, k, dim=1, largest=False, sorted=True)
        vals[:, 0] = 0.0
        idx_out[start:stop] = idx.numpy()
        dist_out[start:stop] = vals.clamp(min=0.0).sqrt().numpy()
    return Neighbors(idx_out, dist_out)


def neighbors_of(X, n_neighbors: int) -> Neighbors:
    """``X`` if it already is a neighbour result (ours or scib-metrics'), else its exact kNN."""
    if hasattr(X, "indices") and hasattr(X, "distances"):
        idx, dist = np.asarray(X.indices), np.asarray(X.distances, dtype=np.float64)
        if idx.shape != dist.shape or idx.ndim != 2:
            raise ValueError("A neighbour result needs indices and distances of the same "
                             f"(cells, k) shape, got {idx.shape} and {dist.shape}.")
        return Neighbors(idx.astype(np.int64), dist)
    return nearest_neighbors(X, n_neighbors)
