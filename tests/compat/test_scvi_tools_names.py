"""scvi-tools' names and shapes work with `import cellvi as scvi`."""

import numpy as np
import pandas as pd
import pytest

import cellvi as scvi


@pytest.fixture
def adata():
    a = scvi.data.synthetic_iid(batch_size=150, n_genes=60, n_proteins=0, n_regions=0)
    scvi.model.SCVI.setup_anndata(a, batch_key="batch", labels_key="labels")
    return a


def test_tutorial_training_keywords(adata):
    model = scvi.model.SCVI(adata, n_latent=4)
    with pytest.warns(UserWarning, match="no meaning in cellvi"):
        model.train(max_epochs=3, check_val_every_n_epoch=1, accelerator="cpu", devices=1,
                    train_size=0.8, validation_size=0.1, shuffle_set_split=True,
                    early_stopping=False, early_stopping_monitor="elbo_validation",
                    early_stopping_min_delta=0.0, plan_kwargs={"lr": 2e-3},
                    datasplitter_kwargs={"drop_last": False}, load_sparse_tensor=True,
                    enable_progress_bar=False, logger=True, log_every_n_steps=5)
    n = adata.n_obs
    assert len(model.train_indices) == int(np.ceil(0.8 * n))
    assert len(model.validation_indices) == int(np.floor(0.1 * n))
    assert len(model.test_indices) == n - len(model.train_indices) - len(model.validation_indices)
    assert model.train_settings["lr"] == 2e-3 and model.train_settings["device"] == "cpu"
    with pytest.raises(TypeError, match="unknown option"):
        model.train(max_epochs=1, not_an_option=3, progress_bar=False)


def test_external_indexing_and_ordered_split(adata):
    model = scvi.model.SCVI(adata, n_latent=4)
    train, val = np.arange(0, 200), np.arange(200, 250)
    model.train(max_epochs=1, progress_bar=False,
                datasplitter_kwargs={"external_indexing": [train, val]})
    np.testing.assert_array_equal(model.train_indices, train)
    np.testing.assert_array_equal(model.validation_indices, val)
    model.train(max_epochs=1, progress_bar=False, shuffle_set_split=False, train_size=0.5)
    np.testing.assert_array_equal(model.train_indices, np.arange(150))
    with pytest.raises(ValueError, match="overlap"):
        model.train(max_epochs=1, datasplitter_kwargs={"external_indexing": [train, train]})


def test_history_has_scvi_tools_keys_and_plots(adata):
    model = scvi.model.SCVI(adata, n_latent=4)
    model.train(max_epochs=4, progress_bar=False)
    for key in ("elbo_train", "elbo_validation", "reconstruction_loss_train",
                "kl_local_train", "kl_global_train", "train_loss_epoch", "validation_loss"):
        assert key in model.history.keys()
    train_elbo = model.history["elbo_train"][1:]
    test_elbo = model.history["elbo_validation"]
    import matplotlib

    matplotlib.use("Agg")
    ax = train_elbo.plot()
    test_elbo.plot(ax=ax)
    np.testing.assert_array_equal(model.history["train_loss_epoch"], model.history["loss_train"])


def test_early_stopping_on_a_loss_monitor_minimises(adata):
    model = scvi.model.SCVI(adata, n_latent=4)
    model.train(max_epochs=40, early_stopping=True, early_stopping_monitor="validation_loss",
                early_stopping_patience=3, progress_bar=False, plan_kwargs={"lr": 3e-2})
    kept = model.train_settings["kept_epoch"]
    assert kept == int(model.history["validation_loss"].idxmin())


def test_settings_seed_makes_runs_identical(adata, monkeypatch):
    monkeypatch.setattr(scvi.settings, "seed", 3)
    a = scvi.model.SCVI(adata, n_latent=4).train(max_epochs=2, progress_bar=False)
    b = scvi.model.SCVI(adata, n_latent=4).train(max_epochs=2, progress_bar=False)
    np.testing.assert_array_equal(a.validation_indices, b.validation_indices)
    np.testing.assert_array_equal(a.get_latent_representation(), b.get_latent_representation())
    for name, value in (("batch_size", 64), ("dl_num_workers", 0), ("verbosity", "INFO")):
        monkeypatch.setattr(scvi.settings, name, value)
    with pytest.raises(ValueError, match="settings.seed"):
        scvi.settings.seed = -1


def test_model_helpers(adata, tmp_path, capsys):
    model = scvi.model.SCVI(adata, n_latent=4).train(max_epochs=2, progress_bar=False)
    model.view_anndata_setup()
    assert "batch" in capsys.readouterr().out
    assert "SCVI model" in model.summary_string
    model.save(tmp_path / "m")
    scvi.model.SCVI.view_setup_args(tmp_path / "m")
    assert "categorical_obs" in capsys.readouterr().out
    assert model.to_device("cpu") is model
    mean, var = model.get_latent_representation(return_dist=True)
    assert mean.shape == var.shape == (adata.n_obs, 4) and (var > 0).all()
    assert model.get_normalized_expression(n_samples_overall=30).shape == (30, adata.n_vars)
    sample = model.posterior_predictive_sample(transform_batch="batch_1")
    assert sample.shape == (adata.n_obs, adata.n_vars)
    elbo = model.get_elbo(return_mean=False)
    assert elbo.shape == (adata.n_obs,) and np.isclose(elbo.mean(), model.get_elbo(), atol=5)
    assert set(model.get_reconstruction_error()) == {"reconstruction_loss"}
    corr = model.get_feature_correlation_matrix(rna_size_factor=1000, n_samples=2)
    assert corr.shape == (adata.n_vars, adata.n_vars)
    linear = scvi.model.LinearSCVI(adata, n_latent=3)
    assert linear.n_latent == 3


def test_data_helpers(tmp_path):
    a = scvi.data.synthetic_iid(n_batches=3, n_labels=4, sparse_format="csr_matrix")
    assert a.shape == (600, 100) and a.obs["batch"].nunique() == 3
    assert a.obs["labels"].nunique() == 4 and a.obsm["protein_expression"].shape == (600, 100)
    assert len(a.uns["protein_names"]) == 100 and a.obsm["accessibility"].shape == (600, 100)
    table = scvi.data.poisson_gene_selection(a, n_top_genes=10, batch_key="batch",
                                             inplace=False)
    assert table["highly_variable"].sum() == 10 and "highly_variable" not in a.var
    assert {"observed_fraction_zeros", "expected_fraction_zeros",
            "prob_zero_enrichment"} <= set(table.columns)
    # genes with extra zeros are the ones selected
    rng = np.random.default_rng(0)
    X = rng.poisson(5.0, (500, 40)).astype(np.float32)
    X[rng.random((500, 40)) < 0.5 * (np.arange(40) < 8)] = 0  # 8 zero-inflated genes
    import anndata

    b = anndata.AnnData(X=X)
    scvi.data.poisson_gene_selection(b, n_top_genes=8, n_samples=2000)
    assert b.var["highly_variable"].to_numpy()[:8].all()
    path = tmp_path / "a.h5ad"
    a.write_h5ad(path)
    assert scvi.data.read_h5ad(path).shape == a.shape
    pd.DataFrame(a.X.toarray()[:5], index=a.obs_names[:5], columns=a.var_names).to_csv(
        tmp_path / "t.csv")
    assert scvi.data.read_csv(tmp_path / "t.csv").shape == (5, 100)
