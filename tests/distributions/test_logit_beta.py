"""The logit-scale Beta: density, KL, reparameterised draws and their gradients."""

import numpy as np
import pytest
import torch
from scipy import integrate, special, stats

from cellvi.distributions import LogitBeta, kl_beta

SHAPES = [(0.5, 0.5), (0.05, 0.9), (0.9, 0.02), (2.0, 3.0), (1e-3, 0.5)]


@pytest.mark.parametrize("a,b", SHAPES)
def test_log_prob_is_the_beta_density_times_the_jacobian(a, b):
    t = torch.linspace(-30, 30, 121, dtype=torch.float64)
    d = LogitBeta(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64))
    delta = special.expit(t.numpy())
    # scipy's Beta density where delta = sigmoid(t) is well away from rounding to 0 or 1 ...
    ok = np.abs(t.numpy()) <= 8
    ref = stats.beta.logpdf(delta, a, b) + np.log(delta) + np.log1p(-delta)
    np.testing.assert_allclose(d.log_prob(t).numpy()[ok], ref[ok], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(d.weight_log_prob(t).numpy()[ok],
                               stats.beta.logpdf(delta, a, b)[ok], rtol=1e-9, atol=1e-9)
    # ... and the formula with scipy's exact log-sigmoid over the whole range
    direct = (a * special.log_expit(t.numpy()) + b * special.log_expit(-t.numpy())
              - special.betaln(a, b))
    np.testing.assert_allclose(d.log_prob(t).numpy(), direct, rtol=1e-12, atol=1e-12)
    # a density on the real line: integrates to one
    def density(s):
        return float(torch.exp(d.log_prob(torch.tensor(s, dtype=torch.float64))).item())

    total, _ = integrate.quad(density, -np.inf, np.inf, limit=400, epsabs=1e-10)
    assert total == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("p,q", [((0.5, 0.5), (0.3, 0.7)), ((0.05, 0.9), (0.5, 0.5)),
                                 ((2.0, 3.0), (0.8, 0.4)), ((0.9, 0.02), (0.5, 0.5))])
def test_kl_matches_numerical_integration_and_torch(p, q):
    a1, b1 = p
    a2, b2 = q

    def log_density(s, a, b):  # the Beta density of sigmoid(s) times its Jacobian, exactly
        return a * special.log_expit(s) + b * special.log_expit(-s) - special.betaln(a, b)

    def integrand(s):
        lp = log_density(s, a1, b1)
        return np.exp(lp) * (lp - log_density(s, a2, b2))

    # the Beta densities are singular at 0 and 1: integrate on the logit scale instead
    ref, _ = integrate.quad(integrand, -np.inf, np.inf, limit=500)
    t = [torch.tensor(v, dtype=torch.float64) for v in (a1, b1, a2, b2)]
    ours = kl_beta(*t)
    assert float(ours) == pytest.approx(ref, rel=1e-6, abs=1e-9)
    via_registry = torch.distributions.kl_divergence(LogitBeta(t[0], t[1]), LogitBeta(t[2], t[3]))
    torch_beta = torch.distributions.kl_divergence(torch.distributions.Beta(t[0], t[1]),
                                                   torch.distributions.Beta(t[2], t[3]))
    torch.testing.assert_close(via_registry, ours)
    torch.testing.assert_close(torch_beta, ours)
    assert float(kl_beta(t[0], t[1], t[0], t[1])) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("a,b", [(0.5, 0.5), (0.05, 0.9), (2.0, 3.0)])
def test_draws_follow_the_beta(a, b):
    torch.manual_seed(0)
    t = LogitBeta(torch.tensor(a), torch.tensor(b)).rsample((20000,))
    assert torch.isfinite(t).all()
    delta = torch.sigmoid(t.double()).numpy()
    assert stats.kstest(delta, stats.beta(a, b).cdf).pvalue > 1e-3


def test_small_shapes_stay_finite_where_a_float32_beta_rounds():
    torch.manual_seed(1)
    a, b = torch.tensor(0.01), torch.tensor(0.02)
    t = LogitBeta(a, b).rsample((5000,))
    assert torch.isfinite(t).all()
    # the weights themselves are within rounding of 0 or 1 ...
    delta = torch.sigmoid(t)
    assert ((delta < 1e-6) | (delta > 1 - 1e-6)).float().mean() > 0.75
    # ... yet their logs are exact and the draws still follow Beta(a, b): P(delta < 1/2)
    frac = float((t < 0).float().mean())
    assert frac == pytest.approx(special.betainc(0.01, 0.02, 0.5), abs=0.03)
    log_delta = torch.nn.functional.logsigmoid(t)
    assert (log_delta > -torch.inf).all()


def test_gradients_through_the_sample_match_the_analytic_ones():
    """Pathwise gradients of E[delta] and E[log delta] against their closed forms."""
    torch.manual_seed(2)
    a = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    t = LogitBeta(a, b).rsample((200000,))
    mean = torch.sigmoid(t).mean()
    ga, gb = torch.autograd.grad(mean, (a, b))
    s = float(a.detach() + b.detach())
    assert float(ga) == pytest.approx(float(b.detach()) / s**2, rel=0.03)
    assert float(gb) == pytest.approx(-float(a.detach()) / s**2, rel=0.03)

    t = LogitBeta(a, b).rsample((200000,))
    mean_log = torch.nn.functional.logsigmoid(t).mean()  # E[log delta] = psi(a) - psi(a + b)
    ga, gb = torch.autograd.grad(mean_log, (a, b))
    assert float(ga) == pytest.approx(special.polygamma(1, 0.6) - special.polygamma(1, s),
                                      rel=0.03)
    assert float(gb) == pytest.approx(-special.polygamma(1, s), rel=0.03)


def test_expand_and_shapes():
    d = LogitBeta(torch.full((3,), 0.5), torch.full((3,), 0.5))
    assert d.rsample((4,)).shape == (4, 3)
    e = d.expand((2, 3))
    assert e.rsample().shape == (2, 3) and e.mean_weight.shape == (2, 3)
    with pytest.raises(ValueError):
        LogitBeta(torch.tensor(-1.0), torch.tensor(0.5), validate_args=True)
