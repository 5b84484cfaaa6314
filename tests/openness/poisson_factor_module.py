r"""A small model written against the open core only: a Poisson factor model for counts.

This file and ``poisson_factor_model.py`` are all that a new model needs (with one new field
class, defined in the model file); nothing in cellvi was edited for it. For cell :math:`n`:

.. math::

    z_n \sim \mathcal N(0, I_K), \quad W_{kg} \sim \mathcal N(0, \sigma_W^2), \quad
    x_{ng} \sim \mathrm{Poisson}\big(\ell_n\, \mathrm{softmax}(z_n W + b_{s_n})_g\big),

with an amortised Normal posterior over :math:`z_n` and a point estimate of the loadings
:math:`W`, whose Gaussian prior is a *global* term: the loss is
:math:`\frac1B\sum_n [-\log p(x_n \mid z_n) + \mathrm{KL}_n] - \log p(W) / N`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributions import Normal, Poisson, kl_divergence

from cellvi import keys
from cellvi.module import ConfiguredModule, LossOutput, ModuleConfig


@dataclass(frozen=True, kw_only=True)
class PoissonFactorConfig(ModuleConfig):
    """Options of :class:`PoissonFactor`."""

    n_input: int
    n_batch: int = 1
    n_latent: int = 4
    n_hidden: int = 32
    prior_scale: float = 1.0


class PoissonFactor(ConfiguredModule):
    """Poisson factor model with a Gaussian prior on its loadings (a global KL term)."""

    Config = PoissonFactorConfig

    def __init__(self, *args, **options):
        super().__init__(*args, **options)
        c = self.config
        self.encoder = nn.Sequential(nn.Linear(c.n_input, c.n_hidden), nn.ReLU(),
                                     nn.Linear(c.n_hidden, 2 * c.n_latent))
        self.loadings = nn.Parameter(0.1 * torch.randn(c.n_latent, c.n_input))
        self.batch_bias = nn.Parameter(torch.zeros(max(c.n_batch, 1), c.n_input))
        self.n_latent = c.n_latent

    def inference(self, x):
        mean, log_var = self.encoder(torch.log1p(x)).chunk(2, dim=-1)
        qz = Normal(mean, (0.5 * log_var).exp())
        return {"qz": qz, "z": qz.rsample()}

    def generative(self, z, batch_index, log_library):
        logits = z @ self.loadings + self.batch_bias[batch_index.reshape(-1)]
        return {"px": Poisson(log_library.exp() * logits.softmax(-1))}

    def loss(self, tensors, inference_outputs, generative_outputs, kl_weight=1.0, n_obs=1):
        x = tensors[keys.X]
        rec = -generative_outputs["px"].log_prob(x).sum(-1)
        qz = inference_outputs["qz"]
        kl_z = kl_divergence(qz, Normal(torch.zeros_like(qz.loc), 1.0)).sum(-1)
        prior = Normal(0.0, self.config.prior_scale)
        kl_global = -prior.log_prob(self.loadings).sum()
        loss = torch.mean(rec + kl_weight * kl_z) + kl_global / n_obs
        return LossOutput(loss=loss, reconstruction_loss=rec, kl_local={"kl_z": kl_z},
                          kl_global=kl_global)

    def forward(self, tensors, *, kl_weight=1.0, n_obs=1):
        inf = self.inference(tensors[keys.X])
        gen = self.generative(inf["z"], tensors[keys.BATCH], tensors["log_library"])
        return inf, gen, self.loss(tensors, inf, gen, kl_weight=kl_weight, n_obs=n_obs)

    # the adversarial plan's interface: the latent and the categories to hide
    def adversarial_shape(self):
        return self.n_latent, self.config.n_batch

    def adversarial_inputs(self, tensors, inference_outputs):
        return inference_outputs["z"], tensors[keys.BATCH], self.config.n_batch
