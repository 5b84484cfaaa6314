r"""Several integration scores of one embedding at once, and scIB's aggregates (scib-metrics)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from anndata import AnnData

from ._clustering import nmi_ari
from ._knn import clisi, entropy_batch_mixing, graph_connectivity, ilisi, knn_purity
from ._neighbors import as_embedding, nearest_neighbors
from ._pca import log_normalize, pca
from ._silhouette import silhouette_batch, silhouette_label

__all__ = ["BATCH_METRICS", "LABEL_METRICS", "integration_scores", "scib_benchmark",
           "score_embedding"]

#: Scores of batch mixing (need the batches; ``silhouette_batch`` and
#: ``graph_connectivity`` need the labels too). Higher is better for every score here.
BATCH_METRICS = ("entropy_batch_mixing", "ilisi", "silhouette_batch")
#: Scores of label conservation (need the labels).
LABEL_METRICS = ("knn_purity", "clisi", "silhouette_label", "nmi", "ari", "graph_connectivity")


def _requested(metrics, batch, labels) -> list[str]:
    known = BATCH_METRICS + LABEL_METRICS
    if metrics is None:
        out = []
        if batch is not None:
            out += [m for m in BATCH_METRICS if m != "silhouette_batch" or labels is not None]
        if labels is not None:
            out += list(LABEL_METRICS)
        if not out:
            raise ValueError("Give batches, labels or both: without them there is no score.")
        return out
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    unknown = [m for m in metrics if m not in known]
    if unknown:
        raise ValueError(f"Unknown metric(s) {unknown}; the metrics are {list(known)}.")
    for m in metrics:
        if m in BATCH_METRICS and batch is None:
            raise ValueError(f"{m} needs the batch of each cell (batch= / batch_key=).")
        if (m in LABEL_METRICS or m == "silhouette_batch") and labels is None:
            raise ValueError(f"{m} needs the label of each cell (labels= / labels_key=).")
    return metrics


def score_embedding(X, *, batch=None, labels=None, metrics: Sequence[str] | None = None,
                    seed: int = 0) -> dict[str, float]:
    """Return integration scores of an embedding (higher is better for each).

    The exact 90 nearest neighbours are computed once and shared (subsets of them: 50 for the
    batch entropy, 30 for kNN purity, 15 for graph connectivity).

    Parameters
    ----------
    X
        ``(cells, dims)`` embedding.
    batch, labels
        Batch and label of each cell (either may be None).
    metrics
        Names among :data:`BATCH_METRICS` and :data:`LABEL_METRICS` (default: every one the
        given batches and labels allow).
    seed
        Seed of the batch entropy's random pools and of k-means.
    """
    X = as_embedding(X)
    names = _requested(metrics, batch, labels)
    nn = nearest_neighbors(X, 90)
    out: dict[str, float] = {}
    for m in names:
        if m == "entropy_batch_mixing":
            out[m] = entropy_batch_mixing(nn, batch, seed=seed)
        elif m == "ilisi":
            out[m] = ilisi(nn, batch)
        elif m == "silhouette_batch":
            out[m] = silhouette_batch(X, labels, batch)
        elif m == "knn_purity":
            out[m] = knn_purity(nn, labels)
        elif m == "clisi":
            out[m] = clisi(nn, labels)
        elif m == "silhouette_label":
            out[m] = silhouette_label(X, labels)
        elif m == "graph_connectivity":
            out[m] = graph_connectivity(nn.subset_neighbors(min(15, nn.n_neighbors)), labels)
        elif m in ("nmi", "ari"):
            if m not in out:
                out.update(nmi_ari(X, labels, seed=seed))
    return {m: float(out[m]) for m in names}


def _obs(adata: AnnData, key: str | None, what: str):
    if key is None:
        return None
    if key not in adata.obs:
        raise KeyError(f"{what} {key!r} is not a column of adata.obs (columns: "
                       f"{list(adata.obs)}).")
    return adata.obs[key].to_numpy()


def integration_scores(adata: AnnData, *, use_rep: str = "X_scvi", batch_key: str | None = None,
                       labels_key: str | None = None, metrics: Sequence[str] | None = None,
                       seed: int = 0) -> pd.Series:
    """Return the integration scores of ``adata.obsm[use_rep]`` (see :func:`score_embedding`).

    Reads ``obs[batch_key]`` and ``obs[labels_key]``; writes nothing.
    """
    if use_rep not in adata.obsm:
        raise KeyError(f"use_rep {use_rep!r} is not in adata.obsm (keys: {list(adata.obsm)}); "
                       "store the latent there first, e.g. adata.obsm['X_scvi'] = "
                       "model.get_latent_representation().")
    scores = score_embedding(np.asarray(adata.obsm[use_rep]),
                             batch=_obs(adata, batch_key, "batch_key"),
                             labels=_obs(adata, labels_key, "labels_key"),
                             metrics=metrics, seed=seed)
    return pd.Series(scores, name=use_rep)


def scib_benchmark(adata: AnnData, *, batch_key: str, labels_key: str,
                   embedding_keys: Sequence[str], pre_integrated_key: str | None = None,
                   layer: str | None = None, min_max_scale: bool = False, n_jobs: int = 1,
                   progress_bar: bool = False) -> pd.DataFrame:
    """Return scIB's metrics and aggregates of embeddings, by scib-metrics' ``Benchmarker``.

    Needs the ``metrics`` extra (``pip install cellvi[metrics]``, i.e. scib-metrics). The
    aggregates are scIB's: ``Batch correction`` and ``Bio conservation`` (means of their
    metrics) and ``Total`` = 0.4 batch correction + 0.6 bio conservation.

    ``adata`` is not changed: the benchmark runs on a light AnnData of its ``obs`` and the
    embeddings. Without ``pre_integrated_key``, the unintegrated reference of the PCR
    comparison is a 50-component PCA of the log-normalised counts (``adata.X`` or ``layer``),
    computed by :func:`cellvi.metrics.pca` (scib-metrics would run scanpy's PCA on ``adata.X``
    as it is, raw counts here).

    Returns
    -------
    pandas.DataFrame
        One row per embedding plus a ``Metric Type`` row, one column per metric and aggregate
        (scib-metrics' ``get_results``).
    """
    try:
        from scib_metrics.benchmark import Benchmarker
    except ImportError as err:
        raise ImportError("scib_benchmark needs scib-metrics: pip install 'cellvi[metrics]' "
                          f"({err}).") from None
    missing = [k for k in embedding_keys if k not in adata.obsm]
    if missing:
        raise KeyError(f"embedding_keys {missing} are not in adata.obsm (keys: "
                       f"{list(adata.obsm)}).")
    _obs(adata, batch_key, "batch_key")
    _obs(adata, labels_key, "labels_key")
    light = AnnData(obs=adata.obs[[batch_key, labels_key]].copy())
    for k in embedding_keys:
        light.obsm[k] = np.asarray(adata.obsm[k], dtype=np.float32)
    if pre_integrated_key is None:
        counts = adata.X if layer is None else adata.layers[layer]
        pre = log_normalize(counts)
        light.obsm["X_pre"] = pca(pre, min(50, *pre.shape)).astype(np.float32)
        pre_integrated_key = "X_pre"
    else:
        light.obsm[pre_integrated_key] = np.asarray(adata.obsm[pre_integrated_key])
    bm = Benchmarker(light, batch_key=batch_key, label_key=labels_key,
                     embedding_obsm_keys=list(embedding_keys),
                     pre_integrated_embedding_obsm_key=pre_integrated_key, n_jobs=n_jobs,
                     progress_bar=progress_bar)
    bm.benchmark()
    return bm.get_results(min_max_scale=min_max_scale)
