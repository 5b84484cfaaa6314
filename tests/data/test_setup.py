"""Bad input gets a clear error; nothing is silently changed."""

import anndata
import numpy as np
import pytest
import scipy.sparse as sp

from cellvi.data import get_summary
from cellvi.model import SCVI


def _adata(X):
    return anndata.AnnData(X=X.astype(np.float32))


def test_summary_records_categories_and_library_prior(tiny):
    before = tiny.X.copy()
    SCVI.setup_anndata(tiny, batch_key="batch", labels_key="cell_type")
    s = get_summary(tiny)
    assert s.batch_categories == ["batch0", "batch1"]
    assert s.label_categories == ["type0", "type1", "type2"]
    assert len(s.library_log_means) == 2 and all(v > 0 for v in s.library_log_vars)
    assert (tiny.X != before).nnz == 0


@pytest.mark.parametrize(
    ("values", "match"),
    [
        (-1.0, "negative"),
        (np.nan, "NaN"),
        (np.inf, "infinite"),
    ],
)
def test_invalid_counts(tiny, values, match):
    X = tiny.X.toarray()
    X[3, 4] = values
    with pytest.raises(ValueError, match=match):
        SCVI.setup_anndata(_adata(X))


def test_log_transformed_and_normalised_data_refused(tiny):
    X = tiny.X.toarray()
    with pytest.raises(ValueError, match="log-transformed.*raw counts"):
        SCVI.setup_anndata(_adata(np.log1p(X)))
    norm = X / X.sum(1, keepdims=True) * 1e4
    with pytest.raises(ValueError, match="equal totals.*layer="):
        SCVI.setup_anndata(_adata(norm))


def test_estimated_counts_warn(tiny):
    X = tiny.X.toarray() * 1.5 + 0.25 * (tiny.X.toarray() > 0)
    with pytest.warns(UserWarning, match="estimated counts"):
        SCVI.setup_anndata(_adata(X))


def test_layer_and_keys(tiny):
    with pytest.raises(KeyError, match="Layer 'counts'"):
        SCVI.setup_anndata(tiny, layer="counts")
    with pytest.raises(KeyError, match="'donor' is not a column"):
        SCVI.setup_anndata(tiny, batch_key="donor")
    tiny.layers["counts"] = tiny.X.copy()
    tiny.X = sp.csr_matrix(np.log1p(tiny.X.toarray()))
    SCVI.setup_anndata(tiny, layer="counts", batch_key="batch")  # raw counts in a layer: fine


def test_nan_covariates(tiny):
    tiny.obs["age"] = np.arange(tiny.n_obs, dtype=float)
    tiny.obs.loc[tiny.obs_names[5], "age"] = np.nan
    with pytest.raises(ValueError, match="age"):
        SCVI.setup_anndata(tiny, continuous_covariate_keys=["age"])
    tiny.obs["batch"] = tiny.obs["batch"].astype(object)
    tiny.obs.loc[tiny.obs_names[2], "batch"] = None
    with pytest.raises(ValueError, match="missing value"):
        SCVI.setup_anndata(tiny, batch_key="batch")


def test_empty_cells_refused_when_library_observed(tiny):
    X = tiny.X.toarray()
    X[7] = 0
    adata = _adata(X)
    SCVI.setup_anndata(adata)
    with pytest.raises(ValueError, match="no counts.*filter_cells"):
        SCVI(adata)
    SCVI(adata, use_observed_lib_size=False)  # a modelled library copes with empty cells


def test_not_set_up(tiny):
    with pytest.raises(ValueError, match="setup_anndata"):
        SCVI(tiny)


def test_empty_anndata():
    with pytest.raises(ValueError, match="empty"):
        SCVI.setup_anndata(anndata.AnnData(np.zeros((0, 3), dtype=np.float32)))
