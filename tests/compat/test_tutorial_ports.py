"""scvi-tools tutorials ported by changing the import: their calls, in their order, run.

Each test replays the calls of one scvi-tools tutorial (API overview, harmonization with
scANVI, linear decoder, differential expression, reference mapping) on simulated data (the
tutorials download theirs; scanpy's normalisation steps are left out), with tiny epochs.
"""

import anndata
import matplotlib
import numpy as np
import pytest

import cellvi as scvi

matplotlib.use("Agg")


@pytest.fixture
def adata():
    a = scvi.data.synthetic_iid(batch_size=150, n_genes=80, n_proteins=0, n_regions=0,
                                n_batches=2, n_labels=3)
    a.obs["cell_type"] = a.obs["labels"].astype(str)
    a.obs["donor"] = np.where(np.arange(a.n_obs) % 3 == 0, "d1", "d2")
    a.obs["percent_mito"] = np.random.default_rng(0).random(a.n_obs)
    a.layers["counts"] = a.X.copy()
    return a


def test_api_overview(adata, tmp_path):
    scvi.model.SCVI.setup_anndata(adata, layer="counts", categorical_covariate_keys=["donor"],
                                  continuous_covariate_keys=["percent_mito"])
    model = scvi.model.SCVI(adata)
    model.train(max_epochs=3)
    model.save(tmp_path / "m", overwrite=True)
    model = scvi.model.SCVI.load(tmp_path / "m", adata=adata)
    latent = model.get_latent_representation()
    adata.obsm["X_scVI"] = latent
    adata_subset = adata[adata.obs.cell_type == "label_1"]
    latent_subset = model.get_latent_representation(adata_subset)
    denoised = model.get_normalized_expression(adata_subset, library_size=1e4)
    assert latent_subset.shape[0] == denoised.shape[0] == adata_subset.n_obs
    adata.layers["scvi_normalized"] = model.get_normalized_expression(library_size=10e4)
    de_df = model.differential_expression(groupby="cell_type")
    de_df = model.differential_expression(groupby="cell_type", group1="label_0",
                                          group2="label_1")
    assert (de_df["bayes_factor"] > 3).dtype == bool
    assert {"lfc_mean", "non_zeros_proportion1", "is_de_fdr_0.05"} <= set(de_df.columns)
    print(model)
    assert not model.history.empty


def test_harmonization_with_scanvi(adata):
    adata.obs["labels_partial"] = adata.obs["cell_type"].astype(str)
    adata.obs.loc[adata.obs_names[::2], "labels_partial"] = "Unknown"
    scvi.model.SCVI.setup_anndata(adata, layer="counts", batch_key="batch")
    vae = scvi.model.SCVI(adata, n_layers=2, n_latent=30, gene_likelihood="nb")
    vae.train(max_epochs=3)
    adata.obsm["X_scVI"] = vae.get_latent_representation()
    lvae = scvi.model.SCANVI.from_scvi_model(vae, adata=adata, labels_key="labels_partial",
                                             unlabeled_category="Unknown")
    lvae.train(max_epochs=2, n_samples_per_label=100)
    adata.obs["C_scANVI"] = lvae.predict(adata)
    adata.obsm["X_scANVI"] = lvae.get_latent_representation(adata)
    assert set(adata.obs["C_scANVI"]) <= {"label_0", "label_1", "label_2"}


def test_linear_decoder(adata):
    scvi.model.LinearSCVI.setup_anndata(adata, layer="counts")
    model = scvi.model.LinearSCVI(adata, n_latent=10)
    model.train(max_epochs=4, plan_kwargs={"lr": 5e-3}, check_val_every_n_epoch=2)
    train_elbo = model.history["elbo_train"][1:]
    test_elbo = model.history["elbo_validation"]
    ax = train_elbo.plot()
    test_elbo.plot(ax=ax)
    Z_hat = model.get_latent_representation()
    loadings = model.get_loadings()
    assert Z_hat.shape == (adata.n_obs, 10) and loadings.shape == (adata.n_vars, 10)


def test_differential_expression(adata):
    scvi.model.SCVI.setup_anndata(adata, layer="counts", batch_key="batch")
    model = scvi.model.SCVI(adata)
    model.train(max_epochs=3)
    de_df = model.differential_expression(groupby="cell_type", group1="label_0",
                                          group2="label_1")
    cell_idx1 = adata.obs["cell_type"] == "label_0"
    cell_idx2 = adata.obs["cell_type"] == "label_1"
    de_change = model.differential_expression(idx1=cell_idx1, idx2=cell_idx2, mode="change")
    assert de_change.filter(like="lfc").shape[1] >= 3
    de_df.head()


def test_reference_mapping(adata):
    adata_ref = adata[adata.obs["batch"] == "batch_0"].copy()
    adata_query = adata[adata.obs["batch"] == "batch_1"].copy()
    scvi.model.SCVI.setup_anndata(adata_ref, batch_key="batch", layer="counts")
    arches_params = dict(use_layer_norm="both", use_batch_norm="none",
                         encode_covariates=True, dropout_rate=0.2, n_layers=2)
    vae_ref = scvi.model.SCVI(adata_ref, **arches_params)
    vae_ref.train(max_epochs=3)
    adata_ref.obsm["X_scVI"] = vae_ref.get_latent_representation()
    scvi.model.SCVI.prepare_query_anndata(adata_query, vae_ref)
    vae_q = scvi.model.SCVI.load_query_data(adata_query, vae_ref)
    vae_q.train(max_epochs=3, plan_kwargs=dict(weight_decay=0.0))
    adata_query.obsm["X_scVI"] = vae_q.get_latent_representation()
    adata_full = anndata.concat([adata_query, adata_ref])
    adata_full.obsm["X_scVI"] = vae_q.get_latent_representation(adata_full)
    assert adata_full.obsm["X_scVI"].shape == (adata.n_obs, 10)
    # scANVI reference, query mapped from a saved model
    adata_ref.obs["labels"] = adata_ref.obs["cell_type"]
    scvi.model.SCVI.setup_anndata(adata_ref, batch_key="batch", layer="counts",
                                  labels_key="labels")
    vae_ref = scvi.model.SCVI(adata_ref, **arches_params)
    vae_ref.train(max_epochs=3)
    vae_ref_scan = scvi.model.SCANVI.from_scvi_model(vae_ref, unlabeled_category="Unknown")
    vae_ref_scan.train(max_epochs=2, n_samples_per_label=100)
    adata_query = adata[adata.obs["batch"] == "batch_1"].copy()
    adata_query.obs["labels"] = "Unknown"
    scvi.model.SCANVI.prepare_query_anndata(adata_query, vae_ref_scan)
    vae_q = scvi.model.SCANVI.load_query_data(adata_query, vae_ref_scan)
    vae_q.train(max_epochs=2, plan_kwargs=dict(weight_decay=0.0), check_val_every_n_epoch=10)
    adata_query.obs["predictions"] = vae_q.predict()
    assert adata_query.obs["predictions"].isin(["label_0", "label_1", "label_2"]).all()
