from importlib import resources
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cellvi.data._datasets import _loess, highly_variable_genes, kang_ifnb, pbmc_ifnb

KANG = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "kang_ifnb"


def test_pbmc_ifnb():
    adata = pbmc_ifnb()
    assert adata.n_obs == 2000
    assert 1000 <= adata.n_vars <= 9015
    assert sp.issparse(adata.X) and adata.X.format == "csr" and adata.X.dtype == np.float32
    assert np.array_equal(adata.X.data, np.round(adata.X.data)) and adata.X.data.min() > 0
    assert isinstance(adata.obs["batch"].dtype, pd.CategoricalDtype)
    assert adata.obs["batch"].value_counts().to_dict() == {"ctrl": 1000, "stim": 1000}
    assert adata.var["highly_variable"].all()
    assert adata.obs_names.is_unique and adata.var_names.is_unique
    assert (np.asarray(adata.X.sum(axis=1)).ravel() > 0).all()
    # a fresh object every call
    adata.X.data[:] = 0
    adata.obs["batch"] = "x"
    again = pbmc_ifnb()
    assert again.X.sum() > 0 and set(again.obs["batch"]) == {"ctrl", "stim"}


def test_pbmc_ifnb_file_size():
    ref = resources.files("cellvi.data").joinpath("_datasets/pbmc_ifnb.h5ad")
    with resources.as_file(ref) as p:
        assert 0 < Path(p).stat().st_size < 2_000_000


def test_kang_ifnb_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist.*pbmc_ifnb"):
        kang_ifnb(tmp_path / "nowhere")
    (tmp_path / "k").mkdir()
    with pytest.raises(FileNotFoundError, match="ctrl_counts_genes_x_cells.mtx.gz"):
        kang_ifnb(tmp_path / "k")


def test_kang_ifnb_matches_packaged():
    """The packaged file is the reader's output on its stored genes; the rule picks ~the same."""
    if not KANG.exists():
        pytest.skip(f"{KANG} not available")
    packaged = pbmc_ifnb()
    full = kang_ifnb(KANG)
    assert list(full.obs_names) == list(packaged.obs_names)
    # the packaged genes are the definition of the dataset: the same counts, exactly
    sub = full[:, list(packaged.var_names)]
    assert (sp.csr_matrix(sub.X) != packaged.X).nnz == 0
    # the selection rule agrees on (at least) 99.5 % of the genes, whatever the platform
    adata = kang_ifnb(KANG, n_top_genes=packaged.n_vars)
    assert adata.var["highly_variable"].all() and adata.n_vars == packaged.n_vars
    shared = len(set(adata.var_names) & set(packaged.var_names))
    assert shared >= 0.995 * packaged.n_vars


def test_highly_variable_genes_ignores_rounding_noise(monkeypatch):
    """Genes with identical counts tie; noise in the last bits must not reorder them."""
    import cellvi.data._datasets as datasets

    rng = np.random.default_rng(3)
    n_cells = 500
    mean = 10 ** rng.uniform(-2, 1, 150)
    theta = np.where(rng.random(150) < 0.2, 0.3, 30.0)
    counts = _nb_counts(rng, n_cells, mean, theta)
    # 150 genes with a single count of 1 (in different cells): one large exact tie
    single = np.zeros((n_cells, 150))
    single[rng.choice(n_cells, 150, replace=False), np.arange(150)] = 1
    adata = anndata.AnnData(X=sp.csr_matrix(np.hstack([counts, single]).astype(np.float32)))
    base = highly_variable_genes(adata, n_top_genes=160)
    assert 0 < base[150:].sum() < 150  # the cut falls inside the tie
    exact = datasets._loess
    noise = np.random.default_rng(4)

    def noisy_loess(x, y, **kwargs):
        fit = exact(x, y, **kwargs)
        return fit * (1 + noise.normal(0, 1e-12, fit.size))

    monkeypatch.setattr(datasets, "_loess", noisy_loess)
    for _ in range(3):
        np.testing.assert_array_equal(highly_variable_genes(adata, n_top_genes=160), base)


def test_loess_recovers_smooth_trend():
    rng = np.random.default_rng(0)
    x = rng.uniform(-3, 2, 2000)
    truth = np.log10(10**x + 10 ** (2 * x) / 0.5)
    fit = _loess(x, truth + rng.normal(0, 0.1, x.size))
    assert np.abs(fit - truth).max() < 0.05
    # ties and constant x are handled (no NaN)
    assert np.isfinite(_loess(np.zeros(50), rng.normal(size=50))).all()


def _nb_counts(rng, n_cells, mean, theta):
    lam = rng.gamma(theta, mean / theta, size=(n_cells, mean.size))
    return rng.poisson(lam)


def test_highly_variable_genes_finds_overdispersed_genes():
    rng = np.random.default_rng(1)
    n_cells, n_genes = 400, 300
    mean = 10 ** rng.uniform(-1.5, 1.0, n_genes)
    theta = np.full(n_genes, 20.0)
    planted = rng.choice(n_genes, 20, replace=False)
    theta[planted] = 0.2
    counts = _nb_counts(rng, n_cells, mean, theta)
    counts[:, 0] = 0  # a constant gene
    planted = planted[planted != 0]
    adata = anndata.AnnData(X=sp.csr_matrix(counts.astype(np.float32)))
    mask = highly_variable_genes(adata, n_top_genes=20)
    assert mask.dtype == bool and mask.sum() == 20 and not mask[0]
    assert mask[planted].mean() >= 0.85
    # dense input and a layer give the same answer
    adata.layers["counts"] = counts
    np.testing.assert_array_equal(
        highly_variable_genes(adata, n_top_genes=20, layer="counts"), mask
    )


def test_highly_variable_genes_batches():
    rng = np.random.default_rng(2)
    n_genes = 200
    mean = 10 ** rng.uniform(-1, 1, n_genes)
    theta_a, theta_b = np.full(n_genes, 20.0), np.full(n_genes, 20.0)
    theta_a[:10] = 0.2  # variable in batch a only
    theta_b[10:20] = 0.2  # variable in batch b only
    theta_a[20:25] = theta_b[20:25] = 0.2  # variable in both
    counts = np.vstack([_nb_counts(rng, 300, mean, theta_a), _nb_counts(rng, 300, mean, theta_b)])
    obs = pd.DataFrame({"batch": ["a"] * 300 + ["b"] * 300})
    obs.index = obs.index.astype(str)
    adata = anndata.AnnData(X=sp.csr_matrix(counts.astype(np.float32)), obs=obs)
    mask = highly_variable_genes(adata, n_top_genes=25, batch_key="batch")
    assert mask.sum() == 25 and mask[20:25].all()  # variable in both batches: always in
    assert mask[:20].mean() >= 0.5
    # ignoring the batches mixes them up: not the same selection
    assert not np.array_equal(highly_variable_genes(adata, n_top_genes=25), mask)
    with pytest.raises(KeyError, match="nope"):
        highly_variable_genes(adata, n_top_genes=5, batch_key="nope")
    with pytest.raises(ValueError, match="n_top_genes"):
        highly_variable_genes(adata, n_top_genes=0)
