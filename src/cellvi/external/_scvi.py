"""A one-call scVI for scanpy users, in the manner of ``scanpy.external.pp.scvi``."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from cellvi.data._setup import check_counts, get_counts

_OWN_TRAIN_ARGS = {
    "max_epochs": "n_epochs",
    "lr": "lr",
    "train_size": "train_size",
    "device": "use_cuda",
}

HVG_HELP = (
    "use_highly_variable_genes=True needs a boolean adata.var['highly_variable'] column. "
    "Compute it from the raw counts first, e.g. with "
    "`scanpy.pp.highly_variable_genes(adata, flavor='seurat_v3', n_top_genes=2000)` or "
    "`adata.var['highly_variable'] = cellvi.data.highly_variable_genes(adata, "
    "n_top_genes=2000)`, or pass use_highly_variable_genes=False (all genes) or subset_genes."
)


def scvi(
    adata: AnnData,
    n_hidden: int = 128,
    n_latent: int = 10,
    n_layers: int = 1,
    dispersion: str = "gene",
    n_epochs: int = 400,
    lr: float = 1e-3,
    train_size: float = 1.0,
    batch_key: str | None = None,
    use_highly_variable_genes: bool = True,
    subset_genes: Sequence[str | int] | None = None,
    linear_decoder: bool = False,
    copy: bool = False,
    use_cuda: bool = True,
    return_posterior: bool = True,
    trainer_kwargs: dict[str, Any] | None = None,
    model_kwargs: dict[str, Any] | None = None,
):
    """Fit scVI (or LDVAE) to the raw counts of an AnnData and store its outputs in it.

    Parameters
    ----------
    adata
        Cells x genes AnnData whose ``X`` holds raw (unnormalised) counts.
    n_hidden
        Width of the hidden layers.
    n_latent
        Dimension of the latent space.
    n_layers
        Hidden layers of the encoder (and of the decoder, for scVI).
    dispersion
        ``"gene"``, ``"gene-batch"``, ``"gene-label"`` or ``"gene-cell"`` (not with the linear
        decoder).
    n_epochs
        Training epochs.
    lr
        Learning rate.
    train_size
        Fraction of the cells used for training (the rest are validation cells).
    batch_key
        ``adata.obs`` column of the batches to correct for; None: no batch correction.
    use_highly_variable_genes
        Use only the genes where ``adata.var["highly_variable"]`` is True.
    subset_genes
        Gene names or integer positions to use; takes priority over
        ``use_highly_variable_genes``.
    linear_decoder
        Fit :class:`~cellvi.model.LinearSCVI` (LDVAE, Svensson et al. 2020) instead of
        :class:`~cellvi.model.SCVI`, and store its loadings.
    copy
        Work on a copy of ``adata`` and return it.
    use_cuda
        Train on the GPU; without one, fall back to the CPU with a warning.
    return_posterior
        Return the trained model.
    trainer_kwargs
        Extra arguments of the model's ``train`` (``batch_size``, ``early_stopping``, ``seed``,
        ``progress_bar``, ...); None means ``{}``.
    model_kwargs
        Extra arguments of the model (``gene_likelihood``, ``dropout_rate``, ...); None means
        ``{}``.

    Returns
    -------
    The AnnData if ``copy``, the trained model if ``return_posterior``, the tuple
    ``(adata, model)`` if both, else None. The AnnData (``adata`` itself unless ``copy``) gets:

    * ``obsm["X_scvi"]``: the latent representation (posterior means), ``(cells, n_latent)``;
    * ``obsm["X_scvi_denoised"]``: the normalised mean expression of the used genes (the
      decoder's scale, each row summing to 1), ``(cells, genes used)``;
    * ``obsm["X_scvi_sample_rate"]``: the mean of the negative binomial at each cell's library
      size (``library * scale``, before any zero inflation), ``(cells, genes used)``;
    * with ``linear_decoder``, ``uns["ldvae_loadings"]``: a genes-used x latent DataFrame of
      loadings (columns ``"Z_0"``...).

    Nothing else in the AnnData is changed: the genes are subset on a private copy. When some
    cells have no counts in the selected genes, the library size is modelled rather than observed
    (with a warning), unless ``model_kwargs`` says otherwise.

    Raises
    ------
    KeyError
        ``use_highly_variable_genes`` without ``var["highly_variable"]``, or an unknown
        ``batch_key``.
    ValueError
        Unknown ``subset_genes``, no gene selected, or ``X`` not holding counts.
    """
    from cellvi.model import SCVI, LinearSCVI

    trainer_kwargs = dict(trainer_kwargs or {})
    model_kwargs = dict(model_kwargs or {})
    for key, own in _OWN_TRAIN_ARGS.items():
        if key in trainer_kwargs:
            raise TypeError(
                f"Pass {key!r} through scvi's own {own!r} argument, not trainer_kwargs."
            )
    if batch_key is not None and batch_key not in adata.obs:
        raise KeyError(f"batch_key {batch_key!r} is not a column of adata.obs.")

    genes = _select_genes(adata, use_highly_variable_genes, subset_genes)
    device = "cpu"
    if use_cuda:
        if torch.cuda.is_available():
            device = "cuda"
        else:
            warnings.warn(
                "use_cuda=True but no CUDA GPU is available; training on the CPU.",
                UserWarning,
                stacklevel=2,
            )

    # a private AnnData with only what the model reads: the user's is never set up or subset
    counts = get_counts(adata, None)[:, genes]
    check_counts(counts, where="adata.X")
    obs = pd.DataFrame(index=adata.obs_names.copy())
    if batch_key is not None:
        obs[batch_key] = adata.obs[batch_key].to_numpy()
    work = AnnData(X=counts, obs=obs, var=pd.DataFrame(index=adata.var_names[genes].copy()))
    n_empty = int((np.asarray(counts.sum(axis=1)).reshape(-1) == 0).sum())
    observed_by_default = not linear_decoder  # LinearSCVI models the library by default
    if n_empty and observed_by_default and "use_observed_lib_size" not in model_kwargs:
        warnings.warn(
            f"{n_empty} cell(s) have no counts in the selected genes; modelling the library size "
            "(use_observed_lib_size=False) so that they can be kept.",
            UserWarning,
            stacklevel=2,
        )
        model_kwargs["use_observed_lib_size"] = False

    cls = LinearSCVI if linear_decoder else SCVI
    cls.setup_anndata(work, batch_key=batch_key)
    model = cls(
        work,
        n_hidden=n_hidden,
        n_latent=n_latent,
        n_layers=n_layers,
        dispersion=dispersion,
        **model_kwargs,
    )
    model.train(max_epochs=n_epochs, lr=lr, train_size=train_size, device=device, **trainer_kwargs)

    if copy:
        adata = adata.copy()
    adata.obsm["X_scvi"] = model.get_latent_representation()
    adata.obsm["X_scvi_denoised"] = model.get_normalized_expression(return_numpy=True)
    # the negative binomial's mean l * rho (before any zero inflation), as in scVI's imputation
    adata.obsm["X_scvi_sample_rate"] = model.get_likelihood_parameters()["mean"]
    if linear_decoder:
        adata.uns["ldvae_loadings"] = model.get_loadings()

    if copy and return_posterior:
        return adata, model
    if copy:
        return adata
    if return_posterior:
        return model
    return None


def _select_genes(adata: AnnData, use_hvg: bool, subset_genes) -> np.ndarray:
    """Integer positions of the genes to use."""
    n = adata.n_vars
    if subset_genes is not None:
        items = list(subset_genes)
        if not items:
            raise ValueError("subset_genes is empty.")
        if all(isinstance(g, int | np.integer) and not isinstance(g, bool) for g in items):
            pos = np.asarray(items, dtype=np.int64)
            if pos.min() < -n or pos.max() >= n:
                raise ValueError(f"subset_genes positions must be in [0, {n}).")
            return pos % n
        names = [str(g) for g in items]
        lookup = pd.Index(adata.var_names).get_indexer(names)
        missing = [g for g, i in zip(names, lookup) if i < 0]
        if missing:
            raise ValueError(
                f"{len(missing)} of subset_genes are not in adata.var_names (e.g. {missing[:5]})."
            )
        return lookup.astype(np.int64)
    if not use_hvg:
        return np.arange(n)
    if "highly_variable" not in adata.var:
        raise KeyError(HVG_HELP)
    mask = adata.var["highly_variable"].to_numpy()
    if mask.dtype != bool:
        raise ValueError(f"adata.var['highly_variable'] must be boolean. {HVG_HELP}")
    if not mask.any():
        raise ValueError(f"No gene is marked highly variable. {HVG_HELP}")
    return np.flatnonzero(mask)
