r"""Neighbourhood scores of an embedding: batch mixing, label purity, LISI, graph connectivity.

Each score takes an embedding ``(cells, dims)`` (its exact nearest neighbours are computed, see
:func:`~cellvi.metrics.nearest_neighbors`) or a neighbour result already computed
(:class:`~cellvi.metrics.Neighbors`, or scib-metrics' ``NeighborsResults``).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from ._neighbors import Neighbors, as_codes, neighbors_of

__all__ = [
    "clisi",
    "entropy_batch_mixing",
    "graph_connectivity",
    "ilisi",
    "knn_purity",
    "lisi",
]


def _n_cells(X) -> int:
    if hasattr(X, "indices") and hasattr(X, "distances"):
        return int(np.asarray(X.indices).shape[0])
    return int(X.shape[0]) if hasattr(X, "shape") else len(X)


def _without_self(nn: Neighbors) -> np.ndarray:
    """Return the neighbours of each cell other than itself, ``(cells, k - 1)``."""
    idx = nn.indices
    rows = np.arange(idx.shape[0])[:, None]
    is_self = idx == rows
    # the cell is normally first; if an approximate search left it out, drop the last column
    keep = ~is_self
    extra = keep.sum(1) - (idx.shape[1] - 1)
    for i in np.flatnonzero(extra > 0):
        keep[i, np.flatnonzero(keep[i])[-1]] = False
    return idx[keep].reshape(idx.shape[0], idx.shape[1] - 1)


def entropy_batch_mixing(X, batch, *, n_neighbors: int = 50, n_pools: int = 50,
                         n_samples_per_pool: int = 100, seed: int = 0) -> float:
    r"""Return the batch-mixing entropy of an embedding (Lopez et al. 2018, scVI).

    For a cell, :math:`p_b` is the fraction of its ``n_neighbors`` nearest neighbours (itself
    excluded) from batch :math:`b`, and its entropy is :math:`-\sum_b p_b \log p_b` (natural
    log). The score averages it over ``n_samples_per_pool`` cells drawn at random (with
    replacement), then over ``n_pools`` such pools, as in the scVI paper's benchmark. Higher is
    better mixed: :math:`\log 2 \approx 0.693` at most for two batches (the paper's case), and
    :math:`\log B` for :math:`B` batches; 0 when every neighbourhood holds one batch.

    Parameters
    ----------
    X
        ``(cells, dims)`` embedding or a neighbour result.
    batch
        Batch of each cell.
    n_neighbors
        Neighbours of a cell, itself excluded (at most cells - 1).
    n_pools, n_samples_per_pool
        Pools of random cells, and cells per pool.
    seed
        Seed of the random cells.
    """
    n = _n_cells(X)
    codes, n_batches = as_codes(batch, n, "batch")
    nn = neighbors_of(X, min(n_neighbors, n - 1) + 1)
    neigh = _without_self(nn)[:, :n_neighbors]
    k = neigh.shape[1]
    counts = np.zeros((n, n_batches))
    np.add.at(counts, (np.repeat(np.arange(n), k), codes[neigh].reshape(-1)), 1.0)
    p = counts / k
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(p > 0, p * np.log(p), 0.0).sum(1)
    rng = np.random.default_rng(seed)
    pools = rng.choice(n, size=(n_pools, n_samples_per_pool), replace=True)
    return float(ent[pools].mean(1).mean())


def knn_purity(X, labels, *, n_neighbors: int = 30) -> float:
    r"""Return the kNN purity of labels in an embedding (scVI's benchmark).

    For each cell, the fraction of its ``n_neighbors`` nearest neighbours (itself excluded)
    that share its label; averaged within each label, then over labels (so small populations
    weigh as much as large ones). 1 when every neighbourhood is pure.
    """
    n = _n_cells(X)
    codes, n_labels = as_codes(labels, n, "labels")
    nn = neighbors_of(X, min(n_neighbors, n - 1) + 1)
    neigh = _without_self(nn)[:, :n_neighbors]
    per_cell = (codes[neigh] == codes[:, None]).mean(1)
    return float(np.mean([per_cell[codes == c].mean() for c in range(n_labels)
                          if (codes == c).any()]))


def lisi(X, labels, *, n_neighbors: int = 90, perplexity: float | None = None,
         tol: float = 1e-5, max_tries: int = 50) -> np.ndarray:
    r"""Return the local inverse Simpson index of each cell (Korsunsky et al. 2019, Harmony).

    Around cell :math:`i`, its neighbours :math:`j \ne i` get weights
    :math:`P_{ij} \propto e^{-\beta_i d_{ij}}` (Euclidean distances), :math:`\beta_i` found by
    bisection so that the weights' entropy is :math:`\log(\text{perplexity})` (within ``tol``,
    at most ``max_tries`` halvings, from :math:`\beta = 1`); the index is
    :math:`1 / \sum_c (\sum_{j: c_j = c} P_{ij})^2`, the effective number of categories among
    the neighbours: 1 for a pure neighbourhood, up to the number of categories. The procedure
    is scib-metrics' (``lisi_knn``), computed in float64; a cell whose weights all vanish gets
    NaN (scib-metrics gives -1).

    Parameters
    ----------
    X
        ``(cells, dims)`` embedding (its ``n_neighbors`` exact neighbours are used, itself
        included) or a neighbour result.
    labels
        Category of each cell (batch for iLISI, cell type for cLISI).
    n_neighbors
        Neighbours when ``X`` is an embedding (scib-metrics' benchmark uses 90).
    perplexity
        Effective neighbourhood size; default ``floor(k / 3)`` for ``k`` neighbours.
    tol, max_tries
        Bisection tolerance on the entropy and its number of steps.
    """
    n = _n_cells(X)
    codes, n_cats = as_codes(labels, n, "labels")
    nn = neighbors_of(X, n_neighbors)
    d, idx = nn.distances, nn.indices
    if perplexity is None:
        perplexity = np.floor(idx.shape[1] / 3)
    if not perplexity > 0:
        raise ValueError(f"perplexity must be > 0, got {perplexity} (use more neighbours).")
    mask = idx != np.arange(n)[:, None]
    target = np.log(perplexity)

    def entropy(beta):
        with np.errstate(over="ignore", invalid="ignore"):
            P = np.where(mask, np.exp(-d * beta[:, None]), 0.0)
            s = P.sum(1)
            H = np.where(s == 0, 0.0, np.log(np.where(s == 0, 1.0, s))
                         + beta * (d * P).sum(1) / np.where(s == 0, 1.0, s))
        return H, P / np.where(s == 0, 1.0, s)[:, None]

    beta = np.ones(n)
    lo = np.full(n, -np.inf)
    hi = np.full(n, np.inf)
    H, P = entropy(beta)
    diff = H - target
    active = np.abs(diff) >= tol
    for _ in range(max_tries):
        if not active.any():
            break
        up = diff > 0
        new_lo = np.where(up, beta, lo)
        new_hi = np.where(up, hi, beta)
        new_beta = np.where(up, np.where(hi == np.inf, beta * 2, (beta + hi) / 2),
                            np.where(lo == -np.inf, beta / 2, (beta + lo) / 2))
        lo, hi = np.where(active, new_lo, lo), np.where(active, new_hi, hi)
        beta = np.where(active, new_beta, beta)
        H_new, P_new = entropy(beta)
        H = np.where(active, H_new, H)
        P = np.where(active[:, None], P_new, P)
        diff = H - target
        active = active & (np.abs(diff) >= tol)
    sums = np.zeros((n, n_cats))
    np.add.at(sums, (np.repeat(np.arange(n), idx.shape[1]), codes[idx].reshape(-1)),
              P.reshape(-1))
    simpson = (sums ** 2).sum(1)
    with np.errstate(divide="ignore"):
        return np.where(H == 0, np.nan, 1.0 / simpson)


def ilisi(X, batch, *, n_neighbors: int = 90, perplexity: float | None = None,
          scale: bool = True) -> float:
    r"""Return the integration LISI: the median :func:`lisi` of the batches.

    With ``scale`` (scIB's convention), :math:`(\tilde{L} - 1) / (B - 1)` for :math:`B`
    batches, so 1 is perfect mixing and 0 none; otherwise the median effective number of
    batches itself. Equal to scib-metrics' ``ilisi_knn`` on the same neighbours.
    """
    n = _n_cells(X)
    _, n_batches = as_codes(batch, n, "batch")
    value = float(np.nanmedian(lisi(X, batch, n_neighbors=n_neighbors, perplexity=perplexity)))
    if scale:
        if n_batches < 2:
            raise ValueError("iLISI needs at least two batches; there is one.")
        value = (value - 1) / (n_batches - 1)
    return value


def clisi(X, labels, *, n_neighbors: int = 90, perplexity: float | None = None,
          scale: bool = True) -> float:
    r"""Return the cell-type LISI: the median :func:`lisi` of the labels.

    With ``scale`` (scIB's convention), :math:`(C - \tilde{L}) / (C - 1)` for :math:`C`
    labels, so 1 is perfectly separated labels; otherwise the median effective number of
    labels. Equal to scib-metrics' ``clisi_knn`` on the same neighbours.
    """
    n = _n_cells(X)
    _, n_labels = as_codes(labels, n, "labels")
    value = float(np.nanmedian(lisi(X, labels, n_neighbors=n_neighbors,
                                    perplexity=perplexity)))
    if scale:
        if n_labels < 2:
            raise ValueError("cLISI needs at least two labels; there is one.")
        value = (n_labels - value) / (n_labels - 1)
    return value


def graph_connectivity(X, labels, *, n_neighbors: int = 15) -> float:
    r"""Return scIB's graph connectivity: how connected each label's cells stay.

    In the directed kNN graph (an edge from each cell to each of its ``n_neighbors`` nearest
    neighbours, itself included), take the cells of one label and the edges among them; the
    score is the share of them in the largest strongly connected component, averaged over
    labels. 1 when every label is one piece. scib-metrics' ``graph_connectivity`` (on 15
    neighbours in its benchmark).
    """
    n = _n_cells(X)
    codes, n_labels = as_codes(labels, n, "labels")
    nn = neighbors_of(X, n_neighbors)
    neigh = _without_self(nn)
    rows = np.repeat(np.arange(n), neigh.shape[1])
    g = sp.csr_matrix((np.ones(rows.size), (rows, neigh.reshape(-1))), shape=(n, n))
    scores = []
    for c in range(n_labels):
        cells = np.flatnonzero(codes == c)
        if not cells.size:
            continue
        _, comp = connected_components(g[cells][:, cells], directed=True, connection="strong")
        scores.append(np.bincount(comp).max() / cells.size)
    return float(np.mean(scores))
