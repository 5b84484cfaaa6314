import itertools
import math

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import expit

from cellvi.distributions import (
    NegativeBinomial,
    ZeroInflatedNegativeBinomial,
    log_nb_positive,
    log_zinb_positive,
)

XS = [0.0, 1.0, 5.0, 100.0, 10000.0, 50000.0]
MUS = [0.0, 1e-3, 1.0, 50.0, 2e4]
THETAS = [1e-4, 0.1, 1.0, 100.0, 1e6]
ZI_LOGITS = [-8.0, -1.0, 0.0, 2.0, 10.0]


def _grid(dtype=torch.float64):
    rows = np.array(list(itertools.product(XS, MUS, THETAS, ZI_LOGITS)))
    return tuple(torch.tensor(rows[:, i], dtype=dtype) for i in range(4))


def _scipy_zinb(x, mu, theta, zi_logits):
    """log(pi * 1[x = 0] + (1 - pi) * NB(x)), built from scipy in log space."""
    x, mu, theta, zi_logits = (np.asarray(a, dtype=np.float64) for a in (x, mu, theta, zi_logits))
    pi = expit(zi_logits)
    log_nb = stats.nbinom.logpmf(x, n=theta, p=theta / (theta + mu))
    with np.errstate(divide="ignore"):
        log_zero_mass = np.where(x == 0, np.log(pi), -np.inf)
    return np.logaddexp(log_zero_mass, np.log1p(-pi) + log_nb)


@pytest.mark.parametrize("use_class", [False, True])
def test_log_prob_matches_scipy_mixture(use_class):
    x, mu, theta, zi = _grid()
    if use_class:
        d = ZeroInflatedNegativeBinomial(mu=mu, theta=theta, zi_logits=zi, validate_args=True)
        ours = d.log_prob(x).numpy()
    else:
        ours = log_zinb_positive(x, mu, theta, zi).numpy()
    ref = _scipy_zinb(x, mu, theta, zi)
    assert not np.isnan(ours).any()
    finite = np.isfinite(ref)
    np.testing.assert_allclose(ours[finite], ref[finite], rtol=1e-7, atol=1e-6)
    assert ((ours[~finite] == -np.inf) | (ours[~finite] < -1e3)).all()


def test_large_logits_limits():
    x = torch.tensor([0.0, 3.0, 10.0], dtype=torch.float64)
    mu, theta = torch.tensor(4.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)
    nb = log_nb_positive(x, mu, theta)
    # no inflation
    no_zi = log_zinb_positive(x, mu, theta, torch.tensor(-60.0, dtype=torch.float64))
    torch.testing.assert_close(no_zi, nb)
    # all the mass on the extra zero
    all_zi = log_zinb_positive(x, mu, theta, torch.tensor(200.0, dtype=torch.float64))
    assert all_zi[0].item() == pytest.approx(0.0, abs=1e-12)
    assert torch.isfinite(all_zi).all() and (all_zi[1:] < -150).all()


def test_float32_is_finite_for_positive_mean():
    x, mu, theta, zi = _grid(torch.float32)
    keep = mu > 0
    assert torch.isfinite(log_zinb_positive(x[keep], mu[keep], theta[keep], zi[keep])).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_are_finite_at_extremes(dtype):
    x, mu, theta, zi = (t.clone() for t in _grid(dtype))
    for t in (mu, theta, zi):
        t.requires_grad_()
    log_zinb_positive(x, mu, theta, zi).sum().backward()
    defined = ~((mu == 0) & (x > 0))
    for t in (mu, theta, zi):
        assert torch.isfinite(t.grad[defined]).all()


def test_gradient_matches_finite_differences():
    x = torch.tensor([0.0, 0.0, 3.0, 40.0], dtype=torch.float64)
    mu = torch.tensor([2.0, 0.01, 0.7, 35.0], dtype=torch.float64, requires_grad=True)
    theta = torch.tensor([0.3, 4.0, 5.0, 80.0], dtype=torch.float64, requires_grad=True)
    zi = torch.tensor([-1.0, 3.0, 0.5, -4.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda m, t, z: log_zinb_positive(x, m, t, z), (mu, theta, zi))


def test_properties_and_parameterisations():
    mu = torch.tensor([0.5, 3.0, 40.0], dtype=torch.float64)
    theta = torch.tensor([0.2, 2.0, 50.0], dtype=torch.float64)
    zi = torch.tensor([-2.0, 0.0, 1.5], dtype=torch.float64)
    scale = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    a = ZeroInflatedNegativeBinomial(mu=mu, theta=theta, zi_logits=zi, scale=scale)
    b = ZeroInflatedNegativeBinomial(total_count=theta, logits=torch.log(mu / theta), zi_logits=zi)
    assert isinstance(a, NegativeBinomial)
    assert a.scale is scale and b.scale is None
    torch.testing.assert_close(a.zi_probs, torch.sigmoid(zi))
    pi = torch.sigmoid(zi)
    torch.testing.assert_close(a.mean, (1 - pi) * mu)
    torch.testing.assert_close(a.variance, (1 - pi) * (mu + mu**2 / theta) + pi * (1 - pi) * mu**2)
    x = torch.tensor([[0.0], [1.0], [9.0]], dtype=torch.float64)
    torch.testing.assert_close(a.log_prob(x), b.log_prob(x))
    torch.testing.assert_close(b.mu, mu)
    # broadcasting of a scalar zi_logits
    c = ZeroInflatedNegativeBinomial(mu=mu, theta=theta, zi_logits=0.0)
    assert c.zi_logits.shape == mu.shape
    e = a.expand((2, 3))
    assert isinstance(e, ZeroInflatedNegativeBinomial)
    assert e.batch_shape == (2, 3) and e.zi_logits.shape == (2, 3)
    torch.testing.assert_close(e.log_prob(x[:2]), a.log_prob(x[:2]).expand(2, 3))


def test_mode():
    d = ZeroInflatedNegativeBinomial(
        mu=torch.tensor([20.0, 20.0]),
        theta=torch.tensor([50.0, 50.0]),
        zi_logits=torch.tensor([-5.0, 5.0]),
    )
    assert d.mode[0].item() > 10 and d.mode[1].item() == 0


def test_validation():
    with pytest.raises(ValueError, match="zi_logits"):
        ZeroInflatedNegativeBinomial(mu=1.0, theta=1.0)
    with pytest.raises(ValueError, match="not both"):
        ZeroInflatedNegativeBinomial(mu=1.0, theta=1.0, zi_logits=0.0, total_count=1.0, logits=0.0)
    with pytest.raises(ValueError):
        ZeroInflatedNegativeBinomial(
            mu=torch.tensor([-1.0]),
            theta=torch.tensor([1.0]),
            zi_logits=torch.tensor([0.0]),
            validate_args=True,
        )
    with pytest.raises(ValueError):
        ZeroInflatedNegativeBinomial(
            mu=torch.tensor([1.0]),
            theta=torch.tensor([1.0]),
            zi_logits=torch.tensor([math.nan]),
            validate_args=True,
        )
    d = ZeroInflatedNegativeBinomial(
        mu=torch.tensor([1.0]),
        theta=torch.tensor([1.0]),
        zi_logits=torch.tensor([0.0]),
        validate_args=True,
    )
    with pytest.raises(ValueError):
        d.log_prob(torch.tensor([2.5]))


@pytest.mark.parametrize(
    ("mu", "theta", "zi"), [(10.0, 3.0, -0.85), (2.0, 0.7, 0.0), (300.0, 1e6, -2.0)]
)
def test_sample_moments(mu, theta, zi):
    torch.manual_seed(0)
    args = (torch.tensor(v, dtype=torch.float64) for v in (mu, theta, zi))
    d = ZeroInflatedNegativeBinomial(*args)
    s = d.sample((200_000,))
    assert s.shape == (200_000,) and s.dtype == torch.float64
    assert math.isclose(s.mean().item(), d.mean.item(), rel_tol=0.03)
    assert math.isclose(s.var().item(), d.variance.item(), rel_tol=0.03)
    # fraction of zeros = pi + (1 - pi) NB(0)
    p0 = d.log_prob(torch.zeros((), dtype=torch.float64)).exp().item()
    assert math.isclose((s == 0).double().mean().item(), p0, rel_tol=0.03)
