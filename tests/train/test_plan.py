"""Training plans: warm-up, schedules, early stopping, optimizers, checkpoints and resume."""

import numpy as np
import pytest
import torch

from cellvi.model import SCANVI, SCVI
from cellvi.module import VAE
from cellvi.train import EarlyStopping, TrainingPlan, expected_calibration_error


def _plan(**options):
    return TrainingPlan(VAE(10, n_batch=2), **options)


def test_kl_warmup_by_epochs_and_by_steps():
    plan = _plan(n_epochs_kl_warmup=4)
    weights = []
    for epoch in range(6):
        plan.epoch = epoch
        weights.append(plan.kl_weight)
    assert weights == [0, 0.25, 0.5, 0.75, 1, 1]
    plan = _plan(n_steps_kl_warmup=10, min_kl_weight=0.2, max_kl_weight=0.6)
    plan.global_step = 5
    assert plan.kl_weight == pytest.approx(0.4)
    assert _plan(n_epochs_kl_warmup=None).kl_weight == 1


def test_optimizer_is_a_torch_optimizer_with_a_state_dict():
    plan = _plan(lr=2e-3, weight_decay=1e-5, eps=0.1)
    plan.setup(device=torch.device("cpu"), sparse=True, n_obs_train=100, has_validation=True)
    (opt,) = plan.optimizers
    assert isinstance(opt, torch.optim.Optimizer)  # torch.optim.Adam's update (test_adam.py)
    assert opt.param_groups[0]["lr"] == 2e-3 and opt.param_groups[0]["eps"] == 0.1
    assert "state" in plan.state_dict()["optimizers"][0]
    assert isinstance(_plan(optimizer="AdamW").make_optimizer(VAE(5).parameters()),
                      torch.optim.AdamW)


@pytest.mark.parametrize(("options", "match"), [
    ({"lr": -1.0}, "lr"), ({"lr": float("nan")}, "lr"), ({"weight_decay": -1.0}, "weight_decay"),
    ({"n_epochs_kl_warmup": -3}, "n_epochs_kl_warmup"), ({"lr_factor": 1.5}, "lr_factor"),
    ({"optimizer": "SGD"}, "optimizer"),
])
def test_bad_options_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        _plan(**options)


def test_reduce_on_plateau_follows_the_rule():
    plan = _plan(reduce_lr_on_plateau=True, lr_patience=2, lr_factor=0.5, lr=1.0)
    plan.setup(device=torch.device("cpu"), sparse=True, n_obs_train=100, has_validation=True)
    lrs = []
    for value in [1.0, 2.0, 2.0, 2.0, 2.0, 3.0, 3.0, 3.0, 3.0]:
        plan.on_epoch_end({"elbo_validation": value})
        lrs.append(plan.optimizers[0].param_groups[0]["lr"])
    # improvements at 1, 2 and 3; the 3rd bad epoch in a row (> patience 2) halves the rate
    assert lrs == [1, 1, 1, 1, 0.5, 0.5, 0.5, 0.5, 0.25]


def test_early_stopping_keeps_the_best_parameters():
    module = VAE(5)
    stop = EarlyStopping(patience=2)
    assert not stop.update(0, -10.0, module)
    best = {k: v.clone() for k, v in module.state_dict().items()}
    with torch.no_grad():
        module.px_r.add_(1.0)
    assert not stop.update(1, -11.0, module)
    assert stop.update(2, -10.5, module) and stop.best_epoch == 0
    torch.testing.assert_close(stop.best_state["px_r"], best["px_r"])
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping(patience=0)


def test_early_stopping_in_training_restores_the_best_epoch(sim):
    adata = sim(400, 40, 3, 2, seed=4)
    SCVI.setup_anndata(adata, batch_key="batch")
    model = SCVI(adata, n_latent=4, n_hidden=16)
    model.train(max_epochs=60, seed=0, progress_bar=False, early_stopping=True,
                early_stopping_patience=3, lr=3e-2)
    hist = model.history["elbo_validation"]
    kept = model.train_settings["kept_epoch"]
    assert len(hist) < 60 and kept == int(hist.idxmax())
    assert len(hist) - 1 - kept == 3  # stopped after 3 epochs without improvement
    torch.manual_seed(0)
    again = model.get_elbo(indices=model.validation_indices)
    assert abs(again - hist.max()) < 1.0  # the kept parameters are the best epoch's


def test_monitoring_validation_without_validation_cells_is_refused(tiny):
    SCVI.setup_anndata(tiny)
    with pytest.raises(ValueError, match="train_size < 1"):
        SCVI(tiny).train(max_epochs=2, train_size=1.0, early_stopping=True, progress_bar=False)


def test_unknown_training_option_names_the_valid_ones(tiny):
    SCVI.setup_anndata(tiny)
    with pytest.raises(TypeError, match="n_epochs_kl_warmup"):
        SCVI(tiny).train(max_epochs=1, n_epoch_kl_warmup=3, progress_bar=False)


def test_plan_kwargs_and_direct_options(tiny):
    SCVI.setup_anndata(tiny)
    model = SCVI(tiny).train(max_epochs=2, progress_bar=False, plan_kwargs={"lr": 5e-3},
                             weight_decay=0.0)
    assert model.train_settings["lr"] == 5e-3 and model.train_settings["weight_decay"] == 0.0


@pytest.mark.parametrize("model_cls", ["SCVI", "SCANVI"])
def test_resume_from_a_checkpoint_gives_the_uninterrupted_run(sim, tmp_path, model_cls):
    adata = sim(300, 30, 3, 2, seed=5)
    labels = adata.obs["cell_type"].astype(str).to_numpy().copy()
    labels[::3] = "Unknown"
    adata.obs["labels"] = labels
    if model_cls == "SCVI":
        cls, setup = SCVI, {"batch_key": "batch"}
    else:
        cls, setup = SCANVI, {"labels_key": "labels", "unlabeled_category": "Unknown",
                              "batch_key": "batch"}
    cls.setup_anndata(adata, **setup)
    options = dict(seed=1, progress_bar=False, reduce_lr_on_plateau=True, lr_patience=1,
                   early_stopping=True, early_stopping_patience=5)
    straight = cls(adata, n_latent=4, n_hidden=16).train(max_epochs=6, **options)
    path = tmp_path / "run.ckpt"
    cls(adata, n_latent=4, n_hidden=16).train(max_epochs=3, checkpoint_path=path, **options)
    resumed = cls(adata, n_latent=4, n_hidden=16)
    resumed.train(max_epochs=6, checkpoint_path=path, resume=True, **options)
    cols = [c for c in straight.history.columns if c != "time"]
    np.testing.assert_array_equal(resumed.history[cols].to_numpy(),
                                  straight.history[cols].to_numpy())
    np.testing.assert_array_equal(resumed.get_latent_representation(),
                                  straight.get_latent_representation())
    with pytest.raises(ValueError, match="another train/validation split"):
        cls(adata).train(max_epochs=6, checkpoint_path=path, resume=True, seed=2,
                         progress_bar=False)
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        cls(adata).train(max_epochs=6, checkpoint_path=tmp_path / "none", resume=True,
                         progress_bar=False)


def test_checkpoint_never_runs_code(tmp_path, tiny):
    import pickle

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps({"cellvi_checkpoint": 1, "x": Payload()}))
    SCVI.setup_anndata(tiny)
    with pytest.raises(ValueError, match="not a readable cellvi checkpoint"):
        SCVI(tiny).train(max_epochs=2, checkpoint_path=path, resume=True, progress_bar=False)
    assert not marker.exists()


def test_expected_calibration_error():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    labels = torch.tensor([0, 1, 0, 1])
    # bins: 0.9 (correct), 0.8 (wrong), 0.6 (correct), 0.7 (correct); one cell each
    expected = (abs(1 - 0.9) + abs(0 - 0.8) + abs(1 - 0.6) + abs(1 - 0.7)) / 4
    assert expected_calibration_error(probs, labels) == pytest.approx(expected)
    perfect = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(perfect, torch.tensor([0, 1])) == 0


def test_adversarial_loss_true_class_and_fooling_target():
    from cellvi.train import adversarial_loss

    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]))
    codes = torch.tensor([0, 2])
    true = adversarial_loss(logits, codes, predict_true_class=True)
    assert true.item() == pytest.approx(-(np.log(0.7) + np.log(0.8)) / 2, rel=1e-6)
    fool = adversarial_loss(logits, codes, predict_true_class=False)
    expected = -((np.log(0.2) + np.log(0.1)) / 2 + (np.log(0.1) + np.log(0.1)) / 2) / 2
    assert fool.item() == pytest.approx(expected, rel=1e-6)
    assert adversarial_loss(torch.zeros(4, 1), torch.zeros(4), predict_true_class=False) == 0
