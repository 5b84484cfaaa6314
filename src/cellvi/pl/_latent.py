"""The latent space in two dimensions, coloured by ``obs`` columns."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from ._utils import finite, grid, is_categorical, palette

__all__ = ["embed", "latent"]

Method = Literal["auto", "umap", "pca", "tsne"]


def _method(method: str) -> str:
    if method not in ("auto", "umap", "pca", "tsne"):
        raise ValueError(f"method must be 'auto', 'umap', 'pca' or 'tsne', got {method!r}.")
    if method == "auto":
        return "umap" if importlib.util.find_spec("umap") is not None else "pca"
    return method


def embed_array(X: np.ndarray, method: Method = "auto", *, seed: int = 0,
                n_neighbors: int = 15) -> tuple[np.ndarray, str]:
    """Return a 2-D embedding of ``X`` and the method used."""
    from cellvi.metrics import pca

    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] < 3:
        raise ValueError(f"Embedding needs a (cells >= 3, dims) matrix, got shape {X.shape}.")
    method = _method(method)
    if X.shape[1] == 2:
        return X.copy(), "given"
    if method == "pca":
        return pca(X, 2, seed=seed), "pca"
    if method == "umap":
        try:
            import umap
        except ImportError:
            raise ImportError("method='umap' needs umap-learn: pip install 'cellvi[umap]' "
                              "(or use method='pca').") from None
        reducer = umap.UMAP(n_components=2, n_neighbors=min(n_neighbors, X.shape[0] - 1),
                            random_state=seed)
        return np.asarray(reducer.fit_transform(X), dtype=np.float64), "umap"
    try:
        from sklearn.manifold import TSNE
    except ImportError:
        raise ImportError("method='tsne' needs scikit-learn (pip install scikit-learn), or use "
                          "method='pca'.") from None
    perplexity = float(min(30.0, (X.shape[0] - 1) / 3))
    return TSNE(2, perplexity=perplexity, random_state=seed, init="pca").fit_transform(X), "tsne"


def embed(adata: AnnData, *, use_rep: str = "X_scvi", method: Method = "auto", seed: int = 0,
          n_neighbors: int = 15, key_added: str | None = None,
          copy: bool = False) -> AnnData | None:
    """Compute a 2-D embedding of ``adata.obsm[use_rep]`` (UMAP, PCA or t-SNE).

    ``method="auto"`` is UMAP when umap-learn is installed (the ``umap`` extra), else the
    first two principal components (:func:`cellvi.metrics.pca`, no extra dependency);
    ``"tsne"`` needs scikit-learn. Seeded.

    Writes ``adata.obsm[key_added]`` (default ``"X_<method>"``, e.g. ``"X_umap"``), a
    ``(cells, 2)`` array; with ``copy=True`` a copy is written and returned.
    """
    if use_rep not in adata.obsm:
        raise KeyError(f"use_rep {use_rep!r} is not in adata.obsm (keys: {list(adata.obsm)}); "
                       "store the latent there first: adata.obsm['X_scvi'] = "
                       "model.get_latent_representation().")
    coords, used = embed_array(np.asarray(adata.obsm[use_rep]), method, seed=seed,
                               n_neighbors=n_neighbors)
    if copy:
        adata = adata.copy()
    adata.obsm[key_added or f"X_{used if used != 'given' else 'embedding'}"] = coords
    return adata if copy else None


def latent(data, *, color: str | Sequence[str] | None = None, use_rep: str = "X_scvi",
           method: Method = "auto", seed: int = 0, point_size: float | None = None,
           ncols: int = 3, figsize=None, title: str | None = None):
    """Plot the latent space in two dimensions, one panel per ``obs`` column in ``color``.

    A categorical column gets a colour per category and a legend; a numeric one a colour
    scale. Cells are drawn in a seeded random order, so that no category hides another.

    Parameters
    ----------
    data
        An AnnData with the latent in ``obsm[use_rep]`` (a 2-D ``obsm`` entry such as
        ``"X_umap"`` is drawn as it is), or a trained model (its latent representation and
        its AnnData's ``obs``).
    color
        ``obs`` column(s) to colour by (default: the batch, or one grey panel).
    use_rep
        The ``obsm`` key of the latent (for an AnnData).
    method
        ``"auto"`` (UMAP when umap-learn is installed, else PCA), ``"umap"``, ``"pca"``,
        ``"tsne"`` (see :func:`embed`). Nothing is written into the AnnData.
    seed
        Seed of the embedding and of the drawing order.
    point_size
        Marker size (default from the number of cells).
    ncols
        Panels per row.
    figsize
        Size of the figure (default: 4.2 x 3.6 inches a panel).
    title
        Title above the panels.

    Returns
    -------
    matplotlib.figure.Figure
    """
    if isinstance(data, AnnData):
        if use_rep not in data.obsm:
            raise KeyError(f"use_rep {use_rep!r} is not in adata.obsm (keys: "
                           f"{list(data.obsm)}).")
        X, obs = np.asarray(data.obsm[use_rep]), data.obs
    elif hasattr(data, "get_latent_representation") and hasattr(data, "adata"):
        X, obs = np.asarray(data.get_latent_representation()), data.adata.obs
    else:
        raise TypeError("latent() needs an AnnData or a trained model.")
    if color is None:
        batch = getattr(getattr(data, "summary", None), "batch_key", None)
        color = [batch] if batch else []
    elif isinstance(color, str):
        color = [color]
    missing = [c for c in color if c not in obs]
    if missing:
        raise KeyError(f"color {missing} not in obs (columns: {list(obs.columns)}).")
    coords, used = embed_array(X, method, seed=seed)
    axis = {"umap": "UMAP", "pca": "PC", "tsne": "t-SNE", "given": use_rep}[used]
    n = coords.shape[0]
    order = np.random.default_rng(seed).permutation(n)
    size = point_size if point_size is not None else float(np.clip(12000 / n, 1.5, 30))
    panels = list(color) or [None]
    fig, axes = grid(len(panels), ncols=ncols, panel=(4.2, 3.6), figsize=figsize)
    for ax, key in zip(axes, panels):
        xy = coords[order]
        if key is None:
            ax.scatter(xy[:, 0], xy[:, 1], s=size, color="0.5", linewidths=0)
        elif is_categorical(obs[key]):
            cat = pd.Categorical(obs[key].to_numpy())
            cols = palette(len(cat.categories))
            codes = cat.codes[order]
            colours = np.array([cols[c] if c >= 0 else (0.8, 0.8, 0.8, 1.0) for c in codes])
            ax.scatter(xy[:, 0], xy[:, 1], s=size, c=colours, linewidths=0)
            handles = [ax.scatter([], [], s=30, color=cols[i], label=str(c))
                       for i, c in enumerate(cat.categories)]
            ax.legend(handles=handles, frameon=False, fontsize=8, loc="center left",
                      bbox_to_anchor=(1.0, 0.5), markerscale=1.0, handletextpad=0.2)
        else:
            values = finite(obs[key].to_numpy())[order]
            sc = ax.scatter(xy[:, 0], xy[:, 1], s=size, c=values, cmap="viridis",
                            linewidths=0)
            fig.colorbar(sc, ax=ax, fraction=0.05, pad=0.02)
        ax.set_title(key if key is not None else "latent space", fontsize=10)
        ax.set_xlabel(f"{axis} 1" if used != "given" else "dim 1", fontsize=8)
        ax.set_ylabel(f"{axis} 2" if used != "given" else "dim 2", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
