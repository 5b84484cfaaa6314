"""cellvi.pl: each plot returns a figure with the expected artists."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import cellvi

mpl = pytest.importorskip("matplotlib", reason="matplotlib (the plot extra) is not installed")
mpl.use("Agg")
plt = pytest.importorskip("matplotlib.pyplot")
from matplotlib.collections import PathCollection  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.image import AxesImage  # noqa: E402


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def trained():
    from conftest import simulate

    adata = simulate(240, 40, 3, 2, seed=2)
    adata.obs["library"] = np.asarray(adata.X.sum(1)).ravel()
    cellvi.model.SCVI.setup_anndata(adata, batch_key="batch")
    model = cellvi.model.SCVI(adata, n_latent=4, n_hidden=32)
    model.train(20, progress_bar=False, early_stopping=True, early_stopping_patience=2)
    return model


def scatters(ax):
    return [c for c in ax.collections if isinstance(c, PathCollection) and len(c.get_offsets())]


def test_training_curves(trained):
    fig = cellvi.pl.training_curves(trained)
    assert isinstance(fig, Figure) and len(fig.axes) == 3
    elbo = fig.axes[0]
    lines = {ln.get_label(): ln for ln in elbo.get_lines()}
    assert {"train", "validation"} <= set(lines)
    np.testing.assert_allclose(lines["validation"].get_ydata(),
                               trained.history["elbo_validation"].to_numpy())
    kept = trained.train_settings["kept_epoch"]
    assert f"kept epoch {kept}" in lines  # early stopping's epoch marked
    fig = cellvi.pl.training_curves(trained.history, metrics="elbo")
    assert len(fig.axes) == 1
    with pytest.raises(ValueError, match="none of"):
        cellvi.pl.training_curves(trained, metrics=["nope"])


def test_latent_pca_coloured_by_obs(trained):
    adata = trained.adata
    adata.obsm["X_scvi"] = trained.get_latent_representation()
    fig = cellvi.pl.latent(adata, color=["batch", "cell_type", "library"], method="pca")
    panels = [ax for ax in fig.axes if ax.get_title() in ("batch", "cell_type", "library")]
    assert len(panels) == 3
    batch_ax, type_ax, lib_ax = panels
    assert len(batch_ax.get_legend().get_texts()) == 2
    assert len(type_ax.get_legend().get_texts()) == 3
    assert len(fig.axes) == 4  # the numeric column has a colour bar
    pts = scatters(batch_ax)[0].get_offsets()
    coords = cellvi.metrics.pca(adata.obsm["X_scvi"], 2)
    assert pts.shape == (adata.n_obs, 2)
    np.testing.assert_allclose(np.sort(pts[:, 0]), np.sort(coords[:, 0]), atol=1e-6)
    # a model works as well, and nothing is written into its AnnData
    keys = set(adata.obsm)
    cellvi.pl.latent(trained, method="pca")
    assert set(adata.obsm) == keys
    with pytest.raises(KeyError, match="not in obs"):
        cellvi.pl.latent(adata, color="nope", method="pca")


def test_embed_writes_obsm(trained):
    adata = trained.adata.copy()
    adata.obsm["X_scvi"] = trained.get_latent_representation()
    out = cellvi.pl.embed(adata, method="pca", copy=True)
    assert "X_pca" in out.obsm and "X_pca" not in adata.obsm
    cellvi.pl.embed(adata, method="pca", key_added="X_2d")
    assert adata.obsm["X_2d"].shape == (adata.n_obs, 2)
    fig = cellvi.pl.latent(adata, use_rep="X_2d", color="batch")
    np.testing.assert_allclose(np.sort(scatters(fig.axes[0])[0].get_offsets()[:, 1]),
                               np.sort(adata.obsm["X_2d"][:, 1]))


def test_latent_auto_is_pca_without_umap(trained, monkeypatch):
    import importlib.util

    from cellvi.pl import _latent

    real = importlib.util.find_spec
    monkeypatch.setattr(_latent.importlib.util, "find_spec",
                        lambda name, *a: None if name == "umap" else real(name, *a))
    fig = cellvi.pl.latent(trained, color="batch")  # method="auto"
    assert fig.axes[0].get_xlabel() == "PC 1"


def test_volcano_one_panel_per_comparison(trained):
    de = trained.differential_expression(groupby="cell_type", n_samples=30)
    fig = cellvi.pl.volcano(de, n_labels=4)
    assert len(fig.axes) == 3
    for ax, (name, part) in zip(fig.axes, de.groupby("comparison", sort=False)):
        assert ax.get_title() == name
        assert sum(len(c.get_offsets()) for c in scatters(ax)) == len(part)
        assert len(ax.texts) == 4
    one = de[de.comparison == de.comparison.iloc[0]].drop(columns="comparison")
    assert len(cellvi.pl.volcano(one, score="proba_de").axes) == 1
    with pytest.raises(KeyError, match="lfc_typo"):
        cellvi.pl.volcano(de, lfc="lfc_typo")


def test_loadings_heatmap(trained):
    model = cellvi.model.LinearSCVI(trained.adata, n_latent=3)
    model.train(3, progress_bar=False)
    fig = cellvi.pl.loadings(model, n_genes=4)
    image = [a for a in fig.axes[0].get_images() if isinstance(a, AxesImage)][0]
    rows, cols = image.get_array().shape
    assert cols == 3 and 4 <= rows <= 12
    frame = model.get_loadings()
    assert abs(frame.to_numpy()).max() == pytest.approx(abs(image.get_array()).max())


def test_zero_inflation_from_a_table():
    table = pd.DataFrame({"prob_zero_inflated": [0.1, 0.7, 0.9, 0.2]},
                         index=[f"g{i}" for i in range(4)])
    fig = cellvi.pl.zero_inflation(table)
    counts = [p.get_height() for p in fig.axes[0].patches]
    assert sum(counts) == 4 and "2 of 4" in fig.axes[0].get_title()


def test_scores_bars():
    table = pd.DataFrame({"ilisi": [0.2, 0.8], "clisi": [0.9, 0.95]}, index=["pca", "scvi"])
    fig = cellvi.pl.scores(table)
    heights = sorted(p.get_height() for p in fig.axes[0].patches)
    assert heights == sorted(table.to_numpy().ravel())
    assert cellvi.plot.scores is cellvi.pl.scores


def test_autozi_zero_inflation():
    if not hasattr(cellvi.model, "AUTOZI"):
        pytest.skip("cellvi.model.AUTOZI is not there yet")
    from conftest import simulate

    adata = simulate(150, 30, 2, 1, seed=5)
    cellvi.model.AUTOZI.setup_anndata(adata)
    model = cellvi.model.AUTOZI(adata, n_latent=3)
    model.train(3, progress_bar=False)
    fig = cellvi.pl.zero_inflation(model)
    assert sum(p.get_height() for p in fig.axes[0].patches) == 30
    assert sum(len(c.get_offsets()) for c in scatters(fig.axes[1])) == 30


def test_totalvi_foreground_probability():
    if not hasattr(cellvi.model, "TOTALVI"):
        pytest.skip("cellvi.model.TOTALVI is not there yet")
    from conftest import simulate

    adata = simulate(150, 30, 2, 1, seed=6)
    rng = np.random.default_rng(0)
    adata.obsm["protein"] = rng.poisson(rng.gamma(2.0, 20.0, (150, 4))).astype(np.float32)
    cellvi.model.TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein")
    model = cellvi.model.TOTALVI(adata, n_latent=3)
    model.train(3, progress_bar=False)
    fig = cellvi.pl.foreground_probability(model)
    assert len(fig.axes) == 4
    pts = scatters(fig.axes[0])[0].get_offsets()
    np.testing.assert_allclose(pts[:, 0], np.log1p(adata.obsm["protein"][:, 0]))
    assert ((pts[:, 1] >= 0) & (pts[:, 1] <= 1)).all()  # probabilities (one posterior draw)
    assert fig.axes[0].get_title() == model.protein_names[0]


def test_gimvi_imputed_vs_measured():
    if not hasattr(cellvi.model, "GIMVI"):
        pytest.skip("cellvi.model.GIMVI is not there yet")
    import anndata
    import scipy.sparse as sp

    rng = np.random.default_rng(0)
    genes = [f"g{j}" for j in range(20)]
    seq = anndata.AnnData(sp.csr_matrix(rng.poisson(3.0, (120, 20)).astype(np.float32)))
    seq.var_names = genes
    spatial = anndata.AnnData(rng.poisson(3.0, (80, 12)).astype(np.float32) + 1)
    spatial.var_names = genes[:12]
    held = pd.DataFrame(rng.poisson(3.0, (80, 3)), columns=genes[12:15])
    cellvi.model.GIMVI.setup_anndata(seq)
    cellvi.model.GIMVI.setup_anndata(spatial)
    model = cellvi.model.GIMVI(seq, spatial, n_latent=3)
    model.train(max_epochs=3, progress_bar=False)
    fig = cellvi.pl.imputed_vs_measured(model, held)
    assert len(fig.axes) == 3 and "Spearman" in fig.axes[0].get_title()
    imputed = model.get_imputed_values(gene_list=genes[12:15], normalized=False)[1]
    pts = scatters(fig.axes[1])[0].get_offsets()
    np.testing.assert_allclose(pts[:, 1], np.log1p(imputed[:, 1]), rtol=1e-5)
    with pytest.raises(ValueError, match="cells"):
        cellvi.pl.imputed_vs_measured(model, held.iloc[:10])
