"""AutoZI's NB/ZINB mixture against the mixture written out with scipy."""

import itertools

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import log_expit

from cellvi.distributions import (
    NBZINBMixture,
    ZeroInflatedNegativeBinomial,
    log_prob_rows,
    mixture_zi_logits,
)

XS = [0.0, 1.0, 5.0, 100.0, 10000.0]
MUS = [1e-3, 1.0, 50.0, 2e4]
THETAS = [1e-3, 1.0, 100.0, 1e5]
ZI = [-8.0, -1.0, 0.0, 3.0]
NB = [-30.0, -3.0, 0.0, 2.0, 30.0]


def _grid():
    rows = np.array(list(itertools.product(XS, MUS, THETAS, ZI, NB)))
    return tuple(torch.tensor(rows[:, i], dtype=torch.float64) for i in range(5))


def _scipy_mixture(x, mu, theta, zi, nb):
    """log(delta NB(x) + (1 - delta) [pi 1[x = 0] + (1 - pi) NB(x)]), term by term."""
    x, mu, theta, zi, nb = (np.asarray(a, dtype=np.float64) for a in (x, mu, theta, zi, nb))
    # log(delta), log(1 - delta), log(pi), log(1 - pi) without rounding delta or pi to 0 or 1
    log_d, log_1md, log_pi, log_1mpi = log_expit(nb), log_expit(-nb), log_expit(zi), log_expit(-zi)
    log_nb = stats.nbinom.logpmf(x, n=theta, p=theta / (theta + mu))
    log_zinb = np.logaddexp(np.where(x == 0, log_pi, -np.inf), log_1mpi + log_nb)
    return np.logaddexp(log_d + log_nb, log_1md + log_zinb)


def test_log_prob_matches_the_written_out_mixture():
    x, mu, theta, zi, nb = _grid()
    d = NBZINBMixture(mu, theta, zi, nb, validate_args=True)
    ours = d.log_prob(x).numpy()
    ref = _scipy_mixture(x, mu, theta, zi, nb)
    assert np.isfinite(ours).all()
    finite = np.isfinite(ref)
    np.testing.assert_allclose(ours[finite], ref[finite], rtol=1e-8, atol=1e-8)


def test_effective_dropout_is_one_minus_delta_times_pi():
    zi = torch.tensor([-40.0, -3.0, 0.0, 4.0, 40.0], dtype=torch.float64)[:, None]
    nb = torch.tensor([-40.0, -2.0, 0.0, 1.5, 40.0], dtype=torch.float64)[None, :]
    pi_eff = torch.sigmoid(mixture_zi_logits(zi, nb))
    ref = torch.sigmoid(-nb) * torch.sigmoid(zi)  # (1 - delta) pi, 1 - delta without rounding
    torch.testing.assert_close(pi_eff, ref, rtol=1e-12, atol=0.0)
    # the limits: all NB is the NB, all ZINB is the ZINB
    x = torch.arange(6, dtype=torch.float64)
    mu, theta = torch.tensor(2.0, dtype=torch.float64), torch.tensor(1.5, dtype=torch.float64)
    lam = torch.tensor(0.7, dtype=torch.float64)
    big = torch.tensor(60.0, dtype=torch.float64)
    torch.testing.assert_close(NBZINBMixture(mu, theta, lam, big).log_prob(x),
                               ZeroInflatedNegativeBinomial(mu, theta, -big).log_prob(x))
    torch.testing.assert_close(NBZINBMixture(mu, theta, lam, -big).log_prob(x),
                               ZeroInflatedNegativeBinomial(mu, theta, lam).log_prob(x))


def test_row_sums_and_gradients_agree_with_the_elementwise_mixture():
    torch.manual_seed(0)
    x = torch.poisson(torch.rand(6, 9) * 3)
    x[:, 0] = 0
    mu = (torch.rand(6, 9) * 4 + 0.1).requires_grad_()
    theta = (torch.rand(9) + 0.5).requires_grad_()
    zi = torch.randn(6, 9).requires_grad_()
    nb = torch.randn(9).requires_grad_()  # one weight per gene, shared by the cells
    rows = log_prob_rows(NBZINBMixture(mu, theta, zi, nb), x.to_sparse_csr())
    direct = NBZINBMixture(mu, theta, zi, nb).log_prob(x).sum(-1)
    torch.testing.assert_close(rows, direct, rtol=1e-5, atol=1e-4)
    g_rows = torch.autograd.grad(rows.sum(), (mu, theta, zi, nb))
    g_direct = torch.autograd.grad(direct.sum(), (mu, theta, zi, nb))
    for a, b in zip(g_rows, g_direct):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_samples_have_the_mixture_zero_fraction_and_expand():
    torch.manual_seed(3)
    mu, theta = torch.tensor(5.0), torch.tensor(2.0)
    zi, nb = torch.tensor(0.5), torch.tensor(-0.3)
    d = NBZINBMixture(mu, theta, zi, nb)
    zeros = float((d.sample((40000,)) == 0).float().mean())
    assert zeros == pytest.approx(float(d.log_prob(torch.tensor(0.0)).exp()), abs=0.01)
    e = d.expand((3, 2))
    assert e.sample().shape == (3, 2) and e.nb_weight.shape == (3, 2)
    assert e.log_prob(torch.zeros(3, 2)).shape == (3, 2)


@pytest.mark.parametrize("m", [0.0, 0.01, 0.3])
def test_minimal_dropout_and_the_written_out_gradients(m):
    torch.manual_seed(1)
    lam = (torch.randn(7, 5, dtype=torch.float64) * 6).requires_grad_()
    lam.data[0, :] = torch.tensor([-120.0, -40.0, 0.0, 40.0, 120.0], dtype=torch.float64)
    t = (torch.randn(5, dtype=torch.float64) * 5).requires_grad_()
    t.data[:2] = torch.tensor([-60.0, 60.0], dtype=torch.float64)
    out = mixture_zi_logits(lam, t, m)
    pi = m + (1 - m) * torch.sigmoid(lam)
    # (1 - delta) pi, and 1 - (1 - delta) pi = delta + (1 - delta)(1 - pi), without cancellation
    log_pi_eff = torch.log(torch.sigmoid(-t) * pi)
    log_not = torch.log(torch.sigmoid(t) + torch.sigmoid(-t) * (1 - m) * torch.sigmoid(-lam))
    finite = torch.isfinite(log_pi_eff)
    torch.testing.assert_close(out[finite], (log_pi_eff - log_not)[finite], rtol=1e-10,
                               atol=1e-10)
    assert torch.isfinite(out).all()
    assert torch.autograd.gradcheck(lambda a, b: mixture_zi_logits(a, b, m), (lam, t))
    # the distribution applies the same floor
    d = NBZINBMixture(torch.full((7, 5), 3.0, dtype=torch.float64), torch.tensor(2.0),
                      lam.detach(), t.detach(), minimal_dropout=m)
    torch.testing.assert_close(d.zinb_probs, pi.detach())
    torch.testing.assert_close(d.zi_logits, out.detach())
