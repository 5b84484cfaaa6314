"""AutoZIVAE: options, the mixture likelihood, the Beta KL, gradients, every mode trains."""

import math

import numpy as np
import pytest
import torch
from scipy import special, stats

from cellvi import keys
from cellvi.module import AutoZIVAE
from cellvi.module._vae_step import supports

MODES = ["gene", "gene-batch", "gene-label", "gene-cell"]


def _data(n=96, g=24, seed=0, zi_genes=8):
    gen = torch.Generator().manual_seed(seed)
    rate = torch.exp(torch.randn(1, g, generator=gen) + 0.5 * torch.randn(n, 1, generator=gen))
    x = torch.poisson(rate * 3, generator=gen)
    x[:, :zi_genes] *= (torch.rand(n, zi_genes, generator=gen) > 0.5).float()
    x[x.sum(1) == 0, -1] = 1
    batch = torch.randint(0, 2, (n, 1), generator=gen)
    labels = torch.randint(0, 3, (n, 1), generator=gen)
    return x, batch, labels


def _tensors(x, batch, labels, sparse=True):
    t = {keys.BATCH: batch, keys.LABELS: labels}
    if sparse:
        t[keys.X], t[keys.X_T] = x.to_sparse_csr(), x.t().to_sparse_csr()
    else:
        t[keys.X] = x
    return t


def _module(zero_inflation="gene", g=24, **kw):
    return AutoZIVAE(g, n_batch=2, n_labels=3, n_hidden=32, n_latent=4,
                     zero_inflation=zero_inflation, **kw)


# ------------------------------------------------------------------ options
@pytest.mark.parametrize("bad, match", [
    (dict(gene_likelihood="nb"), "NB/ZINB mixture"),
    (dict(alpha_prior=1.5), "alpha_prior must be a number in \\(0, 1\\)"),
    (dict(beta_prior=0.0), "beta_prior must be"),
    (dict(minimal_dropout=1.0), "minimal_dropout must be in \\[0, 1\\)"),
    (dict(zero_inflation="cell"), "zero_inflation must be one of"),
    (dict(zero_inflation="gene-label", n_labels=0), "labels_key"),
])
def test_bad_options_raise_clear_errors(bad, match):
    options = {**dict(n_input=10, n_batch=2, n_labels=3), **bad}
    with pytest.raises(ValueError, match=match):
        AutoZIVAE(**options)


def test_prior_rule_buffers_and_learned_shapes():
    m = _module(alpha_prior=0.3, beta_prior=None)
    assert m.config.priors == (0.3, pytest.approx(0.7))
    ab = m.get_alphas_betas()
    assert ab["alpha_prior"] == pytest.approx([0.3]) and ab["beta_prior"] == pytest.approx([0.7])
    # each shape its own value (scvi-tools 1.4.2 stores logit(alpha_prior) for both in "gene")
    m = _module(alpha_prior=0.3, beta_prior=0.6)
    assert m.get_alphas_betas()["beta_prior"] == pytest.approx([0.6])
    assert "alpha_prior_logit" in dict(m.named_buffers()) and not m.learns_prior
    for mode, shape in [("gene", (1,)), ("gene-batch", (2,)), ("gene-label", (3,)),
                        ("gene-cell", (1,))]:
        m = _module(mode, alpha_prior=None, beta_prior=None)
        assert m.learns_prior
        params = dict(m.named_parameters())
        assert params["alpha_prior_logit"].shape == shape
        assert params["beta_prior_logit"].shape == shape
    post = {"gene": (24,), "gene-batch": (24, 2), "gene-label": (24, 3)}
    for mode, shape in post.items():
        assert _module(mode).alpha_posterior_logit.shape == shape


def test_autograd_step_and_the_fused_step_refuses():
    m = _module()
    step, reason = m.fused_training_step(device="cpu", sparse=True)
    assert step is None and "AutoZIVAE overrides" in reason and "loss" in reason
    assert not supports(m)


# ------------------------------------------------------------------ pieces against formulas
def test_rescale_dropout_is_the_bounded_probability():
    h = torch.tensor([-200.0, -30.0, -2.0, 0.0, 3.0, 40.0], dtype=torch.float64)
    m = _module(minimal_dropout=0.05).double()
    pi = torch.sigmoid(m.rescale_dropout(h))
    torch.testing.assert_close(pi, 0.05 + 0.95 * torch.sigmoid(h), rtol=1e-12, atol=0)
    assert torch.equal(_module(minimal_dropout=0.0).rescale_dropout(h), h)


def test_global_kl_is_the_sum_of_beta_kls_against_scipy():
    m = _module("gene-batch").double()
    with torch.no_grad():  # away from the prior, where the posterior starts
        m.alpha_posterior_logit.normal_()
        m.beta_posterior_logit.normal_()
    a = torch.sigmoid(m.alpha_posterior_logit).detach().numpy()
    b = torch.sigmoid(m.beta_posterior_logit).detach().numpy()
    a0 = b0 = 0.5

    def kl(p, q, r, s):  # closed form, with scipy's special functions
        return (special.betaln(r, s) - special.betaln(p, q) + (p - r) * special.digamma(p)
                + (q - s) * special.digamma(q) + (r - p + s - q) * special.digamma(p + q))

    ref = kl(a, b, a0, b0).sum()  # (the closed form against an integral: test_logit_beta.py)
    assert float(m.compute_global_kl_divergence().detach()) == pytest.approx(ref, rel=1e-10)


@pytest.mark.parametrize("mode", MODES)
def test_reconstruction_is_the_nb_zinb_mixture_written_out(mode):
    torch.manual_seed(0)
    x, batch, labels = _data()
    m = _module(mode).double().eval()
    t = _tensors(x.double(), batch, labels, sparse=False)
    inf, gen, out = m(t)
    px = gen["px"]
    mu, theta = px.mu.detach().numpy(), px.theta.detach().expand_as(px.mu).numpy()
    pi = px.zinb_probs.detach().numpy()  # 0.01 + 0.99 sigmoid(decoder's logits)
    torch.testing.assert_close(px.zinb_probs, torch.sigmoid(m.rescale_dropout(px.zinb_logits)))
    delta = torch.sigmoid(m.reshape_bernoulli(inf["delta_logits"], batch, labels))
    delta = np.broadcast_to(delta.detach().numpy(), mu.shape)
    xn = x.numpy()
    nb = stats.nbinom.pmf(xn, theta, theta / (theta + mu))
    zinb = pi * (xn == 0) + (1 - pi) * nb
    ref = -np.log(delta * nb + (1 - delta) * zinb).sum(1)
    np.testing.assert_allclose(out.reconstruction_loss.detach().numpy(), ref, rtol=1e-8)
    # scvi-tools' formula (log-sum-exp of the two weighted components) gives the same
    scvi_style = m.get_reconstruction_loss(t[keys.X], px.mu, px.theta,
                                           m.rescale_dropout(px.zinb_logits),
                                           torch.from_numpy(delta.copy()))
    np.testing.assert_allclose(scvi_style.detach().numpy(), ref, rtol=1e-6)


def test_sparse_and_dense_minibatches_give_the_same_loss():
    x, batch, labels = _data()
    m = _module("gene-cell").eval()
    torch.manual_seed(3)
    dense = m(_tensors(x, batch, labels, sparse=False), n_obs=50)[2]
    torch.manual_seed(3)
    sparse = m(_tensors(x, batch, labels), n_obs=50)[2]
    torch.testing.assert_close(dense.loss, sparse.loss, rtol=1e-5, atol=1e-4)


def test_loss_adds_the_global_kl_once_per_n_obs():
    x, batch, labels = _data()
    m = _module("gene-label").eval()
    assert float(m.compute_global_kl_divergence()) == 0  # the posterior starts at the prior
    with torch.no_grad():
        m.alpha_posterior_logit.normal_()
    torch.manual_seed(1)
    out = m(_tensors(x, batch, labels), n_obs=500)[2]
    per_cell = out.reconstruction_loss + out.kl_local["kl_z"]
    expected = per_cell.mean() + m.compute_global_kl_divergence() / 500
    torch.testing.assert_close(out.loss, expected)
    assert float(out.kl_global) > 0 and set(out.kl_local) == {"kl_z"}
    m = _module("gene-cell").eval()
    out = m(_tensors(x, batch, labels), n_obs=500)[2]
    assert float(out.kl_global) == 0 and (out.kl_local["kl_delta"] > 0).all()


# ------------------------------------------------------------------ gradients and training
def test_gradients_reach_the_beta_shapes_through_the_sample():
    x, batch, labels = _data()
    m = _module(alpha_prior=None, beta_prior=None)
    # the posteriors start at the prior, where the KL's gradient w.r.t. the prior is exactly
    # zero (only rounding made it non-zero on some torch versions): move them away first
    with torch.no_grad():
        m.alpha_posterior_logit.add_(0.5)
        m.beta_posterior_logit.sub_(0.3)
    torch.manual_seed(0)
    out = m(_tensors(x, batch, labels), n_obs=100)[2]
    out.loss.backward()
    for name in ("alpha_posterior_logit", "beta_posterior_logit", "alpha_prior_logit",
                 "beta_prior_logit"):
        grad = getattr(m, name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    # the reconstruction's gradient w.r.t. a weight's shapes flows only through its draw
    m.zero_grad()
    torch.manual_seed(0)
    out = m(_tensors(x, batch, labels), n_obs=100)[2]
    out.reconstruction_loss.mean().backward()
    assert m.alpha_posterior_logit.grad.abs().sum() > 0
    assert m.alpha_prior_logit.grad is None or m.alpha_prior_logit.grad.abs().sum() == 0


@pytest.mark.parametrize("mode, learned", [(m, True) for m in MODES] + [("gene", False)])
def test_each_mode_trains(mode, learned):
    """Every mode, each with a learned prior (the fixed priors train in tests/model too)."""
    torch.manual_seed(0)
    x, batch, labels = _data(n=128, g=20, seed=4)
    prior = None if learned else 0.5
    m = _module(mode, g=20, alpha_prior=prior, beta_prior=prior)
    t = _tensors(x, batch, labels)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in m.parameters()]
    losses = []
    m.train()
    for _ in range(40):
        opt.zero_grad()
        out = m(t, n_obs=128)[2]
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss))
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 1.0
    assert all(math.isfinite(v) for v in losses)
    moved = {n for (n, p), b in zip(m.named_parameters(), before) if not torch.equal(p, b)}
    weights = ({"delta_encoder.linears.0.weight", "delta_head.weight", "delta_entry"}
               if mode == "gene-cell" else {"alpha_posterior_logit", "beta_posterior_logit"})
    if learned:
        weights |= {"alpha_prior_logit", "beta_prior_logit"}
    assert weights <= moved  # the weights' posterior (and learned prior) were updated


def test_marginal_ll_integrates_the_weights_and_bounds_the_elbo():
    x, batch, labels = _data()
    for mode in ("gene", "gene-cell"):
        m = _module(mode).eval()
        t = _tensors(x, batch, labels)
        torch.manual_seed(0)
        out = m(t, n_obs=x.shape[0])[2]
        elbo = -(out.reconstruction_loss + out.kl_local_sum).mean()
        delta = None if mode == "gene-cell" else m.posterior().rsample()
        mll = m.marginal_ll(t, n_mc_samples=60, n_mc_samples_per_pass=25, delta_logits=delta)
        assert mll.shape == (x.shape[0],) and torch.isfinite(mll).all()
        assert float(mll.mean()) > float(elbo) - 1.0
    with pytest.raises(ValueError, match="delta_logits"):
        _module("gene").marginal_ll(_tensors(x, batch, labels), n_mc_samples=3)


def test_sample_from_beta_distribution_and_reshape_bernoulli():
    m = _module("gene-batch")
    torch.manual_seed(0)
    d = m.sample_from_beta_distribution(torch.full((5000,), 0.5), torch.full((5000,), 0.5))
    assert ((d > 0) & (d < 1)).all()  # scvi-tools' guard: never exactly 0 or 1
    assert stats.kstest(d.double().numpy(), stats.beta(0.5, 0.5).cdf).pvalue > 1e-3
    params = torch.arange(6.0).reshape(3, 2)  # (genes, batches)
    cells = m.reshape_bernoulli(params, torch.tensor([[1], [0], [1]]))
    torch.testing.assert_close(cells, torch.tensor([[1.0, 3, 5], [0, 2, 4], [1, 3, 5]]))
    many = m.sample_bernoulli_params(torch.tensor([[1], [0]]), n_samples=4)
    assert many.shape == (4, 2, 24)
