"""SCANVI: label transfer accuracy and calibration, from_scvi_model, queries, bad input."""

from __future__ import annotations

from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import cellvi
from cellvi.model import SCANVI, SCVI

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
UNKNOWN = "Unknown"


def simulate_labelled(
    n_cells: int = 2000,
    n_genes: int = 200,
    n_types: int = 7,
    n_batches: int = 3,
    frac_labelled: float = 0.05,
    seed: int = 0,
) -> tuple[anndata.AnnData, np.ndarray]:
    """NB counts from type-specific means with batch-specific multiplicative gene effects.

    ``obs["cell_type"]`` is the truth, ``obs["labels"]`` keeps it for a random
    ``frac_labelled`` of the cells and is ``"Unknown"`` elsewhere; also returns that mask.
    """
    rng = np.random.default_rng(seed)
    base = rng.gamma(0.8, 1.0, n_genes) + 0.05
    markers = rng.random((n_types, n_genes)) < 0.15
    type_fc = np.exp(rng.normal(0, 1.0, (n_types, n_genes)) * markers)
    batch_genes = rng.random(n_genes) < 0.3
    batch_fc = np.exp(rng.normal(0, 0.5, (n_batches, n_genes)) * batch_genes)
    types = rng.integers(0, n_types, n_cells)
    batches = rng.integers(0, n_batches, n_cells)
    mean = base * type_fc[types] * batch_fc[batches]
    mean /= mean.sum(1, keepdims=True)
    depth = np.array([1.0, 0.6, 1.5, 0.8])[batches % 4]
    mu = mean * (rng.lognormal(np.log(1500), 0.3, n_cells) * depth)[:, None]
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


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small networks: one intra-op thread is as fast, and far faster when cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained():
    adata, labelled = simulate_labelled()
    SCVI.setup_anndata(adata, batch_key="batch")
    vae = SCVI(adata)
    vae.train(max_epochs=25, seed=0, progress_bar=False)
    model = SCANVI.from_scvi_model(vae, UNKNOWN, labels_key="labels")
    model.train(seed=0, progress_bar=False)
    return model, adata, labelled, vae


def test_accuracy_and_calibration_on_simulated_data(trained):
    model, adata, labelled, _ = trained
    truth = adata.obs["cell_type"].astype(str).to_numpy()
    pred = model.predict()
    soft = model.predict(soft=True)
    acc = float((pred[~labelled] == truth[~labelled]).mean())
    confidence = float(soft.to_numpy().max(1)[~labelled].mean())
    print(f"simulated 7 types x 3 batches, 5% labelled: accuracy {acc:.4f}, "
          f"mean max probability {confidence:.4f}")
    assert acc >= 0.90, acc
    assert abs(confidence - acc) <= 0.1, (confidence, acc)
    # the soft predictions are a cells x classes table whose argmax is the hard prediction
    assert list(soft.columns) == model.class_names == [f"type{t}" for t in range(7)]
    assert list(soft.index) == list(adata.obs_names)
    np.testing.assert_allclose(soft.to_numpy().sum(1), 1, atol=1e-5)
    np.testing.assert_array_equal(soft.columns.to_numpy()[soft.to_numpy().argmax(1)], pred)
    assert UNKNOWN not in set(pred)


def test_training_defaults_and_history(trained):
    model, adata, _, _ = trained
    n = adata.n_obs
    base = min(round(20000 / n * 400), 400)
    assert model.train_settings["max_epochs"] == min(max(2, round(base / 3)), 20)
    assert model.train_settings["n_epochs_kl_warmup"] is None  # started from a trained SCVI
    hist = model.history
    assert "classification_loss_train" in hist
    assert hist["classification_loss_train"].iloc[-1] < hist["classification_loss_train"].iloc[0]
    assert np.isfinite(hist["elbo_validation"]).all()
    assert "SCANVI" in repr(model) and "classes (7)" in repr(model)


def test_queries(trained):
    model, adata, _, vae = trained
    z = model.get_latent_representation()
    assert z.shape == (adata.n_obs, 10) and np.isfinite(z).all()
    expr = model.get_normalized_expression(indices=np.arange(50))
    assert expr.shape == (50, adata.n_vars)
    np.testing.assert_allclose(expr.to_numpy().sum(1), 1, rtol=1e-4)
    elbo = model.get_elbo()
    assert np.isfinite(elbo) and elbo < 0
    ll = model.get_marginal_ll(indices=np.arange(60), n_mc_samples=50)
    assert np.isfinite(ll) and ll < 0
    # the SCVI model still works on its AnnData after SCANVI took the setup over
    assert vae.get_latent_representation(indices=np.arange(5)).shape == (5, 10)


def test_query_data_and_unknown_labels(trained):
    model, adata, labelled, _ = trained
    query = adata[:200].copy()
    del query.obs["labels"]
    np.testing.assert_array_equal(model.predict(query), model.predict(indices=np.arange(200)))
    bad = adata[:50].copy()
    bad.obs["labels"] = bad.obs["labels"].astype(str)
    bad.obs.iloc[0, bad.obs.columns.get_loc("labels")] = "type_never_seen"
    with pytest.raises(ValueError, match="type_never_seen"):
        model.predict(bad)


def test_save_load_reproduces_predictions(trained, tmp_path):
    model, adata, _, _ = trained
    model.save(tmp_path / "scanvi")
    loaded = SCANVI.load(tmp_path / "scanvi", adata=adata.copy())
    pd.testing.assert_frame_equal(model.predict(soft=True), loaded.predict(soft=True))
    assert loaded.class_names == model.class_names
    assert loaded.unlabeled_category == UNKNOWN
    assert loaded._default_max_epochs() == model._default_max_epochs()


def test_from_scvi_model_checks():
    adata, _ = simulate_labelled(300, 40, 3, 2, frac_labelled=0.3, seed=1)
    SCVI.setup_anndata(adata, batch_key="batch")
    vae = SCVI(adata, n_hidden=16, n_latent=4)
    with pytest.raises(ValueError, match="labels_key"):
        SCANVI.from_scvi_model(vae, UNKNOWN)
    other = adata[:, 2:].copy()
    with pytest.raises(ValueError, match="gene0"):
        SCANVI.from_scvi_model(vae, UNKNOWN, labels_key="labels", adata=other)
    new_batch = adata[:100].copy()
    new_batch.obs["batch"] = "batch_new"
    with pytest.raises(ValueError, match="batch_new"):
        SCANVI.from_scvi_model(vae, UNKNOWN, labels_key="labels", adata=new_batch)
    # weights are copied: same latent space before SCANVI training
    with pytest.warns(UserWarning, match="not been trained"):
        model = SCANVI.from_scvi_model(vae, UNKNOWN, labels_key="labels")
    np.testing.assert_allclose(
        model.get_latent_representation(), vae.get_latent_representation(), atol=1e-5
    )
    with pytest.raises(ValueError, match="architecture"):
        SCANVI.from_scvi_model(vae, UNKNOWN, labels_key="labels", n_latent=3)
    # a subset of the batches is fine
    one_batch = adata[adata.obs["batch"] == "batch1"].copy()
    m = SCANVI.from_scvi_model(vae, UNKNOWN, labels_key="labels", adata=one_batch)
    assert m.summary.batch_categories == vae.summary.batch_categories


def test_setup_label_rules():
    adata, _ = simulate_labelled(200, 30, 3, 2, frac_labelled=0.5, seed=2)
    SCANVI.setup_anndata(adata, "labels", UNKNOWN, batch_key="batch")
    s = cellvi.data.get_summary(adata)
    assert s.label_categories == ["type0", "type1", "type2", UNKNOWN]  # classes, then unlabelled
    with pytest.raises(KeyError):
        SCANVI.setup_anndata(adata, "no_such_column", UNKNOWN)
    # a misspelt unlabeled category would silently become a class: refuse it
    with pytest.raises(ValueError, match="did you mean"):
        SCANVI.setup_anndata(adata, "labels", "unknown")
    # every cell unlabelled: nothing to learn from
    none = adata.copy()
    none.obs["labels"] = UNKNOWN
    with pytest.raises(ValueError, match="labelled"):
        SCANVI.setup_anndata(none, "labels", UNKNOWN)
    # no unlabelled cell at all: fully supervised, with a warning
    full = adata.copy()
    full.obs["labels"] = full.obs["cell_type"]
    with pytest.warns(UserWarning, match="fully supervised"):
        SCANVI.setup_anndata(full, "labels", UNKNOWN, batch_key="batch")
    model = SCANVI(full, n_hidden=16, n_latent=4, linear_classifier=True)
    assert model.class_names == ["type0", "type1", "type2"]
    # linear: latent -> classes
    assert model.module.label_head.classifier.classifier[0].in_features == 4
    model.train(max_epochs=2, seed=0, progress_bar=False, n_samples_per_label=5)
    assert set(model.predict()) <= set(model.class_names)


def test_scanvi_from_scratch_with_label_groups():
    adata, labelled = simulate_labelled(600, 60, 4, 2, frac_labelled=0.2, seed=3)
    SCANVI.setup_anndata(adata, "labels", UNKNOWN, batch_key="batch")
    model = SCANVI(adata, n_hidden=32, n_latent=6, use_labels_groups=True,
                   labels_groups=[0, 0, 1, 1])
    model.train(max_epochs=15, seed=0, progress_bar=False)
    assert model.train_settings["n_epochs_kl_warmup"] == 400
    truth = adata.obs["cell_type"].astype(str).to_numpy()
    acc = (model.predict()[~labelled] == truth[~labelled]).mean()
    assert acc > 0.5, acc  # chance is 0.25


# ---------------------------------------------------------------------------- real data
def read_cellbench(root: Path) -> anndata.AnnData:
    """CEL-seq2 and Drop-seq CellBench cells on their shared genes; batch = protocol."""
    parts = []
    for protocol in ("celseq2", "dropseq"):
        a = cellvi.data.read(root / f"sc_{protocol}.count.csv.gz", transpose=True)
        meta = pd.read_csv(root / f"sc_{protocol}.metadata.csv.gz", index_col=0)
        meta.index = meta.index.astype(str)
        cells = a.obs_names.intersection(meta.index)
        meta = meta.loc[cells]
        keep = (meta["demuxlet_cls"] == "SNG").to_numpy() if "demuxlet_cls" in meta else None
        a = a[cells].copy()
        if keep is not None:
            a, meta = a[keep].copy(), meta[keep]
        a.obs["cell_line"] = meta["cell_line"].astype(str).to_numpy()
        a.obs["protocol"] = protocol
        parts.append(a)
    genes = parts[0].var_names.intersection(parts[1].var_names)
    adata = anndata.concat([p[:, genes] for p in parts], index_unique="-")
    adata = adata[np.asarray(adata.X.sum(1)).ravel() > 0].copy()
    hvg = cellvi.data.highly_variable_genes(adata, n_top_genes=2000, batch_key="protocol")
    adata = adata[:, hvg].copy()
    return adata[np.asarray(adata.X.sum(1)).ravel() > 0].copy()


def test_cellbench_celseq2_labels_transfer_to_dropseq():
    root = DATA / "cellbench"
    if not root.exists():
        pytest.skip(f"{root} is not available")
    adata = read_cellbench(root)
    celseq = (adata.obs["protocol"] == "celseq2").to_numpy()
    adata.obs["labels"] = np.where(celseq, adata.obs["cell_line"], UNKNOWN)
    SCVI.setup_anndata(adata, batch_key="protocol")
    vae = SCVI(adata)
    vae.train(max_epochs=60, seed=0, progress_bar=False)
    model = SCANVI.from_scvi_model(vae, UNKNOWN, labels_key="labels")
    model.train(seed=0, progress_bar=False)
    truth = adata.obs["cell_line"].to_numpy()
    pred = model.predict()
    acc = float((pred[~celseq] == truth[~celseq]).mean())
    conf = float(model.predict(soft=True).to_numpy().max(1)[~celseq].mean())
    print(f"CellBench: {celseq.sum()} CEL-seq2 labelled, {(~celseq).sum()} Drop-seq predicted; "
          f"accuracy {acc:.4f}, mean max probability {conf:.4f}")
    assert acc >= 0.95, acc
