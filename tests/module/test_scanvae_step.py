"""The SCANVAE training step computes what autograd through ``SCANVAE.forward`` computes."""

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from _step_checks import assert_same_gradients

import cellvi
from cellvi.data import CellData
from cellvi.model import SCANVI
from cellvi.module import SCANVAE, SCANVAEConfig, _scanvae_step, _vae_step
from cellvi.module.vae import VAEConfig
from cellvi.train import SemiSupervisedTrainingPlan, TrainingPlan

N_LABELS = 3  # the tiny data's cell types

OPTIONS = [
    {},  # SCANVI's defaults: ZINB, batch norm in both, dropout 0.1, one layer, batch injected
    {"gene_likelihood": "nb", "n_batch": 0, "y_prior": [0.5, 0.3, 0.2]},
    {"n_layers": 2, "dropout_rate": 0.3, "use_batch_norm": "encoder", "n_latent": 4,
     "log_variational": False, "linear_classifier": True},
    {"use_batch_norm": "none", "dropout_rate": 0.0, "use_labels_groups": True,
     "labels_groups": [0, 0, 1]},
    {"use_batch_norm": "decoder", "n_layers": 2, "deeply_inject_covariates": False,
     "n_cats_per_cov": [3], "gene_likelihood": "nb",
     "classifier_parameters": {"n_layers": 2, "n_hidden": 16, "use_layer_norm": True}},
]


def _data(adata, covariate: bool):
    adata.obs["site"] = pd.Categorical(np.arange(adata.n_obs) % 3)
    adata.obs["label"] = np.where(np.arange(adata.n_obs) % 3 == 0, "Unknown",
                                  adata.obs["cell_type"].astype(str))
    SCANVI.setup_anndata(adata, labels_key="label", unlabeled_category="Unknown",
                         batch_key="batch",
                         categorical_covariate_keys=["site"] if covariate else None)
    return CellData(adata, SCANVI(adata).summary)


def _zero_by_batch_norm(module: SCANVAE) -> set[str]:
    """Biases followed by batch norm: their gradient is 0 exactly, rounding noise in float32."""
    names = set()
    for prefix, layers in (("z_encoder.encoder", module.z_encoder.encoder),
                           ("decoder.px_decoder", module.decoder.px_decoder),
                           ("encoder_z2_z1.encoder", module.encoder_z2_z1.encoder),
                           ("decoder_z1_z2.encoder", module.decoder_z1_z2.encoder)):
        for i, post in enumerate(layers.posts):
            if len(post) and isinstance(post[0], torch.nn.BatchNorm1d):
                names.add(f"{prefix}.linears.{i}.bias")
    return names


def _check_step(reference: SCANVAE, batch, kl_weight, **loss_options):
    """One step both ways from the same state; everything must agree."""
    written = copy.deepcopy(reference)
    step, reason = written.fused_training_step(device="cpu", sparse=False, semi_supervised=True)
    assert step is _scanvae_step.training_step, reason

    torch.manual_seed(1)  # the same dropout masks and posterior samples, if drawn alike
    expected = reference(batch, kl_weight=kl_weight, **loss_options)[2]
    expected.loss.backward()
    next_expected = torch.rand(5)
    torch.manual_seed(1)
    got = step(written, batch, kl_weight, **loss_options)
    assert torch.equal(torch.rand(5), next_expected)  # the same random numbers were drawn
    assert not got.loss.requires_grad

    torch.testing.assert_close(got.loss, expected.loss.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(got.reconstruction_loss, expected.reconstruction_loss.detach(),
                               rtol=1e-6, atol=0)
    assert set(got.kl_local) == set(expected.kl_local)
    for name, value in expected.kl_local.items():
        torch.testing.assert_close(got.kl_local[name], value.detach(), rtol=1e-5, atol=1e-5,
                                   msg=name)
    assert set(got.extra) == set(expected.extra)
    for name, value in expected.extra.items():
        torch.testing.assert_close(got.extra[name], value, rtol=1e-6, atol=0, msg=name)

    assert_same_gradients(written, reference, _zero_by_batch_norm(reference), rtol=1e-5)


@pytest.mark.parametrize("first_layer", ["sparse", "dense"])
@pytest.mark.parametrize("options", OPTIONS)
def test_loss_gradients_statistics_and_random_stream_match_autograd(tiny, options, first_layer,
                                                                    monkeypatch):
    # dense rows: the first encoder layer as sparse products on CSR rows, or dense products
    monkeypatch.setattr(_scanvae_step, "DENSE_FIRST_LAYER_ABOVE",
                        1.0 if first_layer == "sparse" else 0.0)
    options = dict(options)
    n_batch = options.pop("n_batch", 2)
    data = _data(tiny, covariate="n_cats_per_cov" in options)
    batch = data.batch(np.arange(0, 200, 2), nonzero=True)  # 100 cells, a third unlabelled
    labelled = data.batch(np.flatnonzero(np.arange(200) % 3 != 0)[:48])
    if n_batch == 0:
        batch = {**batch, "batch": torch.zeros_like(batch["batch"])}
        labelled = {**labelled, "batch": torch.zeros_like(labelled["batch"])}
    torch.manual_seed(0)
    reference = SCANVAE(data.n_vars, n_batch=n_batch, n_labels=N_LABELS, **options)
    reference.train()
    _check_step(reference, batch, 0.3, feed_labels=True, labelled_tensors=labelled,
                classification_ratio=7.0)


@pytest.mark.parametrize("case", ["labels not fed", "no labelled minibatch",
                                  "no labelled cell", "sparse minibatch"])
def test_other_minibatches_match_autograd(tiny, case):
    data = _data(tiny, covariate=False)
    torch.manual_seed(0)
    reference = SCANVAE(data.n_vars, n_batch=2, n_labels=N_LABELS)
    reference.train()
    batch = data.batch(np.arange(0, 200, 2), nonzero=True)
    labelled = data.batch(np.flatnonzero(np.arange(200) % 3 != 0)[:48])
    options = {"feed_labels": True, "labelled_tensors": labelled}
    if case == "labels not fed":
        options["feed_labels"] = False  # every cell summed over the classes
        # and labelled rows without their non-zero positions (found from the counts)
        options["labelled_tensors"] = {k: v for k, v in labelled.items()
                                       if k != cellvi.keys.INDICES_NONZERO}
    elif case == "no labelled minibatch":
        options["labelled_tensors"] = None
    elif case == "no labelled cell":  # the cross-entropy is 0 with a gradient path
        batch = data.batch(np.arange(0, 200, 3), nonzero=True)  # all unlabelled
        options["labelled_tensors"] = data.batch(np.arange(0, 60, 3))
    else:  # CSR counts with their transpose, as the sparse loaders give them
        batch = data.batch(np.arange(0, 200, 2), nonzero=True, sparse=True)
        options["labelled_tensors"] = data.batch(np.arange(1, 100, 3), sparse=True,
                                                 transpose=False)
    _check_step(reference, batch, 1.0, **options)


def test_semi_supervised_training_uses_it_and_learns_the_same_model(tiny, monkeypatch):
    calls = []
    step = _scanvae_step.training_step

    def counting(*args, **kwargs):
        calls.append(1)
        return step(*args, **kwargs)

    _data(tiny, covariate=False)
    monkeypatch.setattr(_scanvae_step, "training_step", counting)
    fast = SCANVI(tiny)
    fast.train(max_epochs=4, seed=0, progress_bar=False)
    assert len(calls) == 4 * 2  # 180 training cells: 2 minibatches per epoch
    assert fast.train_settings["training_step"] == "fused"

    monkeypatch.setattr(SCANVAE, "fused_training_step",
                        lambda self, *, device, sparse, semi_supervised=False: (None, "turned off"))
    plain = SCANVI(tiny)
    plain.train(max_epochs=4, seed=0, progress_bar=False)
    assert len(calls) == 8
    assert plain.train_settings["training_step"] == "autograd (turned off)"
    cols = ["elbo_train", "elbo_validation", "reconstruction_loss_train",
            "kl_local_validation", "classification_loss_train", "accuracy_validation"]
    cols = [c for c in cols if c in fast.history]
    assert "classification_loss_train" in cols
    np.testing.assert_allclose(fast.history[cols].to_numpy(), plain.history[cols].to_numpy(),
                               rtol=1e-4)
    np.testing.assert_allclose(fast.get_latent_representation(),
                               plain.get_latent_representation(), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(fast.predict(soft=True).to_numpy(),
                               plain.predict(soft=True).to_numpy(), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("change", [
    {"gene_likelihood": "poisson"},
    {"dispersion": "gene-batch"},
    {"dispersion": "gene-label"},
    {"latent_distribution": "ln"},
    {"use_layer_norm": "both"},
    {"encode_covariates": True},
    {"n_continuous_cov": 1},
    {"use_observed_lib_size": False, "library_log_means": np.zeros(2),
     "library_log_vars": np.ones(2)},
    {"var_activation": torch.nn.functional.softplus},
])
def test_unsupported_options_train_through_autograd(change):
    def fused(**options):
        return SCANVAE(20, n_batch=2, n_labels=3, **options).fused_training_step(
            device="cpu", sparse=False, semi_supervised=True)

    assert fused()[0] is not None
    step, reason = fused(**change)
    assert step is None and reason.endswith("is not supported by the fused step"), reason


def test_only_the_semi_supervised_plan_on_the_cpu_with_the_kernels(monkeypatch):
    module = SCANVAE(20, n_batch=2, n_labels=3)
    step, reason = module.fused_training_step(device="cpu", sparse=True)
    assert step is None and "semi-supervised plan" in reason
    assert not _vae_step.supports(module)  # the VAE step's test of subclasses still holds
    for plan, expected in ((TrainingPlan(module), "semi-supervised plan"),
                           (SemiSupervisedTrainingPlan(module), "fused")):
        plan.setup(device=torch.device("cpu"), sparse=False, n_obs_train=10,
                   has_validation=False)
        assert expected in plan.step_path, plan.step_path
    assert "CPU" in module.fused_training_step(device="cuda", sparse=False,
                                               semi_supervised=True)[1]
    assert "float32" in module.double().fused_training_step(
        device="cpu", sparse=False, semi_supervised=True)[1]
    changed = SCANVAE(20, n_labels=3)
    changed.encoder_z2_z1.var_activation = torch.nn.functional.softplus  # not what it writes out
    assert "z2 networks" in changed.fused_training_step(device="cpu", sparse=False,
                                                        semi_supervised=True)[1]
    monkeypatch.setattr(cellvi.settings, "kernels", "torch")
    assert "kernels" in SCANVAE(20, n_labels=3).fused_training_step(
        device="cpu", sparse=False, semi_supervised=True)[1]


def test_every_scanvae_option_is_classified_for_the_fused_step():
    """A new option of SCANVAE must be listed in LABEL_SUPPORTED before the suite passes."""
    extra = set(SCANVAEConfig.names()) - set(VAEConfig.names())
    assert extra == set(_scanvae_step.LABEL_SUPPORTED)


def test_a_subclass_with_a_new_option_or_new_computation_trains_through_autograd():
    from dataclasses import dataclass

    @dataclass(frozen=True, kw_only=True)
    class WithTemperature(SCANVAEConfig):
        temperature: float = 1.0

    class TemperedSCANVAE(SCANVAE):
        Config = WithTemperature

    step, reason = TemperedSCANVAE(20, n_labels=3).fused_training_step(
        device="cpu", sparse=False, semi_supervised=True)
    assert step is None and "temperature" in reason

    class OtherClassification(SCANVAE):
        def classification_loss(self, labelled_tensors):
            return super().classification_loss(labelled_tensors)

    step, reason = OtherClassification(20, n_labels=3).fused_training_step(
        device="cpu", sparse=False, semi_supervised=True)
    assert step is None and "overrides classification_loss" in reason

    class OtherPlan(SemiSupervisedTrainingPlan):
        def forward(self, batch, kl_weight):
            return super().forward(batch, kl_weight)

    plan = OtherPlan(SCANVAE(20, n_labels=3))
    plan.setup(device=torch.device("cpu"), sparse=False, n_obs_train=10, has_validation=False)
    assert plan.step_path == "autograd (OtherPlan has its own step)"
