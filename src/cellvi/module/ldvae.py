r"""LDVAE: the linearly decoded variational autoencoder (Svensson et al., Bioinformatics 2020).

The generative model is scVI's with a linear decoder: for cell :math:`n` in batch :math:`s_n`,

.. math::

    \rho_n = \mathrm{softmax}\big(\mathrm{BN}(W z_n + W_s \mathbf 1_{s_n} (+ b))\big), \qquad
    x_{ng} \sim \mathrm{NB}(\ell_n \rho_{ng}, \theta_g),

so the ``(genes, latent)`` matrix :math:`W` (with the batch normalisation's per-gene scale folded
in) reads as factor loadings, as in a factor analysis. The encoder is still a neural network.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from cellvi.nn import LinearDecoderSCVI

from .vae import VAE


class LDVAE(VAE):
    """Linearly decoded VAE: interpretable per-gene loadings on each latent dimension.

    Parameters
    ----------
    n_input
        Number of genes.
    n_batch
        Number of batches (0: no batch correction).
    n_labels
        Number of labels.
    n_hidden
        Width of the encoder's hidden layers.
    n_latent
        Dimension of the latent space.
    n_layers_encoder
        Hidden layers of the encoders.
    dropout_rate
        Dropout rate of the encoders.
    dispersion
        ``"gene"``, ``"gene-batch"``, ``"gene-label"`` or ``"gene-cell"`` (the latter is not
        supported by the linear decoder).
    log_variational
        Encode ``log(1 + x)``.
    gene_likelihood
        ``"nb"`` (default), ``"zinb"`` or ``"poisson"``.
    use_batch_norm
        Batch normalisation of the decoder's linear output (the encoders always use it).
    bias
        Whether the linear decoder has a bias.
    latent_distribution
        ``"normal"`` or ``"ln"``.
    **vae_kwargs
        Other options of :class:`~cellvi.module.VAE`. The library size is modelled by default
        (``use_observed_lib_size=False``), which needs ``library_log_means`` and
        ``library_log_vars``.
    """

    def __init__(
        self,
        n_input: int,
        n_batch: int = 0,
        n_labels: int = 0,
        n_hidden: int = 128,
        n_latent: int = 10,
        n_layers_encoder: int = 1,
        dropout_rate: float = 0.1,
        dispersion: Literal["gene", "gene-batch", "gene-label", "gene-cell"] = "gene",
        log_variational: bool = True,
        gene_likelihood: Literal["zinb", "nb", "poisson"] = "nb",
        use_batch_norm: bool = True,
        bias: bool = False,
        latent_distribution: Literal["normal", "ln"] = "normal",
        **vae_kwargs: Any,
    ):
        if dispersion == "gene-cell":
            raise ValueError(
                "LDVAE does not support dispersion='gene-cell' (the linear decoder has no "
                "dispersion head); use 'gene', 'gene-batch' or 'gene-label'."
            )
        for key in ("n_layers", "use_batch_norm"):
            if key in vae_kwargs:
                raise TypeError(
                    f"LDVAE sets {key} itself; use n_layers_encoder / use_batch_norm instead."
                )
        vae_kwargs.setdefault("use_observed_lib_size", False)
        # read by _make_decoder, which VAE.__init__ calls before nn.Module attributes exist
        object.__setattr__(self, "_decoder_bias", bool(bias))
        super().__init__(
            n_input,
            n_batch=n_batch,
            n_labels=n_labels,
            n_hidden=n_hidden,
            n_latent=n_latent,
            n_layers=n_layers_encoder,
            dropout_rate=dropout_rate,
            dispersion=dispersion,
            log_variational=log_variational,
            gene_likelihood=gene_likelihood,
            latent_distribution=latent_distribution,
            use_batch_norm="both" if use_batch_norm else "encoder",
            **vae_kwargs,
        )
        self.use_decoder_batch_norm = bool(use_batch_norm)
        self.bias = bool(bias)

    def _make_decoder(self, n_in: int, n_out: int, **kwargs: Any) -> nn.Module:
        return LinearDecoderSCVI(
            n_in,
            n_out,
            n_cat_list=kwargs.get("n_cat_list"),
            use_batch_norm=kwargs.get("use_batch_norm", False),
            use_layer_norm=kwargs.get("use_layer_norm", False),
            bias=self._decoder_bias,
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
