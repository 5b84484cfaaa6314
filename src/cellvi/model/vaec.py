"""VAECModel: the user-facing model of :class:`cellvi.module.VAEC` (the conditional M2 VAE).

Named ``VAECModel`` (not ``VAEC``) so that it is not confused with the PyTorch module
:class:`cellvi.module.VAEC` it wraps. Labels use the same codes as :class:`SCANVI` (classes
first, the unlabeled category last and never a class).
"""

from __future__ import annotations

from anndata import AnnData

from cellvi.module import VAEC

from .scanvi import SemiSupervisedModel, setup_semisupervised


class VAECModel(SemiSupervisedModel):
    """Semi-supervised label-conditional VAE (the "M2" model of Kingma et al., 2014).

    The encoder ``q(z | x, y)`` sees the label, the decoder ``p(x | z, s, y)`` the batch and the
    label, and a classifier ``q(y | x)`` on the counts labels the unlabelled cells. Call
    :meth:`setup_anndata` first.

    Parameters
    ----------
    adata
        AnnData set up with :meth:`VAECModel.setup_anndata`.
    n_hidden
        Width of the hidden layers.
    n_latent
        Dimension of the latent space.
    n_layers
        Hidden layers of the encoder, decoder and classifier.
    dropout_rate
        Dropout rate of the encoder and classifier.
    dispersion
        ``"gene"``, ``"gene-batch"``, ``"gene-label"`` or ``"gene-cell"``.
    gene_likelihood
        ``"zinb"``, ``"nb"`` or ``"poisson"``.
    **module_options
        Other options of the module, :class:`cellvi.module.VAECConfig` (``y_prior``,
        ``classifier_parameters``, ``use_observed_lib_size``, ``encode_covariates``, ...).

    Notes
    -----
    The latent representation and the normalised expression of an unlabelled cell are computed
    with its most likely class under ``q(y | x)``. Default ``max_epochs`` of :meth:`train`:
    ``min(round(20000 / n_cells * 400), 400)``.

    Examples
    --------
    >>> VAECModel.setup_anndata(adata, labels_key="cell_type", unlabeled_category="Unknown")
    >>> model = VAECModel(adata).train()
    >>> adata.obs["predicted"] = model.predict()
    """

    _module_cls = VAEC

    def _classify_covariates(self, batch: dict) -> dict:
        return {}

    @classmethod
    def setup_anndata(
        cls,
        adata: AnnData,
        labels_key: str,
        unlabeled_category: str | int | None = None,
        *,
        layer: str | None = None,
        batch_key: str | None = None,
        size_factor_key: str | None = None,
        categorical_covariate_keys: list[str] | None = None,
        continuous_covariate_keys: list[str] | None = None,
    ) -> None:
        """Check an AnnData of raw counts and record its fields, labels included.

        Parameters
        ----------
        adata
            Cells x genes AnnData of raw counts.
        labels_key
            ``obs`` column of the cell labels.
        unlabeled_category
            The value of that column that marks unlabelled cells; None: every cell is labelled.
            The same rules as :meth:`cellvi.model.SCANVI.setup_anndata` apply.
        layer, batch_key, size_factor_key, categorical_covariate_keys, \
continuous_covariate_keys
            As in :meth:`cellvi.model.SCVI.setup_anndata`.
        """
        setup_semisupervised(
            adata,
            labels_key,
            unlabeled_category,
            layer=layer,
            batch_key=batch_key,
            size_factor_key=size_factor_key,
            categorical_covariate_keys=categorical_covariate_keys,
            continuous_covariate_keys=continuous_covariate_keys,
            model_name=cls.__name__,
        )
