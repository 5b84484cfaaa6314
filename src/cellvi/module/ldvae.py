r"""LDVAE: the linearly decoded variational autoencoder (Svensson et al., Bioinformatics 2020).

The generative model is scVI's with a linear decoder: for cell :math:`n` in batch :math:`s_n`,

.. math::

    \rho_n = \mathrm{softmax}\big(\mathrm{BN}(W z_n + W_s \mathbf 1_{s_n} (+ b))\big), \qquad
    x_{ng} \sim \mathrm{NB}(\ell_n \rho_{ng}, \theta_g),

so the ``(genes, latent)`` matrix :math:`W` (with the batch normalisation's per-gene scale folded
in) reads as factor loadings, as in a factor analysis. The encoder is still a neural network.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from cellvi.nn import LinearDecoderSCVI

from . import _ldvae_step
from .vae import VAE, VAEConfig


@dataclass(frozen=True, kw_only=True)
class LDVAEConfig(VAEConfig):
    """Options of :class:`LDVAE`: those of :class:`~cellvi.module.VAEConfig`, other defaults.

    ``n_layers`` and ``n_hidden`` shape the encoder only (the seeds' ``n_layers_encoder`` is
    accepted for ``n_layers``); ``use_batch_norm`` is ``"both"`` (batch normalisation of the
    decoder's linear output, folded into the loadings) or ``"encoder"`` (``True``/``False`` are
    accepted for those two). ``dispersion="gene-cell"`` is not available: the linear decoder has
    no dispersion head. The library size is modelled by default (``use_observed_lib_size=False``,
    which needs ``library_log_means`` and ``library_log_vars``).

    Attributes
    ----------
    bias
        Whether the linear decoder has a bias.
    """

    gene_likelihood: Literal["zinb", "nb", "poisson"] = "nb"
    use_observed_lib_size: bool = False
    bias: bool = False

    def __post_init__(self):
        if self.dispersion == "gene-cell":
            raise ValueError(
                "LDVAE does not support dispersion='gene-cell' (the linear decoder has no "
                "dispersion head); use 'gene', 'gene-batch' or 'gene-label'."
            )
        super().__post_init__()


class LDVAE(VAE):
    """Linearly decoded VAE: interpretable per-gene loadings on each latent dimension.

    Options: :class:`LDVAEConfig`. On the CPU it trains through the written-out step of
    :mod:`cellvi.module._ldvae_step` for the options that step supports
    (:meth:`fused_training_step`).
    """

    Config = LDVAEConfig

    @classmethod
    def make_config(cls, *args: Any, **options: Any) -> LDVAEConfig:
        """Build the options, accepting the seeds' ``n_layers_encoder`` and a boolean batch norm."""
        if "n_layers_encoder" in options:
            if "n_layers" in options:
                raise TypeError("Pass n_layers or n_layers_encoder (the same option), not both.")
            options["n_layers"] = options.pop("n_layers_encoder")
        if isinstance(options.get("use_batch_norm"), bool):
            options["use_batch_norm"] = "both" if options["use_batch_norm"] else "encoder"
        return super().make_config(*args, **options)

    def fused_training_step(self, *, device: torch.device | str, sparse: bool):
        """Return the written-out training step for this module, or None, and why not.

        Returns ``(step, reason)``: ``step(module, tensors, kl_weight) -> LossOutput`` sets
        every parameter's gradient (:func:`cellvi.module._ldvae_step.training_step`) when the
        module computes what :class:`LDVAE` computes (no method of
        :data:`~cellvi.module._ldvae_step.WRITES_OUT` overridden) with options the step
        supports; else ``(None, reason)``.
        """
        overridden = [name for name in _ldvae_step.WRITES_OUT
                      if getattr(type(self), name) is not getattr(LDVAE, name)]
        if overridden:
            return None, f"{type(self).__name__} overrides {', '.join(overridden)}"
        reason = _ldvae_step.unsupported(self, device=device, sparse=sparse)
        return (None, reason) if reason else (_ldvae_step.training_step, "")

    @property
    def use_decoder_batch_norm(self) -> bool:
        """Whether the decoder's linear output is batch-normalised."""
        return self.config.use_batch_norm in ("decoder", "both")

    @property
    def bias(self) -> bool:
        """Whether the linear decoder has a bias."""
        return self.config.bias

    def _make_decoder(self, n_in: int, n_out: int, **kwargs: Any) -> nn.Module:
        return LinearDecoderSCVI(
            n_in,
            n_out,
            n_cat_list=kwargs.get("n_cat_list"),
            use_batch_norm=kwargs.get("use_batch_norm", False),
            use_layer_norm=kwargs.get("use_layer_norm", False),
            bias=self.config.bias,
        )

    @torch.inference_mode()
    def get_loadings(self) -> torch.Tensor:
        """Return the ``(genes, n_latent)`` loadings of the linear decoder.

        The decoder's batch normalisation is folded in (each gene's row is multiplied by the
        batch norm's ``weight / sqrt(running_var + eps)``), so the loadings are the change in the
        gene's log expression (before the softmax) per unit of each latent dimension. Columns of
        continuous covariates, if any, are left out.
        """
        return self.decoder.loadings()[:, : self.n_latent].clone()
