"""cellvi.metrics: closed forms on constructed cases, scikit-learn, and scib-metrics itself."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

import cellvi
import cellvi.metrics as cm


def blobs(n=240, n_labels=3, n_batches=2, dims=6, shift=4.0, batch_shift=0.0, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_labels, n)
    batch = rng.integers(0, n_batches, n)
    X = rng.normal(size=(n, dims))
    X[:, 0] += shift * labels
    X[:, 1] += batch_shift * batch
    return X, labels.astype(str), batch.astype(str)


# ------------------------------------------------------------------ closed forms
def test_nearest_neighbors_equal_sklearn():
    from sklearn.neighbors import NearestNeighbors

    X, _, _ = blobs(150)
    nn = cm.nearest_neighbors(X, 12)
    dist, idx = NearestNeighbors(n_neighbors=12).fit(X).kneighbors(X)
    assert (nn.indices[:, 0] == np.arange(150)).all() and (nn.distances[:, 0] == 0).all()
    np.testing.assert_allclose(nn.distances, dist, atol=1e-9)
    assert (np.sort(nn.indices, 1) == np.sort(idx, 1)).mean() > 0.999


def test_silhouette_closed_form_and_sklearn():
    from sklearn.metrics import silhouette_samples

    # four points on a line: clusters {0, 1} and {10, 12}
    X = np.array([[0.0], [1.0], [10.0], [12.0]])
    s = cm.silhouette_samples(X, ["a", "a", "b", "b"])
    a0, b0 = 1.0, (10 + 12) / 2
    assert s[0] == pytest.approx((b0 - a0) / b0)
    a2, b2 = 2.0, (10 + 9) / 2
    assert s[2] == pytest.approx((b2 - a2) / b2)
    X, labels, _ = blobs(200)
    np.testing.assert_allclose(cm.silhouette_samples(X, labels), silhouette_samples(X, labels),
                               atol=1e-12)
    np.testing.assert_allclose(cm.silhouette_samples(X, labels, metric="cosine"),
                               silhouette_samples(X, labels, metric="cosine"), atol=1e-10)
    assert cm.silhouette_label(X, labels) == pytest.approx(
        (silhouette_samples(X, labels).mean() + 1) / 2)


def test_silhouette_batch_mixed_vs_separated():
    X, labels, batch = blobs(300, batch_shift=0.0)
    mixed = cm.silhouette_batch(X, labels, batch)
    X2, _, _ = blobs(300, batch_shift=8.0)
    separated = cm.silhouette_batch(X2, labels, batch)
    assert mixed > 0.9 > separated


def test_ari_nmi_equal_sklearn_and_limits():
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    rng = np.random.default_rng(1)
    for _ in range(5):
        t, p = rng.integers(0, 4, 300), rng.integers(0, 6, 300)
        assert cm.adjusted_rand_index(t, p) == pytest.approx(adjusted_rand_score(t, p))
        assert cm.normalized_mutual_info(t, p) == pytest.approx(
            normalized_mutual_info_score(t, p))
    t = rng.integers(0, 3, 100)
    assert cm.adjusted_rand_index(t, (t + 1) % 3) == pytest.approx(1.0)
    assert cm.normalized_mutual_info(t, (t + 1) % 3) == pytest.approx(1.0)
    assert cm.normalized_mutual_info(np.zeros(10), np.zeros(10)) == 1.0


def test_kmeans_recovers_separated_clusters_and_is_seeded():
    X, labels, _ = blobs(300, shift=10.0)
    clusters = cm.kmeans(X, 3, seed=3)
    assert cm.adjusted_rand_index(labels, clusters) == pytest.approx(1.0)
    assert (cm.kmeans(X, 3, seed=3) == clusters).all()
    assert cm.nmi_ari(X, labels) == pytest.approx({"nmi": 1.0, "ari": 1.0})


def test_entropy_batch_mixing_and_purity_closed_forms():
    # cells on a line, batches in pairs (0 0 1 1 0 0 ...): each cell's two nearest
    # neighbours are one of each batch, so every neighbourhood is half and half
    n = 400
    X = np.c_[np.arange(n, dtype=float), np.zeros(n)]
    pairs = (np.arange(n) // 2) % 2
    assert cm.entropy_batch_mixing(X, pairs, n_neighbors=2) == pytest.approx(np.log(2))
    alternating = np.arange(n) % 2
    # two batches far apart: no mixing at all
    X2 = np.c_[np.arange(n) + 1000.0 * (np.arange(n) >= n // 2), np.zeros(n)]
    halves = (np.arange(n) >= n // 2).astype(int)
    assert cm.entropy_batch_mixing(X2, halves, n_neighbors=20) == 0.0
    assert cm.knn_purity(X2, halves, n_neighbors=20) == 1.0
    # alternating labels: no neighbour shares the label, but for the two end cells (1 of 2)
    assert cm.knn_purity(X, alternating, n_neighbors=2) == pytest.approx(0.5 / (n / 2))


def test_lisi_closed_form():
    # each cell's 4 other neighbours at the same distance, two of each category: LISI = 2
    n = 10
    idx = np.array([[i] + [(i + k) % n for k in (1, 2, 3, 4)] for i in range(n)])
    dist = np.c_[np.zeros(n), np.ones((n, 4))]
    labels = np.array([0, 0, 1, 1] * 3)[:n]
    nn = cm.Neighbors(idx, dist)
    lisi = cm.lisi(nn, labels, perplexity=2)
    expected = [1 / (np.bincount(labels[idx[i, 1:]], minlength=2) / 4).__pow__(2).sum()
                for i in range(n)]
    np.testing.assert_allclose(lisi, expected)
    X, labels, batch = blobs(300)
    assert cm.ilisi(X, batch) > 0.8  # batches are mixed in these blobs
    assert cm.clisi(X, labels) > 0.9  # and labels are separated


def test_graph_connectivity_split_label():
    # one label in two far clumps: half of its cells in the largest component
    line = np.c_[np.arange(50.0), np.zeros(50)]
    X = np.r_[line, line + 1000]
    assert cm.graph_connectivity(X, np.zeros(100)) == pytest.approx(0.5)
    assert cm.graph_connectivity(X, np.r_[np.zeros(50), np.ones(50)]) == pytest.approx(1.0)


def test_pca_equals_sklearn_up_to_sign():
    from sklearn.decomposition import PCA

    X, _, _ = blobs(120, dims=8)
    ours = cm.pca(X, 3)
    theirs = PCA(3).fit_transform(X)
    np.testing.assert_allclose(np.abs(ours), np.abs(theirs), atol=1e-9)


def test_score_embedding_and_integration_scores(tiny):
    X, labels, batch = blobs(200)
    scores = cm.score_embedding(X, batch=batch, labels=labels)
    assert set(scores) == set(cm.BATCH_METRICS + cm.LABEL_METRICS)
    assert all(np.isfinite(v) for v in scores.values())
    tiny.obsm["X_test"] = np.random.default_rng(0).normal(size=(tiny.n_obs, 4))
    s = cm.integration_scores(tiny, use_rep="X_test", batch_key="batch",
                              metrics=["ilisi", "entropy_batch_mixing"])
    assert list(s.index) == ["ilisi", "entropy_batch_mixing"]


def test_bad_inputs_name_the_problem(tiny):
    X, labels, batch = blobs(50)
    with pytest.raises(ValueError, match="one value per cell"):
        cm.silhouette_label(X, labels[:-1])
    with pytest.raises(ValueError, match="NaN"):
        cm.knn_purity(np.full((5, 2), np.nan), np.zeros(5))
    with pytest.raises(ValueError, match="two clusters"):
        cm.silhouette_label(X, np.zeros(50))
    with pytest.raises(ValueError, match="needs the label"):
        cm.score_embedding(X, batch=batch, metrics=["clisi"])
    with pytest.raises(ValueError, match="Unknown metric"):
        cm.score_embedding(X, batch=batch, metrics=["lisi_typo"])
    with pytest.raises(KeyError, match="obsm"):
        cm.integration_scores(tiny, use_rep="X_missing", batch_key="batch")


# ------------------------------------------------------------------ imputation
def test_hide_counts_hides_the_share_and_keeps_originals(tiny):
    before = tiny.X.copy()
    corrupted = cm.hide_counts(tiny, rate=0.2, seed=1, copy=True)
    assert (tiny.X != before).nnz == 0  # copy=True leaves the input alone
    rec = corrupted.uns["cellvi_hidden"]
    rows, cols, vals = rec["rows"], rec["cols"], rec["values"]
    assert abs(len(vals) - 0.2 * before.nnz) <= 0.01 * before.nnz
    np.testing.assert_array_equal(vals, before[rows, cols].A1)
    assert (corrupted.X[rows, cols].A1 == 0).all()
    diff = (corrupted.X != before).tocoo()
    assert diff.nnz == len(vals)  # nothing else changed
    assert (np.asarray(corrupted.X.sum(1)).ravel() > 0).all()  # no cell emptied
    thinned = cm.hide_counts(tiny, rate=0.2, mode="binomial", seed=1, copy=True)
    rec = thinned.uns["cellvi_hidden"]
    assert (thinned.X[rec["rows"], rec["cols"]].A1 <= rec["values"]).all()
    dense = tiny.copy()
    dense.X = before.toarray()
    cm.hide_counts(dense, rate=0.2, seed=1)
    np.testing.assert_array_equal(dense.X, corrupted.X.toarray())
    with pytest.raises(ValueError, match="rate"):
        cm.hide_counts(tiny, rate=1.5)


class _Oracle:
    """A 'model' whose expected counts are the true counts: a perfect imputation."""

    def __init__(self, adata, truth):
        self.adata, self.truth = adata, truth

    def get_likelihood_parameters(self, adata=None, indices=None):
        return {"mean": self.truth[indices]}


def test_imputation_score_of_a_perfect_and_a_trained_model(tiny):
    truth = tiny.X.toarray()
    corrupted = cm.hide_counts(tiny, rate=0.1, seed=0, copy=True)
    perfect = cm.imputation_score(_Oracle(corrupted, truth))
    assert perfect["median_absolute_error"] == 0 and perfect["pearson"] == pytest.approx(1)
    scores, model = cm.imputation_benchmark(
        cellvi.model.SCVI, tiny, rate=0.1, setup_kwargs={"batch_key": "batch"},
        train_kwargs={"max_epochs": 30})
    values = model.adata.uns["cellvi_hidden"]["values"]
    # better than imputing zero (the corrupted value), whose median error is the median count
    assert scores["median_absolute_error"] < np.median(values)
    assert scores["spearman"] > 0.3
    assert scores["n_entries"] == len(values)


def test_imputation_score_needs_the_record(tiny):
    with pytest.raises(KeyError, match="hide_counts"):
        cm.imputation_score(_Oracle(tiny, None))


# ------------------------------------------------------------------ scib-metrics itself
@pytest.fixture(scope="module")
def scib():
    return pytest.importorskip("scib_metrics", reason="scib-metrics (the metrics extra) is "
                               "not installed")


def test_equal_to_scib_metrics(scib):
    from scib_metrics.nearest_neighbors import NeighborsResults

    X, labels, batch = blobs(300, n_labels=4, n_batches=3, batch_shift=1.0, seed=2)
    nn = cm.nearest_neighbors(X, 90)
    theirs = NeighborsResults(indices=nn.indices, distances=nn.distances.astype(np.float32))
    assert cm.ilisi(nn, batch) == pytest.approx(float(scib.ilisi_knn(theirs, batch)), abs=1e-5)
    assert cm.clisi(nn, labels) == pytest.approx(float(scib.clisi_knn(theirs, labels)),
                                                 abs=1e-5)
    np.testing.assert_allclose(cm.lisi(nn, labels), scib.lisi_knn(theirs, labels), rtol=1e-4)
    assert cm.silhouette_label(X, labels) == pytest.approx(
        float(scib.silhouette_label(X, labels)), abs=1e-6)
    assert cm.silhouette_batch(X, labels, batch) == pytest.approx(
        float(scib.silhouette_batch(X, labels, batch)), abs=1e-6)
    assert cm.graph_connectivity(nn.subset_neighbors(15), labels) == pytest.approx(
        float(scib.graph_connectivity(theirs.subset_neighbors(15), labels)))
    # the scores from an embedding equal theirs from pynndescent's neighbours
    pynn = scib.nearest_neighbors.pynndescent(X, n_neighbors=90, random_state=0)
    assert cm.ilisi(X, batch) == pytest.approx(float(scib.ilisi_knn(pynn, batch)), abs=1e-4)
    # k-means NMI/ARI: the same when both find the clusters
    Xs, ls, _ = blobs(300, shift=12.0)
    ours = cm.nmi_ari(Xs, ls)
    theirs = scib.nmi_ari_cluster_labels_kmeans(Xs, ls)
    assert ours["nmi"] == pytest.approx(theirs["nmi"]) and ours["ari"] == pytest.approx(
        theirs["ari"])


def test_scib_benchmark_aggregates(scib, tiny):
    X, labels, batch = blobs(tiny.n_obs, seed=3)
    tiny.obs["label"] = labels
    tiny.obsm["X_emb"] = X
    table = cm.scib_benchmark(tiny, batch_key="batch", labels_key="label",
                              embedding_keys=["X_emb"])
    assert {"Batch correction", "Bio conservation", "Total"} <= set(table.columns)
    row = table.loc["X_emb"]
    assert float(row["Total"]) == pytest.approx(0.4 * float(row["Batch correction"])
                                                + 0.6 * float(row["Bio conservation"]))
    assert float(row["Silhouette label"]) == pytest.approx(cm.silhouette_label(X, labels),
                                                           abs=1e-5)
    assert "X_pre" not in tiny.obsm  # the user's AnnData is left alone


def test_sparse_embedding_accepted():
    X, labels, _ = blobs(60)
    assert cm.knn_purity(sp.csr_matrix(X), labels) == cm.knn_purity(X, labels)
