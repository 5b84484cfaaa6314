"""Zero-inflated negative binomial distribution."""

from __future__ import annotations

import torch
from torch.distributions import constraints
from torch.distributions.utils import broadcast_all, lazy_property

from cellvi.distributions._functional import log_zinb_positive
from cellvi.distributions.negative_binomial import (
    NegativeBinomial,
    _resolve_nb_params,
    _sample_nb,
)

__all__ = ["ZeroInflatedNegativeBinomial"]


class ZeroInflatedNegativeBinomial(NegativeBinomial):
    r"""Zero-inflated negative binomial distribution of counts.

    A negative binomial (see :class:`NegativeBinomial`) mixed with a point mass at zero of
    weight :math:`\pi = \sigma(\lambda)`, :math:`\lambda` being the ``zi_logits``:

    .. math::

        p(x \mid \mu, \theta, \pi) =
            \pi\,\mathbb{1}[x = 0] + (1 - \pi)\,\mathrm{NB}(x \mid \mu, \theta),

    with :math:`\mathbb{E}[x] = (1 - \pi)\mu` and
    :math:`\mathrm{Var}[x] = (1 - \pi)(\mu + \mu^2/\theta) + \pi(1 - \pi)\mu^2`.

    Parameters
    ----------
    mu
        Mean :math:`\mu` of the negative binomial component.
    theta
        Inverse dispersion :math:`\theta`.
    zi_logits
        Logits :math:`\lambda` of the zero-inflation probability (required).
    total_count
        :math:`\theta`, to be given together with ``logits`` instead of ``(mu, theta)``.
    logits
        :math:`\log(\mu / \theta)`, to be given together with ``total_count``.
    scale
        Optional normalised expression carried along; not used in the density.
    validate_args
        Whether to check the parameters and the values passed to :meth:`log_prob`.
    """

    arg_constraints = {
        "mu": constraints.nonnegative,
        "theta": constraints.positive,
        "zi_logits": constraints.real,
    }
    support = constraints.nonnegative_integer
    has_rsample = False

    def __init__(
        self,
        mu: torch.Tensor | float | None = None,
        theta: torch.Tensor | float | None = None,
        zi_logits: torch.Tensor | float | None = None,
        *,
        total_count: torch.Tensor | float | None = None,
        logits: torch.Tensor | float | None = None,
        scale: torch.Tensor | None = None,
        validate_args: bool | None = None,
    ):
        if zi_logits is None:
            raise ValueError("The zero-inflated negative binomial needs `zi_logits`.")
        mu, theta, logits = _resolve_nb_params(mu, theta, total_count, logits)
        if logits is None:
            mu, theta, self.zi_logits = broadcast_all(mu, theta, zi_logits)
            super().__init__(mu, theta, scale=scale, validate_args=validate_args)
        else:
            theta, logits, self.zi_logits = broadcast_all(theta, logits, zi_logits)
            super().__init__(
                total_count=theta, logits=logits, scale=scale, validate_args=validate_args
            )

    def expand(self, batch_shape, _instance=None):
        """Return a view of this distribution with a larger batch shape."""
        new = self._get_checked_instance(ZeroInflatedNegativeBinomial, _instance)
        new.zi_logits = self.zi_logits.expand(torch.Size(batch_shape))
        return self._expand_into(new, batch_shape)

    @lazy_property
    def zi_probs(self) -> torch.Tensor:
        r"""Zero-inflation probability :math:`\pi = \sigma(\lambda)`."""
        return torch.sigmoid(self.zi_logits)

    @property
    def mean(self) -> torch.Tensor:
        r"""Mean :math:`(1 - \pi)\mu`."""
        return (1 - self.zi_probs) * self.mu

    @property
    def mode(self) -> torch.Tensor:
        """Mode: the negative binomial's mode, or zero where the extra zero mass dominates."""
        nb_mode = super().mode
        log_p_mode = log_zinb_positive(nb_mode, self.mu, self.theta, self.zi_logits)
        log_p_zero = log_zinb_positive(
            torch.zeros_like(nb_mode), self.mu, self.theta, self.zi_logits
        )
        return torch.where(log_p_mode > log_p_zero, nb_mode, torch.zeros_like(nb_mode))

    @property
    def variance(self) -> torch.Tensor:
        r"""Variance :math:`(1 - \pi)(\mu + \mu^2/\theta) + \pi(1 - \pi)\mu^2`."""
        pi = self.zi_probs
        mu = self.mu
        return (1 - pi) * (mu + mu**2 / self.theta) + pi * (1 - pi) * mu**2

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> torch.Tensor:
        """Draw counts (as floats) of shape ``sample_shape + batch_shape``."""
        with torch.no_grad():
            counts = _sample_nb(self.mu, self.theta, sample_shape)
            extra_zero = torch.bernoulli(self.zi_probs.expand(counts.shape))
            return counts * (1 - extra_zero)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """Elementwise log-probability of the counts ``value``."""
        if self._validate_args:
            self._validate_sample(value)
        return log_zinb_positive(value, self.mu, self.theta, self.zi_logits)
