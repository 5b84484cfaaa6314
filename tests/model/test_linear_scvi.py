"""LDVAE / LinearSCVI: a linear decoder whose loadings recover the factors of a linear model."""

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from cellvi.model import LinearSCVI
from cellvi.module import LDVAE
from cellvi.nn import LinearDecoderSCVI

K = 3


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny matrices: a second intra-op thread only adds contention on a busy 2-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def simulate_linear(n_cells=1000, n_genes=200, seed=0, sd=(1.6, 0.8, 0.4), library=300.0):
    """NB counts whose log expression is ``base + loadings @ factors + noise``.

    Each factor drives its own block of genes (a gene program), with clearly different strengths
    (a VAE's latent axes are only identified up to rotation by the mean-field posterior, which
    favours axes of different strengths); a last block of genes follows no factor. Modest library
    sizes keep the likelihood's noise from drowning that weak preference.
    """
    rng = np.random.default_rng(seed)
    k = len(sd)
    w = np.zeros((n_genes, k))
    blocks = np.array_split(rng.permutation(n_genes), k + 1)
    for j in range(k):
        w[blocks[j], j] = rng.normal(0, 1, len(blocks[j]))
        w[:, j] *= sd[j] / np.sqrt((w[:, j] ** 2).mean() * (k + 1))
    factors = rng.normal(size=(n_cells, k))
    log_expr = rng.normal(0, 1, n_genes) + factors @ w.T + rng.normal(0, 0.1, (n_cells, n_genes))
    scale = np.exp(log_expr)
    scale /= scale.sum(1, keepdims=True)
    library = rng.lognormal(np.log(library), 0.3, n_cells)
    mu = scale * library[:, None]
    theta = 10.0
    counts = rng.negative_binomial(theta, theta / (theta + mu)).astype(np.float32)
    adata = anndata.AnnData(sp.csr_matrix(counts))
    adata.obs_names = [f"cell{i}" for i in range(n_cells)]
    adata.var_names = [f"gene{j}" for j in range(n_genes)]
    adata.obs["batch"] = pd.Categorical(rng.choice(["a", "b"], n_cells))
    return adata, w


def matched_correlations(true: np.ndarray, learned: np.ndarray) -> np.ndarray:
    """|Pearson r| of each true column with its Hungarian-matched learned column."""
    k = true.shape[1]
    r = np.abs(np.corrcoef(true.T, learned.T)[:k, k:])
    rows, cols = linear_sum_assignment(-r)
    return r[rows, cols]


def test_loadings_recover_true_factors():
    adata, w = simulate_linear(seed=0)
    LinearSCVI.setup_anndata(adata)
    model = LinearSCVI(adata, n_latent=K)
    model.train(max_epochs=300, lr=1e-2, n_epochs_kl_warmup=20, seed=0, progress_bar=False)
    loadings = model.get_loadings()
    assert list(loadings.columns) == [f"Z_{i}" for i in range(K)]
    assert list(loadings.index) == list(adata.var_names)
    learned = loadings.to_numpy()
    r = matched_correlations(w, learned)
    assert (r >= 0.8).all(), r
    # and the loadings span the true factors' space (this part is rotation-free)
    lc, wc = learned - learned.mean(0), w - w.mean(0)
    coef = np.linalg.lstsq(lc, wc, rcond=None)[0]
    r2 = 1 - ((wc - lc @ coef) ** 2).sum(0) / (wc**2).sum(0)
    assert (r2 >= 0.85).all(), r2


def make_module(**kw):
    kw = {"library_log_means": np.zeros(2), "library_log_vars": np.ones(2), **kw}
    return LDVAE(n_input=30, n_batch=2, n_latent=4, n_hidden=16, **kw)


def test_ldvae_module_options():
    m = make_module()
    assert isinstance(m.decoder, LinearDecoderSCVI)
    assert not m.use_observed_lib_size and m.l_encoder is not None  # library modelled
    assert m.gene_likelihood == "nb" and m.dispersion == "gene"
    lin = m.decoder.factor_regressor.linears[0]
    assert lin.bias is None  # bias=False
    assert any(isinstance(x, nn.BatchNorm1d) for x in m.decoder.factor_regressor.posts[0])
    assert any(isinstance(x, nn.BatchNorm1d) for x in m.z_encoder.encoder.posts[0])

    m2 = make_module(use_batch_norm=False, bias=True, gene_likelihood="zinb")
    assert m2.decoder.factor_regressor.linears[0].bias is not None
    assert not any(isinstance(x, nn.BatchNorm1d) for x in m2.decoder.factor_regressor.posts[0])
    assert any(isinstance(x, nn.BatchNorm1d) for x in m2.z_encoder.encoder.posts[0])
    torch.testing.assert_close(
        m2.get_loadings(), m2.decoder.factor_regressor.linears[0].weight.t()
    )

    with pytest.raises(ValueError, match="gene-cell"):
        make_module(dispersion="gene-cell")
    with pytest.raises(TypeError, match="n_layers_encoder"):
        make_module(n_layers=2, n_layers_encoder=2)  # the same option twice
    assert make_module(n_layers_encoder=2).config.n_layers == 2
    with pytest.raises(ValueError, match="library_log_means"):
        LDVAE(n_input=30)
    assert LDVAE(n_input=30, use_observed_lib_size=True).use_observed_lib_size


def test_loadings_fold_the_batch_norm_and_drop_covariates():
    m = make_module(n_continuous_cov=2)
    bn = next(x for x in m.decoder.factor_regressor.posts[0] if isinstance(x, nn.BatchNorm1d))
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.running_var.uniform_(0.5, 3.0)
        bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-1, 1)
    m.eval()
    load = m.get_loadings()
    assert load.shape == (30, 4)
    # the loadings are the slope of the pre-softmax output in z
    z = torch.randn(5, 4)
    cont = torch.randn(5, 2)
    batch = torch.zeros(5, 1, dtype=torch.long)

    def pre_softmax(zz):
        return m.decoder.factor_regressor(torch.cat([zz, cont], -1), batch)

    dz = torch.zeros(5, 4)
    dz[:, 1] = 1.0
    with torch.no_grad():
        slope = pre_softmax(z + dz) - pre_softmax(z)
    torch.testing.assert_close(slope, load[:, 1].expand(5, 30), rtol=1e-4, atol=1e-5)


def test_ldvae_forward_loss_and_gradients():
    m = make_module(n_labels=3, dispersion="gene-batch")
    x = torch.poisson(torch.full((8, 30), 3.0))
    tensors = {"X": x, "batch": torch.randint(0, 2, (8, 1)), "labels": torch.zeros(8, 1)}
    m.train()
    _, gen, loss = m(tensors)
    assert torch.isfinite(loss.loss)
    torch.testing.assert_close(gen["px"].scale.sum(-1), torch.ones(8))
    loss.loss.backward()
    assert m.decoder.factor_regressor.linears[0].weight.grad is not None


def test_linear_scvi_queries_save_load_and_de(tmp_path):
    adata, _ = simulate_linear(n_cells=300, n_genes=60, seed=1)
    LinearSCVI.setup_anndata(adata, batch_key="batch")
    model = LinearSCVI(adata, n_latent=K, n_hidden=32, n_layers=2)
    assert model.module.z_encoder.encoder.linears.__len__() == 2
    model.train(max_epochs=3, seed=0, progress_bar=False)
    assert "LDVAE" in repr(model) and "modelled" in repr(model)
    load = model.get_loadings()
    assert load.shape == (60, K) and np.isfinite(load.to_numpy()).all()
    assert model.get_latent_representation().shape == (300, K)
    ne = model.get_normalized_expression(return_numpy=True)
    np.testing.assert_allclose(ne.sum(1), 1.0, rtol=1e-4)

    model.save(tmp_path / "ld")
    loaded = LinearSCVI.load(tmp_path / "ld", adata)
    pd.testing.assert_frame_equal(loaded.get_loadings(), load)

    de = model.differential_expression(groupby="batch", n_samples=50, seed=0, silent=True)
    assert set(de["comparison"]) == {"a vs Rest", "b vs Rest"}
