"""Negative binomial distribution in its (mean, inverse dispersion) form."""

from __future__ import annotations

import torch
from torch.distributions import Distribution, Gamma, constraints
from torch.distributions.utils import broadcast_all, lazy_property

from cellvi.distributions._functional import log_nb_positive

__all__ = ["NegativeBinomial"]


def _resolve_nb_params(
    mu: torch.Tensor | float | None,
    theta: torch.Tensor | float | None,
    total_count: torch.Tensor | float | None,
    logits: torch.Tensor | float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Return ``(mu, theta, logits)`` from exactly one of the two parameterisations.

    ``logits`` is returned (broadcast) only when it was given, so that it can be kept exactly.
    """
    has_mean = mu is not None or theta is not None
    has_torch = total_count is not None or logits is not None
    if has_mean and has_torch:
        raise ValueError(
            "Give either (mu, theta) or (total_count, logits) to the negative binomial, not both."
        )
    if has_mean:
        if mu is None or theta is None:
            raise ValueError("The negative binomial needs both `mu` and `theta`.")
        mu, theta = broadcast_all(mu, theta)
        return mu, theta, None
    if has_torch:
        if total_count is None or logits is None:
            raise ValueError("The negative binomial needs both `total_count` and `logits`.")
        total_count, logits = broadcast_all(total_count, logits)
        return total_count * torch.exp(logits), total_count, logits
    raise ValueError("The negative binomial needs either (mu, theta) or (total_count, logits).")


def _sample_nb(
    mu: torch.Tensor, theta: torch.Tensor, sample_shape: torch.Size | tuple[int, ...] = ()
) -> torch.Tensor:
    """Draw NB counts as a Gamma-Poisson mixture, ``Poisson(Gamma(theta, theta / mu))``.

    The Gamma draw is a standard Gamma scaled by ``mu / theta``, so ``mu = 0`` gives exactly
    zero counts and a huge ``theta`` gives a Gamma draw concentrated at ``mu`` (Poisson limit).
    """
    mu, theta = broadcast_all(mu, theta)
    with torch.no_grad():
        gamma = Gamma(theta, torch.ones_like(theta), validate_args=False).sample(sample_shape)
        return torch.poisson(gamma * (mu / theta))


class NegativeBinomial(Distribution):
    r"""Negative binomial distribution of counts.

    Parameterised by the mean :math:`\mu \geq 0` and the inverse dispersion
    :math:`\theta > 0`:

    .. math::

        p(x \mid \mu, \theta) =
            \frac{\Gamma(x + \theta)}{\Gamma(\theta)\, x!}
            \left(\frac{\theta}{\theta + \mu}\right)^{\theta}
            \left(\frac{\mu}{\theta + \mu}\right)^{x},
        \qquad x \in \{0, 1, 2, \dots\}

    with :math:`\mathbb{E}[x] = \mu` and :math:`\mathrm{Var}[x] = \mu + \mu^2 / \theta`.
    It is the Gamma-Poisson mixture
    :math:`x \sim \mathrm{Poisson}(\lambda),\ \lambda \sim \mathrm{Gamma}(\theta, \theta/\mu)`.

    Alternatively, in the convention of :class:`torch.distributions.NegativeBinomial`, with
    ``total_count`` :math:`= \theta` and ``logits`` :math:`= \log(\mu / \theta)`.

    Parameters
    ----------
    mu
        Mean :math:`\mu`.
    theta
        Inverse dispersion :math:`\theta`.
    total_count
        :math:`\theta`, to be given together with ``logits`` instead of ``(mu, theta)``.
    logits
        :math:`\log(\mu / \theta)`, to be given together with ``total_count``.
    scale
        Optional normalised expression (e.g. a decoder's softmax output) carried along for
        downstream use; it plays no part in the density.
    validate_args
        Whether to check the parameters and the values passed to :meth:`log_prob`.
    """

    arg_constraints = {
        "mu": constraints.nonnegative,
        "theta": constraints.positive,
    }
    support = constraints.nonnegative_integer
    has_rsample = False

    def __init__(
        self,
        mu: torch.Tensor | float | None = None,
        theta: torch.Tensor | float | None = None,
        *,
        total_count: torch.Tensor | float | None = None,
        logits: torch.Tensor | float | None = None,
        scale: torch.Tensor | None = None,
        validate_args: bool | None = None,
    ):
        mu, theta, logits = _resolve_nb_params(mu, theta, total_count, logits)
        self.mu = mu
        self.theta = theta
        if logits is not None:
            self.logits = logits
        self.scale = scale
        super().__init__(batch_shape=mu.shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        """Return a view of this distribution with a larger batch shape."""
        new = self._get_checked_instance(NegativeBinomial, _instance)
        return self._expand_into(new, batch_shape)

    def _expand_into(self, new: NegativeBinomial, batch_shape) -> NegativeBinomial:
        """Copy the expanded NB parameters into ``new`` and initialise it."""
        batch_shape = torch.Size(batch_shape)
        new.mu = self.mu.expand(batch_shape)
        new.theta = self.theta.expand(batch_shape)
        if "logits" in self.__dict__:
            new.logits = self.logits.expand(batch_shape)
        scale = self.scale
        if scale is not None and scale.shape == self.batch_shape:
            scale = scale.expand(batch_shape)
        new.scale = scale
        Distribution.__init__(new, batch_shape=batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def total_count(self) -> torch.Tensor:
        r"""Number of failures :math:`\theta` (torch's convention)."""
        return self.theta

    @lazy_property
    def logits(self) -> torch.Tensor:
        r"""Log-odds :math:`\log(\mu / \theta)` (torch's convention)."""
        return torch.log(self.mu) - torch.log(self.theta)

    @property
    def mean(self) -> torch.Tensor:
        r"""Mean :math:`\mu`."""
        return self.mu

    @property
    def mode(self) -> torch.Tensor:
        r"""Mode :math:`\lfloor \mu (\theta - 1) / \theta \rfloor`, floored at zero."""
        return torch.clamp(torch.floor(self.mu * (self.theta - 1) / self.theta), min=0)

    @property
    def variance(self) -> torch.Tensor:
        r"""Variance :math:`\mu + \mu^2 / \theta`."""
        return self.mu + self.mu**2 / self.theta

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> torch.Tensor:
        """Draw counts (as floats) of shape ``sample_shape + batch_shape``."""
        return _sample_nb(self.mu, self.theta, sample_shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """Elementwise log-probability of the counts ``value``."""
        if self._validate_args:
            self._validate_sample(value)
        return log_nb_positive(value, self.mu, self.theta)
