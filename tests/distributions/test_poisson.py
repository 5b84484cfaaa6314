import itertools
import math

import numpy as np
import pytest
import torch
from scipy import stats

from cellvi.distributions import Poisson, log_poisson

XS = [0.0, 1.0, 5.0, 100.0, 10000.0, 50000.0]
RATES = [0.0, 1e-3, 1.0, 50.0, 2e4]


def _grid(dtype=torch.float64):
    rows = np.array(list(itertools.product(XS, RATES)))
    return tuple(torch.tensor(rows[:, i], dtype=dtype) for i in range(2))


@pytest.mark.parametrize("use_class", [False, True])
def test_log_prob_matches_scipy(use_class):
    x, rate = _grid()
    if use_class:
        ours = Poisson(rate, validate_args=True).log_prob(x).numpy()
    else:
        ours = log_poisson(x, rate).numpy()
    ref = stats.poisson.logpmf(x.numpy(), rate.numpy())
    assert not np.isnan(ours).any()
    finite = np.isfinite(ref)
    np.testing.assert_allclose(ours[finite], ref[finite], rtol=1e-10, atol=1e-8)
    assert (~finite == ((rate.numpy() == 0) & (x.numpy() > 0))).all()
    assert (ours[~finite] == -np.inf).all()


def test_zero_rate_is_point_mass_at_zero():
    d = Poisson(torch.zeros(3), validate_args=True)
    assert torch.equal(d.log_prob(torch.zeros(3)), torch.zeros(3))
    assert torch.equal(d.sample((10,)), torch.zeros(10, 3))


def test_float32_is_finite_for_positive_rate():
    x, rate = _grid(torch.float32)
    keep = rate > 0
    assert torch.isfinite(log_poisson(x[keep], rate[keep])).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_are_finite(dtype):
    x, rate = _grid(dtype)
    rate = rate.clone().requires_grad_()
    log_poisson(x, rate).sum().backward()
    defined = ~((rate == 0) & (x > 0))
    assert torch.isfinite(rate.grad[defined]).all()
    at_zero = (rate == 0) & (x == 0)
    torch.testing.assert_close(rate.grad[at_zero], -torch.ones_like(rate.grad[at_zero]))


def test_is_a_torch_poisson_with_scale_and_expand():
    scale = torch.softmax(torch.randn(2, 5), -1)
    d = Poisson(torch.full((2, 5), 3.0), scale=scale)
    assert isinstance(d, torch.distributions.Poisson)
    assert d.scale is scale
    assert not d.has_rsample
    e = d.expand((4, 2, 5))
    assert isinstance(e, Poisson) and e.batch_shape == (4, 2, 5)
    assert e.scale.shape == (4, 2, 5)
    torch.testing.assert_close(e.mean, torch.full((4, 2, 5), 3.0))


def test_validation():
    with pytest.raises(ValueError):
        Poisson(torch.tensor([-1.0]), validate_args=True)
    d = Poisson(torch.tensor([1.0]), validate_args=True)
    for bad in (0.5, -1.0):
        with pytest.raises(ValueError):
            d.log_prob(torch.tensor([bad]))


@pytest.mark.parametrize("rate", [0.3, 7.0, 500.0])
def test_sample_moments(rate):
    torch.manual_seed(0)
    d = Poisson(torch.tensor(rate, dtype=torch.float64))
    s = d.sample((200_000,))
    assert s.shape == (200_000,) and s.dtype == torch.float64
    assert math.isclose(s.mean().item(), d.mean.item(), rel_tol=0.03)
    assert math.isclose(s.var().item(), d.variance.item(), rel_tol=0.03)
