r"""Silhouette widths of labels and of batches (scIB's ASW scores)."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from ._neighbors import as_codes, as_embedding

__all__ = ["silhouette_batch", "silhouette_label", "silhouette_samples"]


def silhouette_samples(X, labels, *, metric: Literal["euclidean", "cosine"] = "euclidean",
                       chunk_size: int = 1024) -> np.ndarray:
    r"""Return the silhouette width of each cell, ``(cells,)``.

    :math:`s_i = (b_i - a_i) / \max(a_i, b_i)` with :math:`a_i` the mean distance to the other
    cells of its cluster and :math:`b_i` the smallest mean distance to another cluster's cells;
    0 for a cell alone in its cluster (scikit-learn's and scib-metrics' convention). Exact, in
    float64, ``chunk_size`` rows of distances at a time.

    Parameters
    ----------
    X
        ``(cells, dims)`` embedding.
    labels
        Cluster of each cell (at least two clusters).
    metric
        ``"euclidean"`` or ``"cosine"`` (one minus the cosine similarity).
    chunk_size
        Rows per block of the distance matrix.
    """
    X = as_embedding(X)
    codes, k = as_codes(labels, X.shape[0], "labels")
    if k < 2:
        raise ValueError("A silhouette needs at least two clusters; the labels have one.")
    if metric not in ("euclidean", "cosine"):
        raise ValueError(f"metric must be 'euclidean' or 'cosine', got {metric!r}.")
    x = torch.from_numpy(X)
    if metric == "cosine":
        x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-300)
    sq = (x * x).sum(1)
    onehot = torch.nn.functional.one_hot(torch.from_numpy(codes), k).to(torch.float64)
    freq = onehot.sum(0)
    n = X.shape[0]
    a = np.empty(n)
    b = np.empty(n)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        prod = x[start:stop] @ x.T
        if metric == "euclidean":
            d = (sq[start:stop, None] + sq[None, :] - 2.0 * prod).clamp_(min=0.0).sqrt_()
        else:
            d = (1.0 - prod).clamp_(min=0.0)
        rows = torch.arange(stop - start)
        d[rows, rows + start] = 0.0
        sums = d @ onehot  # (chunk, clusters): total distance to each cluster
        own = torch.from_numpy(codes[start:stop])
        intra = sums[rows, own]
        mean = sums / freq
        mean[rows, own] = torch.inf
        a[start:stop] = intra.numpy()
        b[start:stop] = mean.min(1).values.numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        a = a / (freq.numpy()[codes] - 1)
        s = (b - a) / np.maximum(a, b)
    return np.nan_to_num(s)


def silhouette_label(X, labels, *, rescale: bool = True,
                     metric: Literal["euclidean", "cosine"] = "euclidean") -> float:
    r"""Return the average silhouette width of the labels (scIB's cell-type ASW).

    The mean of :func:`silhouette_samples` over cells; with ``rescale``, :math:`(s + 1) / 2` so
    that it lies in [0, 1] and higher separates the labels better. Equal to scib-metrics'
    ``silhouette_label``.
    """
    s = float(np.mean(silhouette_samples(X, labels, metric=metric)))
    return (s + 1) / 2 if rescale else s


def silhouette_batch(X, labels, batch, *, rescale: bool = True,
                     metric: Literal["euclidean", "cosine"] = "euclidean") -> float:
    r"""Return the batch silhouette within labels (scIB's batch ASW): higher is better mixed.

    Within each label, the silhouette widths of the batches :math:`s_i`; each cell scores
    :math:`1 - |s_i|` (with ``rescale``; else :math:`|s_i|`), the scores are averaged within
    the label and then over labels. Labels whose cells are all from one batch, or each from a
    different one, are left out. Equal to scib-metrics' ``silhouette_batch``.
    """
    X = as_embedding(X)
    lab, n_labels = as_codes(labels, X.shape[0], "labels")
    bat, _ = as_codes(batch, X.shape[0], "batch")
    per_label = []
    for c in range(n_labels):
        cells = np.flatnonzero(lab == c)
        n_b = len(np.unique(bat[cells]))
        if n_b == 1 or n_b == cells.size:
            continue
        s = np.abs(silhouette_samples(X[cells], bat[cells], metric=metric))
        per_label.append(np.mean(1 - s if rescale else s))
    if not per_label:
        raise ValueError("No label has cells of several batches: the batch silhouette is "
                         "undefined.")
    return float(np.mean(per_label))
