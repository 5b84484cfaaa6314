"""The written-out LDVAE training step computes what autograd through ``LDVAE.forward`` does."""

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from _step_checks import assert_same_gradients

import cellvi
from cellvi.data import CellData
from cellvi.distributions import nb_log_prob_rows
from cellvi.distributions._rowsum import nb_log_prob_rows_softmax_grad
from cellvi.model import LinearSCVI
from cellvi.module import LDVAE, _ldvae_step, _vae_step
from cellvi.nn._rate import softmax_rate

OPTIONS = [
    {},  # LinearSCVI's defaults: NB, batch norm in both, modelled library, no bias
    {"gene_likelihood": "zinb", "bias": True},
    {"use_observed_lib_size": True, "use_batch_norm": "encoder", "n_batch": 0, "n_layers": 2,
     "dropout_rate": 0.3, "log_variational": False, "n_latent": 4},
    {"use_batch_norm": "none", "dropout_rate": 0.0, "gene_likelihood": "zinb",
     "n_cats_per_cov": [3]},
    {"use_batch_norm": "decoder", "encode_covariates": True, "n_cats_per_cov": [3],
     "n_layers": 2, "deeply_inject_covariates": False, "bias": True},
    {"encode_covariates": True, "gene_likelihood": "zinb", "n_layers": 2},
    {"n_batch": 0, "gene_likelihood": "zinb"},  # one library prior for all cells
    {"n_continuous_cov": 2, "bias": True},
    {"n_continuous_cov": 2, "encode_covariates": True, "gene_likelihood": "zinb",
     "n_cats_per_cov": [3]},
]


def _batch(adata, covariate: bool, continuous: bool = False):
    LinearSCVI.setup_anndata(adata, batch_key="batch",
                             categorical_covariate_keys=["site"] if covariate else None,
                             continuous_covariate_keys=["depth", "mito"] if continuous else None)
    data = CellData(adata, LinearSCVI(adata).summary)
    return data, data.batch(np.arange(0, 200, 2), nonzero=True, sparse=True)  # 100 cells


def _library_prior(batch, n_batch: int) -> dict:
    log_lib = torch.log(batch["X"].to_dense().sum(1))
    codes = batch["batch"].reshape(-1) if n_batch else torch.zeros(len(log_lib), dtype=int)
    groups = [log_lib[codes == b] for b in range(max(n_batch, 1))]
    return {"library_log_means": [float(g.mean()) for g in groups],
            "library_log_vars": [float(g.var()) for g in groups]}


def _zero_by_batch_norm(module: LDVAE) -> set[str]:
    """Biases followed by batch norm: their gradient is 0 exactly, rounding noise in float32."""
    stacks = [("z_encoder.encoder", module.z_encoder.encoder),
              ("decoder.factor_regressor", module.decoder.factor_regressor),
              ("decoder.px_dropout_decoder", module.decoder.px_dropout_decoder)]
    if module.l_encoder is not None:
        stacks.append(("l_encoder.encoder", module.l_encoder.encoder))
    names = set()
    for prefix, layers in stacks:
        for i, post in enumerate(layers.posts):
            if len(post) and isinstance(post[0], torch.nn.BatchNorm1d):
                names.add(f"{prefix}.linears.{i}.bias")
    return names


@pytest.mark.parametrize("options", OPTIONS)
def test_loss_gradients_statistics_and_random_stream_match_autograd(tiny, options):
    options = dict(options)
    n_batch = options.pop("n_batch", 2)
    tiny.obs["site"] = pd.Categorical(np.arange(tiny.n_obs) % 3)
    rng = np.random.default_rng(0)
    tiny.obs["depth"], tiny.obs["mito"] = rng.normal(size=tiny.n_obs), rng.random(tiny.n_obs)
    data, batch = _batch(tiny, covariate="n_cats_per_cov" in options,
                         continuous="n_continuous_cov" in options)
    if n_batch == 0:  # data without batches: every cell in batch 0
        batch = {**batch, "batch": torch.zeros_like(batch["batch"])}
    torch.manual_seed(0)
    reference = LDVAE(data.n_vars, n_batch=n_batch, **_library_prior(batch, n_batch), **options)
    reference.train()
    written = copy.deepcopy(reference)
    step, reason = written.fused_training_step(device="cpu", sparse=True)
    assert step is _ldvae_step.training_step, reason
    assert _vae_step.supports(written)

    torch.manual_seed(1)  # the same dropout masks and posterior samples, if drawn alike
    expected = reference(batch, kl_weight=0.3)[2]
    expected.loss.backward()
    next_expected = torch.rand(5)
    torch.manual_seed(1)
    got = _ldvae_step.training_step(written, batch, 0.3)
    assert torch.equal(torch.rand(5), next_expected)  # the same random numbers were drawn

    # the forward pass is the same operations in the same order: equal to the last bit
    assert torch.equal(got.loss, expected.loss.detach())
    assert torch.equal(got.reconstruction_loss, expected.reconstruction_loss.detach())
    assert set(got.kl_local) == set(expected.kl_local)
    for name, value in expected.kl_local.items():
        assert torch.equal(got.kl_local[name], value.detach()), name
    assert not got.loss.requires_grad

    assert_same_gradients(written, reference, _zero_by_batch_norm(reference), rtol=1e-4)


@pytest.mark.parametrize("zinb", [False, True])
def test_the_kernel_gives_the_log_library_gradient_of_autograd(zinb):
    torch.manual_seed(0)
    n, genes = 37, 300
    x = (torch.poisson(torch.rand(n, genes) * 3) * (torch.rand(n, genes) < 0.3)).to_sparse_csr()
    logits = torch.randn(n, genes, requires_grad=True)
    library = (torch.randn(n, 1) + 6).requires_grad_()
    theta, weights = torch.rand(genes) + 0.3, torch.rand(n) - 0.5
    zi = torch.randn(n, genes) if zinb else None
    rows = nb_log_prob_rows(x, softmax_rate(logits, library, 1e-8)[1], theta, zi)
    (rows * weights).sum().backward()

    d_lib = torch.empty(n)
    value, d_logits, _, _ = nb_log_prob_rows_softmax_grad(
        x, logits.detach(), library.detach(), 1e-8, theta, zi, weights, d_log_library=d_lib)
    plain = nb_log_prob_rows_softmax_grad(x, logits.detach(), library.detach(), 1e-8, theta,
                                          zi, weights)
    assert torch.equal(value, rows.detach()) and torch.equal(d_logits, plain[1])
    torch.testing.assert_close(d_lib, library.grad.reshape(-1), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="d_log_library"):
        nb_log_prob_rows_softmax_grad(x, logits.detach(), library.detach(), 1e-8, theta, zi,
                                      weights, d_log_library=torch.empty(n, dtype=torch.float64))


def test_linear_scvi_trains_through_it_and_learns_the_same_model(tiny, monkeypatch):
    calls = []
    step = _ldvae_step.training_step

    def counting(*args):
        calls.append(1)
        return step(*args)

    LinearSCVI.setup_anndata(tiny, batch_key="batch")
    monkeypatch.setattr(_ldvae_step, "training_step", counting)
    fast = LinearSCVI(tiny, n_latent=4)
    fast.train(max_epochs=4, seed=0, progress_bar=False)
    assert len(calls) == 4 * 2  # 180 training cells: 2 minibatches per epoch
    assert fast.train_settings["training_step"] == "fused"
    assert "training step: fused" in repr(fast)

    monkeypatch.setattr(LDVAE, "fused_training_step", lambda self, **kw: (None, "turned off"))
    plain = LinearSCVI(tiny, n_latent=4)
    plain.train(max_epochs=4, seed=0, progress_bar=False)
    assert len(calls) == 8
    assert plain.train_settings["training_step"] == "autograd (turned off)"
    cols = ["elbo_train", "elbo_validation", "reconstruction_loss_train", "kl_local_validation"]
    np.testing.assert_allclose(fast.history[cols].to_numpy(), plain.history[cols].to_numpy(),
                               rtol=1e-4)
    np.testing.assert_allclose(fast.get_loadings().to_numpy(), plain.get_loadings().to_numpy(),
                               rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize(("change", "named"), [
    ({"gene_likelihood": "poisson"}, "gene_likelihood"),
    ({"dispersion": "gene-batch"}, "dispersion"),
    ({"latent_distribution": "ln"}, "latent_distribution"),
    ({"use_layer_norm": "both"}, "use_layer_norm"),
    ({"use_size_factor_key": True}, "use_size_factor_key"),
    ({"var_activation": torch.nn.functional.softplus}, "var_activation"),
])
def test_other_options_train_through_autograd_with_the_reason(change, named):
    prior = {"library_log_means": [0.0, 0.0], "library_log_vars": [1.0, 1.0]}
    assert _vae_step.supports(LDVAE(20, n_batch=2, **prior))
    step, reason = LDVAE(20, n_batch=2, **prior, **change).fused_training_step(
        device="cpu", sparse=True)
    assert step is None and named in reason and "not supported by the fused step" in reason


def test_the_fallback_is_recorded_on_the_model(tiny):
    LinearSCVI.setup_anndata(tiny, batch_key="batch")
    plain = LinearSCVI(tiny, dispersion="gene-batch").train(max_epochs=1, progress_bar=False)
    assert plain.train_settings["training_step"] == (
        "autograd (dispersion='gene-batch' is not supported by the fused step)")


def test_not_on_other_devices_dense_batches_float64_or_torch_kernels(monkeypatch):
    m = LDVAE(20, n_batch=2, use_observed_lib_size=True)
    assert m.fused_training_step(device="cuda", sparse=True)[1].startswith(
        "the fused step runs on the CPU only")
    assert m.fused_training_step(device="cpu", sparse=False)[1] == "the minibatches are dense"
    assert "float32" in m.double().fused_training_step(device="cpu", sparse=True)[1]
    monkeypatch.setattr(cellvi.settings, "kernels", "torch")
    assert "kernels" in LDVAE(20, use_observed_lib_size=True).fused_training_step(
        device="cpu", sparse=True)[1]


def test_every_ldvae_option_is_classified_for_the_fused_step():
    """A new option of LDVAE must be listed in _ldvae_step.SUPPORTED before the suite passes."""
    from cellvi.module.ldvae import LDVAEConfig

    assert set(LDVAEConfig.names()) == set(_ldvae_step.SUPPORTED)


def test_a_subclass_with_a_new_option_or_new_computation_trains_through_autograd():
    from dataclasses import dataclass

    from cellvi.module.ldvae import LDVAEConfig

    @dataclass(frozen=True, kw_only=True)
    class WithTemperature(LDVAEConfig):
        temperature: float = 1.0

    class TemperedLDVAE(LDVAE):
        Config = WithTemperature

    step, reason = TemperedLDVAE(20, use_observed_lib_size=True).fused_training_step(
        device="cpu", sparse=True)
    assert step is None and "temperature" in reason

    class OtherPrior(LDVAE):
        def _library_prior(self, batch_index):
            return super()._library_prior(batch_index)

    step, reason = OtherPrior(20, use_observed_lib_size=True).fused_training_step(
        device="cpu", sparse=True)
    assert step is None and "overrides _library_prior" in reason
