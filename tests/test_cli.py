"""The command line: `cellvi demo` and `cellvi train`."""

import anndata
import numpy as np

from cellvi.cli import main
from cellvi.model import SCVI


def test_demo_runs(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--epochs", "2", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "2,000 cells" in printed and "epochs: 2" in printed and "ELBO" in printed
    adata = anndata.read_h5ad(out / "adata.h5ad")
    assert adata.obsm["X_scvi"].shape == (2000, 10)
    assert adata.layers["scvi_normalized"].shape == adata.shape
    assert (out / "model" / "model.json").exists()
    # the hint printed at the end works: the model folder loads on its own
    assert "SCVI.load(" in printed
    loaded = SCVI.load(out / "model")
    assert loaded.adata.n_obs == 2000 and loaded.is_trained
    assert main(["demo", "--out", str(out), "--epochs", "1", "--quiet"]) == 2  # no overwrite


def test_demo_stops_early_and_keeps_the_best_epoch(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--epochs", "30", "--early-stopping-patience", "2",
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "kept the best, epoch" in printed and "time:" in printed
    model = SCVI.load(out / "model")
    best = model.history["elbo_validation"].max()
    assert np.isclose(model.get_elbo(indices=model.validation_indices), best, atol=2.0)


def test_train_on_h5ad(tiny, tmp_path, capsys):
    path = tmp_path / "in.h5ad"
    tiny.write_h5ad(path)
    out = tmp_path / "run"
    assert main(["train", str(path), "--batch-key", "batch", "--out", str(out),
                 "--epochs", "2", "--quiet"]) == 0
    adata = anndata.read_h5ad(out / "adata.h5ad")
    assert adata.obsm["X_scvi"].shape == (200, 10)
    np.testing.assert_allclose(adata.layers["scvi_normalized"].sum(1), 1, rtol=1e-4)
    # minibatches gathered from a copy on the device: the same model
    assert main(["train", str(path), "--batch-key", "batch", "--out", str(tmp_path / "dev"),
                 "--epochs", "2", "--quiet", "--data-placement", "device"]) == 0
    np.testing.assert_array_equal(anndata.read_h5ad(tmp_path / "dev" / "adata.h5ad")
                                  .obsm["X_scvi"], adata.obsm["X_scvi"])


def test_train_reports_bad_key(tiny, tmp_path, capsys):
    path = tmp_path / "in.h5ad"
    tiny.write_h5ad(path)
    code = main(["train", str(path), "--batch-key", "donor", "--out", str(tmp_path / "o")])
    assert code == 2
    assert "donor" in capsys.readouterr().err
