"""Quality scores of a model's latent space and imputation (the scVI paper's and scIB's).

Batch mixing: :func:`entropy_batch_mixing` (scVI paper), :func:`ilisi`,
:func:`silhouette_batch`. Label conservation: :func:`knn_purity`, :func:`clisi`,
:func:`silhouette_label`, :func:`nmi_ari` (k-means clusters against labels),
:func:`graph_connectivity`. All of them at once: :func:`score_embedding` /
:func:`integration_scores`. Imputation: :func:`hide_counts`, :func:`imputation_score`,
:func:`imputation_benchmark`. scIB's aggregates through scib-metrics (the ``metrics`` extra):
:func:`scib_benchmark`. The scores equal scib-metrics' where both compute the same one
(``tests/metrics``).
"""

from ._clustering import adjusted_rand_index, kmeans, nmi_ari, normalized_mutual_info
from ._imputation import hide_counts, imputation_benchmark, imputation_score
from ._knn import clisi, entropy_batch_mixing, graph_connectivity, ilisi, knn_purity, lisi
from ._neighbors import Neighbors, nearest_neighbors
from ._pca import log_normalize, pca
from ._scores import (
    BATCH_METRICS,
    LABEL_METRICS,
    integration_scores,
    scib_benchmark,
    score_embedding,
)
from ._silhouette import silhouette_batch, silhouette_label, silhouette_samples

__all__ = [
    "BATCH_METRICS",
    "LABEL_METRICS",
    "Neighbors",
    "adjusted_rand_index",
    "clisi",
    "entropy_batch_mixing",
    "graph_connectivity",
    "hide_counts",
    "ilisi",
    "imputation_benchmark",
    "imputation_score",
    "integration_scores",
    "kmeans",
    "knn_purity",
    "lisi",
    "log_normalize",
    "nearest_neighbors",
    "nmi_ari",
    "normalized_mutual_info",
    "pca",
    "scib_benchmark",
    "score_embedding",
    "silhouette_batch",
    "silhouette_label",
    "silhouette_samples",
]
