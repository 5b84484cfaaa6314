"""Every VAE option builds, trains an epoch and gives finite outputs."""

import numpy as np
import pytest
import torch

from cellvi import keys
from cellvi.distributions import NegativeBinomial, Poisson, ZeroInflatedNegativeBinomial
from cellvi.model import SCVI
from cellvi.module import VAE

OPTIONS = [
    {},
    {"dispersion": "gene-batch"},
    {"dispersion": "gene-label"},
    {"dispersion": "gene-cell"},
    {"gene_likelihood": "nb"},
    {"gene_likelihood": "poisson"},
    {"latent_distribution": "ln"},
    {"log_variational": False},
    {"encode_covariates": True},
    {"deeply_inject_covariates": False, "n_layers": 2},
    {"n_layers": 3, "n_hidden": 32},
    {"use_batch_norm": "none"},
    {"use_batch_norm": "encoder"},
    {"use_batch_norm": "decoder"},
    {"use_layer_norm": "both"},
    {"use_layer_norm": "encoder", "use_batch_norm": "none"},
    {"use_layer_norm": "decoder"},
    {"use_observed_lib_size": False},
    {"var_activation": torch.nn.functional.softplus},
    {"dropout_rate": 0.0, "n_latent": 3},
]


def _setup(adata, **kwargs):
    adata.obs["site"] = np.where(np.arange(adata.n_obs) % 3 == 0, "x", "y")
    adata.obs["age"] = np.linspace(-1, 1, adata.n_obs)
    adata.obs["sf"] = np.asarray(adata.X.sum(1)).ravel() / 100
    SCVI.setup_anndata(
        adata, batch_key="batch", labels_key="cell_type",
        categorical_covariate_keys=["site"], continuous_covariate_keys=["age"], **kwargs,
    )


def _option_id(options: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in options.items()) or "default"


@pytest.mark.parametrize("options", OPTIONS, ids=_option_id)
def test_option_trains_one_epoch(tiny, options):
    _setup(tiny)
    model = SCVI(tiny, **options)
    model.train(max_epochs=1, batch_size=64, progress_bar=False, seed=0)
    assert np.isfinite(model.history["elbo_train"]).all()
    z = model.get_latent_representation()
    assert z.shape == (tiny.n_obs, options.get("n_latent", 10)) and np.isfinite(z).all()
    if options.get("latent_distribution") == "ln":
        np.testing.assert_allclose(z.sum(1), 1, rtol=1e-4)
    expr = model.get_normalized_expression(return_numpy=True)
    np.testing.assert_allclose(expr.sum(1), 1, rtol=1e-4)
    assert np.isfinite(model.get_elbo())


def test_size_factor_key(tiny):
    _setup(tiny, size_factor_key="sf")
    model = SCVI(tiny)
    assert model.module.use_size_factor_key
    model.train(max_epochs=1, progress_bar=False)
    assert np.isfinite(model.get_elbo())


def _batch(n=32, g=20, n_batch=2):
    torch.manual_seed(0)
    return {
        keys.X: torch.poisson(torch.rand(n, g) * 5) + (torch.arange(g) == 0).float(),
        keys.BATCH: torch.randint(0, n_batch, (n, 1)),
        keys.LABELS: torch.zeros(n, 1, dtype=torch.long),
    }


@pytest.mark.parametrize(
    ("likelihood", "cls"),
    [("zinb", ZeroInflatedNegativeBinomial), ("nb", NegativeBinomial), ("poisson", Poisson)],
)
def test_generative_returns_distributions(likelihood, cls):
    vae = VAE(20, n_batch=2, gene_likelihood=likelihood).eval()
    batch = _batch()
    inf = vae.inference(**vae.inference_inputs(batch))
    gen = vae.generative(**vae.generative_inputs(batch, inf))
    assert isinstance(gen["px"], cls)
    assert isinstance(gen["pz"], torch.distributions.Normal)
    assert gen["pl"] is None
    torch.testing.assert_close(gen["px"].scale.sum(-1), torch.ones(32))


def test_loss_is_negative_elbo_with_warmup_weight():
    vae = VAE(20, n_batch=2, use_observed_lib_size=False,
              library_log_means=np.zeros(2), library_log_vars=np.ones(2)).eval()
    batch = _batch()
    torch.manual_seed(1)
    _, _, full = vae(batch, kl_weight=1.0)
    torch.manual_seed(1)
    _, _, half = vae(batch, kl_weight=0.5)
    assert set(full.kl_local) == {"kl_z", "kl_l"}
    expected = (full.reconstruction_loss + 0.5 * full.kl_local["kl_z"] + full.kl_local["kl_l"])
    torch.testing.assert_close(half.loss, expected.mean())


def test_inference_samples_shape_and_marginal_ll():
    vae = VAE(20, n_batch=2).eval()
    batch = _batch()
    inf = vae.inference(**vae.inference_inputs(batch), n_samples=7)
    assert inf["z"].shape == (7, 32, 10) and inf["library"].shape == (7, 32, 1)
    ll = vae.marginal_ll(batch, n_mc_samples=50, n_mc_samples_per_pass=20)
    assert ll.shape == (32,) and torch.isfinite(ll).all() and (ll < 0).all()
    with torch.no_grad():
        elbo = -vae(batch)[2].negative_elbo
    assert ll.mean() > elbo.mean() - 1.0
    x_new = vae.sample(batch, n_samples=3)
    assert x_new.shape == (32, 20, 3)
    assert vae.sample(batch).shape == (32, 20)


def test_transform_batch_changes_only_the_batch():
    vae = VAE(20, n_batch=2).eval()
    batch = _batch()
    inf = vae.inference(**vae.inference_inputs(batch))
    g0 = vae.generative(**vae.generative_inputs(batch, inf), transform_batch=0)["px"].scale
    all0 = dict(batch, **{keys.BATCH: torch.zeros_like(batch[keys.BATCH])})
    ref = vae.generative(**vae.generative_inputs(all0, inf))["px"].scale
    torch.testing.assert_close(g0, ref)


def test_invalid_options():
    with pytest.raises(ValueError, match="dispersion"):
        VAE(10, dispersion="cell")
    with pytest.raises(ValueError, match="gene_likelihood"):
        VAE(10, gene_likelihood="gaussian")
    with pytest.raises(ValueError, match="library_log_means"):
        VAE(10, use_observed_lib_size=False)
    with pytest.raises(ValueError, match="n_labels"):
        VAE(10, dispersion="gene-label")


def test_library_encoder_has_one_layer_whatever_n_layers():
    """As in scvi-tools: n_layers shapes the z encoder and decoder, the library encoder has one."""
    from cellvi.module import LDVAE

    for cls in (VAE, LDVAE):
        vae = cls(20, n_batch=2, n_layers=3, use_observed_lib_size=False,
                  library_log_means=[1.0, 2.0], library_log_vars=[0.5, 0.5])
        assert len(vae.z_encoder.encoder.linears) == 3
        assert len(vae.l_encoder.encoder.linears) == 1
        loss = vae({"X": torch.poisson(torch.full((8, 20), 2.0)),
                    "batch": torch.randint(0, 2, (8, 1))}, kl_weight=1.0)[2].loss
        assert torch.isfinite(loss)
