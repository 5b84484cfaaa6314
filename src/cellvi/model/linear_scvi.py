"""LinearSCVI: scVI with a linear decoder, for interpretable gene loadings (Svensson et al.)."""

from __future__ import annotations

from typing import Any, Literal

import pandas as pd
from anndata import AnnData

from cellvi.data._setup import DataSummary
from cellvi.module.ldvae import LDVAE

from ._vaemodel import VAEModel
from .scvi import vae_arguments


class LinearSCVI(VAEModel):
    """Linearly decoded scVI (LDVAE; Svensson et al., Bioinformatics 2020).

    A neural encoder with a linear decoder: each latent dimension acts on the genes' log
    expression through a column of loadings (:meth:`get_loadings`), like a factor model for counts.
    All the queries of :class:`~cellvi.model.SCVI` are available. Call :meth:`setup_anndata`
    first.

    Parameters
    ----------
    adata
        AnnData set up with :meth:`LinearSCVI.setup_anndata`.
    n_hidden
        Width of the encoder's hidden layers.
    n_latent
        Dimension of the latent space (number of factors).
    n_layers
        Hidden layers of the encoder.
    dropout_rate
        Dropout rate of the encoder.
    dispersion
        ``"gene"``, ``"gene-batch"`` or ``"gene-label"``.
    gene_likelihood
        ``"nb"``, ``"zinb"`` or ``"poisson"``.
    latent_distribution
        ``"normal"`` or ``"ln"``.
    **module_options
        Other options of :class:`cellvi.module.LDVAE` (``use_batch_norm`` of the decoder,
        ``bias``, ``use_observed_lib_size`` (default False: the library size is modelled),
        ``log_variational``...).

    Examples
    --------
    >>> cellvi.model.LinearSCVI.setup_anndata(adata, batch_key="batch")
    >>> model = cellvi.model.LinearSCVI(adata, n_latent=10)
    >>> model.train()
    >>> loadings = model.get_loadings()  # genes x latent DataFrame
    """

    def __init__(
        self,
        adata: AnnData,
        n_hidden: int = 128,
        n_latent: int = 10,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        dispersion: Literal["gene", "gene-batch", "gene-label"] = "gene",
        gene_likelihood: Literal["zinb", "nb", "poisson"] = "nb",
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

    def _build_module(self, summary: DataSummary, **kwargs: Any) -> LDVAE:
        kwargs = dict(kwargs)
        n_layers = kwargs.pop("n_layers", 1)
        return LDVAE(**vae_arguments(summary), n_layers_encoder=n_layers, **kwargs)

    def get_loadings(self) -> pd.DataFrame:
        """Return the linear decoder's loadings, a genes x latent DataFrame.

        Columns are ``"Z_0"``, ``"Z_1"``...; the decoder's batch normalisation is folded in
        (see :meth:`cellvi.module.LDVAE.get_loadings`).
        """
        w = self.module.get_loadings().cpu().numpy()
        cols = [f"Z_{i}" for i in range(w.shape[1])]
        return pd.DataFrame(w, index=list(self.summary.var_names), columns=cols)
