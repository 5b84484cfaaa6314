"""SCANVI's class probabilities: temperature scaling on labelled validation cells."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import shared_data
from test_scanvi import UNKNOWN, read_cellbench, simulate_labelled

from cellvi.model import SCANVI, SCVI
from cellvi.model.scanvi import fit_temperature
from cellvi.train._plan import expected_calibration_error


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------- the fit itself
@pytest.mark.parametrize("true_t", [0.5, 2.0])
def test_fit_temperature_recovers_the_temperature_of_the_labels(true_t):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(20000, 5, generator=gen, dtype=torch.float64) * 3
    labels = torch.multinomial(torch.softmax(logits / true_t, 1), 1, generator=gen).squeeze(1)
    t = fit_temperature(torch.log_softmax(logits, 1), labels, prior_scale=float("inf"))
    assert abs(t / true_t - 1) < 0.05, t
    # the prior barely moves it with this many cells
    assert abs(fit_temperature(logits, labels) / t - 1) < 0.01


def test_fit_temperature_stays_finite_when_every_cell_is_right():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(30, 3, generator=gen, dtype=torch.float64)
    labels = logits.argmax(1)
    mle = fit_temperature(logits, labels, prior_scale=float("inf"))
    map_ = fit_temperature(logits, labels)
    assert mle < 0.05  # the likelihood alone sharpens without end
    assert 2 * mle < map_ < 1.0  # the prior stops it: sharper, not a step function


def test_fit_temperature_bad_input():
    with pytest.raises(ValueError, match="one label per cell"):
        fit_temperature(torch.zeros(3, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="class codes"):
        fit_temperature(torch.zeros(3, 2), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="prior_scale"):
        fit_temperature(torch.zeros(3, 2), torch.tensor([0, 1, 1]), prior_scale=0)
    assert fit_temperature(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)) == 1.0


# ---------------------------------------------------------------------------- SCANVI.train
@pytest.fixture(scope="module")
def trained():
    adata, labelled = simulate_labelled(800, 80, 4, 2, frac_labelled=0.5, seed=5)
    SCANVI.setup_anndata(adata, "labels", UNKNOWN, batch_key="batch")
    model = SCANVI(adata, n_hidden=32, n_latent=6)
    model.train(max_epochs=20, seed=0, progress_bar=False)
    return model, adata, labelled


def test_train_calibrates_and_records_it(trained):
    model, adata, labelled = trained
    info = model.train_settings["calibration"]
    t = float(model.module.temperature)
    assert t == pytest.approx(info["temperature"]) and t != 1.0
    assert info["n_cells"] == int(np.sum(labelled[model.validation_indices]))
    assert info["calibration_error_validation_calibrated"] <= info["calibration_error_validation"]
    last = model.history.iloc[-1]
    assert last["temperature"] == pytest.approx(t)
    assert last["calibration_error_validation_calibrated"] == pytest.approx(
        info["calibration_error_validation_calibrated"])
    # the per-epoch metric is the classifier's own (temperature 1 during training)
    assert "calibration_error_validation" in model.history
    soft = model.predict(soft=True)
    np.testing.assert_allclose(soft.sum(1), 1.0, atol=1e-5)
    assert (np.asarray(model.class_names)[soft.to_numpy().argmax(1)] == model.predict()).all()


def test_temperature_changes_probabilities_not_predictions(trained):
    model, adata, labelled = trained
    t = float(model.module.temperature)
    calibrated = model.predict(soft=True).to_numpy()
    pred = model.predict()
    with torch.no_grad():
        model.module.temperature.fill_(1.0)
    raw = model.predict(soft=True).to_numpy()
    assert (model.predict() == pred).all()
    with torch.no_grad():
        model.module.temperature.fill_(t)
    expected = torch.softmax(torch.log(torch.as_tensor(raw, dtype=torch.float64)) / t, 1)
    np.testing.assert_allclose(calibrated, expected.numpy(), atol=2e-5)


def test_temperature_is_saved_with_the_model(trained, tmp_path):
    model, adata, _ = trained
    model.save(tmp_path / "m", save_anndata=True)
    loaded = SCANVI.load(tmp_path / "m")
    assert float(loaded.module.temperature) == pytest.approx(float(model.module.temperature))
    np.testing.assert_allclose(loaded.predict(soft=True).to_numpy(),
                               model.predict(soft=True).to_numpy(), atol=1e-6)
    assert loaded.train_settings["calibration"] == model.train_settings["calibration"]


def test_calibrate_false_and_retraining_restart_from_one():
    adata, _ = simulate_labelled(400, 40, 3, 2, frac_labelled=0.5, seed=6)
    SCANVI.setup_anndata(adata, "labels", UNKNOWN, batch_key="batch")
    model = SCANVI(adata, n_hidden=16, n_latent=4)
    model.train(max_epochs=3, seed=0, progress_bar=False, calibrate=False)
    assert float(model.module.temperature) == 1.0
    assert model.train_settings["calibration"]["temperature"] == 1.0
    model.train(max_epochs=3, seed=0, progress_bar=False)
    first = float(model.module.temperature)
    assert first != 1.0
    # training again starts from temperature 1 (the per-epoch metric is the raw classifier's)
    # and calibrates the new classifier
    with torch.no_grad():
        model.module.temperature.fill_(7.0)
    model.train(max_epochs=1, seed=1, progress_bar=False)
    assert float(model.module.temperature) != 7.0


def test_no_labelled_validation_cell_warns_and_keeps_one():
    adata, _ = simulate_labelled(300, 30, 3, 2, frac_labelled=0.5, seed=7)
    SCANVI.setup_anndata(adata, "labels", UNKNOWN, batch_key="batch")
    model = SCANVI(adata, n_hidden=16, n_latent=4)
    with pytest.warns(UserWarning, match="No labelled validation cell"):
        model.train(max_epochs=2, seed=0, progress_bar=False, train_size=1.0)
    assert float(model.module.temperature) == 1.0
    assert model.train_settings["calibration"]["n_cells"] == 0


def test_unknown_train_option_still_raises():
    adata, _ = simulate_labelled(200, 20, 2, 1, frac_labelled=0.5, seed=8)
    SCANVI.setup_anndata(adata, "labels", UNKNOWN)
    model = SCANVI(adata, n_hidden=8, n_latent=2)
    with pytest.raises((TypeError, ValueError), match="calibrat|not_an_option"):
        model.train(max_epochs=1, not_an_option=3, progress_bar=False)


# ---------------------------------------------------------------------------- held-out plates
def test_cellbench_held_out_cells_are_calibrated():
    """Label one protocol, predict the other: calibration error <= 0.05, accuracy unchanged.

    Drop-seq labelled, CEL-seq2 predicted (the worse direction: ECE 0.08-0.11 uncalibrated).
    Half of the query protocol's cells are unlabelled training cells, the other half are never
    seen in training (predicted through ``adata=``).
    """
    reference = "dropseq"

    root = shared_data("cellbench")
    adata = read_cellbench(root)
    adata.obs["batch"] = adata.obs["protocol"]
    ref = (adata.obs["protocol"] == reference).to_numpy()
    held = (~ref) & (np.random.default_rng(0).random(adata.n_obs) < 0.5)
    train, query = adata[~held].copy(), adata[held].copy()
    train.obs["labels"] = np.where(ref[~held], train.obs["cell_line"].astype(str), UNKNOWN)
    SCVI.setup_anndata(train, batch_key="batch")
    vae = SCVI(train)
    vae.train(max_epochs=60, seed=0, progress_bar=False)
    model = SCANVI.from_scvi_model(vae, UNKNOWN, labels_key="labels")
    model.train(seed=0, progress_bar=False)
    classes = list(model.class_names)
    truth = torch.as_tensor([classes.index(t) for t in query.obs["cell_line"]])
    calibrated = model.predict(adata=query, soft=True).to_numpy()
    t = float(model.module.temperature)
    with torch.no_grad():
        model.module.temperature.fill_(1.0)
    raw = model.predict(adata=query, soft=True).to_numpy()
    with torch.no_grad():
        model.module.temperature.fill_(t)
    acc = float((calibrated.argmax(1) == truth.numpy()).mean())
    assert (calibrated.argmax(1) == raw.argmax(1)).all()
    ece_raw = expected_calibration_error(torch.as_tensor(raw), truth)
    ece = expected_calibration_error(torch.as_tensor(calibrated), truth)
    print(f"CellBench {reference} -> other protocol: T={t:.2f}, accuracy {acc:.3f}, "
          f"ECE {ece_raw:.3f} -> {ece:.3f}")
    assert acc >= 0.95
    assert ece <= 0.05, (ece_raw, ece)
    assert ece <= ece_raw
    assert isinstance(model.predict(soft=True), pd.DataFrame)
