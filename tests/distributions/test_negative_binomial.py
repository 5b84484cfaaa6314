import itertools
import math

import numpy as np
import pytest
import torch
from scipy import special, stats

from cellvi.distributions import NegativeBinomial, log_nb_positive

XS = [0.0, 1.0, 5.0, 100.0, 10000.0, 50000.0]
MUS = [0.0, 1e-3, 1.0, 50.0, 2e4]
THETAS = [1e-4, 0.1, 1.0, 100.0, 1e6]


def _grid(dtype=torch.float64):
    """All (x, mu, theta) combinations, flattened to 1-D tensors."""
    rows = np.array(list(itertools.product(XS, MUS, THETAS)))
    x, mu, theta = (torch.tensor(rows[:, i], dtype=dtype) for i in range(3))
    return x, mu, theta


def _scipy_nb(x, mu, theta):
    x, mu, theta = (np.asarray(a, dtype=np.float64) for a in (x, mu, theta))
    return stats.nbinom.logpmf(x, n=theta, p=theta / (theta + mu))


@pytest.mark.parametrize("use_class", [False, True])
def test_log_prob_matches_scipy_on_extreme_grid(use_class):
    x, mu, theta = _grid()
    if use_class:
        ours = NegativeBinomial(mu=mu, theta=theta, validate_args=True).log_prob(x)
    else:
        ours = log_nb_positive(x, mu, theta)
    ours = ours.numpy()
    ref = _scipy_nb(x, mu, theta)
    assert not np.isnan(ours).any()
    finite = np.isfinite(ref)
    np.testing.assert_allclose(ours[finite], ref[finite], rtol=1e-7, atol=1e-6)
    # mu = 0 and x > 0: impossible event
    assert (~finite == ((mu.numpy() == 0) & (x.numpy() > 0))).all()
    assert ((ours[~finite] == -np.inf) | (ours[~finite] < -1e3)).all()


def test_point_mass_at_zero_when_mu_is_zero():
    theta = torch.tensor(THETAS, dtype=torch.float64)
    lp = log_nb_positive(torch.zeros_like(theta), torch.zeros_like(theta), theta)
    assert torch.equal(lp, torch.zeros_like(theta))


def test_poisson_limit_against_high_precision_reference():
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    for x, mu, theta in itertools.product([0, 1, 5, 100, 10000], [1e-3, 1.0, 50.0], [1e4, 1e6]):
        t, m = mpmath.mpf(theta), mpmath.mpf(mu)
        exact = (
            mpmath.loggamma(x + t)
            - mpmath.loggamma(t)
            - mpmath.loggamma(x + 1)
            + t * mpmath.log(t / (t + m))
            + x * mpmath.log(m / (t + m))
        )
        args = (torch.tensor(v, dtype=torch.float64) for v in (float(x), mu, theta))
        ours = log_nb_positive(*args).item()
        assert math.isclose(ours, float(exact), rel_tol=1e-9, abs_tol=1e-8), (x, mu, theta)


def test_float32_is_finite_for_positive_mean():
    x, mu, theta = _grid(torch.float32)
    keep = mu > 0
    x, mu, theta = x[keep], mu[keep], theta[keep]
    lp = log_nb_positive(x, mu, theta)
    assert torch.isfinite(lp).all()
    ref = _scipy_nb(x, mu, theta)
    # In float32 the log density is a sum of terms as large as 1e5 (lgamma at 1e4 counts) that
    # cancel; what float32 can promise is an error of a few ulps of the largest term, whatever
    # the platform's lgamma and log (measured: at most 0.44 such ulps with torch's scalar, AVX2
    # and AVX-512 kernels). A bound relative to the result would depend on the kernels.
    xd, md, td = (a.double().numpy() for a in (x, mu, theta))
    terms = [special.gammaln(xd + td), special.gammaln(td), special.gammaln(xd + 1),
             td * np.log(td), td * np.log(td + md), xd * np.log(md), xd * np.log(td + md)]
    magnitude = 1 + np.max(np.abs(terms), axis=0)
    ulps = np.abs(lp.double().numpy() - ref) / (np.finfo(np.float32).eps * magnitude)
    assert ulps.max() < 8


def test_broadcasting_and_no_reduction():
    x = torch.tensor([[0.0, 1.0, 2.0]], dtype=torch.float64)
    mu = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    lp = log_nb_positive(x, mu, torch.tensor(3.0, dtype=torch.float64))
    assert lp.shape == (2, 3)
    ref = _scipy_nb(np.array([[0, 1, 2]]), np.array([[1.0], [2.0]]), 3.0)
    np.testing.assert_allclose(lp.numpy(), ref, rtol=1e-10)


def test_total_count_logits_parameterisation_is_equivalent():
    mu = torch.tensor([1e-3, 0.5, 3.0, 250.0], dtype=torch.float64)
    theta = torch.tensor([0.1, 2.0, 10.0, 1e4], dtype=torch.float64)
    logits = torch.log(mu / theta)
    a = NegativeBinomial(mu=mu, theta=theta)
    b = NegativeBinomial(total_count=theta, logits=logits)
    x = torch.tensor([[0.0], [1.0], [7.0], [300.0]], dtype=torch.float64)
    torch.testing.assert_close(a.log_prob(x), b.log_prob(x))
    torch.testing.assert_close(a.mean, b.mean)
    torch.testing.assert_close(a.variance, b.variance)
    torch.testing.assert_close(b.mu, mu)
    torch.testing.assert_close(a.logits, logits)
    torch.testing.assert_close(a.total_count, theta)
    assert b.logits is not None and torch.equal(b.logits, logits)
    # same convention as torch.distributions.NegativeBinomial
    ref = torch.distributions.NegativeBinomial(total_count=theta, logits=logits)
    torch.testing.assert_close(b.log_prob(x), ref.log_prob(x))
    torch.testing.assert_close(b.mean, ref.mean)
    torch.testing.assert_close(b.variance, ref.variance)


def test_parameterisation_errors():
    with pytest.raises(ValueError, match="not both"):
        NegativeBinomial(mu=1.0, theta=1.0, total_count=1.0, logits=0.0)
    with pytest.raises(ValueError, match="either"):
        NegativeBinomial()
    with pytest.raises(ValueError, match="both"):
        NegativeBinomial(mu=1.0)
    with pytest.raises(ValueError, match="both"):
        NegativeBinomial(total_count=1.0)


@pytest.mark.parametrize(("mu", "theta"), [(-1.0, 1.0), (1.0, 0.0), (1.0, -2.0), (math.nan, 1.0)])
def test_invalid_parameters_raise(mu, theta):
    with pytest.raises(ValueError):
        NegativeBinomial(mu=torch.tensor(mu), theta=torch.tensor(theta), validate_args=True)
    # no check when validation is off
    NegativeBinomial(mu=torch.tensor(mu), theta=torch.tensor(theta), validate_args=False)


@pytest.mark.parametrize("value", [1.5, -1.0])
def test_invalid_values_raise(value):
    d = NegativeBinomial(mu=torch.tensor([2.0]), theta=torch.tensor([1.0]), validate_args=True)
    with pytest.raises(ValueError):
        d.log_prob(torch.tensor([value]))
    d = NegativeBinomial(mu=torch.tensor([2.0]), theta=torch.tensor([1.0]), validate_args=False)
    d.log_prob(torch.tensor([value]))


def test_attributes_shapes_and_expand():
    scale = torch.softmax(torch.randn(4, 3), -1)
    d = NegativeBinomial(mu=torch.ones(4, 3), theta=2.0, scale=scale)
    assert d.batch_shape == (4, 3)
    assert d.theta.shape == (4, 3)
    assert d.scale is scale
    assert not d.has_rsample
    assert d.support is torch.distributions.constraints.nonnegative_integer
    e = d.expand((2, 4, 3))
    assert isinstance(e, NegativeBinomial)
    assert e.batch_shape == (2, 4, 3) and e.scale.shape == (2, 4, 3)
    assert e.sample().shape == (2, 4, 3)


@pytest.mark.parametrize(("mu", "theta"), [(5.0, 2.0), (0.5, 10.0), (50.0, 0.5), (100.0, 1e6)])
def test_sample_moments(mu, theta):
    torch.manual_seed(0)
    d = NegativeBinomial(
        mu=torch.tensor(mu, dtype=torch.float64), theta=torch.tensor(theta, dtype=torch.float64)
    )
    s = d.sample((200_000,))
    assert s.shape == (200_000,) and s.dtype == torch.float64
    assert torch.equal(s, s.round()) and (s >= 0).all()
    assert math.isclose(s.mean().item(), d.mean.item(), rel_tol=0.03)
    assert math.isclose(s.var().item(), d.variance.item(), rel_tol=0.03)


def test_sample_edge_cases():
    torch.manual_seed(0)
    d = NegativeBinomial(mu=torch.tensor([0.0, 1e4, 3.0]), theta=torch.tensor([1.0, 1e-4, 1e6]))
    s = d.sample((1000,))
    assert s.shape == (1000, 3) and s.dtype == torch.float32
    assert torch.isfinite(s).all()
    assert (s[:, 0] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_are_finite_at_extremes(dtype):
    x, mu, theta = _grid(dtype)
    mu = mu.clone().requires_grad_()
    theta = theta.clone().requires_grad_()
    log_nb_positive(x, mu, theta).sum().backward()
    defined = ~((mu == 0) & (x > 0))  # log p = -inf there
    assert torch.isfinite(mu.grad[defined]).all()
    assert torch.isfinite(theta.grad[defined]).all()
    # d/dmu log p(0 | mu=0) = -1
    at_zero = (mu == 0) & (x == 0)
    torch.testing.assert_close(mu.grad[at_zero], -torch.ones_like(mu.grad[at_zero]))


def test_gradient_matches_finite_differences():
    x = torch.tensor([0.0, 3.0, 40.0], dtype=torch.float64)
    mu = torch.tensor([2.0, 0.7, 35.0], dtype=torch.float64, requires_grad=True)
    theta = torch.tensor([0.3, 5.0, 80.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda m, t: log_nb_positive(x, m, t), (mu, theta))
