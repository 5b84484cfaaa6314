r"""The scVI variational autoencoder (Lopez et al., Nature Methods 2018).

Generative model for cell :math:`n` with counts :math:`x_n` in batch :math:`s_n`:

.. math::

    z_n \sim \mathcal N(0, I), \qquad
    \ell_n \sim \mathrm{LogNormal}(\mu_{s_n}, \sigma^2_{s_n}) \text{ (or observed)}, \\
    \rho_n = f_w(z_n, s_n) \in \Delta^{G-1}, \qquad
    x_{ng} \sim \mathrm{ZINB}(\ell_n \rho_{ng}, \theta_g, \pi_{ng})
    \text{ (or NB, Poisson)}.

Inference: :math:`q(z_n \mid x_n, s_n)` and :math:`q(\ell_n \mid x_n, s_n)` are diagonal Normals
(log-normal for the library) from neural encoders. The loss is the negative ELBO,
:math:`-\mathbb E_q \log p(x \mid z, \ell) + \mathrm{KL}(q(z) \| p(z)) + \mathrm{KL}(q(\ell) \|
p(\ell))`, with the KL on :math:`z` scaled by a warm-up weight during training.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.distributions import Distribution, Normal, kl_divergence

from cellvi import keys
from cellvi._checks import check_int
from cellvi.distributions import (
    NegativeBinomial,
    Poisson,
    StandardNormal,
    ZeroInflatedNegativeBinomial,
    log_prob_rows,
    nb_log_prob_rows_softmax,
)
from cellvi.nn import DecoderSCVI, Encoder, SparseRows, csr_with_values

from . import _vae_step
from ._base import RATE_FLOOR, LossOutput, covariate_codes, one_hot, row_sums
from ._config import (
    ConfiguredModule,
    ModuleConfig,
    check_choice,
    check_library_prior,
    plain_values,
)

Tensors = dict[str, torch.Tensor]
NormOption = Literal["encoder", "decoder", "none", "both"]


@dataclass(frozen=True, kw_only=True)
class VAEConfig(ModuleConfig):
    """Options of :class:`VAE` (scVI).

    Attributes
    ----------
    n_input
        Number of genes.
    n_batch
        Number of batches; 0 means no batch correction.
    n_labels
        Number of labels (used by ``dispersion="gene-label"`` and by subclasses).
    n_hidden
        Width of every hidden layer.
    n_latent
        Dimension of the latent space.
    n_layers
        Hidden layers in the encoder and the decoder.
    n_continuous_cov
        Number of continuous covariates (fed to the decoder, and to the encoder when
        ``encode_covariates``).
    n_cats_per_cov
        Number of categories of each extra categorical covariate.
    dropout_rate
        Dropout rate of the encoder.
    dispersion
        ``"gene"`` (one inverse dispersion per gene), ``"gene-batch"``, ``"gene-label"`` or
        ``"gene-cell"`` (predicted by the decoder).
    log_variational
        Encode ``log(1 + x)`` rather than ``x`` (for stability; not a normalisation).
    gene_likelihood
        ``"zinb"``, ``"nb"`` or ``"poisson"``.
    latent_distribution
        ``"normal"`` or ``"ln"`` (logistic normal: softmax of a Normal sample).
    encode_covariates
        Whether the encoders also see the batch and the covariates.
    deeply_inject_covariates
        Inject covariates into every hidden layer, not only the first (matters for
        ``n_layers > 1``).
    use_batch_norm
        Where to use batch normalisation: ``"encoder"``, ``"decoder"``, ``"none"`` or ``"both"``.
    use_layer_norm
        Where to use layer normalisation.
    use_size_factor_key
        Scale the expected counts by a user-given size factor (``tensors["size_factor"]``, on the
        natural scale); takes priority over ``use_observed_lib_size``.
    use_observed_lib_size
        Use the observed total counts as the library size; otherwise the library size is a latent
        variable with a per-batch log-normal prior.
    library_log_means, library_log_vars
        ``(n_batch,)`` means and variances of the log library size per batch: the prior of the
        library when it is modelled. Required when ``use_observed_lib_size=False``.
    var_activation
        Positivity transform of the encoder variances (None: ``torch.exp``).
    """

    n_input: int
    n_batch: int = 0
    n_labels: int = 0
    n_hidden: int = 128
    n_latent: int = 10
    n_layers: int = 1
    n_continuous_cov: int = 0
    n_cats_per_cov: Sequence[int] | None = None
    dropout_rate: float = 0.1
    dispersion: Literal["gene", "gene-batch", "gene-label", "gene-cell"] = "gene"
    log_variational: bool = True
    gene_likelihood: Literal["zinb", "nb", "poisson"] = "zinb"
    latent_distribution: Literal["normal", "ln"] = "normal"
    encode_covariates: bool = False
    deeply_inject_covariates: bool = True
    use_batch_norm: NormOption = "both"
    use_layer_norm: NormOption = "none"
    use_size_factor_key: bool = False
    use_observed_lib_size: bool = True
    library_log_means: Sequence[float] | None = None
    library_log_vars: Sequence[float] | None = None
    var_activation: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __post_init__(self):
        for name in ("n_input", "n_hidden", "n_latent", "n_layers"):
            check_int(name, getattr(self, name), minimum=1)
        if not (isinstance(self.dropout_rate, int | float) and 0 <= self.dropout_rate < 1):
            raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate!r}.")
        check_choice("dispersion", self.dispersion,
                     ("gene", "gene-batch", "gene-label", "gene-cell"))
        check_choice("gene_likelihood", self.gene_likelihood, ("zinb", "nb", "poisson"))
        check_choice("latent_distribution", self.latent_distribution, ("normal", "ln"))
        for name in ("use_batch_norm", "use_layer_norm"):
            check_choice(name, getattr(self, name), ("encoder", "decoder", "none", "both"))
        if self.dispersion == "gene-batch" and self.n_batch < 1:
            raise ValueError("dispersion='gene-batch' needs n_batch >= 1.")
        if self.dispersion == "gene-label" and self.n_labels < 1:
            raise ValueError("dispersion='gene-label' needs n_labels >= 1 (set a labels_key).")
        plain_values(self, n_cats_per_cov=int, library_log_means=float, library_log_vars=float)
        check_library_prior(self)

    @property
    def observed_library(self) -> bool:
        """Whether the library size is observed (a size factor counts as observed)."""
        return self.use_size_factor_key or self.use_observed_lib_size


class VAE(ConfiguredModule):
    """Variational autoencoder for single-cell counts (scVI).

    Built from its options, :class:`VAEConfig` (``VAE(n_input, n_batch=..., ...)`` or
    ``VAE(VAEConfig(...))``), kept in ``module.config``. It is assembled from parts, each made by
    one method that a subclass may override: the encoders (:meth:`_make_encoder`, with the
    categorical inputs of :meth:`_encoder_cat_list`), the decoder (:meth:`_make_decoder`), the
    count likelihood (:func:`count_distribution`) and the prior of ``z``
    (:class:`~cellvi.distributions.StandardNormal`).

    Notes
    -----
    ``x`` may be a dense ``(cells, genes)`` tensor or a sparse CSR one (then with its transpose
    ``x_t``, as the data loader gives them when :attr:`sparse_input` is true): the first encoder
    layer and the likelihood then touch only the non-zero counts. :meth:`fused_training_step`
    says whether the written-out step of :mod:`cellvi.module._vae_step` applies.
    """

    Config = VAEConfig
    #: The training loop and the queries may pass the counts as sparse CSR tensors.
    sparse_input: bool = True

    def __init__(self, *args, **options):
        super().__init__(*args, **options)
        c = self.config
        self.n_input = c.n_input
        self.n_batch = c.n_batch
        self.n_labels = c.n_labels
        self.n_latent = c.n_latent
        self.n_continuous_cov = c.n_continuous_cov
        self.dispersion = c.dispersion
        self.log_variational = c.log_variational
        self.gene_likelihood = c.gene_likelihood
        self.latent_distribution = c.latent_distribution
        self.encode_covariates = c.encode_covariates
        self.use_size_factor_key = c.use_size_factor_key
        self.use_observed_lib_size = c.observed_library
        self.n_cats_per_cov = list(c.n_cats_per_cov or [])

        if not self.use_observed_lib_size:
            means = torch.tensor(c.library_log_means, dtype=torch.float32)
            var = torch.tensor(c.library_log_vars, dtype=torch.float32)
            self.register_buffer("library_log_means", means.reshape(-1))
            self.register_buffer("library_log_vars", var.reshape(-1))

        # inverse dispersion, stored as a log: (genes,) or (genes, n_batch / n_labels)
        if c.dispersion == "gene":
            self.px_r = nn.Parameter(torch.randn(c.n_input))
        elif c.dispersion == "gene-batch":
            self.px_r = nn.Parameter(torch.randn(c.n_input, c.n_batch))
        elif c.dispersion == "gene-label":
            self.px_r = nn.Parameter(torch.randn(c.n_input, c.n_labels))

        cat_list = [c.n_batch, *self.n_cats_per_cov]
        n_input_encoder = c.n_input + c.n_continuous_cov * c.encode_covariates
        self.z_encoder = self._make_encoder(n_input_encoder, c.n_latent,
                                            n_cat_list=self._encoder_cat_list(),
                                            distribution=c.latent_distribution)
        # the library encoder has one hidden layer whatever n_layers is (as in scvi-tools)
        self.l_encoder = None if self.use_observed_lib_size else self._make_encoder(
            n_input_encoder, 1, n_cat_list=cat_list if c.encode_covariates else None,
            n_layers=1)
        self.decoder = self._make_decoder(
            c.n_latent + c.n_continuous_cov,
            c.n_input,
            n_cat_list=cat_list,
            n_layers=c.n_layers,
            n_hidden=c.n_hidden,
            inject_covariates=c.deeply_inject_covariates,
            use_batch_norm=c.use_batch_norm in ("decoder", "both"),
            use_layer_norm=c.use_layer_norm in ("decoder", "both"),
        )

    # ------------------------------------------------------------------ fast path
    def fused_training_step(self, *, device: torch.device | str, sparse: bool):
        """Return the written-out training step for this module, or None, and why not.

        Returns ``(step, reason)``: ``step(module, tensors, kl_weight) -> LossOutput`` sets
        every parameter's gradient (:func:`cellvi.module._vae_step.training_step`) when the
        module computes what :class:`VAE` computes (no method of
        :data:`~cellvi.module._vae_step.WRITES_OUT` overridden) with options the step supports;
        else ``(None, reason)``.
        """
        overridden = [name for name in _vae_step.WRITES_OUT
                      if getattr(type(self), name) is not getattr(VAE, name)]
        if overridden:
            return None, f"{type(self).__name__} overrides {', '.join(overridden)}"
        reason = _vae_step.unsupported(self, device=device, sparse=sparse)
        return (None, reason) if reason else (_vae_step.training_step, "")

    # ------------------------------------------------------------------ parts
    def _encoder_cat_list(self) -> list[int] | None:
        """Categorical inputs of the ``z`` encoder: the batch and covariates, if encoded."""
        c = self.config
        return [c.n_batch, *self.n_cats_per_cov] if c.encode_covariates else None

    def _make_encoder(self, n_in: int, n_out: int, *, n_cat_list, distribution="normal",
                      n_layers: int | None = None):
        """Return an :class:`~cellvi.nn.Encoder` with the module's layer options.

        ``n_layers`` defaults to the config's.
        """
        c = self.config
        return Encoder(
            n_in, n_out, n_cat_list=n_cat_list,
            n_layers=c.n_layers if n_layers is None else n_layers, n_hidden=c.n_hidden,
            dropout_rate=c.dropout_rate, distribution=distribution,
            inject_covariates=c.deeply_inject_covariates,
            use_batch_norm=c.use_batch_norm in ("encoder", "both"),
            use_layer_norm=c.use_layer_norm in ("encoder", "both"),
            var_activation=c.var_activation,
        )

    def _make_decoder(self, n_in: int, n_out: int, **kwargs) -> nn.Module:
        return DecoderSCVI(n_in, n_out, **kwargs)

    # ------------------------------------------------------------------ inference
    def inference(
        self,
        x: torch.Tensor,
        batch_index: torch.Tensor,
        cont_covs: torch.Tensor | None = None,
        cat_covs: torch.Tensor | None = None,
        n_samples: int = 1,
        x_t: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor | Distribution | None]:
        """Encode counts ``x`` ``(cells, genes)`` into posteriors over ``z`` and the library.

        ``x`` is dense, or sparse CSR with ``x_t`` its transpose (computed when None). ``y``,
        label codes ``(cells, 1)``, is the last categorical input of the ``z`` encoder of a
        module whose encoder conditions on the label (:class:`~cellvi.module.VAEC`).

        Returns a dict with ``qz`` (Normal over the untransformed latent), ``z`` (the latent
        sample, softmax-ed for ``"ln"``), ``z_untransformed``, ``ql`` (Normal over the log library,
        None when observed) and ``library`` (log library size). With ``n_samples > 1`` the samples
        get a leading ``(n_samples, ...)`` dimension.
        """
        x_ = self._encoder_input(x, x_t, cont_covs)  # (cells, genes [+ n_cont])
        cats = self._cats(batch_index, cat_covs) if self.encode_covariates else []

        z_cats = cats if y is None else [*cats, y]
        qz, z_untransformed = self.z_encoder(x_, *z_cats)  # (cells, n_latent)
        ql = None
        if self.use_observed_lib_size:
            library = torch.log(row_sums(x)).unsqueeze(-1)  # (cells, 1)
        else:
            ql, library = self.l_encoder(x_, *cats)  # library: (cells, 1), log scale

        if n_samples > 1:
            z_untransformed = qz.rsample((n_samples,))  # (n_samples, cells, n_latent)
            if ql is None:
                library = library.expand(n_samples, *library.shape)  # (n_samples, cells, 1)
            else:
                library = ql.rsample((n_samples,))
        z = self.z_encoder.transform(z_untransformed)
        out = {
            "z": z,
            "z_untransformed": z_untransformed,
            "qz": qz,
            "ql": ql,
            "library": library,
        }
        if y is not None:
            out["y"] = y
        return out

    def _encoder_input(
        self, x: torch.Tensor, x_t: torch.Tensor | None, cont_covs: torch.Tensor | None
    ) -> torch.Tensor | SparseRows:
        """``log(1 + x)`` (or ``x``), with the continuous covariates appended when encoded."""
        extra = cont_covs if (cont_covs is not None and self.encode_covariates) else None
        if x.layout == torch.sparse_csr:
            if x_t is None and torch.is_grad_enabled():
                x_t = x.t().to_sparse_csr()

            def f(v):
                return torch.log1p(v) if self.log_variational else v

            xt_ = None if x_t is None else csr_with_values(x_t, f(x_t.values()))
            return SparseRows(csr_with_values(x, f(x.values())), xt_, extra)
        x_ = torch.log1p(x) if self.log_variational else x  # (cells, genes)
        return x_ if extra is None else torch.cat([x_, extra], dim=-1)

    def _cats(self, batch_index: torch.Tensor, cat_covs: torch.Tensor | None) -> list:
        return covariate_codes(batch_index, cat_covs)

    # ------------------------------------------------------------------ generative
    def generative(
        self,
        z: torch.Tensor,
        library: torch.Tensor,
        batch_index: torch.Tensor,
        cont_covs: torch.Tensor | None = None,
        cat_covs: torch.Tensor | None = None,
        size_factor: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        transform_batch: int | None = None,
    ) -> dict[str, Distribution | None]:
        """Decode ``z`` ``(..., cells, n_latent)`` into the count distribution and the priors.

        Returns ``px`` (ZINB, NB or Poisson over ``(..., cells, genes)``, with the normalised
        expression in ``px.scale``), ``pz`` (standard Normal) and ``pl`` (the log-library prior,
        None when the library is observed). ``transform_batch`` decodes every cell as if it came
        from that batch.
        """
        if transform_batch is not None:
            batch_index = torch.full_like(batch_index, int(transform_batch))
        decoder_input = self._decoder_input(z, cont_covs)
        if self.use_size_factor_key:
            library = torch.log(size_factor)  # (cells, 1)
        # a float32 softmax can underflow to exactly 0, which would make log p(x > 0) = -inf;
        # a floor far below any real expected count keeps the likelihood finite
        scale, r_cell, rate, dropout = self.decoder(
            self.dispersion, decoder_input, library, *self._decoder_cats(batch_index, cat_covs, y),
            rate_floor=RATE_FLOOR,
        )
        theta = self._theta(batch_index, y, r_cell)
        px = count_distribution(self.gene_likelihood, mu=rate, theta=theta, zi_logits=dropout,
                                scale=scale)
        pz = StandardNormal(z)  # closed-form KL from the Normal posterior
        return {"px": px, "pz": pz, "pl": self._library_prior(batch_index)}

    def _theta(
        self, batch_index: torch.Tensor, y: torch.Tensor | None, r_cell: torch.Tensor | None
    ) -> torch.Tensor:
        """Return theta: ``(genes,)``, ``(cells, genes)`` or ``(..., cells, genes)``."""
        if self.dispersion == "gene-cell":
            log_theta = r_cell
        elif self.dispersion == "gene":
            log_theta = self.px_r
        elif self.dispersion == "gene-batch":
            onehot = one_hot(batch_index, self.n_batch).to(self.px_r)
            log_theta = nn.functional.linear(onehot, self.px_r)
        else:
            onehot = one_hot(y, self.n_labels).to(self.px_r)
            log_theta = nn.functional.linear(onehot, self.px_r)
        return log_theta.exp()

    def _library_prior(self, batch_index: torch.Tensor) -> Normal | None:
        """Return the per-batch log-normal prior of the library size (None when observed)."""
        if self.use_observed_lib_size:
            return None
        idx = batch_index.reshape(-1).long()
        means = self.library_log_means[idx].unsqueeze(-1)  # (cells, 1)
        var = self.library_log_vars[idx].unsqueeze(-1)
        return Normal(means, var.sqrt(), validate_args=False)

    def _decoder_cats(
        self, batch_index: torch.Tensor, cat_covs: torch.Tensor | None, y: torch.Tensor | None
    ) -> list:
        """Categorical inputs of the decoder: the batch, then the extra covariates."""
        return self._cats(batch_index, cat_covs)

    def _decoder_input(self, z: torch.Tensor, cont_covs: torch.Tensor | None) -> torch.Tensor:
        if cont_covs is None or self.n_continuous_cov == 0:
            return z
        if z.dim() != cont_covs.dim():
            cont_covs = cont_covs.expand(*z.shape[:-1], cont_covs.shape[-1])
        return torch.cat([z, cont_covs], dim=-1)  # (..., cells, latent + n_cont)

    def generative_scale(
        self,
        z: torch.Tensor,
        library: torch.Tensor | None,
        batch_index: torch.Tensor,
        cont_covs: torch.Tensor | None = None,
        cat_covs: torch.Tensor | None = None,
        size_factor: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        transform_batch: int | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return ``generative(...)["px"].scale`` alone, ``(..., cells, genes)``.

        Takes the arguments of :meth:`generative` and decodes only the normalised expression
        (not the rate, dispersion or zero-inflation): what ``get_normalized_expression`` needs.
        ``out``, when given, receives the result (no gradient flows through it).
        """
        if transform_batch is not None:
            batch_index = torch.full_like(batch_index, int(transform_batch))
        decoder_input = self._decoder_input(z, cont_covs)
        cats = self._decoder_cats(batch_index, cat_covs, y)
        return self.decoder.scale(decoder_input, *cats, out=out)

    # ------------------------------------------------------------------ loss
    def forward(
        self, tensors: Tensors, *, kl_weight: float = 1.0, transform_batch: int | None = None
    ) -> tuple[dict, dict, LossOutput]:
        """Run inference, generative and loss on a minibatch."""
        inference_outputs = self.inference(**self.inference_inputs(tensors))
        generative_outputs = self.generative(
            **self.generative_inputs(tensors, inference_outputs), transform_batch=transform_batch
        )
        loss = self.loss(tensors, inference_outputs, generative_outputs, kl_weight=kl_weight)
        return inference_outputs, generative_outputs, loss

    def inference_inputs(self, tensors: Tensors) -> dict:
        """Pick the inputs of :meth:`inference` from a minibatch."""
        out = {
            "x": tensors[keys.X],
            "batch_index": tensors[keys.BATCH],
            "cont_covs": tensors.get(keys.CONT_COVS),
            "cat_covs": tensors.get(keys.CAT_COVS),
        }
        if keys.X_T in tensors:  # sparse counts
            out["x_t"] = tensors[keys.X_T]
        return out

    def generative_inputs(self, tensors: Tensors, inference_outputs: dict) -> dict:
        """Pick the inputs of :meth:`generative` from a minibatch and the inference outputs."""
        return {
            "z": inference_outputs["z"],
            "library": inference_outputs["library"],
            "batch_index": tensors[keys.BATCH],
            "cont_covs": tensors.get(keys.CONT_COVS),
            "cat_covs": tensors.get(keys.CAT_COVS),
            "size_factor": tensors.get(keys.SIZE_FACTOR),
            "y": tensors.get(keys.LABELS),
        }

    def loss(
        self,
        tensors: Tensors,
        inference_outputs: dict,
        generative_outputs: dict,
        kl_weight: float = 1.0,
    ) -> LossOutput:
        """Negative ELBO of a minibatch, with the KL on ``z`` scaled by ``kl_weight``.

        ``reconstruction_loss`` is ``-log p(x | z, l)`` per cell; ``kl_local`` holds ``kl_z`` and,
        when the library is modelled, ``kl_l`` (which is not warmed up).
        """
        x = tensors[keys.X]
        reconstruction = -log_prob_rows(
            generative_outputs["px"], x, tensors.get(keys.INDICES_NONZERO)
        )  # (cells,)
        kl_z = kl_divergence(inference_outputs["qz"], generative_outputs["pz"]).sum(-1)
        kl_local = {"kl_z": kl_z}
        weighted = kl_weight * kl_z
        if generative_outputs["pl"] is not None:
            kl_l = kl_divergence(inference_outputs["ql"], generative_outputs["pl"]).sum(-1)
            kl_local["kl_l"] = kl_l
            weighted = weighted + kl_l
        loss = torch.mean(reconstruction + weighted)
        return LossOutput(loss=loss, reconstruction_loss=reconstruction, kl_local=kl_local)

    # ------------------------------------------------------------------ evaluation
    @torch.inference_mode()
    def marginal_ll(
        self, tensors: Tensors, n_mc_samples: int, n_mc_samples_per_pass: int = 100
    ) -> torch.Tensor:
        r"""Importance-sampling estimate of :math:`\log p(x)` per cell, shape ``(cells,)``.

        :math:`\log \frac1K \sum_k p(x \mid z_k, l_k) p(z_k) p(l_k) / q(z_k, l_k \mid x)` with
        :math:`(z_k, l_k) \sim q`. The estimate is a lower bound that tightens as ``K`` grows and is
        never below the ELBO in expectation.
        """
        chunks = []
        remaining = n_mc_samples
        while remaining > 0:
            k = min(n_mc_samples_per_pass, remaining)
            remaining -= k
            inf = self.inference(**self.inference_inputs(tensors), n_samples=k)
            log_px = self.log_likelihood_rows(tensors, inf)  # (k, cells)
            zu = inf["z_untransformed"]
            log_pz = StandardNormal(zu).log_prob(zu).sum(-1)
            log_w = log_px + log_pz - inf["qz"].log_prob(zu).sum(-1)
            if inf["ql"] is not None:
                lib = inf["library"]
                pl = self._library_prior(tensors[keys.BATCH])
                log_w = log_w + pl.log_prob(lib).sum(-1) - inf["ql"].log_prob(lib).sum(-1)
            chunks.append(log_w.reshape(k, -1))  # (k, cells)
        log_w = torch.cat(chunks, dim=0)  # (n_mc_samples, cells)
        return torch.logsumexp(log_w, dim=0) - math.log(n_mc_samples)

    @torch.inference_mode()
    def log_likelihood_rows(self, tensors: Tensors, inference_outputs: dict) -> torch.Tensor:
        r"""Return :math:`\log p(x \mid z, l)` per cell, ``(..., cells)``, without gradients.

        The values of ``log_prob_rows(generative(...)["px"], x)``. For the scVI decoder with a
        softmax and an NB or ZINB likelihood, the expected counts are made row by row from the
        decoder's logits (:func:`~cellvi.distributions.nb_log_prob_rows_softmax`) and never
        stored for all genes at once.
        """
        gen_inputs = self.generative_inputs(tensors, inference_outputs)
        x, nonzero = tensors[keys.X], tensors.get(keys.INDICES_NONZERO)
        decoder = self.decoder
        if not (isinstance(decoder, DecoderSCVI) and decoder.scale_activation == "softmax"
                and self.gene_likelihood in ("zinb", "nb") and self.dispersion != "gene-cell"):
            gen = self.generative(**gen_inputs)
            return log_prob_rows(gen["px"], x, nonzero)
        batch_index, y = gen_inputs["batch_index"], gen_inputs["y"]
        library = gen_inputs["library"]
        if self.use_size_factor_key:
            library = torch.log(gen_inputs["size_factor"])  # (cells, 1)
        cats = self._decoder_cats(batch_index, gen_inputs["cat_covs"], y)
        raw_scale, dropout = decoder.logits(
            self._decoder_input(gen_inputs["z"], gen_inputs["cont_covs"]), *cats)
        theta = self._theta(batch_index, y, None)
        zi = dropout if self.gene_likelihood == "zinb" else None
        return nb_log_prob_rows_softmax(x, raw_scale, library, RATE_FLOOR, theta, zi, nonzero)

    @torch.inference_mode()
    def sample(
        self, tensors: Tensors, n_samples: int = 1, library_size: float = 1,
        transform_batch: int | None = None,
    ) -> torch.Tensor:
        r"""Draw from the posterior predictive :math:`p(\hat x \mid x)`.

        Returns ``(cells, genes)`` for one sample, else ``(cells, genes, n_samples)``.
        ``library_size`` multiplies the expected counts; ``transform_batch`` decodes every cell
        as if from that batch.
        """
        inf = self.inference(**self.inference_inputs(tensors), n_samples=n_samples)
        gen = self.generative(**self.generative_inputs(tensors, inf),
                              transform_batch=transform_batch)
        px = gen["px"]
        if library_size != 1:
            px = _rescaled(px, library_size)
        counts = px.sample()  # (cells, genes) or (n_samples, cells, genes)
        return counts.permute(1, 2, 0) if n_samples > 1 else counts


def count_distribution(
    kind: str, *, mu: torch.Tensor, theta: torch.Tensor | None = None,
    zi_logits: torch.Tensor | None = None, scale: torch.Tensor | None = None,
) -> Distribution:
    """Return the count likelihood of the scVI family: ``"zinb"``, ``"nb"`` or ``"poisson"``.

    ``mu`` is the expected count, ``theta`` the inverse dispersion (NB, ZINB), ``zi_logits``
    the zero-inflation logits (ZINB) and ``scale`` the normalised expression kept on the
    distribution for the queries.
    """
    if kind == "zinb":
        return ZeroInflatedNegativeBinomial(mu=mu, theta=theta, zi_logits=zi_logits, scale=scale,
                                            validate_args=False)
    if kind == "nb":
        return NegativeBinomial(mu=mu, theta=theta, scale=scale, validate_args=False)
    if kind == "poisson":
        return Poisson(mu, scale=scale, validate_args=False)
    raise ValueError(f"Unknown count likelihood {kind!r}; use 'zinb', 'nb' or 'poisson'.")


def _rescaled(px: Distribution, factor: float) -> Distribution:
    if isinstance(px, ZeroInflatedNegativeBinomial):
        return count_distribution("zinb", mu=px.mu * factor, theta=px.theta,
                                  zi_logits=px.zi_logits, scale=px.scale)
    if isinstance(px, NegativeBinomial):
        return count_distribution("nb", mu=px.mu * factor, theta=px.theta, scale=px.scale)
    return count_distribution("poisson", mu=px.rate * factor, scale=px.scale)
