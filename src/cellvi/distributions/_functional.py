"""Elementwise log-likelihoods of count distributions.

These plain functions are shared by the distribution classes and by the model losses. They
broadcast their arguments, never reduce, and are written to stay finite (or exactly ``-inf``
where the probability is exactly zero) over the whole range of parameters met in practice:
means from 0 to tens of thousands, inverse dispersions from ``1e-4`` to ``1e6`` and counts in
the tens of thousands.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["log_nb_positive", "log_zinb_positive", "log_poisson", "log_mixture_nb"]


def _x_log_y(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Return ``x * log(y)`` with ``0 * log(0) = 0`` and a finite gradient there.

    ``torch.xlogy`` has the right value but its gradient with respect to ``y`` is ``0 / 0`` at
    ``x = y = 0``. Substituting ``y = 1`` where ``x = 0`` keeps both value and gradient exact.
    """
    return x * torch.log(torch.where(x == 0, 1.0, y))


def _nb_log_terms(
    x: torch.Tensor,
    mu: torch.Tensor,
    theta: torch.Tensor,
    eps: float,
    lgamma_x1: torch.Tensor | None = None,
) -> torch.Tensor:
    """NB log-pmf; ``lgamma_x1 = lgamma(x + 1)`` may be passed in to share it between calls."""
    if lgamma_x1 is None:
        lgamma_x1 = torch.lgamma(x + 1)
    # theta * log(theta / (theta + mu)) written as -theta * log1p(mu / theta): exact when
    # mu << theta, which is the Poisson limit theta -> inf.
    log_nb_zero = -theta * torch.log1p(mu / theta)
    log_theta_mu = torch.log(torch.clamp(theta + mu, min=eps))
    return (
        torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - lgamma_x1
        + log_nb_zero
        + _x_log_y(x, mu)
        - x * log_theta_mu
    )


def log_nb_positive(
    x: torch.Tensor,
    mu: torch.Tensor,
    theta: torch.Tensor,
    eps: float = 1e-8,
) -> torch.Tensor:
    r"""Log-pmf of the negative binomial in its (mean, inverse dispersion) form.

    .. math::

        \log p(x \mid \mu, \theta) =
            \log\Gamma(x + \theta) - \log\Gamma(\theta) - \log\Gamma(x + 1)
            + \theta \log\frac{\theta}{\theta + \mu} + x \log\frac{\mu}{\theta + \mu}

    The term :math:`\theta \log(\theta / (\theta + \mu))` is evaluated as
    :math:`-\theta\,\mathrm{log1p}(\mu / \theta)`, which stays accurate in the Poisson limit
    :math:`\theta \to \infty`. With :math:`\mu = 0` the distribution is a point mass at zero:
    :math:`\log p(0) = 0` and :math:`\log p(x > 0) = -\infty` (never NaN).

    Parameters
    ----------
    x
        Counts (non-negative, integer valued; any float dtype).
    mu
        Mean, :math:`\mu \geq 0`.
    theta
        Inverse dispersion, :math:`\theta > 0`.
    eps
        Lower bound on :math:`\theta + \mu` inside the logarithm; it only matters when both
        vanish and does not bias ordinary values.

    Returns
    -------
    torch.Tensor
        Elementwise log-probabilities, broadcast shape of the inputs.
    """
    return _nb_log_terms(x, mu, theta, eps)


def log_zinb_positive(
    x: torch.Tensor,
    mu: torch.Tensor,
    theta: torch.Tensor,
    zi_logits: torch.Tensor,
    eps: float = 1e-8,
) -> torch.Tensor:
    r"""Log-pmf of the zero-inflated negative binomial.

    With :math:`\pi = \sigma(\lambda)` the probability of an extra zero (:math:`\lambda` the
    ``zi_logits``) and :math:`\mathrm{NB}` the density of :func:`log_nb_positive`,

    .. math::

        p(x) = \pi\,\mathbb{1}[x = 0] + (1 - \pi)\,\mathrm{NB}(x \mid \mu, \theta).

    In log space, using :math:`\log\sigma(\lambda) = \lambda - \mathrm{softplus}(\lambda)` and
    :math:`\log\sigma(-\lambda) = -\mathrm{softplus}(\lambda)`,

    .. math::

        \log p(0) = \mathrm{logaddexp}(\lambda, \log\mathrm{NB}(0)) - \mathrm{softplus}(\lambda),
        \qquad
        \log p(x > 0) = \log\mathrm{NB}(x) - \mathrm{softplus}(\lambda).

    Parameters
    ----------
    x
        Counts (non-negative, integer valued).
    mu
        Mean of the negative binomial component, :math:`\mu \geq 0`.
    theta
        Inverse dispersion, :math:`\theta > 0`.
    zi_logits
        Logits of the zero-inflation probability :math:`\pi`.
    eps
        See :func:`log_nb_positive`.

    Returns
    -------
    torch.Tensor
        Elementwise log-probabilities, broadcast shape of the inputs.
    """
    log_nb = _nb_log_terms(x, mu, theta, eps)
    log_zero = torch.logaddexp(zi_logits, log_nb)
    return torch.where(x == 0, log_zero, log_nb) - F.softplus(zi_logits)


def log_poisson(x: torch.Tensor, rate: torch.Tensor) -> torch.Tensor:
    r"""Log-pmf of the Poisson distribution.

    .. math::

        \log p(x \mid r) = x \log r - r - \log\Gamma(x + 1)

    with :math:`0 \log 0 = 0`, so that a zero rate gives :math:`\log p(0) = 0` and
    :math:`\log p(x > 0) = -\infty`.

    Parameters
    ----------
    x
        Counts (non-negative, integer valued).
    rate
        Rate :math:`r \geq 0`.

    Returns
    -------
    torch.Tensor
        Elementwise log-probabilities, broadcast shape of the inputs.
    """
    return _x_log_y(x, rate) - rate - torch.lgamma(x + 1)


def log_mixture_nb(
    x: torch.Tensor,
    mu1: torch.Tensor,
    mu2: torch.Tensor,
    theta1: torch.Tensor,
    theta2: torch.Tensor | None,
    mixture_logits: torch.Tensor,
    eps: float = 1e-8,
) -> torch.Tensor:
    r"""Log-pmf of a two-component negative binomial mixture.

    With :math:`\pi = \sigma(\lambda)` the weight of the first component (:math:`\lambda` the
    ``mixture_logits``),

    .. math::

        p(x) = \pi\,\mathrm{NB}(x \mid \mu_1, \theta_1)
            + (1 - \pi)\,\mathrm{NB}(x \mid \mu_2, \theta_2),

    evaluated as a log-sum-exp of :math:`\log\mathrm{NB}_1 - \mathrm{softplus}(-\lambda)` and
    :math:`\log\mathrm{NB}_2 - \mathrm{softplus}(\lambda)`. This is totalVI's protein
    background / foreground likelihood.

    Parameters
    ----------
    x
        Counts (non-negative, integer valued).
    mu1
        Mean of the first component.
    mu2
        Mean of the second component.
    theta1
        Inverse dispersion of the first component.
    theta2
        Inverse dispersion of the second component; ``None`` shares ``theta1``.
    mixture_logits
        Logits of the probability of the first component.
    eps
        See :func:`log_nb_positive`.

    Returns
    -------
    torch.Tensor
        Elementwise log-probabilities, broadcast shape of the inputs.
    """
    lgamma_x1 = torch.lgamma(x + 1)
    if theta2 is None:
        # Shared dispersion: the Gamma-function terms are common to both components.
        shared = torch.lgamma(x + theta1) - torch.lgamma(theta1) - lgamma_x1
        log_theta_mu1 = torch.log(torch.clamp(theta1 + mu1, min=eps))
        log_theta_mu2 = torch.log(torch.clamp(theta1 + mu2, min=eps))
        log_nb1 = shared - theta1 * torch.log1p(mu1 / theta1) + _x_log_y(x, mu1) - x * log_theta_mu1
        log_nb2 = shared - theta1 * torch.log1p(mu2 / theta1) + _x_log_y(x, mu2) - x * log_theta_mu2
    else:
        log_nb1 = _nb_log_terms(x, mu1, theta1, eps, lgamma_x1)
        log_nb2 = _nb_log_terms(x, mu2, theta2, eps, lgamma_x1)
    return torch.logaddexp(
        log_nb1 - F.softplus(-mixture_logits), log_nb2 - F.softplus(mixture_logits)
    )
