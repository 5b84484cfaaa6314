"""scvi-tools' DE options and columns, and importance-weighted normalised expression."""

import numpy as np
import pytest
import torch
from conftest import simulate

from cellvi.model import SCVI


@pytest.fixture(scope="module")
def model():
    adata = simulate(300, 40, 3, 2, seed=3)
    SCVI.setup_anndata(adata, batch_key="batch")
    m = SCVI(adata, n_latent=4, n_hidden=32)
    m.train(max_epochs=15, seed=0, progress_bar=False)
    return m


def test_query_strings_select_the_same_cells_as_masks(model):
    obs = model.adata.obs
    g = str(obs["cell_type"].iloc[0])
    mask = (obs["cell_type"] == g).to_numpy()
    a = model.differential_expression(idx1=mask, seed=1, silent=True)
    b = model.differential_expression(idx1=f"cell_type == '{g}'", seed=1, silent=True)
    np.testing.assert_array_equal(a["proba_de"].to_numpy(), b["proba_de"].to_numpy())
    with pytest.raises(ValueError, match="not a valid query of adata.obs"):
        model.differential_expression(idx1="no_such_column == 1", silent=True)
    with pytest.raises(ValueError, match="True or False per cell"):
        model.differential_expression(idx1="cell_type", silent=True)


def test_scvi_tools_columns_and_options(model):
    g = str(model.adata.obs["cell_type"].iloc[0])
    van = model.differential_expression(groupby="cell_type", group1=g, seed=1, silent=True)
    np.testing.assert_allclose(van["proba_m1"] + van["proba_m2"], 1.0)
    np.testing.assert_array_equal(van["proba_m1"], van["proba_de"])
    ch = model.differential_expression(groupby="cell_type", group1=g, mode="change", seed=1,
                                       silent=True, pseudocounts=1e-4)
    assert (ch["delta"] == 0.25).all() and (ch["pseudocounts"] == 1e-4).all()
    short = model.differential_expression(groupby="cell_type", group1=g, mode="change", seed=1,
                                          silent=True, pseudocount=1e-4, all_stats=False)
    assert "raw_mean1" in ch and "raw_mean1" not in short
    np.testing.assert_array_equal(short["proba_de"], ch["proba_de"])
    with pytest.raises(ValueError, match="disagree"):
        model.differential_expression(groupby="cell_type", group1=g, pseudocount=0.1,
                                      pseudocounts=0.2, silent=True)


def test_importance_weighted_expression(model):
    torch.manual_seed(5)
    one = model.get_normalized_expression(n_samples=1, return_numpy=True)
    torch.manual_seed(5)
    one_iw = model.get_normalized_expression(n_samples=1, weights="importance",
                                             return_numpy=True)
    np.testing.assert_allclose(one_iw, one, atol=1e-6)  # one draw per cell: weight 1
    uni = model.get_normalized_expression(n_samples=30, return_numpy=True)
    imp = model.get_normalized_expression(n_samples=30, weights="importance",
                                          return_numpy=True)
    assert imp.shape == uni.shape
    np.testing.assert_allclose(imp.sum(1), 1.0, rtol=1e-4)  # still proportions per cell
    # a reweighting of the same draws (truncated: at least ~sqrt(30) effective draws per cell)
    assert not np.allclose(imp, uni)
    assert np.corrcoef(imp.ravel(), uni.ravel())[0, 1] > 0.9
    draws = model.get_normalized_expression(n_samples=5, weights="importance",
                                            return_mean=False, indices=[0, 1, 2])
    assert draws.shape == (5, 3, model.adata.n_vars)
    with pytest.raises(ValueError, match="numeric library_size"):
        model.get_normalized_expression(weights="importance", library_size="latent")
    with pytest.raises(ValueError, match="weights must be"):
        model.get_normalized_expression(weights="bogus")
