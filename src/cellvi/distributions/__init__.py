"""Count distributions of the scVI family, as :mod:`torch.distributions` subclasses."""

from cellvi.distributions._functional import (
    log_mixture_nb,
    log_nb_positive,
    log_poisson,
    log_zinb_positive,
)
from cellvi.distributions._rowsum import (
    log_prob_rows,
    nb_log_prob_rows,
    nb_log_prob_rows_softmax,
)
from cellvi.distributions.logit_beta import LogitBeta, kl_beta
from cellvi.distributions.nb_zinb_mixture import NBZINBMixture, mixture_zi_logits
from cellvi.distributions.negative_binomial import NegativeBinomial
from cellvi.distributions.negative_binomial_mixture import NegativeBinomialMixture
from cellvi.distributions.poisson import Poisson
from cellvi.distributions.standard_normal import StandardNormal
from cellvi.distributions.zero_inflated_negative_binomial import ZeroInflatedNegativeBinomial

__all__ = [
    "LogitBeta",
    "NBZINBMixture",
    "kl_beta",
    "mixture_zi_logits",
    "NegativeBinomial",
    "NegativeBinomialMixture",
    "Poisson",
    "StandardNormal",
    "ZeroInflatedNegativeBinomial",
    "log_mixture_nb",
    "log_nb_positive",
    "log_poisson",
    "log_prob_rows",
    "nb_log_prob_rows",
    "nb_log_prob_rows_softmax",
    "log_zinb_positive",
]
