"""SCVI really learns: cell types separate, batches mix, the ELBO rises."""

import numpy as np
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_rand_score
from sklearn.neighbors import NearestNeighbors

from cellvi.model import SCVI


def batch_mixing(latent: np.ndarray, batches: np.ndarray, k: int = 30) -> float:
    """Mean fraction of each cell's k nearest neighbours that come from another batch."""
    nn = NearestNeighbors(n_neighbors=k + 1).fit(latent)
    _, idx = nn.kneighbors(latent)
    return float((batches[idx[:, 1:]] != batches[:, None]).mean())


def test_latent_separates_types_and_mixes_batches(sim):
    adata = sim(1000, 200, 4, 2, batch_effect=0.8, batch_genes=0.3, seed=0)
    SCVI.setup_anndata(adata, batch_key="batch")
    model = SCVI(adata)
    # a KL warm-up in proportion to the short run (the default, 400 epochs, suits 400 epochs)
    model.train(max_epochs=150, n_epochs_kl_warmup=20, seed=0, progress_bar=False)

    hist = model.history
    assert hist["elbo_train"].iloc[-1] > hist["elbo_train"].iloc[0] + 10

    z = model.get_latent_representation()
    types = adata.obs["cell_type"].cat.codes.to_numpy()
    batches = adata.obs["batch"].cat.codes.to_numpy()
    ari = adjusted_rand_score(types, KMeans(4, n_init=10, random_state=0).fit_predict(z))
    assert ari >= 0.8, ari

    x = adata.X.toarray()
    log_norm = np.log1p(x / x.sum(1, keepdims=True) * 1e4)
    pca = PCA(10, random_state=0).fit_transform(log_norm)
    mix_scvi, mix_pca = batch_mixing(z, batches), batch_mixing(pca, batches)
    assert mix_scvi > mix_pca + 0.1, (mix_scvi, mix_pca)


def test_marginal_ll_at_least_elbo(sim):
    adata = sim(400, 100, 3, 2, seed=3)
    SCVI.setup_anndata(adata, batch_key="batch")
    model = SCVI(adata, use_observed_lib_size=False)
    model.train(max_epochs=30, seed=0, progress_bar=False)
    elbo = model.get_elbo()
    ll = model.get_marginal_ll(n_mc_samples=200)
    assert elbo < 0 and ll < 0
    assert ll >= elbo - 0.5, (ll, elbo)
    rec = model.get_reconstruction_error()["reconstruction_loss"]
    assert rec > 0 and -rec > elbo  # the KL makes the ELBO lower than the log-likelihood term
