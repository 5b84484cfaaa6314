r"""Clusters of an embedding against known labels: k-means, NMI and ARI."""

from __future__ import annotations

import numpy as np
import torch

from ._neighbors import as_codes, as_embedding

__all__ = ["adjusted_rand_index", "kmeans", "nmi_ari", "normalized_mutual_info"]


def kmeans(X, n_clusters: int, *, n_init: int = 10, max_iter: int = 300, tol: float = 1e-4,
           seed: int = 0) -> np.ndarray:
    r"""Return k-means clusters of the rows of ``X``: Lloyd's iterations from k-means++ seeds.

    Each of ``n_init`` runs starts from k-means++ centres (each next centre drawn with
    probability proportional to the squared distance to the nearest chosen one) and iterates
    until the centres move by less than ``tol`` times the data's mean variance; the run with the
    smallest within-cluster sum of squares is kept. Seeded: the same ``seed`` gives the same
    clusters.

    Returns
    -------
    numpy.ndarray
        ``(cells,)`` cluster codes in ``0 .. n_clusters - 1``.
    """
    X = as_embedding(X)
    n = X.shape[0]
    if isinstance(n_clusters, bool) or int(n_clusters) != n_clusters or not 1 <= n_clusters <= n:
        raise ValueError(f"n_clusters must be an integer in [1, {n}], got {n_clusters!r}.")
    k = int(n_clusters)
    x = torch.from_numpy(X)
    sq = (x * x).sum(1)
    threshold = tol * float(x.var(0).mean())
    gen = torch.Generator().manual_seed(int(seed))
    best, best_inertia = None, np.inf

    def dist2(centres):
        return (sq[:, None] + (centres * centres).sum(1)[None, :] - 2 * x @ centres.T).clamp_(0)

    for _ in range(n_init):
        centres = x[torch.randint(n, (1,), generator=gen)]
        closest = dist2(centres)[:, 0]
        for _ in range(1, k):
            total = float(closest.sum())
            if total <= 0:  # fewer distinct points than clusters
                nxt = torch.randint(n, (1,), generator=gen)
            else:
                nxt = torch.multinomial(closest / total, 1, generator=gen)
            centres = torch.cat([centres, x[nxt]])
            closest = torch.minimum(closest, dist2(x[nxt])[:, 0])
        for _ in range(max_iter):
            assign = dist2(centres).argmin(1)
            onehot = torch.nn.functional.one_hot(assign, k).to(x.dtype)
            counts = onehot.sum(0)
            new = (onehot.T @ x) / counts.clamp_min(1)[:, None]
            empty = counts == 0
            new[empty] = centres[empty]  # an empty cluster keeps its centre
            shift = float(((new - centres) ** 2).sum())
            centres = new
            if shift <= threshold:
                break
        d = dist2(centres)
        assign = d.argmin(1)
        inertia = float(d.gather(1, assign[:, None]).sum())
        if inertia < best_inertia:
            best, best_inertia = assign, inertia
    return best.numpy().astype(np.int64)


def _contingency(labels_true, labels_pred) -> np.ndarray:
    t = np.asarray(labels_true)
    p = np.asarray(labels_pred)
    if t.shape != p.shape or t.ndim != 1:
        raise ValueError(f"labels_true and labels_pred must be two (cells,) arrays of the same "
                         f"length, got shapes {t.shape} and {p.shape}.")
    tc, nt = as_codes(t, t.size, "labels_true")
    pc, npred = as_codes(p, p.size, "labels_pred")
    table = np.zeros((nt, npred))
    np.add.at(table, (tc, pc), 1.0)
    return table


def normalized_mutual_info(labels_true, labels_pred) -> float:
    r"""Return the normalised mutual information of two labellings (arithmetic mean).

    :math:`\mathrm{NMI} = I(T; P) / \tfrac12 (H(T) + H(P))` from the contingency table, natural
    logs; 1 when the labellings agree up to names, 1 too when both are a single group.
    scikit-learn's ``normalized_mutual_info_score`` (``average_method="arithmetic"``), the one
    scib-metrics uses.
    """
    table = _contingency(labels_true, labels_pred)
    n = table.sum()
    pt, pp = table.sum(1) / n, table.sum(0) / n
    if table.shape[0] == table.shape[1] == 1:  # neither splits the cells: a perfect match
        return 1.0
    nz = table > 0
    pij = table[nz] / n
    mi = float((pij * (np.log(pij) - np.log(np.outer(pt, pp)[nz]))).sum())
    ht = float(-(pt[pt > 0] * np.log(pt[pt > 0])).sum())
    hp = float(-(pp[pp > 0] * np.log(pp[pp > 0])).sum())
    if abs(mi) < np.finfo(np.float64).eps:  # not a perfect match (handled above)
        return 0.0
    return float(mi / ((ht + hp) / 2))


def adjusted_rand_index(labels_true, labels_pred) -> float:
    r"""Return the adjusted Rand index of two labellings.

    :math:`\frac{\sum_{ij}\binom{n_{ij}}2 - E}{\tfrac12(\sum_i\binom{a_i}2 + \sum_j\binom{b_j}2)
    - E}` with :math:`E = \sum_i\binom{a_i}2\sum_j\binom{b_j}2 / \binom n2`: 1 for identical
    labellings, about 0 for independent ones. scikit-learn's ``adjusted_rand_score``.
    """
    table = _contingency(labels_true, labels_pred)
    n = table.sum()

    def comb2(v):
        return v * (v - 1) / 2

    sum_ij = comb2(table).sum()
    sum_a, sum_b = comb2(table.sum(1)).sum(), comb2(table.sum(0)).sum()
    expected = sum_a * sum_b / comb2(n) if n > 1 else 0.0
    maximum = (sum_a + sum_b) / 2
    if maximum == expected:  # both trivial (one group, or all singletons)
        return 1.0
    return float((sum_ij - expected) / (maximum - expected))


def nmi_ari(X, labels, *, n_clusters: int | None = None, n_init: int = 10,
            seed: int = 0) -> dict[str, float]:
    r"""Return the NMI and ARI of k-means clusters of an embedding against its labels.

    k-means (:func:`kmeans`) with as many clusters as labels (``n_clusters`` to change it), then
    :func:`normalized_mutual_info` and :func:`adjusted_rand_index` against the labels: scIB's
    ``nmi_ari_cluster_labels_kmeans`` (scib-metrics uses its own k-means, so values agree when
    the clusters do).

    Returns
    -------
    dict
        ``{"nmi": ..., "ari": ...}``.
    """
    X = as_embedding(X)
    codes, k = as_codes(labels, X.shape[0], "labels")
    clusters = kmeans(X, k if n_clusters is None else n_clusters, n_init=n_init, seed=seed)
    return {"nmi": normalized_mutual_info(codes, clusters),
            "ari": adjusted_rand_index(codes, clusters)}
