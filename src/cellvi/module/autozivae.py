r"""AutoZI: which genes are zero-inflated (Clivio et al., 2019).

scVI's generative model with, for each gene :math:`g` (or gene and batch, gene and label, gene
and cell: ``zero_inflation``), a mixture weight :math:`\delta_g` between a negative binomial and
a zero-inflated negative binomial of the same mean and dispersion:

.. math::

    \delta_g \sim \mathrm{Beta}(\alpha, \beta), \qquad
    x_{ng} \mid z_n, \ell_n, \delta_g \sim
        \delta_g\,\mathrm{NB}(\mu_{ng}, \theta_g) + (1 - \delta_g)\,
        \mathrm{ZINB}(\mu_{ng}, \theta_g, \pi_{ng}),

with :math:`\mu_{ng} = \ell_n \rho_{ng}` and the dropout
:math:`\pi_{ng} = m + (1 - m)\sigma(h_g(z_n))` from scVI's decoder, bounded below by
``minimal_dropout`` :math:`m` so that the ZINB component differs from the NB one. As in
scvi-tools, :math:`\delta` weighs the **NB** part: a gene is zero-inflated when
:math:`\delta_g` is small, and the paper's decision rule calls it so when
:math:`q(\delta_g < 1/2) > 1/2`. With :math:`\alpha, \beta < 1` (0.5 by default) the prior puts
its mass near 0 and 1, a soft spike-and-slab.

Inference: :math:`q(z_n \mid x_n)` (and the library) as in scVI, and a Beta posterior
:math:`q(\delta_g) = \mathrm{Beta}(a_g, b_g)` with :math:`a_g, b_g \in (0, 1)` (sigmoids of free
parameters, as in scvi-tools) for the global weights; for ``zero_inflation="gene-cell"`` the
weights are local, :math:`q(\delta_{ng} \mid x_n)`, from an encoder of the cell's counts. The
negative ELBO per cell is

.. math::

    \frac1B\sum_{n \in \text{batch}} \Big[-\log p(x_n \mid z_n, \ell_n, \delta)
        + \mathrm{KL}_z + \mathrm{KL}_\ell\Big]
    + \frac{1}{N}\sum_g \mathrm{KL}\big(q(\delta_g) \,\|\, p(\delta_g)\big),

the global KL counted once per pass over the :math:`N` training cells (the plan passes
``n_obs``), with one reparameterised draw of :math:`\delta` per minibatch. The mixture is a ZINB
whose extra zero has probability :math:`(1 - \delta)\pi`
(:class:`~cellvi.distributions.NBZINBMixture`), so the likelihood costs one NB evaluation on the
non-zero counts; the Beta draws are made on the logit scale
(:class:`~cellvi.distributions.LogitBeta`), where weights within rounding of 0 or 1 stay exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.distributions import kl_divergence

from cellvi import keys
from cellvi.distributions import (
    LogitBeta,
    NBZINBMixture,
    StandardNormal,
    kl_beta,
    log_prob_rows,
)
from cellvi.nn import FCLayers

from ._base import LossOutput
from ._config import check_choice
from .vae import VAE, VAEConfig

Tensors = dict[str, torch.Tensor]
ZeroInflation = Literal["gene", "gene-batch", "gene-label", "gene-cell"]

__all__ = ["AutoZIVAE", "AutoZIVAEConfig"]


@dataclass(frozen=True, kw_only=True)
class AutoZIVAEConfig(VAEConfig):
    r"""Options of :class:`AutoZIVAE`: those of :class:`~cellvi.module.VAEConfig` and these.

    The likelihood is AutoZI's NB/ZINB mixture, so ``gene_likelihood`` stays ``"zinb"`` (the
    ZINB component is scVI's).

    Attributes
    ----------
    alpha_prior, beta_prior
        Shapes of the Beta prior of the NB weight :math:`\delta`, each in (0, 1). When one is
        None it is set to one minus the other (scvi-tools' rule); when both are None the prior
        is learned (empirical Bayes): one ``(alpha, beta)`` pair shared by the genes, per batch
        for ``"gene-batch"`` and per label for ``"gene-label"``.
    minimal_dropout
        Lower bound :math:`m \in [0, 1)` of the ZINB component's dropout,
        :math:`\pi = m + (1 - m)\sigma(h)`; 0 lets the ZINB component collapse onto the NB one
        and the mixture weight become unidentifiable.
    zero_inflation
        What one weight covers: ``"gene"`` (one per gene), ``"gene-batch"`` (per gene and
        batch), ``"gene-label"`` (per gene and label) or ``"gene-cell"`` (per gene and cell:
        a local latent variable with an amortised posterior, whose KL is per cell).
    """

    alpha_prior: float | None = 0.5
    beta_prior: float | None = 0.5
    minimal_dropout: float = 0.01
    zero_inflation: ZeroInflation = "gene"

    def __post_init__(self):
        if self.gene_likelihood != "zinb":
            raise ValueError(
                f"AutoZI's likelihood is its NB/ZINB mixture; gene_likelihood="
                f"{self.gene_likelihood!r} cannot be used. Leave gene_likelihood unset (or use "
                "cellvi.model.SCVI for a plain NB or Poisson likelihood)."
            )
        super().__post_init__()
        check_choice("zero_inflation", self.zero_inflation,
                     ("gene", "gene-batch", "gene-label", "gene-cell"))
        for name in ("alpha_prior", "beta_prior"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int | float) and 0 < value < 1):
                raise ValueError(
                    f"{name} must be a number in (0, 1) (the Beta shapes are sigmoids of free "
                    f"parameters), or None to learn the prior; got {value!r}."
                )
        if not (isinstance(self.minimal_dropout, int | float) and 0 <= self.minimal_dropout < 1):
            raise ValueError(f"minimal_dropout must be in [0, 1), got {self.minimal_dropout!r}.")
        if self.zero_inflation == "gene-batch" and self.n_batch < 1:
            raise ValueError("zero_inflation='gene-batch' needs n_batch >= 1 (set a batch_key).")
        if self.zero_inflation == "gene-label" and self.n_labels < 1:
            raise ValueError(
                "zero_inflation='gene-label' needs n_labels >= 1 (set a labels_key in "
                "setup_anndata).")

    @property
    def priors(self) -> tuple[float | None, float | None]:
        """The prior shapes after scvi-tools' rule (one given: the other is one minus it)."""
        a, b = self.alpha_prior, self.beta_prior
        if a is not None and b is None:
            b = 1.0 - a
        elif b is not None and a is None:
            a = 1.0 - b
        return a, b


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


class AutoZIVAE(VAE):
    """scVI with a Beta-distributed NB/ZINB mixture weight per gene: AutoZI.

    Options: :class:`AutoZIVAEConfig`. The methods named as in the seed (scVI 0.5's
    ``AutoZIVAE``) and in scvi-tools are here: :meth:`get_alphas_betas`,
    :meth:`sample_from_beta_distribution`, :meth:`reshape_bernoulli`,
    :meth:`sample_bernoulli_params`, :meth:`rescale_dropout`, :meth:`get_reconstruction_loss`,
    :meth:`compute_global_kl_divergence`. It trains through autograd: it overrides the
    computation that :meth:`~cellvi.module.VAE.fused_training_step` writes out, so the fused
    step refuses it.

    Attributes
    ----------
    alpha_posterior_logit, beta_posterior_logit
        Logits of the posterior Beta shapes, ``(genes,)`` or ``(genes, batches / labels)``
        (global modes).
    alpha_prior_logit, beta_prior_logit
        Logits of the prior shapes, ``(1,)`` or ``(batches / labels,)``: parameters when the
        prior is learned, buffers otherwise.
    delta_encoder, delta_head, delta_entry
        ``"gene-cell"`` only: a hidden layer on the encoded counts, a head giving both shapes'
        logits for every gene, and per-gene weights of the entry's own ``log(1 + x)`` and of
        ``1[x > 0]`` (a hidden layer of 128 units cannot say which of thousands of counts are
        zero, which is what the posterior of that entry's weight mostly depends on).
    """

    Config = AutoZIVAEConfig

    def __init__(self, *args, **options):
        super().__init__(*args, **options)
        c = self.config
        self.zero_inflation = c.zero_inflation
        self.minimal_dropout = float(c.minimal_dropout)
        n_groups = {"gene-batch": c.n_batch, "gene-label": c.n_labels}.get(c.zero_inflation)
        prior_shape = (n_groups,) if n_groups else (1,)
        if c.zero_inflation == "gene-cell":
            n_in = c.n_input + c.n_continuous_cov * c.encode_covariates
            self.delta_encoder = FCLayers(
                n_in, c.n_hidden, n_cat_list=self._encoder_cat_list(), n_layers=c.n_layers,
                n_hidden=c.n_hidden, dropout_rate=c.dropout_rate,
                inject_covariates=c.deeply_inject_covariates,
                use_batch_norm=c.use_batch_norm in ("encoder", "both"),
                use_layer_norm=c.use_layer_norm in ("encoder", "both"),
            )
            self.delta_head = nn.Linear(c.n_hidden, 2 * c.n_input)
            # (alpha, beta) x (log1p(x), 1[x > 0]) x genes; starts at 0: the head alone
            self.delta_entry = nn.Parameter(torch.zeros(2, 2, c.n_input))
        alpha, beta = c.priors
        for name, value in (("alpha_prior_logit", alpha), ("beta_prior_logit", beta)):
            if value is None:
                setattr(self, name, nn.Parameter(torch.randn(prior_shape)))
            else:
                self.register_buffer(name, torch.full(prior_shape, _logit(value)))
        if c.zero_inflation != "gene-cell":
            # every weight's posterior starts at its prior (scvi-tools draws its logits from
            # N(0, 1)): a gene leaves the prior only as far as the data move it, so the call
            # q(delta < 1/2) > 1/2 is not decided by a random head start (BENCHMARKS.md, AutoZI)
            shape = (c.n_input, n_groups) if n_groups else (c.n_input,)
            self.alpha_posterior_logit = nn.Parameter(
                self.alpha_prior_logit.detach().clone().expand(shape).contiguous())
            self.beta_posterior_logit = nn.Parameter(
                self.beta_prior_logit.detach().clone().expand(shape).contiguous())

    @property
    def learns_prior(self) -> bool:
        """Whether the Beta prior's shapes are learned (both given as None)."""
        return isinstance(self.alpha_prior_logit, nn.Parameter)

    # ------------------------------------------------------------------ the Beta weights
    def get_alphas_betas(self, as_numpy: bool = True, tensors: Tensors | None = None
                         ) -> dict[str, torch.Tensor | np.ndarray]:
        """Return the Beta shapes: ``alpha_posterior``, ``beta_posterior``, ``alpha_prior``...

        Global modes: posteriors ``(genes,)`` or ``(genes, groups)`` and priors ``(1,)`` or
        ``(groups,)``. ``"gene-cell"``: the posteriors are per cell, ``(cells, genes)``, for the
        minibatch ``tensors`` (without it, only the priors are returned).
        """
        out = {}
        if self.zero_inflation != "gene-cell":
            out["alpha_posterior"] = torch.sigmoid(self.alpha_posterior_logit)
            out["beta_posterior"] = torch.sigmoid(self.beta_posterior_logit)
        elif tensors is not None:
            x = tensors[keys.X]
            a, b = self._cell_posterior(x, tensors.get(keys.X_T), tensors[keys.BATCH],
                                        tensors.get(keys.CONT_COVS), tensors.get(keys.CAT_COVS))
            out["alpha_posterior"], out["beta_posterior"] = a, b
        out["alpha_prior"] = torch.sigmoid(self.alpha_prior_logit)
        out["beta_prior"] = torch.sigmoid(self.beta_prior_logit)
        if as_numpy:
            out = {k: v.detach().cpu().numpy() for k, v in out.items()}
        return out

    def posterior(self) -> LogitBeta:
        r"""Return :math:`q(\delta)` on the logit scale (global modes)."""
        if self.zero_inflation == "gene-cell":
            raise ValueError("With zero_inflation='gene-cell' the posterior is per cell: use "
                             "inference(...)['qdelta'].")
        return LogitBeta(torch.sigmoid(self.alpha_posterior_logit),
                         torch.sigmoid(self.beta_posterior_logit), validate_args=False)

    def prior(self) -> LogitBeta:
        r"""Return :math:`p(\delta)` on the logit scale, ``(1,)`` or ``(groups,)``."""
        return LogitBeta(torch.sigmoid(self.alpha_prior_logit),
                         torch.sigmoid(self.beta_prior_logit), validate_args=False)

    def _cell_posterior(self, x, x_t, batch_index, cont_covs, cat_covs):
        """``"gene-cell"``: the per-cell posterior shapes, two ``(cells, genes)`` tensors."""
        x_ = self._encoder_input(x, x_t, cont_covs)
        cats = self._cats(batch_index, cat_covs) if self.encode_covariates else []
        h = self.delta_encoder(x_, *cats)  # (cells, hidden)
        dense = x.to_dense() if x.layout == torch.sparse_csr else x
        own = torch.stack([torch.log1p(dense), (dense > 0).to(dense.dtype)])  # (2, cells, G)
        entry = torch.einsum("kng,akg->ang", own, self.delta_entry)  # (2, cells, genes)
        logits = self.delta_head(h).unflatten(-1, (2, -1)).movedim(-2, 0) + entry
        return torch.sigmoid(logits[0]), torch.sigmoid(logits[1])

    def sample_from_beta_distribution(
        self, alpha: torch.Tensor, beta: torch.Tensor, eps_gamma: float = 1e-30,
        eps_sample: float = 1e-7,
    ) -> torch.Tensor:
        r"""Draw :math:`\delta \sim \mathrm{Beta}(\alpha, \beta)`, reparameterised.

        Drawn on the logit scale (:class:`~cellvi.distributions.LogitBeta`, where no Gamma
        draw underflows, so ``eps_gamma`` is not needed) and mapped to
        ``eps_sample + (1 - 2 eps_sample) * delta``, scvi-tools' guard against exact 0 and 1.
        The module itself uses the logits (:meth:`sample_bernoulli_params` with
        ``logits=True``), which need no guard.
        """
        t = LogitBeta(alpha, beta).rsample()
        return eps_sample + (1 - 2 * eps_sample) * torch.sigmoid(t)

    def reshape_bernoulli(self, bernoulli_params: torch.Tensor,
                          batch_index: torch.Tensor | None = None,
                          y: torch.Tensor | None = None) -> torch.Tensor:
        """Give each cell its weights: ``(..., genes[, groups])`` -> ``(..., cells, genes)``.

        ``"gene"``: ``(..., 1, genes)`` (broadcast over cells); ``"gene-batch"`` /
        ``"gene-label"``: each cell's batch / label column; ``"gene-cell"``: unchanged. Works
        on weights or on their logits.
        """
        if self.zero_inflation == "gene":
            return bernoulli_params.unsqueeze(-2)
        if self.zero_inflation == "gene-cell":
            return bernoulli_params
        codes = batch_index if self.zero_inflation == "gene-batch" else y
        if codes is None:
            raise ValueError(f"zero_inflation={self.zero_inflation!r} needs the cells' "
                             f"{'batches' if self.zero_inflation == 'gene-batch' else 'labels'}.")
        picked = bernoulli_params.index_select(-1, codes.reshape(-1).long())  # (..., G, cells)
        return picked.transpose(-1, -2)

    def sample_bernoulli_params(self, batch_index: torch.Tensor | None = None,
                                y: torch.Tensor | None = None, n_samples: int = 1,
                                logits: bool = False) -> torch.Tensor:
        r"""Draw the global weights and give each cell its own: ``([n_samples,] cells, genes)``.

        ``logits=True`` returns :math:`\operatorname{logit}\delta`, exact near 0 and 1.
        """
        q = self.posterior()
        t = q.rsample((n_samples,) if n_samples > 1 else ())
        t = self.reshape_bernoulli(t, batch_index, y)
        return t if logits else torch.sigmoid(t)

    def rescale_dropout(self, px_dropout: torch.Tensor, eps_log: float = 1e-8) -> torch.Tensor:
        r"""Return the logits of :math:`\pi = m + (1 - m)\sigma(h)`, :math:`m` the minimal dropout.

        Computed in log space, :math:`\log\pi = \operatorname{logaddexp}(\log m, \log(1 - m)
        + \log\sigma(h))` and :math:`\log(1 - \pi) = \log(1 - m) + \log\sigma(-h)`, so no
        ``eps_log`` is needed (the argument is kept for scvi-tools' signature).
        """
        m = self.minimal_dropout
        if m <= 0:
            return px_dropout
        log1m = math.log1p(-m)
        log_pi = torch.logaddexp(torch.full_like(px_dropout, math.log(m)),
                                 log1m + nn.functional.logsigmoid(px_dropout))
        return log_pi - log1m - nn.functional.logsigmoid(-px_dropout)

    def compute_global_kl_divergence(self) -> torch.Tensor:
        r"""Return :math:`\sum \mathrm{KL}(q(\delta) \| p(\delta))` over the global weights.

        Zero for ``"gene-cell"``, whose KL is per cell (``kl_local["kl_delta"]``).
        """
        if self.zero_inflation == "gene-cell":
            return torch.zeros((), device=self.alpha_prior_logit.device)
        a = torch.sigmoid(self.alpha_posterior_logit)
        b = torch.sigmoid(self.beta_posterior_logit)
        return kl_beta(a, b, torch.sigmoid(self.alpha_prior_logit),
                       torch.sigmoid(self.beta_prior_logit)).sum()

    def get_reconstruction_loss(
        self, x: torch.Tensor, px_rate: torch.Tensor, px_r: torch.Tensor,
        px_dropout: torch.Tensor, bernoulli_params: torch.Tensor, eps_log: float = 1e-8,
        **kwargs,
    ) -> torch.Tensor:
        r"""Return ``-log p(x)`` per cell under the mixture with NB weights ``bernoulli_params``.

        ``px_dropout`` are the ZINB component's (rescaled) dropout logits and
        ``bernoulli_params`` the weights :math:`\delta` broadcastable to ``px_rate``
        (:meth:`reshape_bernoulli`); ``eps_log`` bounds them away from 0 and 1 as in
        scvi-tools.
        """
        d = bernoulli_params.clamp(eps_log, 1 - eps_log)
        px = NBZINBMixture(px_rate, px_r, px_dropout, torch.log(d) - torch.log1p(-d))
        return -log_prob_rows(px, x, kwargs.get("nonzero"))

    # ------------------------------------------------------------------ inference
    def inference(self, x, batch_index, cont_covs=None, cat_covs=None, n_samples: int = 1,
                  x_t=None, y=None) -> dict:
        r"""Run scVI's inference, plus the NB weights: ``qdelta`` and a draw ``delta_logits``.

        ``delta_logits`` is one reparameterised draw of :math:`\operatorname{logit}\delta`
        (a leading ``n_samples`` dimension when ``n_samples > 1``): ``(genes[, groups])`` for
        the global modes, shared by the minibatch's cells, or ``(cells, genes)`` for
        ``"gene-cell"``.
        """
        out = super().inference(x, batch_index, cont_covs=cont_covs, cat_covs=cat_covs,
                                n_samples=n_samples, x_t=x_t, y=y)
        if self.zero_inflation == "gene-cell":
            qdelta = LogitBeta(*self._cell_posterior(x, x_t, batch_index, cont_covs, cat_covs),
                               validate_args=False)
        else:
            qdelta = self.posterior()
        out["qdelta"] = qdelta
        out["delta_logits"] = qdelta.rsample((n_samples,) if n_samples > 1 else ())
        return out

    # ------------------------------------------------------------------ generative
    def generative_inputs(self, tensors: Tensors, inference_outputs: dict) -> dict:
        """Pick scVI's generative inputs and the draw of the NB weights."""
        return {**super().generative_inputs(tensors, inference_outputs),
                "delta_logits": inference_outputs["delta_logits"]}

    def generative(self, z, library, batch_index, cont_covs=None, cat_covs=None,
                   size_factor=None, y=None, transform_batch=None, delta_logits=None) -> dict:
        """Decode as scVI does, with the NB/ZINB mixture as ``px``; ``pdelta`` is the prior.

        ``delta_logits`` is a draw of :meth:`inference` (None: a fresh draw from the posterior,
        global modes only). With ``transform_batch``, the cells take that batch's weights too.
        """
        out = super().generative(z, library, batch_index, cont_covs=cont_covs,
                                 cat_covs=cat_covs, size_factor=size_factor, y=y,
                                 transform_batch=transform_batch)
        if transform_batch is not None:
            batch_index = torch.full_like(batch_index, int(transform_batch))
        if delta_logits is None:
            if self.zero_inflation == "gene-cell":
                raise ValueError("zero_inflation='gene-cell' needs delta_logits from inference.")
            delta_logits = self.posterior().rsample()
        px = out["px"]
        # (..., 1 or cells, genes): broadcasts against the (..., cells, genes) means, also when
        # one draw of the weights serves several draws of z
        nb_logits = self.reshape_bernoulli(delta_logits, batch_index, y)
        # the minimal dropout is applied inside the mixture's logits (rescale_dropout's value,
        # fused with the mixing: a third of the elementwise work)
        out["px"] = NBZINBMixture(px.mu, px.theta, px.zi_logits, nb_logits,
                                  minimal_dropout=self.minimal_dropout, scale=px.scale,
                                  validate_args=False)
        out["pdelta"] = self.prior()
        return out

    def generative_scale(self, z, library, batch_index, cont_covs=None, cat_covs=None,
                         size_factor=None, y=None, transform_batch=None, out=None,
                         delta_logits=None) -> torch.Tensor:
        """Return the normalised expression alone (scVI's; the weights do not enter it)."""
        return super().generative_scale(z, library, batch_index, cont_covs=cont_covs,
                                        cat_covs=cat_covs, size_factor=size_factor, y=y,
                                        transform_batch=transform_batch, out=out)

    # ------------------------------------------------------------------ loss
    def forward(self, tensors: Tensors, *, kl_weight: float = 1.0, n_obs: int = 1,
                transform_batch: int | None = None) -> tuple[dict, dict, LossOutput]:
        """Run inference, generative and loss on a minibatch (``n_obs``: training cells)."""
        inference_outputs = self.inference(**self.inference_inputs(tensors))
        generative_outputs = self.generative(
            **self.generative_inputs(tensors, inference_outputs), transform_batch=transform_batch
        )
        loss = self.loss(tensors, inference_outputs, generative_outputs, kl_weight=kl_weight,
                         n_obs=n_obs)
        return inference_outputs, generative_outputs, loss

    def loss(self, tensors: Tensors, inference_outputs: dict, generative_outputs: dict,
             kl_weight: float = 1.0, n_obs: int = 1) -> LossOutput:
        """Negative ELBO per cell, with the global KL of the weights divided by ``n_obs``.

        ``reconstruction_loss`` is the mixture's ``-log p(x | z, l, delta)`` per cell;
        ``kl_local`` holds ``kl_z`` (scaled by the warm-up ``kl_weight`` in the loss),
        ``kl_l`` when the library is modelled and, for ``"gene-cell"``, ``kl_delta``;
        ``kl_global`` is :meth:`compute_global_kl_divergence` (scvi-tools' ``kl_global``, not
        warmed up). The loss is ``mean(reconstruction + kl_weight kl_z + kl_l + kl_delta) +
        kl_global / n_obs``.
        """
        x = tensors[keys.X]
        reconstruction = -log_prob_rows(
            generative_outputs["px"], x, tensors.get(keys.INDICES_NONZERO))  # (cells,)
        kl_z = kl_divergence(inference_outputs["qz"], generative_outputs["pz"]).sum(-1)
        kl_local = {"kl_z": kl_z}
        unweighted = torch.zeros_like(kl_z)
        if generative_outputs["pl"] is not None:
            kl_l = kl_divergence(inference_outputs["ql"], generative_outputs["pl"]).sum(-1)
            kl_local["kl_l"] = kl_l
            unweighted = unweighted + kl_l
        if self.zero_inflation == "gene-cell":
            kl_delta = kl_divergence(inference_outputs["qdelta"],
                                     generative_outputs["pdelta"]).sum(-1)  # (cells,)
            kl_local["kl_delta"] = kl_delta
            unweighted = unweighted + kl_delta
            kl_global = torch.zeros((), device=kl_z.device)
        else:
            kl_global = self.compute_global_kl_divergence()
        loss = torch.mean(reconstruction + kl_weight * kl_z + unweighted) + kl_global / n_obs
        return LossOutput(loss=loss, reconstruction_loss=reconstruction, kl_local=kl_local,
                          kl_global=kl_global)

    # ------------------------------------------------------------------ evaluation
    @torch.inference_mode()
    def log_likelihood_rows(self, tensors: Tensors, inference_outputs: dict) -> torch.Tensor:
        r"""Return :math:`\log p(x \mid z, l, \delta)` per cell, ``(..., cells)``.

        At the draws of ``inference_outputs``; the mixture's likelihood (scVI's softmax shortcut
        does not apply).
        """
        gen = self.generative(**self.generative_inputs(tensors, inference_outputs))
        return log_prob_rows(gen["px"], tensors[keys.X], tensors.get(keys.INDICES_NONZERO))

    @torch.inference_mode()
    def marginal_ll(self, tensors: Tensors, n_mc_samples: int, n_mc_samples_per_pass: int = 100,
                    delta_logits: torch.Tensor | None = None) -> torch.Tensor:
        r"""Estimate :math:`\log p(x_n \mid \cdot)` per cell by importance sampling, ``(cells,)``.

        Global modes: :math:`\log p(x_n \mid \delta)` at the given draw ``delta_logits``
        (``(genes[, groups])``), :math:`\log\frac1K\sum_k p(x_n \mid z_k, l_k, \delta)
        p(z_k) p(l_k) / q(z_k, l_k \mid x_n)`; the weights being shared by all cells, the
        integral over :math:`\delta` is the model's (``AUTOZI.get_marginal_ll``).
        ``"gene-cell"``: :math:`\log p(x_n)` itself, the weights drawn with :math:`z` and
        weighed by :math:`p(\delta_n) / q(\delta_n \mid x_n)`.
        """
        local = self.zero_inflation == "gene-cell"
        if not local and delta_logits is None:
            raise ValueError("Global zero-inflation weights: pass one draw as delta_logits "
                             "(AUTOZI.get_marginal_ll integrates over them).")
        chunks = []
        remaining = n_mc_samples
        while remaining > 0:
            k = min(n_mc_samples_per_pass, remaining)
            remaining -= k
            inf = self.inference(**self.inference_inputs(tensors), n_samples=k)
            if k == 1:  # the leading sample dimension, as for k > 1
                inf = {**inf, "z": inf["z"].unsqueeze(0),
                       "z_untransformed": inf["z_untransformed"].unsqueeze(0),
                       "library": inf["library"].unsqueeze(0),
                       "delta_logits": inf["delta_logits"].unsqueeze(0)}
            if not local:
                inf["delta_logits"] = delta_logits
            log_px = self.log_likelihood_rows(tensors, inf)  # (k, cells)
            zu = inf["z_untransformed"]
            log_w = (log_px + StandardNormal(zu).log_prob(zu).sum(-1)
                     - inf["qz"].log_prob(zu).sum(-1))
            if inf["ql"] is not None:
                lib = inf["library"]
                pl = self._library_prior(tensors[keys.BATCH])
                log_w = log_w + pl.log_prob(lib).sum(-1) - inf["ql"].log_prob(lib).sum(-1)
            if local:
                t = inf["delta_logits"]  # (k, cells, genes)
                log_w = (log_w + self.prior().log_prob(t).sum(-1)
                         - inf["qdelta"].log_prob(t).sum(-1))
            chunks.append(log_w.reshape(k, -1))
        log_w = torch.cat(chunks, dim=0)  # (n_mc_samples, cells)
        return torch.logsumexp(log_w, dim=0) - math.log(n_mc_samples)
