"""SCVI's user-facing API: training history, queries, save/load, reproducibility."""

import anndata
import numpy as np
import pandas as pd
import pytest

from cellvi.model import SCVI


@pytest.fixture
def trained(tiny):
    SCVI.setup_anndata(tiny, batch_key="batch")
    model = SCVI(tiny, n_latent=4)
    model.train(max_epochs=3, seed=0, progress_bar=False)
    return model


def test_default_epochs_and_split(tiny):
    SCVI.setup_anndata(tiny, batch_key="batch")
    model = SCVI(tiny)
    model.train(max_epochs=2, train_size=0.75, seed=0, progress_bar=False)
    assert len(model.train_indices) == 150 and len(model.validation_indices) == 50
    assert set(model.train_indices).isdisjoint(model.validation_indices)
    hist = model.history
    for col in ["elbo_train", "elbo_validation", "reconstruction_loss_train",
                "reconstruction_loss_validation", "kl_local_train", "kl_local_validation"]:
        assert col in hist and len(hist[col]) == 2
    assert (hist["elbo_validation"] < 0).all()
    np.testing.assert_allclose(
        hist["elbo_train"], -(hist["reconstruction_loss_train"] + hist["kl_local_train"])
    )


def test_same_seed_same_model(tiny):
    SCVI.setup_anndata(tiny, batch_key="batch")
    a, b = SCVI(tiny), SCVI(tiny)
    a.train(max_epochs=2, seed=3, progress_bar=False)
    b.train(max_epochs=2, seed=3, progress_bar=False)
    np.testing.assert_array_equal(a.get_latent_representation(), b.get_latent_representation())


def test_queries_shapes_and_conventions(trained, tiny):
    z = trained.get_latent_representation()
    assert z.shape == (200, 4)
    zs = trained.get_latent_representation(give_mean=False, indices=[0, 1, 2])
    assert zs.shape == (3, 4)
    expr = trained.get_normalized_expression(gene_list=["gene1", "gene3"], library_size=1e4)
    assert isinstance(expr, pd.DataFrame) and list(expr.columns) == ["gene1", "gene3"]
    assert list(expr.index) == list(tiny.obs_names)
    full = trained.get_normalized_expression(return_numpy=True)
    np.testing.assert_allclose(full.sum(1), 1, rtol=1e-5)
    samples = trained.get_normalized_expression(n_samples=3, return_mean=False)
    assert samples.shape == (3, 200, 50)
    mixed = trained.get_normalized_expression(transform_batch=["batch0", "batch1"],
                                              return_numpy=True)
    assert mixed.shape == (200, 50)
    params = trained.get_likelihood_parameters(indices=np.arange(10))
    assert set(params) == {"mean", "dispersions", "dropout"}
    assert params["mean"].shape == (10, 50) and (params["dropout"] <= 1).all()
    elbo = trained.get_elbo()
    ll = trained.get_marginal_ll(n_mc_samples=100)
    assert elbo < 0 and ll < 0 and ll > elbo - 1.0
    assert trained.get_reconstruction_error()["reconstruction_loss"] > 0
    pp = trained.posterior_predictive_sample(n_samples=2)
    assert pp.shape == (200, 50, 2) and (pp >= 0).all() and np.allclose(pp, np.round(pp))
    with pytest.raises(ValueError, match="transform_batch"):
        trained.get_normalized_expression(transform_batch="nope")
    with pytest.raises(ValueError, match="not in the model"):
        trained.get_normalized_expression(gene_list=["nope"])


def test_query_on_new_anndata_with_same_genes(trained, tiny):
    new = tiny[:40].copy()
    del new.uns["_cellvi_setup"]
    z_new = trained.get_latent_representation(new)
    np.testing.assert_allclose(z_new, trained.get_latent_representation(indices=range(40)),
                               rtol=1e-5, atol=1e-6)
    other = tiny[:, ::-1].copy()
    with pytest.raises(ValueError, match="different order"):
        trained.get_latent_representation(other)
    unknown = tiny[:10].copy()
    unknown.obs["batch"] = "batch9"
    with pytest.warns(UserWarning, match="batch9"):  # the encoder does not read the batch
        trained.get_latent_representation(unknown)
    with pytest.raises(ValueError, match="batch9"):  # decoding needs a known batch
        trained.get_normalized_expression(unknown)


def test_save_load_round_trip(trained, tiny, tmp_path):
    path = tmp_path / "model"
    trained.save(path, save_anndata=True)
    z = trained.get_latent_representation()
    loaded = SCVI.load(path)
    np.testing.assert_array_equal(loaded.get_latent_representation(), z)
    pd.testing.assert_frame_equal(loaded.history, trained.history)
    np.testing.assert_array_equal(loaded.validation_indices, trained.validation_indices)
    loaded2 = SCVI.load(path, adata=tiny.copy())
    np.testing.assert_array_equal(loaded2.get_latent_representation(), z)
    assert "trained 3 epochs" in repr(loaded2)

    with pytest.raises(FileExistsError, match="overwrite"):
        trained.save(path)
    trained.save(path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no leftovers


def test_load_refuses_other_genes(trained, tiny, tmp_path):
    trained.save(tmp_path / "m")
    other = anndata.AnnData(tiny.X[:, :45].copy())
    other.var_names = [f"g{i}" for i in range(45)]
    with pytest.raises(ValueError, match="differ from the model's") as err:
        SCVI.load(tmp_path / "m", adata=other)
    assert "gene49" in str(err.value) or "missing" in str(err.value)
    with pytest.raises(FileNotFoundError, match="save_anndata"):
        SCVI.load(tmp_path / "m")


def test_failed_save_leaves_nothing(trained, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(anndata.AnnData, "write_h5ad", boom)
    with pytest.raises(OSError, match="disk full"):
        trained.save(tmp_path / "m", save_anndata=True)
    assert list(tmp_path.iterdir()) == []


def test_repr_before_and_after_training(tiny):
    SCVI.setup_anndata(tiny, batch_key="batch")
    model = SCVI(tiny)
    assert "not trained" in repr(model) and "200 cells x 50 genes" in repr(model)
    model.train(max_epochs=1, progress_bar=False)
    assert "trained 1 epochs" in repr(model) and "validation ELBO" in repr(model)


def test_nan_loss_names_causes(tiny):
    SCVI.setup_anndata(tiny, batch_key="batch")
    model = SCVI(tiny)
    with pytest.raises(FloatingPointError, match="learning rate"):
        model.train(max_epochs=2, lr=1e30, progress_bar=False)


def test_early_stopping_keeps_best(tiny):
    SCVI.setup_anndata(tiny, batch_key="batch")
    model = SCVI(tiny)
    model.train(max_epochs=200, early_stopping=True, early_stopping_patience=3, lr=5e-2,
                n_epochs_kl_warmup=None, seed=0, progress_bar=False)
    assert len(model.history) < 200
