"""Plots of trained models and their results (matplotlib: the ``plot`` extra).

Every function returns its :class:`matplotlib.figure.Figure`; matplotlib is imported when a
plot is drawn, not with cellvi. :func:`training_curves` (a model's history),
:func:`latent` (the latent space in 2-D coloured by ``obs`` columns: UMAP with the ``umap``
extra, else a PCA computed by cellvi), :func:`embed` (the 2-D embedding written into
``obsm``), :func:`volcano` (a DE table), :func:`loadings` (LDVAE),
:func:`foreground_probability` (totalVI), :func:`imputed_vs_measured` (gimVI),
:func:`zero_inflation` (AutoZI), :func:`scores` (integration scores of several embeddings),
:func:`tuning_history` (a :mod:`cellvi.tune` study). Also available as ``cellvi.plot``.
"""

from ._de import volcano
from ._latent import embed, latent
from ._models import foreground_probability, imputed_vs_measured, loadings, scores, zero_inflation
from ._training import training_curves, tuning_history

__all__ = [
    "embed",
    "foreground_probability",
    "imputed_vs_measured",
    "latent",
    "loadings",
    "scores",
    "training_curves",
    "tuning_history",
    "volcano",
    "zero_inflation",
]
