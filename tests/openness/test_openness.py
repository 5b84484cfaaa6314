"""A model added with one module file, one model file and one field trains through the core."""

import numpy as np
import pytest
import torch
from poisson_factor_model import FactorPlan, PoissonFactorModel
from poisson_factor_module import PoissonFactor

from cellvi.data import get_summary
from cellvi.train import AdversarialTrainingPlan


def test_poisson_factor_model_trains_with_its_own_plan_and_field(sim):
    adata = sim(600, 50, 3, 2, seed=9)
    PoissonFactorModel.setup_anndata(adata, batch_key="batch")
    assert get_summary(adata)["log_library"].kind == "test_log_library"  # saved with the rest
    model = PoissonFactorModel(adata, n_latent=3)
    assert isinstance(model.module, PoissonFactor) and model.module.config.n_latent == 3
    model.train(max_epochs=30, seed=0, progress_bar=False, n_epochs_kl_warmup=5, lr=1e-2)
    hist = model.history
    assert hist["elbo_validation"].iloc[-1] > hist["elbo_validation"].iloc[0] + 10
    assert (hist["kl_global_train"] > 0).all()  # the prior of the loadings, per cell
    assert model.train_settings["training_step"].startswith("autograd")
    # its plan's two learning rates were used
    assert model.train_settings["lr"] == 1e-2
    # the latent separates the simulated cell types
    from sklearn.neighbors import KNeighborsClassifier

    z = model.get_latent_representation()
    types = adata.obs["cell_type"].to_numpy()
    knn = KNeighborsClassifier(10).fit(z[::2], types[::2])
    assert knn.score(z[1::2], types[1::2]) > 0.8


def test_adversarial_plan_trains_a_discriminator_with_its_own_optimizer(sim):
    from cellvi.data import CellData, iterate

    adata = sim(400, 30, 3, 2, seed=10)
    PoissonFactorModel.setup_anndata(adata, batch_key="batch")
    model = PoissonFactorModel(adata, n_latent=3)
    plan = AdversarialTrainingPlan(model.module, scale_adversarial_loss=1.0, lr=1e-2)
    plan.setup(device=torch.device("cpu"), sparse=False, n_obs_train=400, has_validation=False)
    model_opt, adv_opt = plan.optimizers
    adv_params = {id(p) for g in adv_opt.param_groups for p in g["params"]}
    model_params = {id(p) for g in model_opt.param_groups for p in g["params"]}
    assert adv_params == {id(p) for p in plan.adversary.parameters()}
    assert not adv_params & model_params  # each optimizer updates only its own side
    data = CellData(adata, get_summary(adata))
    batches = list(iterate(data, np.arange(400), batch_size=100, nonzero=False))
    before_adv = [p.detach().clone() for p in plan.adversary.parameters()]
    before_model = [p.detach().clone() for p in model.module.parameters()]
    losses = []
    model.module.train()
    for _ in range(30):
        for b in batches:
            out = plan.training_step(b)
            losses.append(float(out.extra["adversarial_loss"]))
    assert all(not torch.equal(a, p) for a, p in zip(before_adv, plan.adversary.parameters()))
    assert any(not torch.equal(a, p) for a, p in zip(before_model, model.module.parameters()))
    assert "adversarial_fooling" in out.extra
    state = plan.state_dict()
    assert state["adversary"] is not None and len(state["optimizers"]) == 2


def test_adversary_only_step_leaves_the_model_unchanged(sim):
    """The discriminator's update never moves the model's parameters."""
    from cellvi.data import CellData, iterate

    adata = sim(200, 20, 2, 2, seed=11)
    PoissonFactorModel.setup_anndata(adata, batch_key="batch")
    model = PoissonFactorModel(adata)
    plan = AdversarialTrainingPlan(model.module, scale_adversarial_loss=0.0)
    plan.setup(device=torch.device("cpu"), sparse=False, n_obs_train=200, has_validation=False)
    plan.optimizers[0].param_groups[0]["lr"] = 0.0  # freeze the model's own optimizer
    data = CellData(adata, get_summary(adata))
    (batch,) = list(iterate(data, np.arange(200), batch_size=200, nonzero=False))
    before = [p.detach().clone() for p in model.module.parameters()]
    plan.training_step(batch)
    for a, p in zip(before, model.module.parameters()):
        torch.testing.assert_close(a, p, rtol=0, atol=0)


def test_own_plan_is_used(sim):
    adata = sim(200, 20, 2, 1, seed=12)
    PoissonFactorModel.setup_anndata(adata)
    model = PoissonFactorModel(adata)
    plan = FactorPlan(model.module, lr=1e-2)
    plan.setup(device=torch.device("cpu"), sparse=False, n_obs_train=200, has_validation=False)
    lrs = [g["lr"] for g in plan.optimizers[0].param_groups]
    assert lrs == [1e-2, pytest.approx(1e-3)]
