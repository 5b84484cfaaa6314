"""GIMVI: the scvi-tools API, the adversarial step, imputation that learns, save/load, errors."""

import copy

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from scipy.stats import spearmanr

from cellvi import keys
from cellvi.data import get_summary
from cellvi.model import GIMVI
from cellvi.model.gimvi import GIMVITrainingPlan
from cellvi.train import adversarial_loss


def simulate(n_seq=500, n_spatial=400, n_genes=80, spatial_genes=None, seed=0, n_latent=4):
    """A sequencing and a spatial dataset drawn from one latent space (clusters + noise).

    The spatial side measures ``spatial_genes`` (default: 20 random genes) with its own
    per-gene capture efficiency and smaller libraries.
    """
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 1.2, (n_latent, n_genes))
    b = rng.normal(0, 0.8, n_genes)
    centres = rng.normal(0, 2.0, (5, n_latent))
    if spatial_genes is None:
        spatial_genes = np.sort(rng.choice(n_genes, 20, replace=False))

    def draw(n, genes, lib, theta, factor):
        types = rng.integers(0, 5, n)
        z = centres[types] + rng.normal(0, 0.4, (n, n_latent))
        logit = z @ w + b
        p = np.exp(logit - logit.max(1, keepdims=True))[:, genes] * factor
        p /= p.sum(1, keepdims=True)
        mu = p * rng.lognormal(np.log(lib), 0.3, n)[:, None]
        x = rng.poisson(rng.gamma(theta, mu / theta))
        x[x.sum(1) == 0, 0] = 1
        return x.astype(np.float32), types

    xs, ts = draw(n_seq, np.arange(n_genes), 2000, 3.0, 1.0)
    xf, tf = draw(n_spatial, spatial_genes, 200, 20.0, rng.lognormal(0, 0.3, len(spatial_genes)))
    names = np.array([f"g{j}" for j in range(n_genes)])
    seq = anndata.AnnData(sp.csr_matrix(xs))
    seq.var_names, seq.obs_names = names, [f"s{i}" for i in range(n_seq)]
    spatial = anndata.AnnData(xf)
    spatial.var_names = names[spatial_genes]
    spatial.obs_names = [f"f{i}" for i in range(n_spatial)]
    seq.obs["cell_type"] = pd.Categorical([f"t{t}" for t in ts])
    spatial.obs["cell_type"] = pd.Categorical([f"t{t}" for t in tf])
    spatial.obs["section"] = pd.Categorical(rng.choice(["a", "b"], n_spatial))
    return seq, spatial


def hide(spatial, n_hidden=5):
    """Hide every other of the ``2 * n_hidden`` most expressed spatial genes."""
    totals = np.asarray(spatial.X.sum(0)).ravel()
    held = list(spatial.var_names[np.argsort(-totals)[: 2 * n_hidden : 2]])
    kept = [g for g in spatial.var_names if g not in held]
    cells = np.asarray(spatial[:, kept].X.sum(1)).ravel() > 0  # an observed library > 0
    return spatial[cells, kept].copy(), held, np.asarray(spatial[cells, held].X)


def median_spearman(imputed, measured):
    return float(np.median([spearmanr(imputed[:, j], measured[:, j])[0]
                            for j in range(measured.shape[1])]))


@pytest.fixture(scope="module")
def trained():
    seq, spatial = simulate(seed=3)
    spatial_train, held, measured = hide(spatial)
    GIMVI.setup_anndata(seq)
    GIMVI.setup_anndata(spatial_train, batch_key="section")
    model = GIMVI(seq, spatial_train, n_latent=4)
    obs_before = spatial_train.obs.copy()
    model.train(max_epochs=100, seed=0, progress_bar=False)
    return model, seq, spatial_train, held, measured, obs_before


def test_imputation_beats_the_mean_expression_baseline(trained):
    model, seq, spatial, held, measured, _ = trained
    seq_imp, sp_imp = model.get_imputed_values(normalized=False)
    assert seq_imp.shape == (seq.n_obs, 80) and sp_imp.shape == (spatial.n_obs, 80)
    pos = [list(model.var_names).index(g) for g in held]
    ours = median_spearman(sp_imp[:, pos], measured)
    # baseline: the gene's mean fraction on the sequencing side times the cell's library
    x = seq.X.toarray()
    frac = (x / x.sum(1, keepdims=True)).mean(0)
    lib = np.asarray(spatial.X.sum(1)).reshape(-1, 1)
    base = median_spearman(lib * frac[pos], measured)
    assert ours > 0.5 and ours > base + 0.1, (ours, base)
    # normalised values: each cell's expression sums to one over its dataset's genes
    _, norm = model.get_imputed_values()
    own = [list(model.var_names).index(g) for g in spatial.var_names]
    np.testing.assert_allclose(norm[:, own].sum(1), 1, rtol=1e-5)
    np.testing.assert_allclose(norm * lib, sp_imp, rtol=1e-4)
    # the latent space is shared: spatial cells sit next to sequencing cells of their type
    from sklearn.neighbors import KNeighborsClassifier

    z_seq, z_sp = model.get_latent_representation()
    knn = KNeighborsClassifier(10).fit(z_seq, seq.obs["cell_type"])
    assert knn.score(z_sp, spatial.obs["cell_type"]) > 0.3  # chance: 0.2


def test_training_history_and_the_users_data_unchanged(trained):
    model, seq, spatial, _, _, obs_before = trained
    h = model.history
    assert h["elbo_validation"].iloc[-1] > h["elbo_validation"].iloc[0] + 50
    assert {"adversarial_loss_train", "adversarial_fooling_train"} <= set(h)
    # scvi-tools shifts the spatial batch codes in adata.obs; cellvi leaves the data alone
    pd.testing.assert_frame_equal(spatial.obs, obs_before)
    assert model.module.n_batch == 3 and model.module.batch_offsets == [0, 1]
    assert model.train_settings["kappa"] == 5 and len(model.train_indices) == 2
    assert "2 datasets" in repr(model) and "trained 100 epochs" in repr(model)


def test_save_load_round_trip_is_bitwise(trained, tmp_path):
    model, seq, spatial, _, _, _ = trained
    z = model.get_latent_representation()
    imp = model.get_imputed_values(normalized=False, decode_mode=0)
    model.save(tmp_path / "m", save_anndata=True)
    assert {"adata_seq.h5ad", "adata_spatial.h5ad", "model.safetensors", "model.json"} <= {
        p.name for p in (tmp_path / "m").iterdir()}
    for loaded in (GIMVI.load(tmp_path / "m"),
                   GIMVI.load(tmp_path / "m", adata_seq=seq, adata_spatial=spatial)):
        for a, b in zip(z, loaded.get_latent_representation()):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(imp, loaded.get_imputed_values(normalized=False, decode_mode=0)):
            np.testing.assert_array_equal(a, b)
        assert list(loaded.var_names) == list(model.var_names)
        pd.testing.assert_frame_equal(loaded.history, model.history)
        assert loaded.is_trained and loaded.module.config == model.module.config
    # overwriting without the AnnData drops the old AnnData files (they were cellvi's)
    (tmp_path / "m" / "notes.txt").write_text("mine")
    model.save(tmp_path / "m", overwrite=True)
    names = {p.name for p in (tmp_path / "m").iterdir()}
    assert "adata_seq.h5ad" not in names and "notes.txt" in names
    with pytest.raises(FileNotFoundError, match="adata_seq="):
        GIMVI.load(tmp_path / "m")
    with pytest.raises(FileExistsError, match="overwrite"):
        model.save(tmp_path / "m")
    wrong = spatial[:, spatial.var_names[::-1]].copy()
    with pytest.raises(ValueError, match="gene"):
        GIMVI.load(tmp_path / "m", adata_seq=seq, adata_spatial=wrong)


def test_queries_on_new_data_and_their_errors(trained):
    model, seq, spatial, _, _, _ = trained
    z_seq, z_sp = model.get_latent_representation()
    z2 = model.get_latent_representation([seq.copy(), spatial.copy()])
    np.testing.assert_array_equal(z_sp, z2[1])
    sub = model.get_imputed_values(gene_list=["g3", "g0"])
    full = model.get_imputed_values()
    np.testing.assert_allclose(sub[1], full[1][:, [3, 0]], rtol=1e-6)
    with pytest.raises(ValueError, match="one per dataset"):
        model.get_latent_representation([seq])
    with pytest.raises(ValueError, match="mode must be"):
        model.get_imputed_values(decode_mode=2)
    with pytest.raises(ValueError, match="not in the model"):
        model.get_imputed_values(gene_list=["nope"])


def _plan_and_batch(kappa=5.0, **options):
    seq, spatial = simulate(n_seq=120, n_spatial=100, n_genes=30, seed=5)
    GIMVI.setup_anndata(seq)
    GIMVI.setup_anndata(spatial)
    model = GIMVI(seq, spatial, n_latent=3)
    plan = GIMVITrainingPlan(model.module, scale_adversarial_loss=kappa, **options)
    plan.setup(device=torch.device("cpu"), sparse=False, n_obs_train=220, has_validation=False)
    batch = (model._source(0).batch(np.arange(64)), model._source(1).batch(np.arange(64)))
    model.module.train()
    return model, plan, batch


def test_adversarial_step_updates_only_what_it_should():
    model, plan, batch = _plan_and_batch()
    module, adv = model.module, plan.adversary
    model_opt, adv_opt = plan.optimizers
    own = {id(p) for g in model_opt.param_groups for p in g["params"]}
    theirs = {id(p) for g in adv_opt.param_groups for p in g["params"]}
    assert own == {id(p) for p in module.parameters()}
    assert theirs == {id(p) for p in adv.parameters()} and not own & theirs
    assert adv.classifier[0].linears.__len__() == 3  # scvi-tools' gimVI discriminator
    adv.eval()  # deterministic discriminator: its gradient can be recomputed below
    zs = []
    training_loss = module.training_loss

    def recording(*args, **kwargs):
        out = training_loss(*args, **kwargs)
        zs.append(out[0].detach())
        return out

    module.training_loss = recording
    before = copy.deepcopy(adv)
    module_before = {k: v.clone() for k, v in module.state_dict().items()}
    out = plan.training_step(batch)
    module.training_loss = training_loss
    # the discriminator's gradient is kappa times its own cross-entropy, nothing of the
    # fooling term (which moved the encoder only)
    z, codes = torch.cat(zs), torch.cat([torch.zeros(64), torch.ones(64)]).long()
    ce = adversarial_loss(before(z), codes, predict_true_class=True)
    grads = torch.autograd.grad(5.0 * ce, list(before.parameters()))
    for g, p in zip(grads, adv.parameters()):
        torch.testing.assert_close(p.grad, g)
    assert float(out.extra["adversarial_loss"]) == pytest.approx(float(ce.detach()), rel=1e-5)
    changed = [k for k, v in module.state_dict().items() if not torch.equal(v, module_before[k])]
    assert any(k.startswith("encoder_heads.0") for k in changed)
    assert any(k.startswith("encoder_heads.1") for k in changed)
    assert out.reconstruction_loss.shape == (128,)


def test_discriminator_step_leaves_the_model_and_model_step_the_discriminator():
    model, plan, batch = _plan_and_batch()
    plan.optimizers[0].param_groups[0]["lr"] = 0.0
    plan.optimizers[0].param_groups[0]["weight_decay"] = 0.0
    params = [p.detach().clone() for p in model.module.parameters()]
    adv = [p.detach().clone() for p in plan.adversary.parameters()]
    plan.training_step(batch)
    for a, p in zip(params, model.module.parameters()):
        torch.testing.assert_close(a, p, rtol=0, atol=0)
    assert all(not torch.equal(a, p) for a, p in zip(adv, plan.adversary.parameters()))
    # and the other way round
    model, plan, batch = _plan_and_batch()
    plan.optimizers[1].param_groups[0]["lr"] = 0.0
    plan.optimizers[1].param_groups[0]["weight_decay"] = 0.0
    adv = [p.detach().clone() for p in plan.adversary.parameters()]
    plan.training_step(batch)
    for a, p in zip(adv, plan.adversary.parameters()):
        torch.testing.assert_close(a, p, rtol=0, atol=0)
    # kappa = 0: no adversarial term, no discriminator step
    model, plan, batch = _plan_and_batch(kappa=0.0)
    adv = [p.detach().clone() for p in plan.adversary.parameters()]
    out = plan.training_step(batch)
    assert "adversarial_fooling" not in out.extra
    for a, p in zip(adv, plan.adversary.parameters()):
        torch.testing.assert_close(a, p, rtol=0, atol=0)


def test_discriminator_on_the_updated_encoders():
    """discriminator_latent='updated' (scvi-tools' order): new samples after the model step."""
    model, plan, batch = _plan_and_batch(discriminator_latent="updated")
    module, adv = model.module, plan.adversary
    adv.eval()  # deterministic discriminator: its gradient can be recomputed below
    before = copy.deepcopy(adv)
    state = torch.get_rng_state()
    plan.training_step(batch)
    # replay: the same draws for the model's pass, then new samples from the updated module
    after = copy.deepcopy(module)
    torch.set_rng_state(state)
    for d, t in enumerate(batch):
        module.training_loss(t, mode=d)
    with torch.no_grad():
        z = torch.cat([after.inference(t[keys.X], mode=d)["z"] for d, t in enumerate(batch)])
    codes = torch.cat([torch.zeros(64), torch.ones(64)]).long()
    grads = torch.autograd.grad(5.0 * adversarial_loss(before(z), codes, predict_true_class=True),
                                list(before.parameters()))
    for g, p in zip(grads, adv.parameters()):
        torch.testing.assert_close(p.grad, g)
    with pytest.raises(ValueError, match="discriminator_latent"):
        _plan_and_batch(discriminator_latent="fresh")


def test_three_datasets_with_overlapping_gene_sets():
    """Genes matched by name; no dataset's genes contain another's; each scored on its own."""
    seq, spatial = simulate(n_seq=300, n_spatial=300, n_genes=60,
                            spatial_genes=np.arange(40, 60), seed=7)
    a = seq[:, [f"g{j}" for j in range(50)]].copy()  # lacks g50..g59
    b = spatial[:150, [f"g{j}" for j in range(40, 60)]].copy()  # g40..g59
    c = spatial[150:, [f"g{j}" for j in (59, 45, 41, 58, 50, 52)]].copy()  # own order
    c = c[np.asarray(c.X.sum(1)).ravel() > 0].copy()
    for d in (a, b, c):
        GIMVI.setup_anndata(d)
    model = GIMVI(a, [b, c], n_latent=3)
    assert list(model.var_names) == [f"g{j}" for j in range(60)]
    assert model.module.config.indices_mappings[2] == (59, 45, 41, 58, 50, 52)
    assert model.module.gene_likelihoods == ["zinb", "nb", "nb"]
    assert model.module.model_library_bools == [True, False, False]
    model.train(max_epochs=15, seed=1, progress_bar=False, kappa="auto")
    h = model.history
    assert h["elbo_train"].iloc[-1] > h["elbo_train"].iloc[0]
    imputed = model.get_imputed_values()
    assert [i.shape for i in imputed] == [(300, 60), (150, 60), (c.n_obs, 60)]
    assert len(model.get_latent_representation()) == 3
    np.testing.assert_allclose(imputed[2][:, [59, 45, 41, 58, 50, 52]].sum(1), 1, rtol=1e-5)
    assert model.module.adversarial_shape() == (3, 3)


def test_resume_equals_the_uninterrupted_run(tmp_path):
    seq, spatial = simulate(n_seq=150, n_spatial=120, n_genes=30, seed=8)
    GIMVI.setup_anndata(seq)
    GIMVI.setup_anndata(spatial)
    full = GIMVI(seq, spatial, n_latent=3).train(max_epochs=4, seed=2, progress_bar=False)
    part = GIMVI(seq, spatial, n_latent=3)
    part.train(max_epochs=2, seed=2, progress_bar=False, checkpoint_path=tmp_path / "c.pt")
    part.train(max_epochs=4, seed=2, progress_bar=False, checkpoint_path=tmp_path / "c.pt",
               resume=True)
    for k, v in full.module.state_dict().items():
        torch.testing.assert_close(part.module.state_dict()[k], v, rtol=0, atol=0)


def test_bad_input_raises_clear_errors():
    seq, spatial = simulate(n_seq=60, n_spatial=50, n_genes=30, seed=9)
    with pytest.raises(ValueError, match="setup_anndata"):
        GIMVI(seq, spatial)
    GIMVI.setup_anndata(seq)
    GIMVI.setup_anndata(spatial)
    with pytest.raises(ValueError, match="same AnnData object"):
        GIMVI(seq, seq)
    with pytest.raises(ValueError, match="one per dataset"):
        GIMVI(seq, spatial, generative_distributions=["zinb"])
    with pytest.raises(ValueError, match="generative_distributions"):
        GIMVI(seq, spatial, generative_distributions=["zinb", "normal"])
    with pytest.raises(TypeError, match="from the datasets"):
        GIMVI(seq, spatial, total_genes=3)
    with pytest.raises(TypeError, match="AnnData"):
        GIMVI(seq, "spatial.h5ad")
    other = spatial.copy()
    other.var_names = [v.upper() for v in other.var_names]
    GIMVI.setup_anndata(other)
    with pytest.raises(ValueError, match="shares no gene"):
        GIMVI(seq, other)
    dup = spatial.copy()
    dup.var_names = ["g1"] * dup.n_vars
    with pytest.warns(UserWarning):
        GIMVI.setup_anndata(dup)
    with pytest.raises(ValueError, match="var_names_make_unique"):
        GIMVI(seq, dup)
    empty = spatial.copy()
    empty.X[0] = 0
    GIMVI.setup_anndata(empty)
    with pytest.raises(ValueError, match="no counts"):
        GIMVI(seq, empty)
    model = GIMVI(seq, spatial)
    with pytest.raises(TypeError, match="kappa="):
        model.train(max_epochs=1, scale_adversarial_loss=2)
    with pytest.raises(ValueError, match="kappa"):
        model.train(max_epochs=1, kappa=-1)
    with pytest.raises(TypeError, match="unknown option"):
        model.train(max_epochs=1, learning_rate=0.1)
    assert get_summary(spatial).n_vars == 20 and keys.X in get_summary(spatial)
