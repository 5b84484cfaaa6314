"""TOTALVI: set-up and bad input, learning (foreground, imputation), queries, save/load."""

import warnings

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from conftest import shared_data

from cellvi.model import TOTALVI
from cellvi.model.totalvi import (
    MIN_BACKGROUND_SCALE,
    empirical_background_prior,
    fit_two_gaussians,
)

KEY = "protein_expression"


def citeseq(n_cells=500, n_genes=80, n_proteins=12, n_types=4, n_batches=2, *, seed=0,
            missing=None):
    """RNA and protein counts with known types and known foreground / background."""
    rng = np.random.default_rng(seed)
    types = rng.integers(0, n_types, n_cells)
    batches = rng.integers(0, n_batches, n_cells)
    base = rng.gamma(0.8, 1.0, n_genes) + 0.05
    type_fc = np.exp(rng.normal(0, 1.2, (n_types, n_genes)) * (rng.random((n_types, n_genes))
                                                                < 0.4))
    batch_fc = np.exp(rng.normal(0, 0.4, (n_batches, n_genes)))
    mean = base * type_fc[types] * batch_fc[batches]
    mean /= mean.sum(1, keepdims=True)
    mu = mean * rng.lognormal(np.log(800), 0.3, n_cells)[:, None]
    x = rng.poisson(rng.gamma(5.0, mu / 5.0)).astype(np.float32)
    x[x.sum(1) == 0, 0] = 1
    on = rng.random((n_types, n_proteins)) < 0.4
    on[rng.integers(n_types, size=n_proteins), np.arange(n_proteins)] = True
    fg = on[types] & (rng.random((n_cells, n_proteins)) < 0.9)
    back = rng.lognormal(np.log(10), 0.6, n_proteins) * rng.lognormal(0, 0.2, n_cells)[:, None]
    fold = rng.lognormal(np.log(15), 0.4, n_proteins)
    rate = np.where(fg, back * fold, back)
    y = rng.poisson(rng.gamma(10.0, rate / 10.0)).astype(np.float32)
    if missing:
        for b, cols in missing.items():
            y[np.ix_(batches == b, cols)] = 0
    adata = anndata.AnnData(sp.csr_matrix(x))
    adata.obs_names = [f"c{i}" for i in range(n_cells)]
    adata.var_names = [f"g{j}" for j in range(n_genes)]
    adata.obs["cell_type"] = pd.Categorical([f"t{t}" for t in types])
    adata.obs["batch"] = pd.Categorical([f"b{b}" for b in batches])
    adata.obsm[KEY] = y
    adata.uns["protein_names"] = np.array([f"p{j}" for j in range(n_proteins)])
    adata.obsm["foreground"] = fg
    return adata


def setup_cite(adata, **kwargs):
    TOTALVI.setup_anndata(adata, protein_expression_obsm_key=KEY,
                          protein_names_uns_key="protein_names", batch_key="batch", **kwargs)


FAST = dict(n_steps_kl_warmup=60, progress_bar=False)


@pytest.fixture(scope="module")
def trained():
    adata = citeseq(seed=0)
    setup_cite(adata)
    model = TOTALVI(adata, n_hidden=64, n_latent=8)
    model.train(max_epochs=80, seed=0, **FAST)
    return model


def _auroc(truth: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(np.median([roc_auc_score(truth[:, j], score[:, j])
                            for j in range(truth.shape[1]) if 0 < truth[:, j].mean() < 1]))


# ------------------------------------------------------------------------------ learning
def test_learns_and_separates_foreground_from_background(trained):
    hist = trained.history
    assert hist["elbo_validation"].iloc[-1] > hist["elbo_validation"].iloc[0] + 50
    assert {"reconstruction_loss_gene_train", "reconstruction_loss_protein_train"} <= set(hist)
    fg = trained.adata.obsm["foreground"]
    prob = trained.get_protein_foreground_probability()
    assert list(prob.columns) == trained.protein_names and prob.shape == fg.shape
    assert ((prob.to_numpy() >= 0) & (prob.to_numpy() <= 1)).all()
    assert _auroc(fg, prob.to_numpy()) > 0.9
    # the latent separates the simulated types
    from sklearn.neighbors import KNeighborsClassifier

    z = trained.get_latent_representation()
    types = trained.adata.obs["cell_type"].to_numpy()
    assert KNeighborsClassifier(10).fit(z[::2], types[::2]).score(z[1::2], types[1::2]) > 0.9
    # the plan: scvi-tools' totalVI defaults, no adversary without missing proteins
    s = trained.train_settings
    assert s["lr"] == 4e-3 and s["batch_size"] == 256 and s["early_stopping"] is True
    assert s["reduce_lr_on_plateau"] is True and s["adversarial_classifier"] is False
    assert "TOTALVAE" in repr(trained)


def test_hidden_proteins_are_imputed_from_rna():
    """Cells whose proteins were hidden (their own batch, all zeros) get them back."""
    adata = citeseq(n_cells=600, seed=3)
    truth = adata.obsm[KEY].copy()
    hidden = (adata.obs["batch"] == "b1").to_numpy() & (np.arange(adata.n_obs) % 2 == 0)
    batch = adata.obs["batch"].astype(str).to_numpy()
    batch[hidden] = "hidden"
    adata.obs["batch"] = pd.Categorical(batch)
    y = adata.obsm[KEY].copy()
    y[hidden] = 0
    adata.obsm[KEY] = y
    with pytest.warns(UserWarning, match="no protein counts at all"):
        setup_cite(adata)
    model = TOTALVI(adata, n_hidden=64, n_latent=8)  # (the set-up said it already)
    assert model.module.protein_batch_mask is not None
    model.train(max_epochs=70, seed=1, **FAST)
    assert model.train_settings["adversarial_classifier"] is True
    assert "adversarial_loss_train" in model.history
    _, pro = model.get_normalized_expression(indices=np.flatnonzero(hidden), transform_batch="b1",
                                             n_samples=5, return_numpy=True)
    cors = [np.corrcoef(np.log1p(pro[:, j]), np.log1p(truth[hidden, j]))[0, 1]
            for j in range(truth.shape[1])]
    assert np.median(cors) > 0.7


# ------------------------------------------------------------------------------ queries
def test_queries_have_scvi_tools_shapes_and_names(trained):
    m = trained
    n = m.adata.n_obs
    rna, pro = m.get_normalized_expression()
    assert rna.shape == (n, 80) and pro.shape == (n, 12)
    assert np.allclose(rna.to_numpy().sum(1), 1, atol=1e-4)
    rna, pro = m.get_normalized_expression(indices=[3, 1], gene_list=["g5", "g2"],
                                           protein_list=["p3"], transform_batch=["b0", "b1"],
                                           library_size=1e4, n_samples=3)
    assert list(rna.columns) == ["g5", "g2"] and list(pro.columns) == ["p3"]
    assert list(rna.index) == ["c3", "c1"] and (rna.to_numpy() > 0).all()
    rna, pro = m.get_normalized_expression(n_samples=4, return_mean=False)
    assert rna.shape == (4, n, 80) and pro.shape == (4, n, 12)
    _, scaled = m.get_normalized_expression(scale_protein=True, include_protein_background=True,
                                            return_numpy=True)
    assert np.allclose(scaled.sum(1), 1, atol=1e-4)
    lat, _ = m.get_normalized_expression(library_size="latent", protein_list=[], gene_list=None)
    np.testing.assert_allclose(lat.to_numpy().sum(1), np.asarray(m.adata.X.sum(1)).ravel(),
                               rtol=1e-3)
    with pytest.raises(ValueError, match="Proteins not in the model"):
        m.get_normalized_expression(protein_list=["nope"])
    with pytest.raises(ValueError, match="not a batch of the model"):
        m.get_protein_foreground_probability(transform_batch="b9")
    bg = m.get_protein_background_mean()
    assert bg.shape == (n, 12) and (bg > 0).all()
    assert m.get_latent_library_size().shape == (n, 1)
    post = m.posterior_predictive_sample(n_samples=2, protein_list=["p0", "p1"])
    assert post["rna"].shape == (n, 80, 2) and post["protein"].shape == (n, 2, 2)
    params = m.get_likelihood_parameters(indices=np.arange(10))
    assert params["mean"].shape == (10, 80) and params["protein_mixing"].shape == (10, 12)
    corr = m.get_feature_correlation_matrix(indices=np.arange(50), n_samples=2)
    assert corr.shape == (92, 92) and list(corr.index[-12:]) == m.protein_names
    elbo = m.get_elbo()
    assert np.isfinite(elbo) and elbo < 0
    rec = m.get_reconstruction_error()
    assert set(rec) == {"reconstruction_loss_gene", "reconstruction_loss_protein"}
    assert rec["reconstruction_loss_gene"] > 0 and rec["reconstruction_loss_protein"] > 0
    torch.manual_seed(0)
    per_cell = m.get_reconstruction_error(return_mean=False)
    assert per_cell["reconstruction_loss_protein"].shape == (n,)
    ll = m.get_marginal_ll(indices=np.arange(20), n_mc_samples=20)
    assert np.isfinite(ll)


def test_differential_expression_over_genes_and_proteins(trained):
    m = trained
    de = m.differential_expression(groupby="cell_type", group1="t0", n_samples=300, seed=0,
                                   silent=True)
    names = list(de.index)
    assert len(names) == 80 + 12 and sum(n.endswith("_protein") for n in names) == 12
    assert de.loc["p0_protein", "raw_normalized_mean1"] != de.loc["p0_protein",
                                                                  "raw_normalized_mean1"]  # NaN
    # the proteins marking type t0 come out as changed, in the right direction
    fg = m.adata.obsm["foreground"]
    t0 = (m.adata.obs["cell_type"] == "t0").to_numpy()
    diff = fg[t0].mean(0) - fg[~t0].mean(0)
    up = [f"p{j}_protein" for j in np.flatnonzero(diff > 0.6)]
    down = [f"p{j}_protein" for j in np.flatnonzero(diff < -0.6)]
    assert up or down
    assert (de.loc[up, "lfc_mean"] > 1).all() and (de.loc[down, "lfc_mean"] < -1).all()
    assert (de.loc[up + down, "proba_de"] > 0.9).all()
    only = m.differential_expression(idx1=np.flatnonzero(t0), use_field=["protein"],
                                     n_samples=100, seed=0, silent=True)
    assert len(only) == 12
    with pytest.raises(ValueError, match="use_field"):
        m.differential_expression(idx1=[0, 1], use_field=["atac"])


def test_save_load_round_trip_reproduces_outputs(trained, tmp_path):
    m = trained
    m.save(tmp_path / "m", save_anndata=True)
    loaded = TOTALVI.load(tmp_path / "m")
    assert loaded.protein_names == m.protein_names
    np.testing.assert_array_equal(loaded.get_latent_representation(),
                                  m.get_latent_representation())
    torch.manual_seed(0)
    a = m.get_normalized_expression(n_samples=3, return_numpy=True)
    torch.manual_seed(0)
    b = loaded.get_normalized_expression(n_samples=3, return_numpy=True)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    torch.manual_seed(1)
    a = m.get_protein_foreground_probability(return_numpy=True)
    torch.manual_seed(1)
    np.testing.assert_array_equal(a, loaded.get_protein_foreground_probability(return_numpy=True))
    for k, v in m.module.state_dict().items():
        torch.testing.assert_close(loaded.module.state_dict()[k], v, rtol=0, atol=0)


def test_masked_model_round_trip_keeps_its_mask(tmp_path):
    adata = citeseq(n_cells=200, seed=2, missing={1: [0, 1]})
    setup_cite(adata)
    with pytest.warns(UserWarning, match="all-zero counts"):
        m = TOTALVI(adata, n_hidden=16, n_latent=4)
    m.save(tmp_path / "m")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # loading does not warn again
        loaded = TOTALVI.load(tmp_path / "m", adata=adata)
    torch.testing.assert_close(loaded.module.protein_batch_mask, m.module.protein_batch_mask)
    assert loaded._plan_defaults()["adversarial_classifier"] is True
    over = TOTALVI(adata, n_hidden=16, override_missing_proteins=True)
    assert over.module.protein_batch_mask is None
    assert over._plan_defaults()["adversarial_classifier"] is False


# ------------------------------------------------------------------------------ bad input
def test_bad_protein_input_raises_and_changes_nothing():
    adata = citeseq(n_cells=60, n_proteins=4)
    before = adata.obsm[KEY].copy()
    with pytest.raises(KeyError, match="protein_expression_obsm_key"):
        TOTALVI.setup_anndata(adata, protein_expression_obsm_key="adt")
    bad = adata.copy()
    bad.obsm[KEY] = np.stack([before, before], axis=2)  # (cells, proteins, 2)
    with pytest.raises(ValueError, match="must be a \\(cells, features\\) matrix"):
        setup_cite(bad)
    bad.obsm[KEY] = np.log1p(before)
    with pytest.raises(ValueError, match="log-transformed or normalised"):
        setup_cite(bad)
    bad.obsm[KEY] = before - before.mean(0)
    with pytest.raises(ValueError, match="negative values.*CLR"):
        setup_cite(bad)
    bad.obsm[KEY] = np.where(before > 5, np.nan, before)
    with pytest.raises(ValueError, match="NaN"):
        setup_cite(bad)
    bad = adata.copy()
    bad.uns["protein_names"] = np.array(["a", "b", "c"])
    with pytest.raises(ValueError, match="3 names but"):
        setup_cite(bad)
    bad.uns["protein_names"] = np.array(["a", "b", "a", "c"])
    with pytest.raises(ValueError, match="duplicates"):
        setup_cite(bad)
    bad = adata.copy()
    bad.obsm[KEY] = pd.DataFrame(before, index=adata.obs_names, columns=list("wxyz"))
    with pytest.raises(ValueError, match="other proteins than the columns"):
        setup_cite(bad)
    TOTALVI.setup_anndata(bad, protein_expression_obsm_key=KEY)  # the columns are the names
    zero = adata.copy()
    zero.obsm[KEY] = np.zeros_like(before)
    with pytest.raises(ValueError, match="all zeros"):
        setup_cite(zero)
    some = adata.copy()
    y = before.copy()
    y[:, 2] = 0
    some.obsm[KEY] = y
    with pytest.warns(UserWarning, match="zero in every cell"):
        setup_cite(some)
    np.testing.assert_array_equal(adata.obsm[KEY], before)  # nothing the user owns changed
    assert set(adata.obsm) == {KEY, "foreground"}
    # an AnnData of another panel is refused by a trained model's queries
    setup_cite(adata)
    m = TOTALVI(adata, n_hidden=16, n_latent=4)
    other = adata.copy()
    other.uns["protein_names"] = np.array(["p0", "p1", "p3", "p2"])
    with pytest.raises(ValueError, match="other proteins than the model's"):
        m.get_latent_representation(other)
    with pytest.raises(TypeError, match="sets .* from the data set-up"):
        TOTALVI(adata, n_input_proteins=3)
    plain = citeseq(n_cells=30)
    TOTALVI.setup_anndata  # noqa: B018
    from cellvi.model import SCVI

    SCVI.setup_anndata(plain)
    with pytest.raises(ValueError, match="not set up for TOTALVI"):
        TOTALVI(plain)


# ------------------------------------------------------------------------------ the prior
def test_two_gaussian_em_matches_scikit_learn():
    from sklearn.mixture import GaussianMixture

    rng = np.random.default_rng(0)
    cols = []
    for _ in range(5):
        a = rng.normal(rng.uniform(0.5, 2.5), rng.uniform(0.2, 0.5), int(rng.integers(150, 350)))
        b = rng.normal(rng.uniform(4, 6), rng.uniform(0.3, 0.8), 500 - len(a))
        cols.append(rng.permutation(np.concatenate([a, b])))
    x = np.stack(cols, 1)
    means, variances, weights = fit_two_gaussians(x)
    for j in range(x.shape[1]):
        gm = GaussianMixture(2, tol=1e-9, max_iter=2000, random_state=0).fit(x[:, [j]])
        order = np.argsort(gm.means_.ravel())
        np.testing.assert_allclose(means[j], gm.means_.ravel()[order], atol=2e-3)
        np.testing.assert_allclose(variances[j], gm.covariances_.ravel()[order], rtol=1e-2)
        np.testing.assert_allclose(weights[j], gm.weights_[order], atol=2e-3)
    # constant and two-valued columns stay finite
    m, v, w = fit_two_gaussians(np.c_[np.zeros(50), np.r_[np.zeros(25), np.ones(25)]])
    assert np.isfinite(m).all() and np.isfinite(v).all() and (v > 0).all()


def test_empirical_prior_starts_at_the_background_per_protein_and_batch():
    adata = citeseq(n_cells=600, n_proteins=12, seed=4)
    y = adata.obsm[KEY]
    codes = adata.obs["batch"].cat.codes.to_numpy()
    mask = np.ones((2, 12), dtype=bool)
    mask[1, 0] = False
    mean, scale = empirical_background_prior(y, codes, mask)
    assert mean.shape == scale.shape == (12, 2) and (scale >= MIN_BACKGROUND_SCALE).all()
    fg = adata.obsm["foreground"]
    for j in range(1, 12):  # the lower component is the background's log counts
        back = np.log1p(y[(codes == 1) & ~fg[:, j], j])
        assert abs(mean[j, 1] - back.mean()) < 0.35
    assert mean[0, 1] == 0 and scale[0, 1] == 1  # not measured there
    setup_cite(adata)
    m = TOTALVI(adata, n_hidden=16)  # more than 10 proteins: on by default
    got = m.module.background_pro_alpha.detach().numpy()
    np.testing.assert_allclose(got[1:], empirical_background_prior(y, codes, np.ones((2, 12),
                                                                                      bool))[0][1:],
                               rtol=1e-5)
    off = TOTALVI(adata, n_hidden=16, empirical_protein_background_prior=False)
    assert (off.module.background_pro_alpha.detach().numpy() == 3.0).all()


# ------------------------------------------------------------------------------ real data
def _pbmc_two_panels():
    folder = shared_data("pbmc_citeseq")
    parts = []
    for name in ("pbmc_10k_protein_v3", "pbmc_5k_protein_v3"):
        a = anndata.read_h5ad(folder / f"{name}.h5ad")
        a.obsm[KEY] = pd.DataFrame(a.obsm[KEY], index=a.obs_names,
                                   columns=[str(p) for p in a.uns["protein_names"]])
        a.obs["batch"] = name
        del a.uns["protein_names"]
        parts.append(a)
    genes = parts[0].var_names.intersection(parts[1].var_names)
    union = sorted(set(parts[0].obsm[KEY].columns) | set(parts[1].obsm[KEY].columns))
    for a in parts:
        a.obsm[KEY] = a.obsm[KEY].reindex(columns=union, fill_value=0)
    adata = anndata.concat([a[:, genes] for a in parts], index_unique="-")
    top = np.argsort(-np.asarray(adata.X.sum(0)).ravel())[:1500]  # a small test
    adata = adata[:, np.sort(top)].copy()
    adata.X = sp.csr_matrix(adata.X.astype(np.float32))
    return adata


@pytest.mark.parametrize("seed", [0, 1])
def test_pbmc_two_panels_trains_with_the_empirical_prior_without_nan(seed):
    adata = _pbmc_two_panels()
    assert adata.obsm[KEY].shape[1] == 29
    TOTALVI.setup_anndata(adata, protein_expression_obsm_key=KEY, batch_key="batch")
    with pytest.warns(UserWarning, match="all-zero counts"):
        model = TOTALVI(adata, empirical_protein_background_prior=True)
    mask = model.module.protein_batch_mask.numpy()
    assert mask.sum(1).tolist() == [14, 29] or sorted(mask.sum(1).tolist()) == [14, 29]
    model.train(max_epochs=25, seed=seed, progress_bar=False)
    assert np.isfinite(model.history["elbo_validation"]).all()
    assert np.isfinite(model.get_latent_representation()).all()


def test_cd8_csv_reads_and_trains():
    from cellvi.data import read_citeseq_csv

    folder = shared_data("cd8_citeseq")
    adata = read_citeseq_csv(folder / "GSE100866_CD8_merged-RNA_umi.csv.gz",
                             folder / "GSE100866_CD8_merged-ADT_umi.csv.gz")
    assert adata.obsm[KEY].shape == (1774, 5)
    adata = adata[:, np.asarray(adata.X.sum(0)).ravel() >= 200].copy()
    adata = adata[np.asarray(adata.X.sum(1)).ravel() > 0].copy()
    TOTALVI.setup_anndata(adata, protein_expression_obsm_key=KEY,
                          protein_names_uns_key="protein_names")
    model = TOTALVI(adata, empirical_protein_background_prior=True)
    model.train(max_epochs=4, seed=0, progress_bar=False)
    assert np.isfinite(model.history["elbo_validation"]).all()
    assert list(model.get_protein_foreground_probability().columns) == list(
        adata.uns["protein_names"])
