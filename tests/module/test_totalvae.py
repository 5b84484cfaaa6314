"""The totalVI module: its likelihoods against direct formulas, masking, sparse input, options."""

import numpy as np
import pytest
import torch
from scipy.special import expit, logsumexp
from scipy.stats import nbinom
from torch import nn

from cellvi import keys
from cellvi.module import TOTALVAE, TOTALVAEConfig
from cellvi.module.totalvae import (
    PROTEIN_KEY,
    DecoderTOTALVI,
    _OneHotCovariates,
    _SparseDenseMatmul,
)
from cellvi.nn import CovariateLinear, FCLayers


def _batch(n=24, genes=30, proteins=6, n_batch=2, seed=0, sparse=False, cont=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.poisson(torch.rand(n, genes, generator=g) * 2, generator=g)
    x[:, 0] += 1  # no empty cell
    y = torch.poisson(torch.rand(n, proteins, generator=g) * 40 + 1, generator=g)
    b = torch.randint(0, n_batch, (n, 1), generator=g)
    t = {keys.X: x, PROTEIN_KEY: y, keys.BATCH: b}
    if cont:
        t[keys.CONT_COVS] = torch.randn(n, cont, generator=g)
    if sparse:
        t[keys.X] = x.to_sparse_csr()
        t[keys.X_T] = x.t().to_sparse_csr()
    return t


def _nb_logpmf(x, mu, theta):
    return nbinom.logpmf(x, theta, theta / (theta + mu))


def _grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("likelihood", ["nb", "zinb"])
def test_loss_terms_match_direct_formulas(likelihood):
    """Every term of the loss, per cell, against scipy or the closed form."""
    torch.manual_seed(0)
    m = TOTALVAE(30, n_input_proteins=6, n_batch=2, gene_likelihood=likelihood).eval()
    t = _batch()
    torch.manual_seed(1)
    inf, gen, out = m(t, kl_weight=1.0)
    x, y = t[keys.X].numpy().astype(float), t[PROTEIN_KEY].numpy().astype(float)
    lib = inf["library"].detach().numpy()  # log totals
    np.testing.assert_allclose(lib[:, 0], np.log(x.sum(1)), rtol=1e-6)
    g = gen["genes"]
    logits = g["logits"].detach().double().numpy()
    rho = np.exp(logits - logsumexp(logits, axis=1, keepdims=True))
    mu = np.exp(lib) * rho + 1e-8
    theta = g["theta"].detach().double().numpy()
    log_px = _nb_logpmf(x, mu, theta)
    if likelihood == "zinb":
        pi = expit(g["dropout"].detach().double().numpy())
        log_px = np.where(x == 0, np.log(pi + (1 - pi) * np.exp(log_px)), np.log(1 - pi) + log_px)
    py = {k: v.detach().double().numpy() for k, v in gen["py"].items()}
    eff = np.exp(py["efficiency"])
    pi_back = expit(py["mixing"])
    phi = py["r"]
    log_py = np.logaddexp(np.log(pi_back) + _nb_logpmf(y, eff * py["rate_back"], phi),
                          np.log1p(-pi_back) + _nb_logpmf(y, eff * py["rate_fore"], phi))
    rec = -log_px.sum(1) - log_py.sum(1)
    np.testing.assert_allclose(out.reconstruction_loss.detach().numpy(), rec, rtol=2e-5)
    np.testing.assert_allclose(out.extra["reconstruction_loss_protein"].item(),
                               -log_py.sum(1).mean(), rtol=2e-5)
    # the background KL: Normal(a, b) against the batch's prior
    prior = gen["background_prior"]
    m0, s0 = prior.loc.detach().double().numpy(), prior.scale.detach().double().numpy()
    a, s = py["back_alpha"], py["back_beta"]
    kl = np.log(s0 / s) + (s**2 + (a - m0) ** 2) / (2 * s0**2) - 0.5
    np.testing.assert_allclose(out.kl_local["kl_background"].detach().numpy(), kl.sum(1),
                               rtol=1e-5)
    # -log LogNormal(e | 0, 1) summed over proteins plus 1e-3 * -log(1 - pi_fore)
    log_e = py["efficiency"]
    lognormal = -(-log_e - 0.5 * np.log(2 * np.pi) - 0.5 * log_e**2)
    penalty = lognormal.sum(1) - 1e-3 * np.log(pi_back).sum(1)
    np.testing.assert_allclose(out.kl_local["background_penalty"].detach().numpy(), penalty,
                               rtol=1e-5)
    qz = inf["qz"]
    kl_z = 0.5 * (qz.scale**2 + qz.loc**2 - 1).sum(1) - torch.log(qz.scale).sum(1)
    torch.testing.assert_close(out.kl_local["kl_z"], kl_z.detach(), rtol=1e-5, atol=1e-5)
    # the loss weights the protein likelihood and the KLs by the warm-up weight (scvi-tools 1.4)
    w = 0.3
    torch.manual_seed(1)
    _, _, warm = m(t, kl_weight=w)
    expected = (-log_px.sum(1) - w * log_py.sum(1) + w * (kl_z.detach().numpy() + kl.sum(1)
                                                          + penalty)).mean()
    np.testing.assert_allclose(warm.loss.item(), expected, rtol=2e-5)


def test_sparse_and_dense_input_give_the_same_loss_and_gradients():
    torch.manual_seed(0)
    m = TOTALVAE(30, n_input_proteins=6, n_batch=2, n_continuous_cov=2).eval()
    dense, sparse = _batch(cont=2), _batch(cont=2, sparse=True)
    torch.manual_seed(3)
    a = m(dense)[2]
    a.loss.backward()
    ga = _grads(m)
    m.zero_grad()
    torch.manual_seed(3)
    b = m(sparse)[2]
    b.loss.backward()
    gb = _grads(m)
    assert set(ga) == set(gb)
    torch.testing.assert_close(a.loss, b.loss)
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-5, atol=1e-6, msg=name)


def test_compiled_gene_likelihood_equals_the_distribution_path():
    """The one-kernel gene likelihood of training gives the loss and gradients of ``px``."""
    torch.manual_seed(0)
    m = TOTALVAE(30, n_input_proteins=6, n_batch=2, gene_likelihood="zinb").eval()
    t = _batch(sparse=True)
    torch.manual_seed(5)
    inf = m.inference(**m.inference_inputs(t))
    gen = m.generative(**m.generative_inputs(t, inf))  # px built
    assert gen["px"] is not None
    ref = m.loss(t, inf, gen)
    ref.loss.backward()
    g_ref = _grads(m)
    m.zero_grad()
    torch.manual_seed(5)
    inf, gen, out = m(t)  # the training path
    assert gen["px"] is None
    out.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-4)
    for name, g in _grads(m).items():
        torch.testing.assert_close(g, g_ref[name], rtol=1e-4, atol=1e-6, msg=name)
    # a loss that weights the cells unequally still gets exact gradients
    m.zero_grad()
    torch.manual_seed(5)
    inf = m.inference(**m.inference_inputs(t))
    weights = torch.linspace(0.5, 2.0, 24)
    gen = m.generative(**m.generative_inputs(t, inf), gene_distribution=False)
    (m.gene_log_likelihood(t[keys.X], gen) * weights).sum().backward()
    fused = _grads(m)
    m.zero_grad()
    torch.manual_seed(5)
    inf = m.inference(**m.inference_inputs(t))
    gen = m.generative(**m.generative_inputs(t, inf))
    (m.gene_log_likelihood(t[keys.X], gen) * weights).sum().backward()
    for name, g in _grads(m).items():
        torch.testing.assert_close(fused[name], g, rtol=1e-4, atol=1e-5, msg=name)


def test_missing_proteins_leave_the_likelihood_of_their_batch():
    mask = [[True] * 6, [True, True, True, False, False, False]]  # batch 1 lacks 3 proteins
    torch.manual_seed(0)
    m = TOTALVAE(30, n_input_proteins=6, n_batch=2, protein_batch_mask=mask).eval()
    t = _batch()
    b1 = t[keys.BATCH].reshape(-1) == 1
    assert b1.any() and (~b1).any()
    changed = {k: v.clone() for k, v in t.items()}
    changed[PROTEIN_KEY][b1, 3:] = 1000.0  # what batch 1 did not measure
    torch.manual_seed(2)
    inf, gen, a = m(t)
    b = m.loss(changed, inf, gen)  # the same posterior draws, other counts
    torch.testing.assert_close(a.reconstruction_loss, b.reconstruction_loss)
    torch.testing.assert_close(a.kl_local["kl_background"], b.kl_local["kl_background"])
    changed[PROTEIN_KEY][~b1, 3:] += 5.0  # but batch 0 measured them
    c = m.loss(changed, inf, gen)
    assert not torch.allclose(a.reconstruction_loss[~b1], c.reconstruction_loss[~b1])
    torch.testing.assert_close(a.reconstruction_loss[b1], c.reconstruction_loss[b1])
    # no gradient reaches the background prior of what a batch did not measure
    c.loss.backward()
    assert torch.all(m.background_pro_alpha.grad[3:, 1] == 0)
    assert torch.all(m.background_pro_alpha.grad[:, 0] != 0)
    # the mask is part of the config, not of the weights
    assert "protein_batch_mask" not in m.state_dict()


def test_fused_decoder_stacks_are_four_separate_stacks():
    """The one wide hidden layer computes what four layers of width n_hidden compute."""
    torch.manual_seed(0)
    dec = DecoderTOTALVI(10, 30, 6, n_cat_list=[3], n_hidden=16, dropout_rate=0.0).eval()
    assert dec.fused
    z = torch.randn(12, 10)
    cats = torch.randint(0, 3, (12, 1))
    with torch.no_grad():
        for bn in dec.hidden.posts[0]:
            if isinstance(bn, nn.BatchNorm1d):
                bn.running_mean.normal_()
                bn.running_var.uniform_(0.5, 2)
        h = dec.hidden_states(z, cats)
        wide = dec.hidden.linears[0]
        for k, name in enumerate(dec.STACKS):
            one = FCLayers(10, 16, n_cat_list=[3], n_layers=1, dropout_rate=0.0).eval()
            cols = slice(16 * k, 16 * (k + 1))
            one.linears[0].weight.copy_(wide.weight[:, cols])
            one.linears[0].bias.copy_(wide.bias[cols])
            one.linears[0].cat_weights[0].copy_(wide.cat_weights[0][:, cols])
            bn_w, bn_1 = dec.hidden.posts[0][0], one.posts[0][0]
            for attr in ("weight", "bias", "running_mean", "running_var"):
                getattr(bn_1, attr).copy_(getattr(bn_w, attr)[cols])
            torch.testing.assert_close(h[name][:, :16], one(z, cats))
            torch.testing.assert_close(h[name][:, 16:], z)
    # two layers per stack: four separate stacks, same outputs' shapes
    deep = DecoderTOTALVI(10, 30, 6, n_cat_list=[3], n_layers=2, n_hidden=16)
    assert not deep.fused
    assert deep.hidden_states(z, cats, which=["px"])["px"].shape == (12, 26)


def test_one_hot_covariates_and_joint_first_layer_match_the_core_layer():
    torch.manual_seed(0)
    ref = CovariateLinear(8, 5, [3, 1, 2])
    fast = CovariateLinear(8, 5, [3, 1, 2])
    fast.load_state_dict(ref.state_dict())
    fast.__class__ = _OneHotCovariates
    x = torch.randn(7, 8)
    cats = [torch.randint(0, n, (7, 1)) for n in (3, 1, 2)]
    a, b = ref(x, *cats), fast(x, *cats)
    torch.testing.assert_close(a, b)
    a.square().sum().backward()
    b.square().sum().backward()
    for p, q in zip(ref.parameters(), fast.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    # [X | D] @ W with X sparse: the gradient of the whole weight, written once
    w = torch.randn(12, 4, requires_grad=True)
    xs = torch.poisson(torch.rand(7, 9))
    d = torch.randn(7, 3)
    out = _SparseDenseMatmul.apply(w, xs.to_sparse_csr(), xs.t().to_sparse_csr(), d)
    g = torch.randn(7, 4)
    (out * g).sum().backward()
    w2 = w.detach().clone().requires_grad_()
    ref_out = torch.cat([xs, d], 1) @ w2
    (ref_out * g).sum().backward()
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-5, atol=1e-5)


def test_marginal_likelihood_bounds_the_elbo_and_samples_have_shapes():
    torch.manual_seed(0)
    m = TOTALVAE(30, n_input_proteins=6, n_batch=2,
                 protein_batch_mask=[[True] * 6, [True] * 5 + [False]]).eval()
    t = _batch(n=16)
    with torch.no_grad():
        torch.manual_seed(0)
        elbo = -m(t)[2].negative_elbo
        ll = m.marginal_ll(t, n_mc_samples=200, n_mc_samples_per_pass=50)
    assert torch.isfinite(ll).all()
    # the regularisers of the loss are not part of log p(x, y); remove them from the ELBO
    torch.manual_seed(0)
    out = m(t)[2]
    elbo = elbo + out.kl_local["background_penalty"]
    assert ll.mean() > elbo.mean()
    rna, prot = m.sample(t, n_samples=3)
    assert rna.shape == (16, 30, 3) and prot.shape == (16, 6, 3)
    rna, prot = m.sample(t)
    assert rna.shape == (16, 30) and prot.shape == (16, 6) and (prot >= 0).all()
    inf = m.inference(**m.inference_inputs(t), n_samples=4)
    dec = m.decode(inf["z"], t[keys.BATCH])
    assert dec["gene_logits"].shape == (4, 16, 30) and dec["rate_fore"].shape == (4, 16, 6)
    assert (dec["rate_fore"] >= dec["rate_back"]).all()  # the foreground is not below


def test_config_validates_and_seed_options():
    c = TOTALVAEConfig(n_input_genes=5, n_input_proteins=3, n_layers=3)
    assert (c.n_layers_encoder, c.n_layers_decoder) == (3, 3)
    with pytest.raises(ValueError, match="gene_dispersion"):
        TOTALVAEConfig(n_input_genes=5, n_input_proteins=3, gene_dispersion="gene-cell")
    with pytest.raises(ValueError, match="protein_batch_mask must have shape"):
        TOTALVAEConfig(n_input_genes=5, n_input_proteins=3, n_batch=2,
                       protein_batch_mask=[[True, True, True]])
    with pytest.raises(ValueError, match="both"):
        TOTALVAEConfig(n_input_genes=5, n_input_proteins=3, protein_background_prior_mean=[1, 2, 3])
    with pytest.raises(ValueError, match="positive"):
        TOTALVAEConfig(n_input_genes=5, n_input_proteins=3, protein_background_prior_mean=[1, 2, 3],
                       protein_background_prior_scale=[1, 0, 1])
    with pytest.raises(ValueError, match="needs proteins|needs genes and proteins"):
        TOTALVAEConfig(n_input_genes=5, n_input_proteins=0)
    with pytest.raises(ValueError, match="library_log_means"):
        TOTALVAEConfig(n_input_genes=5, n_input_proteins=3, use_observed_lib_size=False)
    # per-batch and per-label dispersions; a modelled library
    m = TOTALVAE(30, n_input_proteins=6, n_batch=2, n_labels=2, gene_dispersion="gene-batch",
                 protein_dispersion="protein-label", use_observed_lib_size=False,
                 library_log_means=[3.0, 3.2], library_log_vars=[0.2, 0.3])
    t = _batch(sparse=True)
    t[keys.LABELS] = torch.randint(0, 2, (24, 1))
    out = m(t)[2]
    assert torch.isfinite(out.loss) and "kl_l" in out.kl_local
    out.loss.backward()
    assert m.px_r.grad.shape == (30, 2) and m.py_r.grad.shape == (6, 2)
