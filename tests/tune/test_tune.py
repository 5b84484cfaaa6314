"""cellvi.tune: search spaces, a study that beats the defaults, resuming, pruning, objectives."""

from __future__ import annotations

import numpy as np
import pytest

import cellvi
from cellvi.tune import choice, default_search_space, integer, loguniform, uniform

optuna = pytest.importorskip("optuna", reason="Optuna (the tune extra) is not installed")

SPACE = {"n_latent": choice([4, 8]), "lr": loguniform(1e-4, 3e-2),
         "n_hidden": choice([32, 64])}


@pytest.fixture(scope="module")
def data():
    from conftest import simulate

    adata = simulate(240, 40, 3, 2, seed=4)
    cellvi.model.SCVI.setup_anndata(adata, batch_key="batch")
    return adata


def study(data, tmp_path, **options):
    kwargs = dict(n_trials=6, search_space=SPACE, max_epochs=6, output_dir=tmp_path,
                  model_kwargs={"n_layers": 1}, seed=3)
    kwargs.update(options)
    return cellvi.tune.run_study(cellvi.model.SCVI, data, **kwargs)


def test_default_spaces_hold_the_defaults():
    for cls in (cellvi.model.SCVI, cellvi.model.LinearSCVI, cellvi.model.SCANVI):
        space = default_search_space(cls)
        assert {"n_hidden", "n_latent", "n_layers", "dropout_rate", "gene_likelihood",
                "lr"} <= set(space)
        assert 128 in space["n_hidden"] and 10 in space["n_latent"] and 1 in space["n_layers"]
        assert 0.1 in space["dropout_rate"] and "zinb" in space["gene_likelihood"]
        assert 1e-3 in space["lr"]
    for name in ("TOTALVI", "AUTOZI", "GIMVI"):
        cls = getattr(cellvi.model, name, None)
        if cls is not None:
            assert "lr" in default_search_space(cls) and "n_latent" in default_search_space(cls)
    assert 3 in integer(1, 3) and 4 not in integer(1, 3)
    assert 0.15 in uniform(0, 0.3, step=0.05) and 0.12 not in uniform(0, 0.3, step=0.05)


def test_bad_spaces_and_objectives_name_the_fix(data, tmp_path):
    with pytest.raises(ValueError, match="not an option of SCVI"):
        study(data, tmp_path, search_space={"n_latnt": choice([5, 10])})
    with pytest.raises(ValueError, match="sets max_epochs itself"):
        study(data, tmp_path, search_space={"max_epochs": choice([5, 10])})
    with pytest.raises(ValueError, match="Unknown objective"):
        study(data, tmp_path, objectives="elbo_train_typo")
    with pytest.raises(ValueError, match="directions"):
        study(data, tmp_path, objectives=lambda m: 0.0)
    with pytest.raises(ValueError, match="both searched and fixed"):
        study(data, tmp_path, model_kwargs={"n_latent": 5})


def test_study_beats_the_defaults_on_held_out_cells(data, tmp_path):
    result = study(data, tmp_path, n_trials=6, pruner="none")
    trials = result.trials
    assert len(trials) == 6 and (trials.state == "COMPLETE").all()
    base = trials[trials.baseline].iloc[0]
    assert base.number == 0 and base.params_lr == pytest.approx(1e-3)
    assert base.params_n_latent == 8 or base.params_n_latent == 4  # the model's default: 10
    best = trials.loc[trials.elbo_validation.idxmax()]
    assert result.best_value == pytest.approx(best.elbo_validation)
    assert result.best_value > result.baseline_value
    assert best.elbo_test > base.elbo_test  # and on the test cells no trial saw
    # the saved best model is the best trial's
    model = result.load_best_model(cellvi.model.SCVI, adata=data)
    assert model.history["elbo_validation"].iloc[-1] == pytest.approx(result.best_value)
    fig = cellvi.pl.tuning_history(result)
    assert len(fig.axes[0].collections) >= 1
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_resumed_study_continues_where_it_stopped(data, tmp_path):
    first = study(data, tmp_path / "a", n_trials=2)
    again = study(data, tmp_path / "a", n_trials=2)  # nothing missing: nothing runs
    assert len(again.trials) == 2
    resumed = study(data, tmp_path / "a", n_trials=4)
    straight = study(data, tmp_path / "b", n_trials=4)
    cols = ["number", "state", "elbo_validation"] + [c for c in straight.trials
                                                    if c.startswith("params_")]
    assert resumed.trials[cols].head(2).equals(first.trials[cols])
    # the resumed study proposes and scores what the uninterrupted one did
    assert resumed.trials[cols].equals(straight.trials[cols])
    with pytest.raises(ValueError, match="other settings"):
        study(data, tmp_path / "a", n_trials=6, max_epochs=7)


def test_pruning_stops_poor_trials_early(data, tmp_path):
    space = {"lr": loguniform(1e-5, 1e-2), "n_latent": choice([4, 8])}
    result = study(data, tmp_path, n_trials=8, max_epochs=8, search_space=space,
                   pruning_warmup_epochs=1, sampler="random")
    pruned = result.trials[result.trials.state == "PRUNED"]
    assert len(pruned) >= 1
    assert (pruned.pruned_at_epoch < 7).all()
    steps = [len(t.intermediate_values) for t in result.study.trials
             if t.state.name == "PRUNED"]
    assert max(steps) < 8


def test_multi_objective_elbo_and_batch_mixing(data, tmp_path):
    result = study(data, tmp_path, n_trials=3, objectives=["elbo_validation", "ilisi"],
                   storage=optuna.storages.InMemoryStorage())
    assert result.directions == ["maximize", "maximize"]
    complete = result.trials[result.trials.state == "COMPLETE"]
    assert len(complete) == 3 and np.isfinite(complete[["elbo_validation", "ilisi"]]).all().all()
    assert result.pareto_trials and set(result.pareto_trials) <= set(complete.number)
    assert result.best_model_path is None and result.best_value is None


def test_callable_objective(data, tmp_path):
    def test_elbo(model):
        return model.get_elbo(indices=model.validation_indices)

    result = study(data, tmp_path, n_trials=2, objectives=test_elbo, directions=["maximize"],
                   storage=optuna.storages.InMemoryStorage(), save="none")
    assert result.objectives == ["test_elbo"]
    assert np.isfinite(result.best_value) and result.best_model_path is None
