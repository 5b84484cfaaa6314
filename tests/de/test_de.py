"""Bayesian differential expression: calibrated on simulated data with known DE genes."""

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from sklearn.metrics import roc_auc_score

from cellvi.de import de_statistics, fdr_de_prediction
from cellvi.model import SCVI

N_CELLS, N_GENES, FRAC_DE = 1000, 300, 0.12


def simulate_de(seed: int = 0):
    """Two cell types, two batches; 12% of genes with |log2 FC| in [1, 2] between the types."""
    rng = np.random.default_rng(seed)
    types = rng.integers(0, 2, N_CELLS)
    batches = rng.integers(0, 2, N_CELLS)
    base = rng.normal(0, 1.2, N_GENES)  # log mean expression
    n_de = int(FRAC_DE * N_GENES)
    is_de = np.zeros(N_GENES, dtype=bool)
    is_de[rng.choice(N_GENES, n_de, replace=False)] = True
    lfc = np.zeros(N_GENES)
    lfc[is_de] = rng.uniform(1, 2, n_de) * rng.choice([-1, 1], n_de)  # log2 FC of B over A
    batch_effect = rng.normal(0, 0.3, (2, N_GENES))
    logmu = base + np.where(types[:, None] == 1, lfc * np.log(2), 0.0) + batch_effect[batches]
    scale = np.exp(logmu)
    scale /= scale.sum(1, keepdims=True)
    library = rng.lognormal(np.log(1500), 0.3, N_CELLS)
    mu = scale * library[:, None]
    theta = 5.0
    counts = rng.negative_binomial(theta, theta / (theta + mu)).astype(np.float32)
    adata = anndata.AnnData(sp.csr_matrix(counts))
    adata.obs_names = [f"cell{i}" for i in range(N_CELLS)]
    adata.var_names = [f"gene{j}" for j in range(N_GENES)]
    adata.obs["cell_type"] = pd.Categorical(np.where(types == 1, "B", "A"))
    adata.obs["batch"] = pd.Categorical([f"b{b}" for b in batches])
    return adata, pd.Series(is_de, index=adata.var_names), pd.Series(lfc, index=adata.var_names)


@pytest.fixture(scope="module")
def one_thread():
    # tiny matrices: a second intra-op thread only adds contention on a busy 2-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def fitted(one_thread):
    adata, is_de, lfc = simulate_de(0)
    SCVI.setup_anndata(adata, batch_key="batch")
    model = SCVI(adata, n_latent=5, gene_likelihood="nb")
    model.train(max_epochs=60, seed=0, progress_bar=False)
    return model, is_de, lfc


def test_change_mode_ranks_true_de_genes_and_controls_fdr(fitted):
    model, is_de, lfc = fitted
    res = model.differential_expression(
        groupby="cell_type",
        group1="B",
        group2="A",
        mode="change",
        delta=0.5,
        fdr_target=0.05,
        seed=0,
        silent=True,
    )
    assert len(res) == N_GENES and res.index.is_unique
    truth = is_de[res.index].to_numpy()
    auroc = roc_auc_score(truth, res["bayes_factor"])
    assert auroc >= 0.9, auroc
    called = res["is_de_fdr_0.05"].to_numpy()
    fdp = (called & ~truth).sum() / max(called.sum(), 1)
    assert fdp <= 0.10, fdp
    assert (called & truth).sum() >= 0.25 * truth.sum()  # and it has power
    # the posterior LFC estimates the true one, with the right sign
    r = np.corrcoef(res["lfc_mean"], lfc[res.index])[0, 1]
    assert r >= 0.8, r
    assert res["bayes_factor"].is_monotonic_decreasing
    assert (res["comparison"] == "B vs A").all()
    assert (res["group1"] == "B").all() and (res["group2"] == "A").all()


def test_vanilla_mode_columns_and_direction(fitted):
    model, is_de, lfc = fitted
    res = model.differential_expression(
        groupby="cell_type", group1="B", group2="A", seed=1, silent=True
    )
    expected = [
        "proba_de",
        "proba_not_de",
        "bayes_factor",
        "scale1",
        "scale2",
        "lfc_mean",
        "lfc_median",
        "lfc_std",
        "lfc_min",
        "lfc_max",
        "raw_mean1",
        "raw_mean2",
        "non_zeros_proportion1",
        "non_zeros_proportion2",
        "raw_normalized_mean1",
        "raw_normalized_mean2",
        "is_de_fdr_0.05",
        "comparison",
        "group1",
        "group2",
    ]
    group_columns = ["lfc_estimate", "lfc_se", "null_lfc", "proba_m1", "proba_m2",
                     "pseudocounts"]
    assert list(res.columns) == expected[:10] + group_columns + expected[10:]
    np.testing.assert_allclose(res["proba_de"] + res["proba_not_de"], 1.0)
    p = res["proba_de"]
    np.testing.assert_allclose(res["bayes_factor"], np.log(p + 1e-8) - np.log(1 - p + 1e-8))
    truth = is_de[res.index].to_numpy()
    assert roc_auc_score(truth, res["bayes_factor"].abs()) >= 0.9
    # genes up in B have P(scale_B > scale_A) near 1, genes down near 0
    up, down = lfc[res.index] >= 1, lfc[res.index] <= -1
    p_up, p_down = res["proba_de"][up.to_numpy()], res["proba_de"][down.to_numpy()]
    assert p_up.median() > 0.95 and p_up.mean() > 0.9
    assert p_down.median() < 0.05 and p_down.mean() < 0.1
    assert (res["lfc_min"] <= res["lfc_median"]).all() and (
        res["lfc_median"] <= res["lfc_max"]
    ).all()
    assert (res["lfc_std"] >= 0).all()


def test_raw_statistics_are_exact(fitted):
    model, _, _ = fitted
    res = model.differential_expression(
        groupby="cell_type", group1="B", group2="A", n_samples=50, seed=0, silent=True
    )
    adata = model.adata
    x = adata.X.toarray().astype(np.float64)
    b = (adata.obs["cell_type"] == "B").to_numpy()
    xb, xa = x[b], x[~b]
    genes = adata.var_names.get_indexer(res.index)
    np.testing.assert_allclose(res["raw_mean1"], xb.mean(0)[genes], rtol=1e-6)
    np.testing.assert_allclose(res["raw_mean2"], xa.mean(0)[genes], rtol=1e-6)
    np.testing.assert_allclose(res["non_zeros_proportion1"], (xb > 0).mean(0)[genes])
    norm_a = (xa / xa.sum(1, keepdims=True) * 1e4).mean(0)
    np.testing.assert_allclose(res["raw_normalized_mean2"], norm_a[genes], rtol=1e-5)


def test_each_group_vs_rest_and_idx_equivalence(fitted):
    model, _, _ = fitted
    res = model.differential_expression(groupby="cell_type", n_samples=500, seed=0, silent=True)
    assert list(pd.unique(res["comparison"])) == ["A vs Rest", "B vs Rest"]
    assert len(res) == 2 * N_GENES
    assert set(res["group2"]) == {"Rest"}
    a = res[res["group1"] == "A"]
    b = res[res["group1"] == "B"]
    # with two groups, "A vs Rest" mirrors "B vs Rest"
    r = np.corrcoef(a["lfc_mean"], -b.loc[a.index, "lfc_mean"])[0, 1]
    assert r > 0.95

    # idx1/idx2 give exactly the groupby result with the same seed
    is_b = (model.adata.obs["cell_type"] == "B").to_numpy()
    by_group = model.differential_expression(
        groupby="cell_type", group1="B", group2="A", n_samples=500, seed=3, silent=True
    )
    by_idx = model.differential_expression(
        idx1=np.flatnonzero(is_b), idx2=~is_b, n_samples=500, seed=3, silent=True
    )
    num = by_group.columns[:16]
    pd.testing.assert_frame_equal(by_group[num], by_idx[num])
    assert (by_idx["comparison"] == "idx1 vs idx2").all()
    rest = model.differential_expression(idx1=is_b, n_samples=100, seed=0, silent=True)
    assert (rest["group2"] == "Rest").all()


def test_seeded_and_on_another_anndata(fitted):
    model, _, _ = fitted
    kw = dict(groupby="cell_type", group1="A", n_samples=300, seed=7, silent=True)
    state = torch.random.get_rng_state()
    r1 = model.differential_expression(**kw)
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched
    r2 = model.differential_expression(adata=model.adata.copy(), **kw)
    pd.testing.assert_frame_equal(r1, r2)
    r3 = model.differential_expression(**{**kw, "seed": 8})
    assert not np.allclose(r1["scale1"], r3.loc[r1.index, "scale1"])


def test_batch_correction_and_gene_list(fitted):
    model, is_de, _ = fitted
    res = model.differential_expression(
        groupby="cell_type",
        group1="B",
        group2="A",
        mode="change",
        delta=0.5,
        batch_correction=True,
        seed=0,
        silent=True,
    )
    assert roc_auc_score(is_de[res.index], res["bayes_factor"]) >= 0.9
    one = model.differential_expression(
        groupby="cell_type",
        group1="B",
        group2="A",
        batch_correction=True,
        batchid1=["b0"],
        batchid2="b0",
        n_samples=200,
        seed=0,
        silent=True,
    )
    assert len(one) == N_GENES
    genes = ["gene5", "gene1", "gene42"]
    sub = model.differential_expression(
        groupby="cell_type", group1="B", gene_list=genes, n_samples=200, seed=0, silent=True
    )
    assert sorted(sub.index) == sorted(genes)


def test_progress_bar(fitted, capsys):
    model, _, _ = fitted
    model.differential_expression(groupby="cell_type", n_samples=50, silent=False)
    assert "DE comparisons" in capsys.readouterr().err
    model.differential_expression(groupby="cell_type", n_samples=50, silent=True)
    assert "DE comparisons" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(groupby="nope"), KeyError, "not a column of adata.obs"),
        (dict(groupby="cell_type", group1="C"), ValueError, "not in adata.obs"),
        (dict(groupby="cell_type", group1="B", group2="Z"), ValueError, "not in adata.obs"),
        (dict(groupby="cell_type", group1="B", group2="B"), ValueError, "same group"),
        (dict(groupby="cell_type", idx1=[0, 1]), ValueError, "not both"),
        (dict(), ValueError, "Give groupby"),
        (dict(group1="B"), ValueError, "pass groupby"),
        (dict(idx1=[0, 1, 2], idx2=[2, 3]), ValueError, "overlap"),
        (dict(idx1=[]), ValueError, "Empty group"),
        (dict(idx1=np.arange(N_CELLS)), ValueError, "Empty group"),
        (dict(idx1=[0], idx2=np.array([], dtype=int)), ValueError, "Empty group"),
        (dict(groupby="cell_type", mode="change", delta=0), ValueError, "delta must be > 0"),
        (dict(groupby="cell_type", delta=-1.0), ValueError, "delta must be > 0"),
        (dict(groupby="cell_type", effect="pairs"), ValueError, "effect must be"),
        (dict(groupby="cell_type", weights="iw"), ValueError, "weights must be"),
        (dict(groupby="cell_type", null_lfc="median"), ValueError, "null_lfc"),
        (
            dict(groupby="cell_type", weights="importance",
                 importance_weighting_kwargs={"anchors": 3}),
            ValueError,
            "Unknown importance_weighting_kwargs",
        ),
        (
            dict(groupby="cell_type", weights="importance", batch_correction=True),
            ValueError,
            "one batch",
        ),
        (dict(groupby="cell_type", fdr_target=0), ValueError, "fdr_target"),
        (dict(groupby="cell_type", fdr_target=1.5), ValueError, "fdr_target"),
        (dict(groupby="cell_type", mode="bogus"), ValueError, "mode must be"),
        (dict(groupby="cell_type", gene_list=["gene1", "XYZ"]), ValueError, "not in the model"),
        (dict(groupby="cell_type", batchid1=["b0"]), ValueError, "batch_correction=True"),
        (
            dict(groupby="cell_type", batch_correction=True, batchid2=["b9"]),
            ValueError,
            "not a batch",
        ),
        (dict(groupby="cell_type", n_samples=0), ValueError, "n_samples"),
    ],
)
def test_bad_input(fitted, kwargs, error, match):
    model, _, _ = fitted
    with pytest.raises(error, match=match):
        model.differential_expression(silent=True, **{"n_samples": 10, **kwargs})


def test_one_group_only_has_no_rest(fitted):
    model, _, _ = fitted
    adata = model.adata.copy()
    adata.obs["one"] = "x"
    with pytest.raises(ValueError, match="Empty group"):
        model.differential_expression(adata=adata, groupby="one", silent=True)


def test_fdr_prediction_by_hand():
    p = np.array([0.99, 0.2, 0.97, 0.9, 0.5])
    # sorted: .99 .97 .9 .5 .2 -> running mean of 1-p: .01 .02 .0467 .16 ...
    np.testing.assert_array_equal(fdr_de_prediction(p, 0.05), [True, False, True, True, False])
    np.testing.assert_array_equal(fdr_de_prediction(p, 0.015), [True] + [False] * 4)
    assert not fdr_de_prediction(np.array([0.5, 0.4]), 0.05).any()
    with pytest.raises(ValueError, match="fdr_target"):
        fdr_de_prediction(p, 0.0)


def test_de_statistics_by_hand():
    s1 = np.array([[0.2, 0.1], [0.4, 0.1], [0.2, 0.3], [0.4, 0.3]])
    s2 = np.array([[0.1, 0.1], [0.1, 0.2], [0.1, 0.3], [0.8, 0.3]])
    van = de_statistics(s1, s2, mode="vanilla")
    np.testing.assert_allclose(van["proba_de"], [0.75, 0.0])
    np.testing.assert_allclose(van["scale1"], [0.3, 0.2])
    ch = de_statistics(s1, s2, mode="change", delta=0.9)
    # log2 ratios gene 0: 1, 2, 1, -1 ; gene 1: 0, -1, 0, 0
    np.testing.assert_allclose(ch["proba_de"], [1.0, 0.25])
    np.testing.assert_allclose(ch["lfc_mean"], [0.75, -0.25])
    np.testing.assert_allclose(ch["lfc_median"], [1.0, 0.0])
    np.testing.assert_allclose(ch["lfc_min"], [-1.0, -1.0])
    np.testing.assert_allclose(ch["bayes_factor"][0], np.log((1 + 1e-8) / 1e-8))
    with pytest.raises(ValueError, match="same shape"):
        de_statistics(s1, s2[:2])


def test_feature_correlation_matrix(fitted):
    model, is_de, lfc = fitted
    genes = list(lfc.index[lfc >= 1][:4]) + list(lfc.index[lfc <= -1][:4])
    for kind in ("spearman", "pearson"):
        corr = model.get_feature_correlation_matrix(
            n_samples=2, correlation_type=kind, gene_list=genes
        )
        assert corr.shape == (8, 8) and list(corr.index) == genes == list(corr.columns)
        np.testing.assert_allclose(corr.to_numpy(), corr.to_numpy().T, atol=1e-10)
        np.testing.assert_allclose(np.diag(corr), 1.0)
        c = corr.to_numpy()
        # genes moved together by the cell type correlate; up vs down anti-correlate
        assert c[:4, :4][np.triu_indices(4, 1)].mean() > 0.3
        assert c[:4, 4:].mean() < -0.3
    full = model.get_feature_correlation_matrix(
        n_samples=1, indices=np.arange(200), transform_batch=["b0", "b1"]
    )
    assert full.shape == (N_GENES, N_GENES)
    with pytest.raises(ValueError, match="correlation_type"):
        model.get_feature_correlation_matrix(correlation_type="kendall")
