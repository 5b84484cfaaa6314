"""SCVI: the user-facing single-cell variational inference model."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from anndata import AnnData

from cellvi.data._setup import DataSummary
from cellvi.module import VAE

from ._vaemodel import VAEModel


class SCVI(VAEModel):
    """Single-cell variational inference (Lopez et al., 2018).

    A deep generative model of raw counts that gives a batch-corrected latent space, denoised
    expression and likelihoods. Call :meth:`setup_anndata` first.

    Parameters
    ----------
    adata
        AnnData set up with :meth:`SCVI.setup_anndata`.
    n_hidden
        Width of the hidden layers.
    n_latent
        Dimension of the latent space.
    n_layers
        Hidden layers in the encoder and decoder.
    dropout_rate
        Dropout rate of the encoder.
    dispersion
        ``"gene"``, ``"gene-batch"``, ``"gene-label"`` or ``"gene-cell"``.
    gene_likelihood
        ``"zinb"``, ``"nb"`` or ``"poisson"``.
    latent_distribution
        ``"normal"`` or ``"ln"`` (logistic normal).
    **module_options
        Any other option of :class:`cellvi.module.VAE` (``use_observed_lib_size``,
        ``encode_covariates``, ``deeply_inject_covariates``, ``use_batch_norm``,
        ``use_layer_norm``, ``log_variational``, ``var_activation``).

    Examples
    --------
    >>> adata = cellvi.data.pbmc_ifnb()
    >>> cellvi.model.SCVI.setup_anndata(adata, batch_key="batch")
    >>> model = cellvi.model.SCVI(adata)
    >>> model.train()
    >>> adata.obsm["X_scvi"] = model.get_latent_representation()
    """

    def __init__(
        self,
        adata: AnnData,
        n_hidden: int = 128,
        n_latent: int = 10,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        dispersion: Literal["gene", "gene-batch", "gene-label", "gene-cell"] = "gene",
        gene_likelihood: Literal["zinb", "nb", "poisson"] = "zinb",
        latent_distribution: Literal["normal", "ln"] = "normal",
        **module_options: Any,
    ):
        super().__init__(
            adata,
            n_hidden=n_hidden,
            n_latent=n_latent,
            n_layers=n_layers,
            dropout_rate=dropout_rate,
            dispersion=dispersion,
            gene_likelihood=gene_likelihood,
            latent_distribution=latent_distribution,
            **module_options,
        )

    def _build_module(self, summary: DataSummary, **kwargs: Any) -> VAE:
        return VAE(**vae_arguments(summary), **kwargs)


def vae_arguments(summary: DataSummary) -> dict[str, Any]:
    """Return the constructor arguments of a VAE-like module that follow from the summary."""
    return dict(
        n_input=summary.n_vars,
        n_batch=summary.n_batch,
        n_labels=summary.n_labels,
        n_continuous_cov=len(summary.continuous_covariate_keys),
        n_cats_per_cov=summary.n_cats_per_cov,
        use_size_factor_key=summary.size_factor_key is not None,
        library_log_means=np.asarray(summary.library_log_means, dtype=np.float32),
        library_log_vars=np.asarray(summary.library_log_vars, dtype=np.float32),
    )
