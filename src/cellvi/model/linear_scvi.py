"""LinearSCVI: scVI with a linear decoder, for interpretable gene loadings (Svensson et al.)."""

from __future__ import annotations

import pandas as pd

from cellvi.module.ldvae import LDVAE

from ._vaemodel import VAEModel


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
        Other options of the module, :class:`cellvi.module.LDVAEConfig` (``use_batch_norm``,
        ``bias``, ``use_observed_lib_size`` (default False: the library size is modelled),
        ``log_variational``...).

    Examples
    --------
    >>> cellvi.model.LinearSCVI.setup_anndata(adata, batch_key="batch")
    >>> model = cellvi.model.LinearSCVI(adata, n_latent=10)
    >>> model.train()
    >>> loadings = model.get_loadings()  # genes x latent DataFrame
    """

    _module_cls = LDVAE

    @property
    def n_latent(self) -> int:
        """Dimension of the latent space (the number of factors)."""
        return self.module.n_latent

    def get_loadings(self) -> pd.DataFrame:
        """Return the linear decoder's loadings, a genes x latent DataFrame.

        Columns are ``"Z_0"``, ``"Z_1"``...; the decoder's batch normalisation is folded in
        (see :meth:`cellvi.module.LDVAE.get_loadings`).
        """
        w = self.module.get_loadings().cpu().numpy()
        cols = [f"Z_{i}" for i in range(w.shape[1])]
        return pd.DataFrame(w, index=list(self.summary.var_names), columns=cols)
