import itertools
import math

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import expit

from cellvi.distributions import NegativeBinomialMixture, log_mixture_nb, log_nb_positive

XS = [0.0, 1.0, 5.0, 100.0, 10000.0, 50000.0]
MUS = [0.0, 1e-3, 1.0, 50.0, 2e4]
THETAS = [1e-4, 0.1, 1.0, 100.0, 1e6]


def _grid(dtype=torch.float64):
    """(x, mu1, mu2, theta1, theta2, logits) over a grid mixing the extremes."""
    rng = np.random.default_rng(0)
    rows = np.array(list(itertools.product(XS, MUS, THETAS)))
    n = len(rows)
    mu2 = rng.choice(MUS, n)
    theta2 = rng.choice(THETAS, n)
    logits = rng.choice([-6.0, -0.5, 0.0, 1.0, 6.0], n)
    cols = [rows[:, 0], rows[:, 1], mu2, rows[:, 2], theta2, logits]
    return tuple(torch.tensor(c, dtype=dtype) for c in cols)


def _scipy_mixture(x, mu1, mu2, theta1, theta2, logits):
    x, mu1, mu2, theta1, theta2, logits = (
        np.asarray(a, dtype=np.float64) for a in (x, mu1, mu2, theta1, theta2, logits)
    )
    pi = expit(logits)
    nb1 = stats.nbinom.logpmf(x, n=theta1, p=theta1 / (theta1 + mu1))
    nb2 = stats.nbinom.logpmf(x, n=theta2, p=theta2 / (theta2 + mu2))
    return np.logaddexp(np.log(pi) + nb1, np.log1p(-pi) + nb2)


@pytest.mark.parametrize("shared_theta", [False, True])
@pytest.mark.parametrize("use_class", [False, True])
def test_log_prob_matches_scipy_mixture(shared_theta, use_class):
    x, mu1, mu2, theta1, theta2, logits = _grid()
    theta2_arg = None if shared_theta else theta2
    if use_class:
        d = NegativeBinomialMixture(mu1, mu2, theta1, logits, theta2_arg, validate_args=True)
        ours = d.log_prob(x).numpy()
    else:
        ours = log_mixture_nb(x, mu1, mu2, theta1, theta2_arg, logits).numpy()
    ref = _scipy_mixture(x, mu1, mu2, theta1, theta1 if shared_theta else theta2, logits)
    assert not np.isnan(ours).any()
    finite = np.isfinite(ref)
    np.testing.assert_allclose(ours[finite], ref[finite], rtol=1e-7, atol=1e-6)
    assert ((ours[~finite] == -np.inf) | (ours[~finite] < -1e3)).all()


def test_degenerate_weights_give_single_component():
    x = torch.tensor([0.0, 2.0, 30.0], dtype=torch.float64)
    mu1, mu2 = torch.tensor(1.5, dtype=torch.float64), torch.tensor(25.0, dtype=torch.float64)
    theta = torch.tensor(3.0, dtype=torch.float64)
    big = torch.tensor(60.0, dtype=torch.float64)
    torch.testing.assert_close(
        log_mixture_nb(x, mu1, mu2, theta, None, big), log_nb_positive(x, mu1, theta)
    )
    torch.testing.assert_close(
        log_mixture_nb(x, mu1, mu2, theta, None, -big), log_nb_positive(x, mu2, theta)
    )


def test_float32_is_finite_for_positive_means():
    x, mu1, mu2, theta1, theta2, logits = _grid(torch.float32)
    keep = (mu1 > 0) & (mu2 > 0)
    lp = log_mixture_nb(x[keep], mu1[keep], mu2[keep], theta1[keep], theta2[keep], logits[keep])
    assert torch.isfinite(lp).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_are_finite_at_extremes(dtype):
    x, *params = (t.clone() for t in _grid(dtype))
    for t in params:
        t.requires_grad_()
    mu1, mu2, theta1, theta2, logits = params
    log_mixture_nb(x, *params).sum().backward()
    # d/dmu_k of log NB(x > 0 | mu_k = 0) is infinite: left out, for that mean only.
    assert torch.isfinite(mu1.grad[~((mu1 == 0) & (x > 0))]).all()
    assert torch.isfinite(mu2.grad[~((mu2 == 0) & (x > 0))]).all()
    defined = ~((mu1 == 0) & (mu2 == 0) & (x > 0))  # log p = -inf there
    for t in (theta1, theta2, logits):
        assert torch.isfinite(t.grad[defined]).all()


def test_gradient_matches_finite_differences():
    x = torch.tensor([0.0, 3.0, 40.0], dtype=torch.float64)
    params = [
        torch.tensor(v, dtype=torch.float64, requires_grad=True)
        for v in (
            [2.0, 0.7, 35.0],
            [20.0, 5.0, 3.0],
            [0.3, 5.0, 80.0],
            [1.0, 2.0, 9.0],
            [-1.0, 0.5, 2.0],
        )
    ]
    assert torch.autograd.gradcheck(lambda *p: log_mixture_nb(x, *p), tuple(params))


def test_moments_formulas_and_shapes():
    mu1 = torch.tensor([1.0, 4.0], dtype=torch.float64)
    mu2 = torch.tensor([30.0, 4.0], dtype=torch.float64)
    theta1 = torch.tensor([2.0, 5.0], dtype=torch.float64)
    theta2 = torch.tensor([10.0, 1.0], dtype=torch.float64)
    logits = torch.tensor([0.3, -1.0], dtype=torch.float64)
    d = NegativeBinomialMixture(mu1, mu2, theta1, logits, theta2)
    pi = torch.sigmoid(logits)
    torch.testing.assert_close(d.mixture_probs, pi)
    torch.testing.assert_close(d.mean, pi * mu1 + (1 - pi) * mu2)
    v1, v2 = mu1 + mu1**2 / theta1, mu2 + mu2**2 / theta2
    second = pi * (v1 + mu1**2) + (1 - pi) * (v2 + mu2**2)
    torch.testing.assert_close(d.variance, second - d.mean**2)
    assert d.batch_shape == (2,)
    shared = NegativeBinomialMixture(mu1, mu2, 2.0, 0.0)
    assert shared.theta2 is None and shared.theta1.shape == (2,)
    e = shared.expand((3, 2))
    assert isinstance(e, NegativeBinomialMixture) and e.batch_shape == (3, 2)
    assert e.sample((4,)).shape == (4, 3, 2)


def test_validation():
    with pytest.raises(ValueError):
        NegativeBinomialMixture(
            torch.tensor([-1.0]),
            torch.tensor([1.0]),
            torch.tensor([1.0]),
            torch.tensor([0.0]),
            validate_args=True,
        )
    with pytest.raises(ValueError):
        NegativeBinomialMixture(
            torch.tensor([1.0]),
            torch.tensor([1.0]),
            torch.tensor([1.0]),
            torch.tensor([0.0]),
            torch.tensor([0.0]),
            validate_args=True,
        )
    d = NegativeBinomialMixture(
        torch.tensor([1.0]),
        torch.tensor([1.0]),
        torch.tensor([1.0]),
        torch.tensor([0.0]),
        validate_args=True,
    )
    with pytest.raises(ValueError):
        d.log_prob(torch.tensor([0.5]))
    assert not d.has_rsample


@pytest.mark.parametrize(
    ("mu1", "mu2", "theta1", "theta2", "logits"),
    [(5.0, 60.0, 10.0, 2.0, 0.5), (0.3, 20.0, 1.0, None, -1.0), (100.0, 400.0, 1e6, 50.0, 0.0)],
)
def test_sample_moments(mu1, mu2, theta1, theta2, logits):
    torch.manual_seed(0)

    def t(v):
        return None if v is None else torch.tensor(v, dtype=torch.float64)

    d = NegativeBinomialMixture(t(mu1), t(mu2), t(theta1), t(logits), t(theta2))
    s = d.sample((200_000,))
    assert s.shape == (200_000,) and s.dtype == torch.float64
    assert torch.equal(s, s.round()) and (s >= 0).all()
    assert math.isclose(s.mean().item(), d.mean.item(), rel_tol=0.03)
    assert math.isclose(s.var().item(), d.variance.item(), rel_tol=0.03)
