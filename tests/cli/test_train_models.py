"""`cellvi train --model ...`: every model end to end on tiny data; filters before training."""

import json

import anndata
import numpy as np
import pandas as pd
import pytest
from cli_data import make_files, make_scanvi_run

import cellvi
from cellvi.cli import main

FAST = ["--epochs", "2", "--quiet"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_files(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="module")
def scanvi_run(files, tmp_path_factory):
    return make_scanvi_run(files, tmp_path_factory.mktemp("runs") / "scanvi")


def _record(out):
    return json.loads((out / "run.json").read_text())


def test_scanvi_run_writes_latent_predictions_and_tables(scanvi_run):
    out = scanvi_run
    adata = anndata.read_h5ad(out / "adata.h5ad")
    assert adata.obsm["X_scanvi"].shape == (200, 10)
    assert adata.layers["scanvi_normalized"].shape == (200, 50)
    assert set(adata.obs["scanvi_prediction"]) <= {"type0", "type1", "type2"}
    assert ((adata.obs["scanvi_prediction_probability"] > 0)
            & (adata.obs["scanvi_prediction_probability"] <= 1)).all()
    table = pd.read_csv(out / "predictions.csv", index_col=0)
    assert list(table.index) == list(adata.obs_names)
    assert (table["label"] == adata.obs["scanvi_prediction"].astype(str)).all()
    history = pd.read_csv(out / "history.csv", index_col=0)
    assert len(history) == 2 and "elbo_validation" in history
    model = cellvi.model.SCANVI.load(out / "model")
    assert model.is_trained and model.unlabeled_category == "Unknown"
    record = _record(out)
    assert record["model_class"] == "SCANVI" and record["setup"]["labels_key"] == "label"
    assert record["outputs"]["latent_key"] == "X_scanvi"
    # the latent written is the saved model's
    np.testing.assert_allclose(model.get_latent_representation(), adata.obsm["X_scanvi"],
                               rtol=1e-5, atol=1e-5)


def test_scanvi_from_a_pretrained_scvi(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(files["sim"]), "--model", "scanvi", "--out", str(out),
                 "--labels-key", "label", "--scvi-epochs", "1", "--n-latent", "4",
                 *FAST]) == 0
    model = cellvi.model.SCANVI.load(out / "model")
    assert model.summary.extra.get("pretrained_from_scvi") and model.module.n_latent == 4


@pytest.mark.parametrize("model", ["linear", "autozi"])
def test_linear_and_autozi_write_their_tables(files, tmp_path, model):
    out = tmp_path / model
    extra = ["--no-normalized"] if model == "autozi" else []
    assert main(["train", str(files["sim"]), "--model", model, "--out", str(out),
                 "--batch-key", "batch", "--n-latent", "3", *extra, *FAST]) == 0
    adata = anndata.read_h5ad(out / "adata.h5ad")
    assert adata.obsm[f"X_{model}"].shape == (200, 3)
    if model == "linear":
        loadings = pd.read_csv(out / "loadings.csv", index_col=0)
        assert loadings.shape == (50, 3) and list(loadings.index) == list(adata.var_names)
        assert adata.layers["linear_normalized"].shape == (200, 50)
    else:
        table = pd.read_csv(out / "zero_inflation.csv", index_col=0)
        assert len(table) == 50 and "prob_zero_inflated" in table
        assert "autozi_normalized" not in adata.layers
    cls = {"linear": cellvi.model.LinearSCVI, "autozi": cellvi.model.AUTOZI}[model]
    assert cls.load(out / "model").is_trained


def test_totalvi_reads_the_proteins_from_obsm(files, tmp_path, capsys):
    out = tmp_path / "tv"
    assert main(["train", str(files["cite"]), "--model", "totalvi", "--out", str(out),
                 "--batch-key", "batch", "--protein-names-key", "protein_names",
                 "--n-latent", "5", *FAST]) == 0
    assert "and 6 proteins" in capsys.readouterr().out
    adata = anndata.read_h5ad(out / "adata.h5ad")
    assert adata.obsm["X_totalvi"].shape == (200, 5)
    proteins = adata.obsm["totalvi_protein_normalized"]
    assert list(proteins.columns) == [f"p{j}" for j in range(6)]
    assert cellvi.model.TOTALVI.load(out / "model").protein_names == list(proteins.columns)


def test_gimvi_trains_on_two_datasets_and_imputes_the_spatial_one(files, tmp_path):
    out = tmp_path / "gimvi"
    assert main(["train", str(files["seq"]), "--model", "gimvi", "--spatial",
                 str(files["spatial"]), "--spatial-batch-key", "section", "--out", str(out),
                 "--n-latent", "4", "--kappa", "2", *FAST]) == 0
    seq = anndata.read_h5ad(out / "adata_seq.h5ad")
    spatial = anndata.read_h5ad(out / "adata_spatial.h5ad")
    assert seq.obsm["X_gimvi"].shape == (160, 4)
    assert spatial.obsm["X_gimvi"].shape == (spatial.n_obs, 4)
    imputed = spatial.obsm["gimvi_imputed"]
    assert imputed.shape == (spatial.n_obs, 40)  # every sequenced gene, measured or not
    model = cellvi.model.GIMVI.load(out / "model")
    assert model.train_settings.get("kappa") == 2


def test_filters_drop_empty_cells_and_keep_variable_genes(files, tmp_path, capsys):
    adata = anndata.read_h5ad(files["sim"])
    X = adata.X.tolil()
    X[[3, 7]] = 0
    adata.X = X.tocsr()
    path = tmp_path / "empty.h5ad"
    adata.write_h5ad(path)
    out = tmp_path / "run"
    code = main(["train", str(path), "--out", str(out), "--batch-key", "batch", *FAST])
    err = capsys.readouterr().err
    assert code == 2 and "--min-counts 1" in err and len(err.strip().splitlines()) == 1
    assert not (out / "model").exists()
    assert main(["train", str(path), "--out", str(out), "--batch-key", "batch",
                 "--min-counts", "1", "--n-top-genes", "20", *FAST]) == 0
    printed = capsys.readouterr().out
    assert "2 of 200 cells dropped" in printed and "20 of 50 genes kept" in printed
    written = anndata.read_h5ad(out / "adata.h5ad")
    assert written.shape == (198, 20)
    mask = cellvi.data.highly_variable_genes(adata[adata.X.sum(1).A1 >= 1].copy(),
                                             n_top_genes=20, batch_key="batch")
    kept = adata.var_names[np.asarray(mask)]
    assert list(written.var_names) == list(kept)
    assert cellvi.model.SCVI.load(out / "model").summary.n_vars == 20
    filters = _record(out)["filters"]["input"]
    assert filters["cells_below_min_counts"] == 2 and filters["genes"] == 20


def test_model_and_train_options_pass_through(files, tmp_path):
    out = tmp_path / "run"
    assert main(["train", str(files["sim"]), "--out", str(out), "--n-hidden", "16",
                 "--dispersion", "gene-batch", "--batch-key", "batch",
                 "--model-option", "use_layer_norm=\"both\"", "--train-option",
                 "reduce_lr_on_plateau=true", "--lr", "0.002", "--early-stopping",
                 *FAST]) == 0
    model = cellvi.model.SCVI.load(out / "model")
    c = model.module.config
    assert (c.n_hidden, c.dispersion, c.use_layer_norm) == (16, "gene-batch", "both")
    assert model.train_settings["early_stopping"] is True
    assert model.train_settings.get("kept_epoch") is not None


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"cellvi {cellvi.__version__}"
