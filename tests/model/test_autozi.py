"""AUTOZI: the decision rule finds the zero-inflated genes; modes, queries, save/load, errors."""

import inspect

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import cellvi
from cellvi.model import AUTOZI


def simulate_zi(n_cells=500, n_genes=40, n_zi=15, n_batches=1, seed=0):
    """NB counts (3 cell types) with extra zeros (probability 0.4-0.7) in ``n_zi`` genes."""
    rng = np.random.default_rng(seed)
    types = rng.integers(0, 3, n_cells)
    batches = rng.integers(0, n_batches, n_cells)
    base = rng.uniform(np.log(2), np.log(25), n_genes)
    log_mean = base + rng.normal(0, 0.7, (3, n_genes))[types]
    log_mean += rng.normal(0, 0.3, (n_batches, n_genes))[batches]
    mu = np.exp(log_mean) * rng.lognormal(0, 0.2, n_cells)[:, None]
    counts = rng.poisson(rng.gamma(5.0, mu / 5.0))
    is_zi = np.zeros(n_genes, dtype=bool)
    is_zi[rng.choice(n_genes, n_zi, replace=False)] = True
    pi = np.where(is_zi, rng.uniform(0.4, 0.7, n_genes), 0.0)
    counts = counts * (rng.random(counts.shape) >= pi)
    adata = anndata.AnnData(sp.csr_matrix(counts.astype(np.float32)))
    adata.obs_names = [f"c{i}" for i in range(n_cells)]
    adata.var_names = [f"g{j}" for j in range(n_genes)]
    adata.obs["batch"] = pd.Categorical([f"b{b}" for b in batches])
    adata.obs["cell_type"] = pd.Categorical([f"t{t}" for t in types])
    return adata, is_zi


TRAIN = dict(progress_bar=False, seed=0, device="cpu")


def test_decision_rule_finds_the_zero_inflated_genes():
    from sklearn.metrics import roc_auc_score

    adata, is_zi = simulate_zi()
    AUTOZI.setup_anndata(adata)
    model = AUTOZI(adata, n_hidden=32, n_latent=4)
    model.train(max_epochs=100, lr=1e-2, **TRAIN)
    table = model.get_zero_inflation()
    assert list(table.index) == list(adata.var_names)
    assert list(table.columns) == ["prob_zero_inflated", "delta_mean", "alpha_posterior",
                                   "beta_posterior", "is_zero_inflated"]
    called = table["is_zero_inflated"].to_numpy()
    assert np.array_equal(called, table["prob_zero_inflated"].to_numpy() > 0.5)
    tpr, fpr = called[is_zi].mean(), called[~is_zi].mean()
    assert tpr >= 0.8 and fpr <= 0.1, (tpr, fpr)
    assert roc_auc_score(is_zi, table["prob_zero_inflated"]) >= 0.95
    # the NB weight's posterior mean is low where zero-inflation was found
    assert table.loc[called, "delta_mean"].max() < table.loc[~called, "delta_mean"].min() + 0.5
    ab = model.get_alphas_betas()
    assert set(ab) == {"alpha_posterior", "beta_posterior", "alpha_prior", "beta_prior"}
    np.testing.assert_allclose(table["alpha_posterior"], ab["alpha_posterior"], rtol=1e-6)
    # the history carries the global KL per cell, and the step is autograd's
    hist = model.history
    assert (hist["kl_global_train"] > 0).all() and (hist["kl_global_validation"] > 0).all()
    assert model.train_settings["training_step"].startswith("autograd")
    assert hist["elbo_validation"].iloc[-1] > hist["elbo_validation"].iloc[0]
    assert "zero_inflation='gene'" in repr(model) and "Beta(0.5, 0.5)" in repr(model)


@pytest.mark.parametrize("mode, setup, prior", [
    ("gene-batch", {"batch_key": "batch"}, None),
    ("gene-label", {"labels_key": "cell_type"}, None),
    ("gene-cell", {}, 0.5),
    ("gene-cell", {"batch_key": "batch"}, None),
    ("gene", {}, None),
])
def test_each_mode_trains_through_the_model(mode, setup, prior):
    adata, _ = simulate_zi(n_cells=240, n_genes=24, n_zi=8, n_batches=2, seed=1)
    AUTOZI.setup_anndata(adata, **setup)
    model = AUTOZI(adata, n_hidden=16, n_latent=3, zero_inflation=mode, alpha_prior=prior,
                   beta_prior=prior)
    model.train(max_epochs=25, lr=1e-2, **TRAIN)
    hist = model.history
    assert np.isfinite(hist["elbo_validation"]).all()
    assert hist["elbo_validation"].iloc[-1] > hist["elbo_validation"].iloc[0] + 1.0
    global_kl = hist["kl_global_train"]
    assert (global_kl == 0).all() if mode == "gene-cell" else (global_kl > 0).all()
    assert model.train_settings["training_step"].startswith("autograd")
    table = model.get_zero_inflation()
    ab = model.get_alphas_betas()
    if mode in ("gene-batch", "gene-label"):
        level = "batch" if mode == "gene-batch" else "label"
        assert table.index.names == ["gene", level] and len(table) == 24 * 2 * (
            1 if mode == "gene-batch" else 1.5)
        assert ab["alpha_posterior"].shape == (24, 2 if mode == "gene-batch" else 3)
        assert ab["alpha_prior"].shape == (2 if mode == "gene-batch" else 3,)
    elif mode == "gene-cell":
        assert ab["alpha_posterior"].shape == (240, 24)
        assert "fraction_cells_zero_inflated" in table and len(table) == 24
    if prior is None:  # the prior was learned
        assert not np.allclose(ab["alpha_prior"], ab["beta_prior"])
    assert np.isfinite(model.get_latent_representation()).all()
    expr = model.get_normalized_expression(library_size="latent", n_samples=2)
    assert expr.shape == (240, 24) and np.isfinite(expr.to_numpy()).all()
    if mode == "gene-batch":  # the queries that decode as another batch, and DE
        both = model.get_normalized_expression(transform_batch=["b0", "b1"], n_samples=2)
        assert np.isfinite(both.to_numpy()).all()
        de = model.differential_expression(groupby="cell_type", n_samples=50, silent=True)
        assert len(de) == 24 * 3 and np.isfinite(de["lfc_mean"]).all()


def test_save_load_reproduces_the_model_bit_for_bit(tmp_path):
    adata, _ = simulate_zi(n_cells=200, n_genes=20, n_zi=6, n_batches=2, seed=2)
    AUTOZI.setup_anndata(adata, batch_key="batch")
    model = AUTOZI(adata, n_hidden=16, n_latent=3, zero_inflation="gene-batch",
                   alpha_prior=None, beta_prior=None)
    model.train(max_epochs=5, **TRAIN)
    model.save(tmp_path / "m", save_anndata=True)
    loaded = AUTOZI.load(tmp_path / "m")
    for k, v in model.get_alphas_betas().items():
        assert np.array_equal(v, loaded.get_alphas_betas()[k]), k
    pd.testing.assert_frame_equal(model.get_zero_inflation(), loaded.get_zero_inflation())
    assert np.array_equal(model.get_latent_representation(), loaded.get_latent_representation())
    torch.manual_seed(5)
    a = model.get_elbo()
    torch.manual_seed(5)
    assert a == loaded.get_elbo()
    assert loaded.module.config == model.module.config
    pd.testing.assert_frame_equal(model.history, loaded.history)


def test_marginal_ll_integrates_the_weights():
    adata, _ = simulate_zi(n_cells=120, n_genes=16, n_zi=5, seed=3)
    AUTOZI.setup_anndata(adata)
    model = AUTOZI(adata, n_hidden=16, n_latent=3)
    model.train(max_epochs=10, lr=1e-2, **TRAIN)
    torch.manual_seed(0)
    mll = model.get_marginal_ll(n_mc_samples=40, n_delta_samples=4)
    elbo = model.get_elbo()
    assert np.isfinite(mll) and mll > elbo - 2.0
    with pytest.raises(ValueError, match="does not split into cells"):
        model.get_marginal_ll(n_mc_samples=4, return_mean=False)
    with pytest.raises(ValueError, match="n_delta_samples"):
        model.get_marginal_ll(n_mc_samples=4, n_delta_samples=8)
    cell = AUTOZI(adata, n_hidden=16, n_latent=3, zero_inflation="gene-cell")
    values = cell.get_marginal_ll(n_mc_samples=8, return_mean=False)
    assert values.shape == (120,) and np.isfinite(values).all()


def test_api_names_and_defaults_follow_scvi_tools():
    params = inspect.signature(AUTOZI).parameters
    expected = dict(n_hidden=128, n_latent=10, n_layers=1, dropout_rate=0.1, dispersion="gene",
                    latent_distribution="normal", alpha_prior=0.5, beta_prior=0.5,
                    minimal_dropout=0.01, zero_inflation="gene", use_observed_lib_size=True)
    assert list(params)[0] == "adata"
    for name, default in expected.items():
        assert params[name].default == default, name
    assert cellvi.model.AUTOZI is AUTOZI and cellvi.module.AutoZIVAE is not None


def test_bad_input_raises_clear_errors():
    adata, _ = simulate_zi(n_cells=60, n_genes=10, n_zi=3)
    AUTOZI.setup_anndata(adata)
    with pytest.raises(ValueError, match="labels_key"):
        AUTOZI(adata, zero_inflation="gene-label")
    with pytest.raises(ValueError, match="batch_key"):
        AUTOZI(adata, zero_inflation="gene-batch")
    with pytest.raises(ValueError, match="NB/ZINB mixture"):
        AUTOZI(adata, gene_likelihood="nb")
    with pytest.raises(ValueError, match="alpha_prior"):
        AUTOZI(adata, alpha_prior=2.0)
    with pytest.raises(TypeError, match="no option"):
        AUTOZI(adata, zero_inflaton="gene")
    model = AUTOZI(adata)
    with pytest.raises(ValueError, match="threshold"):
        model.get_zero_inflation(threshold=1.5)
    with pytest.raises(TypeError, match="n_input"):
        AUTOZI(adata, n_input=3)
