"""The optimised per-cell likelihood equals the plain elementwise formula."""

import pytest
import torch

from cellvi.distributions import (
    NegativeBinomial,
    ZeroInflatedNegativeBinomial,
    log_nb_positive,
    log_prob_rows,
    log_zinb_positive,
    nb_log_prob_rows,
)


def _inputs(seed, n=64, g=300, theta_shape="gene"):
    gen = torch.Generator().manual_seed(seed)
    dt = torch.float64
    mu = torch.exp(torch.randn(n, g, generator=gen, dtype=dt) * 3)  # 1e-4 .. 1e4
    # counts: mostly zeros, some large (tens of thousands)
    x = torch.poisson(mu, generator=gen) * (torch.rand(n, g, generator=gen, dtype=dt) < 0.7)
    x[0, :5] = torch.tensor([0.0, 1.0, 20000.0, 50000.0, 3.0], dtype=dt)
    shape = (g,) if theta_shape == "gene" else (n, g)
    theta = torch.exp(torch.empty(shape, dtype=dt).uniform_(-9.2, 13.8, generator=gen))  # 1e-4..1e6
    zi = torch.randn(n, g, generator=gen, dtype=dt) * 3
    return x, mu.requires_grad_(), theta.requires_grad_(), zi.requires_grad_()


@pytest.mark.parametrize("theta_shape", ["gene", "cell"])
@pytest.mark.parametrize("zero_inflated", [False, True])
@pytest.mark.parametrize("given_nonzero", [False, True])
def test_rows_equal_plain_formula_and_gradients(theta_shape, zero_inflated, given_nonzero):
    x, mu, theta, zi = _inputs(0, theta_shape=theta_shape)
    nonzero = torch.stack(torch.nonzero(x, as_tuple=True)) if given_nonzero else None
    if zero_inflated:
        plain = log_zinb_positive(x, mu, theta, zi).sum(-1)
        fast = nb_log_prob_rows(x, mu, theta, zi, nonzero=nonzero)
    else:
        plain = log_nb_positive(x, mu, theta).sum(-1)
        fast = nb_log_prob_rows(x, mu, theta, nonzero=nonzero)
    torch.testing.assert_close(fast, plain, rtol=1e-10, atol=1e-8)
    params = (mu, theta, zi) if zero_inflated else (mu, theta)
    g_plain = torch.autograd.grad(plain.sum(), params)
    g_fast = torch.autograd.grad(fast.sum(), params)
    for a, b in zip(g_fast, g_plain):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


def test_leading_sample_dimension_with_given_nonzero():
    x, mu, theta, zi = _inputs(1)
    mu3 = torch.stack([mu.detach(), mu.detach() * 2])  # (2, cells, genes)
    zi3 = torch.stack([zi.detach(), -zi.detach()])
    nonzero = torch.stack(torch.nonzero(x, as_tuple=True))
    plain = log_zinb_positive(x, mu3, theta.detach(), zi3).sum(-1)
    torch.testing.assert_close(nb_log_prob_rows(x, mu3, theta.detach(), zi3, nonzero), plain)
    torch.testing.assert_close(nb_log_prob_rows(x, mu3, theta.detach(), zi3), plain)


def test_float32_matches_float64_reference():
    x, mu, theta, zi = _inputs(2)
    theta = theta.detach().clamp(max=1e3)
    ref = log_zinb_positive(x, mu.detach(), theta, zi.detach()).sum(-1)
    fast = nb_log_prob_rows(x.float(), mu.detach().float(), theta.float(), zi.detach().float())
    torch.testing.assert_close(fast.double(), ref, rtol=1e-4, atol=0.5)


def test_dispatch_through_distributions():
    x, mu, theta, zi = _inputs(3)
    px = ZeroInflatedNegativeBinomial(mu=mu, theta=theta, zi_logits=zi, validate_args=False)
    torch.testing.assert_close(log_prob_rows(px, x), px.log_prob(x).sum(-1))
    nb = NegativeBinomial(mu=mu, theta=theta, validate_args=False)
    torch.testing.assert_close(log_prob_rows(nb, x), nb.log_prob(x).sum(-1))


def test_no_gradient_path_gives_the_same_values():
    x, mu, theta, zi = _inputs(4)
    with_grad = nb_log_prob_rows(x, mu, theta, zi)
    with torch.no_grad():
        without = nb_log_prob_rows(x, mu, theta, zi)
        nb_without = nb_log_prob_rows(x, mu, theta)
    torch.testing.assert_close(without, with_grad.detach(), rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(nb_without, log_nb_positive(x, mu, theta).sum(-1).detach())
    assert mu.grad is None


def test_zero_probability_underflow_is_recomputed_stably():
    # float32: zi << 0 and mu >> theta make p(0) = sigma(zi) + (1 - sigma(zi)) NB(0) underflow
    x, mu, theta, zi = _inputs(5, n=6, g=40)
    mu32 = mu.detach().float().clone()
    zi32 = zi.detach().float().clone()
    th32 = theta.detach().float().clamp(1e-2, 1e3)
    mu32[2, :3], th32[:3], zi32[2, :3] = 1e6, 10.0, -120.0  # log NB(0) ~ -110, zi = -120
    x32 = x.float().clone()
    x32[2, :3] = 0.0
    mu32.requires_grad_(), zi32.requires_grad_(), th32.requires_grad_()
    fast = nb_log_prob_rows(x32, mu32, th32, zi32)
    assert torch.isfinite(fast).all()
    ref = log_zinb_positive(x32.double(), mu32.double(), th32.double(), zi32.double()).sum(-1)
    torch.testing.assert_close(fast.double(), ref.detach(), rtol=1e-5, atol=1e-2)
    grads = torch.autograd.grad(fast.sum(), (mu32, th32, zi32))
    refs = torch.autograd.grad(ref.sum(), (mu32, th32, zi32))
    for a, b in zip(grads, refs):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("theta_kind", ["gene", "cell-shared", "sample"])
@pytest.mark.parametrize("zero_inflated", [False, True])
def test_sample_dimension_values_and_gradients(theta_kind, zero_inflated):
    """(samples, cells, genes) means over one count matrix, as in the marginal likelihood."""
    x, mu, theta, zi = _inputs(6, n=20, g=50)
    gen = torch.Generator().manual_seed(7)
    dt = torch.float64
    mu3 = (mu.detach() * torch.exp(torch.randn(3, 20, 50, generator=gen, dtype=dt))
           ).requires_grad_()
    zi3 = torch.randn(3, 20, 50, generator=gen, dtype=dt).mul(3).requires_grad_()
    if theta_kind == "gene":
        th = theta.detach().clone().requires_grad_()
    elif theta_kind == "cell-shared":  # gene-batch / gene-label: (cells, genes), no sample dim
        th = torch.exp(torch.randn(20, 50, generator=gen, dtype=dt) * 2).requires_grad_()
    else:  # gene-cell: differs between samples
        th = torch.exp(torch.randn(3, 20, 50, generator=gen, dtype=dt) * 2).requires_grad_()
    nonzero = torch.stack(torch.nonzero(x, as_tuple=True))
    if zero_inflated:
        plain = log_zinb_positive(x, mu3, th, zi3).sum(-1)
        fast = nb_log_prob_rows(x, mu3, th, zi3, nonzero)
        params = (mu3, th, zi3)
    else:
        plain = log_nb_positive(x, mu3, th).sum(-1)
        fast = nb_log_prob_rows(x, mu3, th, nonzero=nonzero)
        params = (mu3, th)
    assert fast.shape == (3, 20)
    torch.testing.assert_close(fast, plain, rtol=1e-10, atol=1e-8)
    weights = torch.rand(3, 20, generator=gen, dtype=dt)  # a non-uniform upstream gradient
    for a, b in zip(torch.autograd.grad((fast * weights).sum(), params),
                    torch.autograd.grad((plain * weights).sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


def test_counts_with_their_own_sample_dimension():
    x, mu, theta, zi = _inputs(8, n=10, g=30)
    x3 = torch.stack([x, torch.flip(x, [0])])  # different counts per sample
    mu3 = torch.stack([mu.detach(), mu.detach() * 0.5])
    plain = log_zinb_positive(x3, mu3, theta.detach(), zi.detach()).sum(-1)
    torch.testing.assert_close(nb_log_prob_rows(x3, mu3, theta.detach(), zi.detach()), plain)

