"""Every training parameter is checked before anything changes; failures leave the model intact."""

import numpy as np
import pytest
import torch

from cellvi.model import SCANVI, SCVI


@pytest.fixture
def model(tiny):
    SCVI.setup_anndata(tiny, batch_key="batch")
    return SCVI(tiny, n_latent=3, n_hidden=16)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"max_epochs": 0}, "max_epochs must be >= 1"),
    ({"max_epochs": 2.5}, "max_epochs must be an integer"),
    ({"max_epochs": 3.0}, "write 3"),
    ({"batch_size": 0}, "batch_size must be >= 2"),
    ({"batch_size": 1}, "batch_size must be >= 2"),
    ({"batch_size": "128"}, "batch_size must be an integer"),
    ({"train_size": 0}, "train_size"),
    ({"train_size": 1.5}, "train_size"),
    ({"train_size": float("nan")}, "train_size"),
    ({"seed": -1}, "seed must be >= 0"),
    ({"seed": 1.5}, "seed must be an integer"),
    ({"lr": -1.0}, "lr must be a positive"),
    ({"lr": float("inf")}, "lr must be a positive"),
    ({"n_epochs_kl_warmup": -5}, "n_epochs_kl_warmup"),
    ({"device": "cuda:7"}, "no CUDA GPU"),
    ({"data_placement": "gpu"}, "data_placement"),
    ({"check_val_every_n_epoch": 0}, "check_val_every_n_epoch"),
    ({"early_stopping_patience": 0}, "patience"),
    ({"progress_bar": "yes"}, "progress_bar"),
    ({"no_such_option": 1}, "unknown option"),
])
def test_bad_parameters_raise_before_anything_changes(model, kwargs, match):
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    with pytest.raises((ValueError, TypeError), match=match):
        model.train(**{"max_epochs": 2, "progress_bar": False, **kwargs})
    assert model.train_indices.size == 0 and model.history.empty and not model.is_trained
    for k, v in model.module.state_dict().items():
        assert torch.equal(v, before[k])


def test_too_few_training_cells_are_refused(tiny):
    one = tiny[:1].copy()
    SCVI.setup_anndata(one)
    with pytest.raises(ValueError, match="at least 2 training cells"):
        SCVI(one).train(max_epochs=1, progress_bar=False)
    SCVI.setup_anndata(tiny)
    with pytest.raises(ValueError, match="at least 2 training cells"):
        SCVI(tiny[:2].copy()).train(max_epochs=1, train_size=0.4, progress_bar=False)


def test_small_batches_never_give_nan(tiny):
    """Minibatches of one cell never reach batch norm: no NaN latent, in every path."""
    for n_cells, batch_size in [(3, 2), (5, 2), (7, 3)]:
        small = tiny[:n_cells].copy()
        SCVI.setup_anndata(small)
        for options in ({}, {"dispersion": "gene-batch"}):
            model = SCVI(small, n_hidden=8, **options)
            model.train(max_epochs=3, batch_size=batch_size, train_size=1.0, progress_bar=False)
            assert np.isfinite(model.get_latent_representation()).all()
            assert np.isfinite(model.history["elbo_train"]).all()


def test_a_failed_train_restores_the_model(model, monkeypatch):
    model.train(max_epochs=2, progress_bar=False, seed=0)
    z = model.get_latent_representation()
    hist = model.history.copy()
    split = model.train_indices.copy()
    from cellvi.train import TrainingPlan

    calls = []
    original = TrainingPlan.training_step

    def failing(self, batch):
        calls.append(1)
        if len(calls) > 3:
            raise FloatingPointError("The loss became nan")
        return original(self, batch)

    monkeypatch.setattr(TrainingPlan, "training_step", failing)
    with pytest.raises(FloatingPointError, match="nan") as info:
        model.train(max_epochs=5, progress_bar=False, seed=1)
    assert any("restored" in n for n in getattr(info.value, "__notes__", ["restored"]))
    np.testing.assert_array_equal(model.get_latent_representation(), z)
    np.testing.assert_array_equal(model.train_indices, split)
    assert model.history.equals(hist) and model.is_trained


def test_nan_validation_metrics_are_errors(model, monkeypatch):
    from cellvi.train import TrainingPlan

    def nan_validation(self, batch):
        out = self.module(batch, kl_weight=1.0)[2]
        out.reconstruction_loss = out.reconstruction_loss * float("nan")
        return out

    monkeypatch.setattr(TrainingPlan, "validation_step", nan_validation)
    with pytest.raises(FloatingPointError, match="Validation metrics became"):
        model.train(max_epochs=2, progress_bar=False)
    assert not model.is_trained


def test_ctrl_c_stops_after_the_current_step_and_keeps_the_history(model, monkeypatch):
    import os
    import signal

    from cellvi.train import TrainingPlan

    steps = []
    original = TrainingPlan.training_step

    def interrupting(self, batch):
        out = original(self, batch)
        steps.append(1)
        if len(steps) == 5:  # during epoch 2 (two steps per epoch)
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(TrainingPlan, "training_step", interrupting)
    model.train(max_epochs=10, progress_bar=False, seed=0)
    assert len(steps) == 5  # stopped right after the step that was running
    assert list(model.history.index) == [0, 1, 2] and model.train_settings["interrupted"]
    assert np.isfinite(model.get_latent_representation()).all()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_queries_check_their_indices(model):
    n = model.adata.n_obs
    with pytest.raises(ValueError, match="integer positions"):
        model.get_latent_representation(indices=[0.5, 1.0])
    with pytest.raises(ValueError, match="one entry per cell"):
        model.get_latent_representation(indices=np.ones(n - 1, bool))
    with pytest.raises(ValueError, match="empty"):
        model.get_latent_representation(indices=[])
    with pytest.raises(IndexError, match="must be in"):
        model.get_latent_representation(indices=[n])
    assert model.get_latent_representation(indices=np.arange(n) < 5).shape == (5, 3)


def test_semi_supervised_training_checks_its_options(tiny):
    labels = tiny.obs["cell_type"].astype(str).to_numpy().copy()
    labels[::2] = "Unknown"
    tiny.obs["labels"] = labels
    SCANVI.setup_anndata(tiny, "labels", "Unknown")
    model = SCANVI(tiny, n_hidden=8)
    with pytest.raises(ValueError, match="n_samples_per_label"):
        model.train(max_epochs=1, n_samples_per_label=0, progress_bar=False)
    with pytest.raises(ValueError, match="classification_ratio"):
        model.train(max_epochs=1, classification_ratio=-1, progress_bar=False)


def test_model_options_and_query_numbers_are_checked(tiny):
    SCVI.setup_anndata(tiny)
    for bad in ({"n_latent": 0}, {"n_hidden": -1}, {"n_layers": 0}, {"dropout_rate": 1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SCVI(tiny, **bad)
    model = SCVI(tiny, n_hidden=8)
    with pytest.raises(ValueError, match="library_size must be finite and > 0"):
        model.get_normalized_expression(library_size=-1)
    with pytest.raises(ValueError, match="n_mc_samples must be >= 1"):
        model.get_marginal_ll(n_mc_samples=0)
