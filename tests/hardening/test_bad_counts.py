"""Bad counts and bad columns get clear errors at set-up; nothing is changed."""

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cellvi.model import SCANVI, SCVI


def _adata(X, **obs):
    a = anndata.AnnData(X=X)
    for k, v in obs.items():
        a.obs[k] = v
    return a


@pytest.mark.parametrize(("X", "match"), [
    (np.array([[1.0, -2.0], [3.0, 4.0]]), "negative"),
    (np.array([[1.0, np.nan], [3.0, 4.0]]), "NaN or infinite"),
    (sp.csr_matrix(np.array([[1.0, np.inf], [3.0, 4.0]])), "NaN or infinite"),
    (np.log1p(np.array([[10.0, 20.0], [30.0, 40.0], [5.0, 1.0]])), "log-transformed"),
    (np.zeros((0, 3)), "empty"),
])
def test_bad_counts(X, match):
    before = X.copy()
    with pytest.raises(ValueError, match=match):
        SCVI.setup_anndata(_adata(X))
    if X.size:
        np.testing.assert_array_equal(X.toarray() if sp.issparse(X) else X,
                                      before.toarray() if sp.issparse(before) else before)


def test_counts_in_any_numeric_type_are_read(tiny):
    for X in (tiny.X.toarray().astype(np.int32), tiny.X.toarray().astype(np.float64),
              sp.csc_matrix(tiny.X), sp.coo_matrix(tiny.X).tocsr().astype(np.int64)):
        a = tiny.copy()
        a.X = X
        SCVI.setup_anndata(a)
        z = SCVI(a, n_hidden=8).get_latent_representation()
        assert np.isfinite(z).all()


def test_empty_cells_with_the_observed_library(tiny):
    X = tiny.X.toarray()
    X[3] = 0
    a = _adata(X)
    SCVI.setup_anndata(a)
    with pytest.raises(ValueError, match="have no counts.*row 3"):
        SCVI(a)
    SCVI(a, use_observed_lib_size=False)  # a modelled library size copes with them


@pytest.mark.parametrize(("column", "match"), [
    (["a", None] * 50 + ["a"] * 100, "missing value"),
    ([np.nan] * 200, "missing value"),
])
def test_bad_batch_columns(tiny, column, match):
    tiny.obs["b"] = pd.Series(column, index=tiny.obs_names, dtype=object)
    with pytest.raises(ValueError, match=match):
        SCVI.setup_anndata(tiny, batch_key="b")


def test_bad_continuous_covariates_and_size_factors(tiny):
    tiny.obs["x"] = ["a"] * tiny.n_obs
    with pytest.raises(ValueError, match="non-numeric"):
        SCVI.setup_anndata(tiny, continuous_covariate_keys=["x"])
    tiny.obs["sf"] = np.r_[np.zeros(1), np.ones(tiny.n_obs - 1)]
    with pytest.raises(ValueError, match="finite and positive"):
        SCVI.setup_anndata(tiny, size_factor_key="sf")


def test_a_query_with_unknown_batches_or_labels(tiny):
    SCVI.setup_anndata(tiny, batch_key="batch")
    model = SCVI(tiny, n_hidden=8)
    other = tiny.copy()
    other.obs["batch"] = "new-batch"
    with pytest.raises(ValueError, match="categories the model was not set up with"):
        model.get_normalized_expression(other)  # decoding needs a known batch
    tiny.obs["labels"] = tiny.obs["cell_type"].astype(str)
    SCANVI.setup_anndata(tiny, "labels", "Unknown")
    scanvi = SCANVI(tiny, n_hidden=8)
    query = tiny.copy()
    query.obs["labels"] = "a new type"
    with pytest.raises(ValueError, match="labels the model does not know"):
        scanvi.predict(query)
