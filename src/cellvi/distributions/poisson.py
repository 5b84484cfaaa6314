"""Poisson distribution with a zero-rate-safe density."""

from __future__ import annotations

import torch
from torch.distributions import Poisson as _TorchPoisson
from torch.distributions import constraints

from cellvi.distributions._functional import log_poisson

__all__ = ["Poisson"]


class Poisson(_TorchPoisson):
    r"""Poisson distribution of counts.

    .. math::

        p(x \mid r) = \frac{r^x e^{-r}}{x!}, \qquad x \in \{0, 1, 2, \dots\}

    with :math:`0^0 = 1`, so a zero rate is a point mass at zero (:math:`\log p(0) = 0`, no
    NaN). Mean and variance are both :math:`r`.

    Parameters
    ----------
    rate
        Rate :math:`r \geq 0`.
    scale
        Optional normalised expression carried along; not used in the density.
    validate_args
        Whether to check the parameters and the values passed to :meth:`log_prob`.
    """

    arg_constraints = {"rate": constraints.nonnegative}
    support = constraints.nonnegative_integer
    has_rsample = False

    def __init__(
        self,
        rate: torch.Tensor | float,
        *,
        scale: torch.Tensor | None = None,
        validate_args: bool | None = None,
    ):
        self.scale = scale
        super().__init__(rate, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        """Return a view of this distribution with a larger batch shape."""
        new = self._get_checked_instance(Poisson, _instance)
        scale = self.scale
        if scale is not None and scale.shape == self.batch_shape:
            scale = scale.expand(torch.Size(batch_shape))
        new.scale = scale
        return super().expand(batch_shape, _instance=new)

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> torch.Tensor:
        """Draw counts (as floats) of shape ``sample_shape + batch_shape``."""
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            return torch.poisson(self.rate.expand(shape))

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """Elementwise log-probability of the counts ``value``."""
        if self._validate_args:
            self._validate_sample(value)
        return log_poisson(value, self.rate)
