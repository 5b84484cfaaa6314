"""cellvi.external.scvi: the scanpy-style one-call wrapper, on the packaged Kang PBMC subset."""

import warnings

import numpy as np
import pandas as pd
import pytest
import torch

import cellvi
from cellvi.external import scvi
from cellvi.model import SCVI, LinearSCVI

FAST = dict(progress_bar=False, seed=0, batch_size=256)
N_GENES = 300


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def kang():
    return cellvi.data.pbmc_ifnb()


def snapshot(adata):
    return (
        adata.X.copy(),
        adata.obs.copy(),
        adata.var.copy(),
        set(adata.uns),
        set(adata.obsm),
        list(adata.var_names),
    )


def assert_unchanged(adata, snap, new_obsm=(), new_uns=()):
    X, obs, var, uns, obsm, names = snap
    assert (adata.X != X).nnz == 0
    pd.testing.assert_frame_equal(adata.obs, obs)
    pd.testing.assert_frame_equal(adata.var, var)
    assert list(adata.var_names) == names
    assert set(adata.uns) == uns | set(new_uns)
    assert set(adata.obsm) == obsm | set(new_obsm)


KEYS = ("X_scvi", "X_scvi_denoised", "X_scvi_sample_rate")


def test_in_place_scvi_on_hvgs(kang):
    adata = kang.copy()
    # the most expressed genes as "highly variable": no cell is left without counts
    top = np.sort(np.argsort(-np.asarray(adata.X.sum(0)).ravel())[:N_GENES])
    adata.var["highly_variable"] = np.isin(np.arange(adata.n_vars), top)
    snap = snapshot(adata)
    model = scvi(
        adata, n_latent=6, n_epochs=2, batch_key="batch", use_cuda=False, trainer_kwargs=FAST
    )
    assert isinstance(model, SCVI) and model.is_trained
    assert model.summary.var_names == list(adata.var_names[top])
    assert_unchanged(adata, snap, new_obsm=KEYS)
    assert adata.obsm["X_scvi"].shape == (adata.n_obs, 6)
    den = adata.obsm["X_scvi_denoised"]
    rate = adata.obsm["X_scvi_sample_rate"]
    assert den.shape == rate.shape == (adata.n_obs, N_GENES)
    np.testing.assert_allclose(den.sum(1), 1.0, rtol=1e-4)
    # observed library sizes: the NB means add up to each cell's total counts of those genes
    totals = np.asarray(adata.X[:, top].sum(1)).ravel()
    np.testing.assert_allclose(rate.sum(1), totals, rtol=1e-3)
    assert "ldvae_loadings" not in adata.uns


def test_copy_linear_returns_adata_and_model(kang):
    snap = snapshot(kang)
    genes = list(kang.var_names[100 : 100 + N_GENES])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = scvi(
            kang,
            n_latent=4,
            n_epochs=2,
            subset_genes=genes,
            linear_decoder=True,
            copy=True,
            use_cuda=False,
            trainer_kwargs=FAST,
        )
    assert isinstance(out, tuple) and len(out) == 2
    adata, model = out
    assert isinstance(model, LinearSCVI)
    assert adata is not kang
    assert_unchanged(kang, snap)  # the original is untouched
    assert_unchanged(adata, snap, new_obsm=KEYS, new_uns=["ldvae_loadings"])
    load = adata.uns["ldvae_loadings"]
    assert isinstance(load, pd.DataFrame)
    assert load.shape == (N_GENES, 4) and list(load.index) == genes
    assert list(load.columns) == ["Z_0", "Z_1", "Z_2", "Z_3"]
    pd.testing.assert_frame_equal(load, model.get_loadings())
    assert adata.obsm["X_scvi"].shape == (kang.n_obs, 4)
    assert adata.obsm["X_scvi_sample_rate"].shape == (kang.n_obs, N_GENES)
    assert np.all(adata.obsm["X_scvi_sample_rate"] > 0)


def test_return_options_and_all_genes(kang):
    small = kang[:400, :N_GENES].copy()
    out = scvi(
        small,
        n_epochs=1,
        copy=True,
        return_posterior=False,
        use_cuda=False,
        use_highly_variable_genes=False,
        trainer_kwargs=FAST,
    )
    assert isinstance(out, type(small))
    assert out.obsm["X_scvi_denoised"].shape == (400, N_GENES)
    assert "X_scvi" not in small.obsm
    pos = np.sort(np.argsort(-np.asarray(small.X.sum(0)).ravel())[:4]).tolist()  # expressed
    res = scvi(
        small,
        n_epochs=1,
        return_posterior=False,
        use_cuda=False,
        subset_genes=pos,
        linear_decoder=True,
        trainer_kwargs=FAST,
    )
    assert res is None
    assert set(KEYS) <= set(small.obsm) and small.obsm["X_scvi_denoised"].shape == (400, 4)
    assert list(small.uns["ldvae_loadings"].index) == list(small.var_names[pos])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_use_cuda_without_gpu_warns_and_falls_back(kang):
    small = kang[:200, :50].copy()
    small = small[np.asarray(small.X.sum(1)).ravel() > 0].copy()
    with pytest.warns(UserWarning, match="no CUDA GPU"):
        model = scvi(
            small, n_epochs=1, use_cuda=True, use_highly_variable_genes=False, trainer_kwargs=FAST
        )
    assert model.device.type == "cpu"


def test_errors(kang):
    small = kang[:100, :50].copy()
    no_hvg = small.copy()
    del no_hvg.var["highly_variable"]
    with pytest.raises(KeyError, match="highly_variable_genes"):
        scvi(no_hvg, n_epochs=1, use_cuda=False)
    assert "X_scvi" not in no_hvg.obsm
    with pytest.raises(ValueError, match="not in adata.var_names"):
        scvi(small, n_epochs=1, use_cuda=False, subset_genes=["NOT_A_GENE"])
    with pytest.raises(KeyError, match="batch_key"):
        scvi(small, n_epochs=1, use_cuda=False, batch_key="donor")
    with pytest.raises(TypeError, match="n_epochs"):
        scvi(small, use_cuda=False, trainer_kwargs=dict(max_epochs=3))
    none_hvg = small.copy()
    none_hvg.var["highly_variable"] = False
    with pytest.raises(ValueError, match="No gene is marked"):
        scvi(none_hvg, n_epochs=1, use_cuda=False)
    normalized = small.copy()
    normalized.X = normalized.X * 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="raw counts"):
            scvi(normalized, n_epochs=1, use_cuda=False)


def test_cells_empty_in_the_selected_genes(kang):
    small = kang[:300].copy()
    genes = list(small.var_names[100 : 100 + 200])
    empty = np.asarray(small[:, genes].X.sum(1)).ravel() == 0
    assert empty.any()
    with pytest.warns(UserWarning, match="modelling the library size"):
        model = scvi(small, n_epochs=1, subset_genes=genes, use_cuda=False, trainer_kwargs=FAST)
    assert not model.module.use_observed_lib_size
    assert np.isfinite(small.obsm["X_scvi"]).all()
    with pytest.raises(ValueError, match="no counts"):
        scvi(
            small,
            n_epochs=1,
            subset_genes=genes,
            use_cuda=False,
            model_kwargs=dict(use_observed_lib_size=True),
        )
