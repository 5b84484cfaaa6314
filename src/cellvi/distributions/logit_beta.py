r"""The Beta distribution carried on the logit scale, for weights that sit at 0 or 1.

AutoZI's mixture weights :math:`\delta \sim \mathrm{Beta}(\alpha, \beta)` have
:math:`\alpha, \beta < 1`: their mass piles up against 0 and 1. In float32 a Gamma draw with
shape :math:`\alpha = 0.05` underflows to exactly 0 about a third of the time
(:math:`P(X < 10^{-38}) \approx 10^{-38\alpha} / \Gamma(1 + \alpha)`), and
:math:`\delta = X / (X + Y)` then rounds to 0, 1 or, when both vanish, ``0/0``. This class draws
and scores :math:`t = \operatorname{logit}\delta = \log X - \log Y` instead, with
:math:`\log X` from the shape-boosted identity

.. math::

    X = G\, U^{1/\alpha}, \quad G \sim \mathrm{Gamma}(\alpha + 1, 1),\ U \sim \mathcal U(0, 1)
    \quad\Rightarrow\quad \log X = \log G + \frac{\log U}{\alpha},

which stays finite for any :math:`\alpha > 0` and is reparameterised (the Gamma draw by
torch's implicit gradient, :math:`\log U / \alpha` directly). :math:`\log\delta =
\log\sigma(t)` and :math:`\log(1 - \delta) = \log\sigma(-t)` are then exact to the last bit.
"""

from __future__ import annotations

import torch
from torch.distributions import Distribution, constraints, register_kl
from torch.distributions.utils import broadcast_all

__all__ = ["LogitBeta", "kl_beta"]


class LogitBeta(Distribution):
    r"""The logit :math:`t = \log\frac{\delta}{1 - \delta}` of a Beta variable :math:`\delta`.

    Its density on the real line (the Beta density times the Jacobian
    :math:`d\delta/dt = \sigma(t)\sigma(-t)`) is

    .. math::

        \log p(t) = \alpha \log\sigma(t) + \beta \log\sigma(-t) - \log B(\alpha, \beta),

    and, the logit being a bijection, a KL divergence between two of them is the one between
    the Beta distributions (:func:`kl_beta`).

    Parameters
    ----------
    concentration1
        :math:`\alpha > 0`, the Beta's first shape (the weight of values near 1).
    concentration0
        :math:`\beta > 0`, the second shape (near 0).
    validate_args
        Whether to check the parameters.
    """

    arg_constraints = {
        "concentration1": constraints.positive,
        "concentration0": constraints.positive,
    }
    support = constraints.real
    has_rsample = True

    def __init__(self, concentration1: torch.Tensor | float, concentration0: torch.Tensor | float,
                 validate_args: bool | None = None):
        self.concentration1, self.concentration0 = broadcast_all(concentration1, concentration0)
        super().__init__(batch_shape=self.concentration1.shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        """Return a view of this distribution with a larger batch shape."""
        new = self._get_checked_instance(LogitBeta, _instance)
        batch_shape = torch.Size(batch_shape)
        new.concentration1 = self.concentration1.expand(batch_shape)
        new.concentration0 = self.concentration0.expand(batch_shape)
        Distribution.__init__(new, batch_shape=batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def mean_weight(self) -> torch.Tensor:
        r"""Posterior mean of the weight, :math:`\mathbb E[\delta] = \alpha / (\alpha + \beta)`."""
        return self.concentration1 / (self.concentration1 + self.concentration0)

    def _log_gamma_sample(self, shape: torch.Size, conc: torch.Tensor) -> torch.Tensor:
        """``log`` of a reparameterised Gamma(conc, 1) draw, finite for any ``conc > 0``."""
        conc = conc.expand(shape)
        g = torch._standard_gamma(conc + 1)  # differentiable in conc (implicit gradient)
        log_u = -torch.empty_like(g).exponential_()  # log U, U ~ Uniform(0, 1)
        tiny = torch.finfo(g.dtype).tiny  # never reached for shapes >= 1, but never log(0)
        return torch.log(g.clamp_min(tiny)) + log_u / conc

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> torch.Tensor:
        r"""Draw :math:`t = \log X - \log Y`, reparameterised, shape ``sample_shape + batch``."""
        shape = self._extended_shape(sample_shape)
        log_x = self._log_gamma_sample(shape, self.concentration1)
        log_y = self._log_gamma_sample(shape, self.concentration0)
        return log_x - log_y

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """Log density of the logit ``value`` (on the real line, Jacobian included)."""
        if self._validate_args:
            self._validate_sample(value)
        a, b = self.concentration1, self.concentration0
        log_beta_fn = torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b)
        return (a * torch.nn.functional.logsigmoid(value)
                + b * torch.nn.functional.logsigmoid(-value) - log_beta_fn)

    def weight_log_prob(self, value: torch.Tensor) -> torch.Tensor:
        r"""Log Beta density of :math:`\delta = \sigma(t)` for the logit ``value`` (no Jacobian).

        :math:`(\alpha - 1)\log\sigma(t) + (\beta - 1)\log\sigma(-t) - \log B(\alpha, \beta)`:
        the density that ``torch.distributions.Beta(alpha, beta).log_prob(sigmoid(t))`` gives,
        without the rounding of :math:`\delta` to 0 or 1.
        """
        return (self.log_prob(value) - torch.nn.functional.logsigmoid(value)
                - torch.nn.functional.logsigmoid(-value))


def kl_beta(a1: torch.Tensor, b1: torch.Tensor, a2: torch.Tensor,
            b2: torch.Tensor) -> torch.Tensor:
    r"""Return :math:`\mathrm{KL}(\mathrm{Beta}(a_1, b_1) \,\|\, \mathrm{Beta}(a_2, b_2))`.

    .. math::

        \log\frac{B(a_2, b_2)}{B(a_1, b_1)} + (a_1 - a_2)\psi(a_1) + (b_1 - b_2)\psi(b_1)
        + (a_2 - a_1 + b_2 - b_1)\psi(a_1 + b_1),

    elementwise, with :math:`\psi` the digamma function.
    """
    s1 = a1 + b1
    log_b1 = torch.lgamma(a1) + torch.lgamma(b1) - torch.lgamma(s1)
    log_b2 = torch.lgamma(a2) + torch.lgamma(b2) - torch.lgamma(a2 + b2)
    return (log_b2 - log_b1 + (a1 - a2) * torch.digamma(a1) + (b1 - b2) * torch.digamma(b1)
            + (a2 - a1 + b2 - b1) * torch.digamma(s1))


@register_kl(LogitBeta, LogitBeta)
def _kl_logit_beta(p: LogitBeta, q: LogitBeta) -> torch.Tensor:
    return kl_beta(p.concentration1, p.concentration0, q.concentration1, q.concentration0)
