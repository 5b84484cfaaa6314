"""The written-out scVI training step computes what autograd through ``VAE.forward`` computes."""

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from _step_checks import assert_same_gradients

import cellvi
from cellvi.data import CellData
from cellvi.model import SCVI
from cellvi.module import VAE, _vae_step

OPTIONS = [
    {},  # scVI's defaults: ZINB, batch norm, dropout 0.1, one hidden layer, batch injected
    {"gene_likelihood": "nb", "n_batch": 0},
    {"n_layers": 2, "dropout_rate": 0.3, "use_batch_norm": "encoder", "n_latent": 4,
     "log_variational": False},
    {"use_batch_norm": "none", "dropout_rate": 0.0},
    {"use_batch_norm": "decoder", "n_layers": 2, "deeply_inject_covariates": False,
     "n_cats_per_cov": [3]},
]


def _batch(adata, covariate: bool):
    SCVI.setup_anndata(adata, batch_key="batch",
                       categorical_covariate_keys=["site"] if covariate else None)
    data = CellData(adata, SCVI(adata).summary)
    return data, data.batch(np.arange(0, 200, 2), nonzero=True, sparse=True)  # 100 cells


def _zero_by_batch_norm(module: VAE) -> set[str]:
    """Biases followed by batch norm: their gradient is 0 exactly, rounding noise in float32."""
    names = set()
    for prefix, layers in (("z_encoder.encoder", module.z_encoder.encoder),
                           ("decoder.px_decoder", module.decoder.px_decoder)):
        for i, post in enumerate(layers.posts):
            if isinstance(post[0], torch.nn.BatchNorm1d):
                names.add(f"{prefix}.linears.{i}.bias")
    return names


@pytest.mark.parametrize("options", OPTIONS)
def test_loss_gradients_statistics_and_random_stream_match_autograd(tiny, options):
    options = dict(options)
    n_batch = options.pop("n_batch", 2)
    tiny.obs["site"] = pd.Categorical(np.arange(tiny.n_obs) % 3)
    data, batch = _batch(tiny, covariate="n_cats_per_cov" in options)
    torch.manual_seed(0)
    reference = VAE(data.n_vars, n_batch=n_batch, **options)
    reference.train()
    written = copy.deepcopy(reference)
    assert _vae_step.supports(written)

    torch.manual_seed(1)  # the same dropout masks and posterior samples, if drawn alike
    expected = reference(batch, kl_weight=0.3)[2]
    expected.loss.backward()
    next_expected = torch.rand(5)
    torch.manual_seed(1)
    got = _vae_step.training_step(written, batch, 0.3)
    assert torch.equal(torch.rand(5), next_expected)  # the same random numbers were drawn

    # the forward pass is the same operations in the same order: equal to the last bit
    assert torch.equal(got.loss, expected.loss.detach())
    assert torch.equal(got.reconstruction_loss, expected.reconstruction_loss.detach())
    assert torch.equal(got.kl_local["kl_z"], expected.kl_local["kl_z"].detach())
    assert not got.loss.requires_grad

    assert_same_gradients(written, reference, _zero_by_batch_norm(reference), rtol=1e-4)


def test_training_uses_it_and_learns_the_same_model(tiny, monkeypatch):
    calls = []
    step = _vae_step.training_step

    def counting(*args):
        calls.append(1)
        return step(*args)

    SCVI.setup_anndata(tiny, batch_key="batch")
    monkeypatch.setattr(_vae_step, "training_step", counting)
    fast = SCVI(tiny)
    fast.train(max_epochs=4, seed=0, progress_bar=False)
    assert len(calls) == 4 * 2  # 180 training cells: 2 minibatches per epoch

    assert fast.train_settings["training_step"] == "fused"
    monkeypatch.setattr(VAE, "fused_training_step", lambda self, **kw: (None, "turned off"))
    plain = SCVI(tiny)
    plain.train(max_epochs=4, seed=0, progress_bar=False)
    assert len(calls) == 8
    assert plain.train_settings["training_step"] == "autograd (turned off)"
    cols = ["elbo_train", "elbo_validation", "reconstruction_loss_train", "kl_local_validation"]
    np.testing.assert_allclose(fast.history[cols].to_numpy(), plain.history[cols].to_numpy(),
                               rtol=1e-4)
    np.testing.assert_allclose(fast.get_latent_representation(),
                               plain.get_latent_representation(), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("change", [
    {"gene_likelihood": "poisson"},
    {"dispersion": "gene-batch"},
    {"dispersion": "gene-cell"},
    {"latent_distribution": "ln"},
    {"use_layer_norm": "both"},
    {"encode_covariates": True},
    {"n_continuous_cov": 1},
    {"use_observed_lib_size": False, "library_log_means": np.zeros(2),
     "library_log_vars": np.ones(2)},
    {"var_activation": torch.nn.functional.softplus},
])
def test_other_options_train_through_autograd(change):
    assert _vae_step.supports(VAE(20, n_batch=2))
    assert not _vae_step.supports(VAE(20, n_batch=2, **change))


def test_not_for_subclasses_float64_or_torch_kernels(monkeypatch):
    from cellvi.module import SCANVAE

    assert not _vae_step.supports(SCANVAE(20, n_batch=2, n_labels=3))
    assert not _vae_step.supports(VAE(20, n_batch=2).double())
    monkeypatch.setattr(cellvi.settings, "kernels", "torch")
    assert not _vae_step.supports(VAE(20, n_batch=2))


def test_every_vae_option_is_classified_for_the_fused_step():
    """A new option of the VAE must be listed in _vae_step.SUPPORTED before the suite passes."""
    from cellvi.module import VAEConfig

    assert set(VAEConfig.names()) == set(_vae_step.SUPPORTED)


def test_a_subclass_with_a_new_option_or_new_computation_trains_through_autograd():
    from dataclasses import dataclass

    from cellvi.module import VAEConfig

    @dataclass(frozen=True, kw_only=True)
    class WithTemperature(VAEConfig):
        temperature: float = 1.0

    class TemperedVAE(VAE):
        Config = WithTemperature

    step, reason = TemperedVAE(20, n_batch=2).fused_training_step(device="cpu", sparse=True)
    assert step is None and "temperature" in reason

    class OtherLoss(VAE):
        def loss(self, *args, **kwargs):
            return super().loss(*args, **kwargs)

    step, reason = OtherLoss(20).fused_training_step(device="cpu", sparse=True)
    assert step is None and "overrides loss" in reason
    step, reason = VAE(20).fused_training_step(device="cuda", sparse=True)
    assert step is None and "CPU" in reason
    assert VAE(20).fused_training_step(device="cpu", sparse=False)[1] == "the minibatches are dense"


def test_the_path_taken_is_recorded_and_printed(tiny):
    SCVI.setup_anndata(tiny, batch_key="batch")
    fast = SCVI(tiny).train(max_epochs=1, progress_bar=False)
    assert fast.train_settings["training_step"] == "fused"
    assert "training step: fused" in repr(fast)
    plain = SCVI(tiny, dispersion="gene-batch").train(max_epochs=1, progress_bar=False)
    assert plain.train_settings["training_step"] == (
        "autograd (dispersion='gene-batch' is not supported by the fused step)")
    assert "autograd" in repr(plain)
