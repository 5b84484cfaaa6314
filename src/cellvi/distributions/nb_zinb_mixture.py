r"""AutoZI's likelihood: a mixture of a negative binomial and a zero-inflated one."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from cellvi.distributions.zero_inflated_negative_binomial import ZeroInflatedNegativeBinomial

__all__ = ["NBZINBMixture", "mixture_zi_logits"]


def mixture_zi_logits(zi_logits: torch.Tensor, nb_logits: torch.Tensor,
                      minimal_dropout: float = 0.0) -> torch.Tensor:
    r"""Zero-inflation logits of the ZINB that equals the NB/ZINB mixture.

    With the ZINB component's dropout :math:`\pi = m + (1 - m)\sigma(\lambda)` (``zi_logits``
    :math:`\lambda`, ``minimal_dropout`` :math:`m`) and the NB weight :math:`\delta =
    \sigma(t)` (``nb_logits``), the mixture's extra zero has probability
    :math:`\pi' = (1 - \delta)\pi`; returns :math:`\operatorname{logit}\pi' = \log\pi' -
    \log(1 - \pi')` from

    .. math::

        \log(1 - \pi) = \log(1 - m) + \log\sigma(-\lambda), \qquad
        \log\pi = \operatorname{logaddexp}\big(\log m,\ \log(1 - m) + \log\sigma(-\lambda)
            + \lambda\big), \\
        \log\pi' = \log\sigma(-t) + \log\pi, \qquad
        \log(1 - \pi') = \operatorname{logaddexp}\big(\log\sigma(t),\
            \log\sigma(-t) + \log(1 - \pi)\big),

    (:math:`\log\sigma(\lambda) = \log\sigma(-\lambda) + \lambda`: one log-sigmoid per
    entry; those of :math:`t` are taken before it is broadcast over cells). Every term stays
    exact when :math:`\delta` or :math:`\pi` is within rounding of 0 or 1. The gradients are
    written out (one autograd node instead of a dozen; two exponentials per entry):

    .. math::

        \frac{\partial \operatorname{logit}\pi'}{\partial\lambda}
            = \frac{(1 - m)\,\sigma(\lambda)\sigma(-\lambda)}{\pi\,(1 - \pi')}, \qquad
        \frac{\partial \operatorname{logit}\pi'}{\partial t} = -\frac{\delta}{1 - \pi'}.
    """
    return _MixtureLogits.apply(zi_logits, nb_logits, float(minimal_dropout))


def _mixture_logits_parts(lam, t, m):
    """Return ``logit pi'`` and ``log(1 - pi)``, ``log pi``, ``log(1 - pi')``, ``log delta``."""
    log_not = F.logsigmoid(-lam)  # log(1 - sigma(lambda))
    if m > 0:
        log_not = log_not + math.log1p(-m)  # log(1 - pi)
        log_pi = torch.logaddexp(log_not + lam, log_not.new_tensor(math.log(m)))
    else:
        log_pi = log_not + lam
    log_d, log_1md = F.logsigmoid(t), F.logsigmoid(-t)  # compact: (genes,) for one per gene
    log_not_mixed = torch.logaddexp(log_d, log_1md + log_not)  # log(1 - pi')
    return log_1md + log_pi - log_not_mixed, log_not, log_pi, log_not_mixed, log_d


class _MixtureLogits(torch.autograd.Function):
    """:func:`mixture_zi_logits` with its gradients written out."""

    @staticmethod
    def forward(ctx, lam, t, m):  # noqa: D102
        out, log_not, log_pi, log_not_mixed, log_d = _mixture_logits_parts(lam, t, m)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            ctx.save_for_backward(lam, log_not, log_pi, log_not_mixed, log_d)
            ctx.m, ctx.lam_shape, ctx.t_shape = m, lam.shape, t.shape
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # noqa: D102
        lam, log_not, log_pi, log_not_mixed, log_d = ctx.saved_tensors
        d_lam = d_t = None
        if ctx.needs_input_grad[0]:
            # log[(1 - m) s (1 - s)] = 2 log(1 - pi) - log(1 - m) + lambda
            expo = 2 * log_not - math.log1p(-ctx.m) + lam - log_pi - log_not_mixed
            d_lam = (grad * expo.exp_()).sum_to_size(ctx.lam_shape)
        if ctx.needs_input_grad[1]:
            d_t = (-grad * (log_d - log_not_mixed).exp_()).sum_to_size(ctx.t_shape)
        return d_lam, d_t, None


class NBZINBMixture(ZeroInflatedNegativeBinomial):
    r"""Mixture of a negative binomial and a zero-inflated negative binomial with the same NB.

    AutoZI's likelihood (Clivio et al., 2019): with :math:`\delta = \sigma(t)` the weight of
    the NB component (scvi-tools' convention: :math:`\delta` weighs the NB part, so a gene is
    zero-inflated when :math:`\delta` is small) and :math:`\pi = m + (1 - m)\sigma(\lambda)`
    the dropout of the ZINB component,

    .. math::

        p(x) = \delta\,\mathrm{NB}(x \mid \mu, \theta)
            + (1 - \delta)\big[\pi\,\mathbb 1[x = 0] + (1 - \pi)\,\mathrm{NB}(x \mid \mu,
            \theta)\big]
            = \pi'\,\mathbb 1[x = 0] + (1 - \pi')\,\mathrm{NB}(x \mid \mu, \theta),

    a ZINB whose extra zero has probability :math:`\pi' = (1 - \delta)\pi`
    (:func:`mixture_zi_logits`). It is therefore a
    :class:`~cellvi.distributions.ZeroInflatedNegativeBinomial` (``zi_logits`` holds
    :math:`\operatorname{logit}\pi'`), and the per-cell sums of
    :func:`~cellvi.distributions.log_prob_rows` evaluate the Gamma-function terms on the
    non-zero counts only: one NB evaluation instead of the two (NB and ZINB, then their
    log-sum-exp) of the mixture written out.

    Parameters
    ----------
    mu
        Mean of the negative binomial.
    theta
        Inverse dispersion.
    zinb_logits
        Logits :math:`\lambda` of the ZINB component's dropout.
    nb_logits
        Logits :math:`t` of the NB component's weight :math:`\delta`.
    minimal_dropout
        :math:`m`: the ZINB component's dropout is :math:`\pi = m + (1 - m)\sigma(\lambda)`
        (AutoZI's lower bound, which keeps the ZINB component apart from the NB one).
    scale
        Optional normalised expression carried along; not used in the density.
    validate_args
        Whether to check the parameters and the values passed to :meth:`log_prob`.
    """

    def __init__(
        self,
        mu: torch.Tensor | float,
        theta: torch.Tensor | float,
        zinb_logits: torch.Tensor | float,
        nb_logits: torch.Tensor | float,
        *,
        minimal_dropout: float = 0.0,
        scale: torch.Tensor | None = None,
        validate_args: bool | None = None,
    ):
        if not 0 <= minimal_dropout < 1:
            raise ValueError(f"minimal_dropout must be in [0, 1), got {minimal_dropout}.")
        zinb_logits, nb_logits = (torch.as_tensor(v, dtype=torch.get_default_dtype())
                                  if not isinstance(v, torch.Tensor) else v
                                  for v in (zinb_logits, nb_logits))
        zi = mixture_zi_logits(zinb_logits, nb_logits, minimal_dropout)  # before broadcasting
        super().__init__(mu=mu, theta=theta, zi_logits=zi, scale=scale,
                         validate_args=validate_args)
        shape = self.batch_shape
        self.zinb_logits, self.nb_logits = zinb_logits.expand(shape), nb_logits.expand(shape)
        self.minimal_dropout = float(minimal_dropout)

    def expand(self, batch_shape, _instance=None):
        """Return a view of this distribution with a larger batch shape."""
        new = self._get_checked_instance(NBZINBMixture, _instance)
        batch_shape = torch.Size(batch_shape)
        new.zinb_logits = self.zinb_logits.expand(batch_shape)
        new.nb_logits = self.nb_logits.expand(batch_shape)
        new.minimal_dropout = self.minimal_dropout
        return super().expand(batch_shape, _instance=new)

    @property
    def zinb_probs(self) -> torch.Tensor:
        r"""Dropout :math:`\pi = m + (1 - m)\sigma(\lambda)` of the ZINB component."""
        m = self.minimal_dropout
        return m + (1 - m) * torch.sigmoid(self.zinb_logits)

    @property
    def nb_weight(self) -> torch.Tensor:
        r"""Weight :math:`\delta = \sigma(t)` of the NB component."""
        return torch.sigmoid(self.nb_logits)
