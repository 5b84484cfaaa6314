"""Two-component negative binomial mixture (totalVI's protein likelihood)."""

from __future__ import annotations

import torch
from torch.distributions import Distribution, constraints
from torch.distributions.utils import broadcast_all, lazy_property

from cellvi.distributions._functional import log_mixture_nb
from cellvi.distributions.negative_binomial import _sample_nb

__all__ = ["NegativeBinomialMixture"]


class NegativeBinomialMixture(Distribution):
    r"""Mixture of two negative binomials.

    With :math:`\pi = \sigma(\lambda)` the weight of the first component (:math:`\lambda` the
    ``mixture_logits``) and :math:`\mathrm{NB}` as in :class:`NegativeBinomial`,

    .. math::

        p(x) = \pi\,\mathrm{NB}(x \mid \mu_1, \theta_1)
            + (1 - \pi)\,\mathrm{NB}(x \mid \mu_2, \theta_2).

    In totalVI the first component is the protein background and the second the foreground.
    By the law of total variance, with :math:`v_k = \mu_k + \mu_k^2 / \theta_k`,

    .. math::

        \mathbb{E}[x] = \pi\mu_1 + (1 - \pi)\mu_2, \qquad
        \mathrm{Var}[x] = \pi v_1 + (1 - \pi) v_2 + \pi(1 - \pi)(\mu_1 - \mu_2)^2.

    Parameters
    ----------
    mu1
        Mean of the first component.
    mu2
        Mean of the second component.
    theta1
        Inverse dispersion of the first component.
    mixture_logits
        Logits of the probability of the first component.
    theta2
        Inverse dispersion of the second component; ``None`` (default) shares ``theta1``.
    validate_args
        Whether to check the parameters and the values passed to :meth:`log_prob`.
    """

    support = constraints.nonnegative_integer
    has_rsample = False

    def __init__(
        self,
        mu1: torch.Tensor | float,
        mu2: torch.Tensor | float,
        theta1: torch.Tensor | float,
        mixture_logits: torch.Tensor | float,
        theta2: torch.Tensor | float | None = None,
        *,
        validate_args: bool | None = None,
    ):
        if theta2 is None:
            self.mu1, self.mu2, self.theta1, self.mixture_logits = broadcast_all(
                mu1, mu2, theta1, mixture_logits
            )
            self.theta2 = None
        else:
            self.mu1, self.mu2, self.theta1, self.mixture_logits, self.theta2 = broadcast_all(
                mu1, mu2, theta1, mixture_logits, theta2
            )
        super().__init__(batch_shape=self.mu1.shape, validate_args=validate_args)

    @property
    def arg_constraints(self) -> dict[str, constraints.Constraint]:
        """Constraints on the parameters (``theta2`` only when it is not shared)."""
        arg_constraints = {
            "mu1": constraints.nonnegative,
            "mu2": constraints.nonnegative,
            "theta1": constraints.positive,
            "mixture_logits": constraints.real,
        }
        if self.theta2 is not None:
            arg_constraints["theta2"] = constraints.positive
        return arg_constraints

    def expand(self, batch_shape, _instance=None):
        """Return a view of this distribution with a larger batch shape."""
        new = self._get_checked_instance(NegativeBinomialMixture, _instance)
        batch_shape = torch.Size(batch_shape)
        new.mu1 = self.mu1.expand(batch_shape)
        new.mu2 = self.mu2.expand(batch_shape)
        new.theta1 = self.theta1.expand(batch_shape)
        new.mixture_logits = self.mixture_logits.expand(batch_shape)
        new.theta2 = None if self.theta2 is None else self.theta2.expand(batch_shape)
        Distribution.__init__(new, batch_shape=batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def _theta2(self) -> torch.Tensor:
        """Inverse dispersion of the second component, resolved when shared."""
        return self.theta1 if self.theta2 is None else self.theta2

    @lazy_property
    def mixture_probs(self) -> torch.Tensor:
        r"""Probability :math:`\pi = \sigma(\lambda)` of the first component."""
        return torch.sigmoid(self.mixture_logits)

    @property
    def mean(self) -> torch.Tensor:
        r"""Mean :math:`\pi\mu_1 + (1 - \pi)\mu_2`."""
        pi = self.mixture_probs
        return pi * self.mu1 + (1 - pi) * self.mu2

    @property
    def variance(self) -> torch.Tensor:
        r"""Variance :math:`\pi v_1 + (1 - \pi) v_2 + \pi(1 - \pi)(\mu_1 - \mu_2)^2`."""
        pi = self.mixture_probs
        var1 = self.mu1 + self.mu1**2 / self.theta1
        var2 = self.mu2 + self.mu2**2 / self._theta2
        return pi * var1 + (1 - pi) * var2 + pi * (1 - pi) * (self.mu1 - self.mu2) ** 2

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> torch.Tensor:
        """Draw counts (as floats) of shape ``sample_shape + batch_shape``."""
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            first = torch.bernoulli(self.mixture_probs.expand(shape)).bool()
            mu = torch.where(first, self.mu1, self.mu2)
            theta = torch.where(first, self.theta1, self._theta2)
            return _sample_nb(mu, theta)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """Elementwise log-probability of the counts ``value``."""
        if self._validate_args:
            self._validate_sample(value)
        return log_mixture_nb(
            value, self.mu1, self.mu2, self.theta1, self.theta2, self.mixture_logits
        )
