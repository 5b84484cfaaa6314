"""Reference mapping: prepare_query_anndata, load_query_data, and mapping without surgery."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from cellvi.model import SCANVI, SCVI, LinearSCVI


def _split(sim, n_genes=40, seed=31):
    adata = sim(600, n_genes, 3, 3, seed=seed)
    ref = adata[adata.obs["batch"] != "batch2"].copy()
    query = adata[adata.obs["batch"] == "batch2"].copy()
    return adata, ref, query


def test_prepare_query_anndata_reorders_pads_and_reports(sim, capsys):
    _, ref, query = _split(sim)
    SCVI.setup_anndata(ref, batch_key="batch")
    model = SCVI(ref, n_hidden=8)
    X = query.X.toarray()
    shuffled = query[:, ::-1].copy()
    shuffled = shuffled[:, 3:].copy()  # three reference genes missing
    shuffled.var_names = [*shuffled.var_names[:-1], "extra_gene"]  # and one unknown gene
    shuffled.layers["counts"] = shuffled.X.copy()
    SCVI.prepare_query_anndata(shuffled, model)
    printed = capsys.readouterr().out
    assert "36 of 40 reference genes found; 4 padded with zeros" in printed
    assert "1 query genes not in the reference dropped" in printed
    assert list(shuffled.var_names) == list(ref.var_names)
    got = shuffled.X.toarray() if sp.issparse(shuffled.X) else shuffled.X
    kept = [g for g in ref.var_names if g in set(query.var_names[::-1][3:-1])]
    for g in kept[:5]:
        j, k = list(ref.var_names).index(g), list(query.var_names).index(g)
        np.testing.assert_array_equal(got[:, j], X[:, k])
    missing = [j for j, g in enumerate(ref.var_names) if g not in kept]
    assert (got[:, missing] == 0).all()
    names = SCVI.prepare_query_anndata(query, model, return_reference_var_names=True)
    assert list(names) == list(ref.var_names)


@pytest.mark.parametrize("model_cls", [SCVI, LinearSCVI])
def test_load_query_data_trains_only_the_new_batch_and_keeps_the_reference(sim, model_cls):
    _, ref, query = _split(sim)
    model_cls.setup_anndata(ref, batch_key="batch")
    reference = model_cls(ref, n_hidden=16, n_latent=4).train(max_epochs=10, progress_bar=False,
                                                              seed=0)
    before = {k: v.clone() for k, v in reference.module.state_dict().items()}
    q = model_cls.load_query_data(query, reference)
    assert q.summary.batch_categories == ["batch0", "batch1", "batch2"]
    assert q.train_settings["reference_mapping"]["new_batches"] == ["batch2"]
    q.train(max_epochs=10, progress_bar=False, seed=0)
    assert q.train_settings["training_step"].startswith("autograd (some parameters are frozen")
    after = q.module.state_dict()
    trainable = set(q.train_settings["reference_mapping"]["trainable"])
    changed_any = False
    for name, old in before.items():
        if name.endswith("num_batches_tracked"):
            continue
        new = after[name]
        overlap = tuple(slice(0, s) for s in old.shape)
        module_name = name.rsplit(".", 1)[0]
        if (name in trainable or f"{module_name}.weight" in trainable) and (
                old.shape == new.shape):
            continue  # trained on purpose (the decoder's batch norm and its statistics)
        assert torch.equal(new[overlap], old), name  # the reference's values, bit for bit
        changed_any |= old.shape != new.shape
    assert changed_any  # the batch tables grew by a row
    z = q.get_latent_representation()
    assert z.shape == (query.n_obs, 4) and np.isfinite(z).all()
    # the reference model itself is untouched
    for name, old in before.items():
        assert torch.equal(reference.module.state_dict()[name], old)


def test_query_from_a_saved_reference_and_bad_queries(sim, tmp_path):
    _, ref, query = _split(sim)
    SCVI.setup_anndata(ref, batch_key="batch")
    reference = SCVI(ref, n_hidden=8).train(max_epochs=2, progress_bar=False)
    reference.save(tmp_path / "ref")
    q = SCVI.load_query_data(query.copy(), tmp_path / "ref")
    assert q.summary.n_batch == 3
    with pytest.raises(ValueError, match="prepare_query_anndata"):
        SCVI.load_query_data(query[:, ::-1].copy(), reference)
    with pytest.raises(ValueError, match="is a SCVI model"):
        LinearSCVI.load_query_data(query.copy(), reference)


def test_scanvi_label_transfer_to_a_query_batch(sim):
    adata = sim(900, 60, 3, 3, batch_effect=0.6, seed=32)
    adata.obs["labels"] = adata.obs["cell_type"].astype(str)
    ref = adata[adata.obs["batch"] != "batch2"].copy()
    query = adata[adata.obs["batch"] == "batch2"].copy()
    truth = query.obs["cell_type"].astype(str).to_numpy()
    del query.obs["labels"]  # a query has no labels
    SCVI.setup_anndata(ref, batch_key="batch", labels_key="labels")
    vae = SCVI(ref, n_hidden=32, n_latent=6).train(max_epochs=40, progress_bar=False, seed=0)
    scanvi = SCANVI.from_scvi_model(vae, "Unknown", labels_key="labels")
    scanvi.train(max_epochs=10, progress_bar=False, seed=0)
    q = SCANVI.load_query_data(query, scanvi)
    q.train(max_epochs=20, progress_bar=False, seed=0)
    acc = (q.predict() == truth).mean()
    assert acc >= 0.9, acc


def test_unknown_batches_without_surgery(sim):
    _, ref, query = _split(sim)
    SCVI.setup_anndata(ref, batch_key="batch")
    model = SCVI(ref, n_hidden=8).train(max_epochs=2, progress_bar=False)
    with pytest.warns(UserWarning, match="unknown to the model"):
        z = model.get_latent_representation(query)
    assert z.shape == (query.n_obs, 10)
    with pytest.warns(UserWarning, match="unknown to the model"):
        x = model.get_normalized_expression(query, transform_batch="batch0")
    assert x.shape == query.shape
    with pytest.raises(ValueError, match="not set up with"):
        model.get_normalized_expression(query)  # its own batch is needed to decode
    encoded = SCVI(ref, n_hidden=8, encode_covariates=True)
    with pytest.raises(ValueError, match="not set up with"):
        encoded.get_latent_representation(query)  # this encoder reads the batch
