"""SCVI: the user-facing single-cell variational inference model."""

from __future__ import annotations

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
        Any other option of the module, :class:`cellvi.module.VAEConfig`
        (``use_observed_lib_size``, ``encode_covariates``, ``deeply_inject_covariates``,
        ``use_batch_norm``, ``use_layer_norm``, ``log_variational``, ``var_activation``); the
        defaults are the module's. The options that follow from the data (genes, batches,
        covariates, library prior) are set from the set-up.

    Examples
    --------
    >>> adata = cellvi.data.pbmc_ifnb()
    >>> cellvi.model.SCVI.setup_anndata(adata, batch_key="batch")
    >>> model = cellvi.model.SCVI(adata)
    >>> model.train()
    >>> adata.obsm["X_scvi"] = model.get_latent_representation()
    """

    _module_cls = VAE
