"""Settings: a call runs with a snapshot of them, recorded with the model."""

import cellvi
from cellvi._settings import current, snapshot_settings


def test_a_call_runs_with_the_settings_it_started_with(monkeypatch):
    seen = []

    @snapshot_settings
    def call():
        seen.append(current().kernels)
        cellvi.settings.kernels = "torch"  # a change during the call does not reach it
        seen.append(current().kernels)

    monkeypatch.setattr(cellvi.settings, "kernels", "auto")
    call()
    assert seen == ["auto", "auto"]
    assert current().kernels == "torch"  # outside a call: the live settings


def test_train_records_its_settings(tiny, monkeypatch):
    cellvi.model.SCVI.setup_anndata(tiny)
    monkeypatch.setattr(cellvi.settings, "kernels", "torch")
    model = cellvi.model.SCVI(tiny).train(max_epochs=1, progress_bar=False)
    assert model.train_settings["settings"]["kernels"] == "torch"
    assert model.train_settings["training_step"].startswith("autograd (the compiled kernels")


def test_a_seeded_train_leaves_the_global_generator_alone(tiny):
    import torch

    cellvi.model.SCVI.setup_anndata(tiny)
    model = cellvi.model.SCVI(tiny, n_hidden=8)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    model.train(max_epochs=1, seed=5, progress_bar=False)
    assert torch.equal(torch.rand(3), expected)
