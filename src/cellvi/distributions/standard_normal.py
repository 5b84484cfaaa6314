r"""The standard Normal prior :math:`\mathcal N(0, 1)`, with a closed-form KL from any Normal."""

from __future__ import annotations

import torch
from torch.distributions import Normal, register_kl

__all__ = ["StandardNormal"]


class StandardNormal(Normal):
    r""":math:`\mathcal N(0, 1)` elementwise, with the shape of ``like``.

    The same distribution as ``Normal(torch.zeros_like(like), torch.ones_like(like))``; its
    type tells :func:`torch.distributions.kl_divergence` to use

    .. math::

        \mathrm{KL}\big(\mathcal N(\mu, \sigma^2) \,\|\, \mathcal N(0, 1)\big)
        = \tfrac12 \left(\sigma^2 + \mu^2 - 1\right) - \log \sigma,

    a few operations instead of the general Normal-Normal formula.
    """

    def __init__(self, like: torch.Tensor, validate_args: bool | None = False):
        super().__init__(torch.zeros_like(like), torch.ones_like(like), validate_args=validate_args)


@register_kl(Normal, StandardNormal)
def _kl_normal_standard_normal(p: Normal, q: StandardNormal) -> torch.Tensor:
    return 0.5 * (p.scale.square() + p.loc.square() - 1) - p.scale.log()
