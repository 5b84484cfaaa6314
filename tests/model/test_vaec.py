"""VAECModel: the conditional M2 model trains and classifies; save/load; setup rules."""

from __future__ import annotations

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from cellvi.model import VAECModel
from cellvi.module import VAEC

UNKNOWN = "Unknown"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small networks: one intra-op thread is as fast, and far faster when cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def simulate_labelled(n_cells=1500, n_genes=200, n_types=7, n_batches=3, frac_labelled=0.05,
                      seed=0):
    """NB counts, type-specific means, batch-specific gene effects; 5% of cells labelled."""
    rng = np.random.default_rng(seed)
    base = rng.gamma(0.8, 1.0, n_genes) + 0.05
    type_fc = np.exp(rng.normal(0, 1.0, (n_types, n_genes)) * (rng.random((n_types, n_genes))
                                                                 < 0.15))
    batch_fc = np.exp(rng.normal(0, 0.5, (n_batches, n_genes)) * (rng.random(n_genes) < 0.3))
    types = rng.integers(0, n_types, n_cells)
    batches = rng.integers(0, n_batches, n_cells)
    mean = base * type_fc[types] * batch_fc[batches]
    mean /= mean.sum(1, keepdims=True)
    mu = mean * rng.lognormal(np.log(1500), 0.3, n_cells)[:, None]
    counts = rng.poisson(rng.gamma(5.0, mu / 5.0))
    counts[counts.sum(1) == 0, 0] = 1
    adata = anndata.AnnData(sp.csr_matrix(counts.astype(np.float32)))
    adata.obs_names = [f"cell{i}" for i in range(n_cells)]
    adata.var_names = [f"gene{j}" for j in range(n_genes)]
    names = np.array([f"type{t}" for t in range(n_types)])
    adata.obs["cell_type"] = pd.Categorical(names[types])
    adata.obs["batch"] = pd.Categorical([f"batch{b}" for b in batches])
    labelled = rng.random(n_cells) < frac_labelled
    adata.obs["labels"] = np.where(labelled, names[types], UNKNOWN)
    return adata, labelled


@pytest.fixture(scope="module")
def trained():
    adata, labelled = simulate_labelled()
    VAECModel.setup_anndata(adata, "labels", UNKNOWN, batch_key="batch")
    model = VAECModel(adata, n_hidden=64)
    model.train(max_epochs=25, seed=0, progress_bar=False)
    return model, adata, labelled


def test_vaec_classifies_far_better_than_chance(trained):
    model, adata, labelled = trained
    assert isinstance(model.module, VAEC)
    truth = adata.obs["cell_type"].astype(str).to_numpy()
    pred = model.predict()
    acc = float((pred[~labelled] == truth[~labelled]).mean())
    soft = model.predict(soft=True)
    conf = float(soft.to_numpy().max(1)[~labelled].mean())
    print(f"VAEC, 7 types x 3 batches, 5% labelled: accuracy {acc:.4f}, mean max probability "
          f"{conf:.4f} (chance 0.14)")
    assert acc >= 0.8, acc
    assert list(soft.columns) == model.class_names and UNKNOWN not in model.class_names


def test_vaec_queries_and_save_load(trained, tmp_path):
    model, adata, _ = trained
    z = model.get_latent_representation()
    assert z.shape == (adata.n_obs, 10) and np.isfinite(z).all()
    expr = model.get_normalized_expression(indices=np.arange(20))
    np.testing.assert_allclose(expr.to_numpy().sum(1), 1, rtol=1e-4)
    assert np.isfinite(model.get_elbo())
    ll = model.get_marginal_ll(indices=np.arange(30), n_mc_samples=20)
    assert np.isfinite(ll) and ll < 0
    assert "classification_loss_train" in model.history
    model.save(tmp_path / "vaec")
    loaded = VAECModel.load(tmp_path / "vaec", adata=adata.copy())
    pd.testing.assert_frame_equal(model.predict(soft=True), loaded.predict(soft=True))
    query = adata[:100].copy()
    del query.obs["labels"]
    np.testing.assert_array_equal(loaded.predict(query), model.predict(indices=np.arange(100)))


def test_vaec_fully_supervised_setup():
    adata, _ = simulate_labelled(300, 40, 3, 2, seed=4)
    VAECModel.setup_anndata(adata, "cell_type")  # unlabeled_category=None: all labelled
    model = VAECModel(adata, n_hidden=16, n_latent=4)
    assert model.class_names == ["type0", "type1", "type2"]
    model.train(max_epochs=2, seed=0, progress_bar=False)
    assert set(model.predict()) <= set(model.class_names)
    with pytest.raises(ValueError, match="did you mean"):
        VAECModel.setup_anndata(adata, "labels", "unknown")
