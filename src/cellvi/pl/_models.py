"""Plots of one model's own quantities, and of metric tables.

LDVAE loadings, totalVI foreground probabilities, gimVI imputation against measurements,
AutoZI zero-inflation probabilities, integration scores of several embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._utils import check_frame_columns, grid, palette, pyplot

__all__ = ["foreground_probability", "imputed_vs_measured", "loadings", "scores",
           "zero_inflation"]


def loadings(model, *, n_genes: int = 5, factors: Sequence[str] | None = None,
             cmap: str = "RdBu_r", figsize=None):
    r"""Plot a heatmap of LDVAE loadings: the top genes of each factor.

    For each factor (latent dimension), the ``n_genes`` genes with the largest absolute
    loading; the heatmap shows those genes (rows, grouped by factor) against every factor
    (columns), on a colour scale symmetric around 0. A loading :math:`w_{gk}` is the change in
    gene :math:`g`'s log expression per unit of factor :math:`k`.

    Parameters
    ----------
    model
        A trained :class:`~cellvi.model.LinearSCVI` (its ``get_loadings()``), or a genes x
        factors DataFrame of loadings.
    n_genes
        Top genes per factor.
    factors
        Factors (columns) to use (default: all).
    cmap
        A diverging colour map.
    figsize
        Size of the figure.

    Returns
    -------
    matplotlib.figure.Figure
    """
    if isinstance(model, pd.DataFrame):
        frame = model
    elif hasattr(model, "get_loadings"):
        frame = model.get_loadings()
    else:
        raise TypeError("loadings() needs a LinearSCVI model or a DataFrame of loadings.")
    if factors is not None:
        check_frame_columns(frame, factors, "The loadings")
        frame = frame[list(factors)]
    genes: list = []
    for f in frame.columns:
        for g in frame[f].abs().sort_values(ascending=False).index[:n_genes]:
            if g not in genes:
                genes.append(g)
    values = frame.loc[genes].to_numpy(dtype=np.float64)
    plt = pyplot()
    if figsize is None:
        figsize = (1.2 + 0.45 * frame.shape[1], 1.0 + 0.2 * len(genes))
    fig, ax = plt.subplots(figsize=figsize)
    vmax = float(np.abs(values).max()) or 1.0
    im = ax.imshow(values, cmap=cmap, vmin=-vmax, vmax=vmax, aspect="auto")
    ax.set_xticks(range(frame.shape[1]), [str(c) for c in frame.columns], rotation=90,
                  fontsize=8)
    ax.set_yticks(range(len(genes)), [str(g) for g in genes], fontsize=7)
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, label="loading")
    ax.set_title("LDVAE loadings: top genes per factor", fontsize=10)
    fig.tight_layout()
    return fig


def _protein_counts(model) -> np.ndarray:
    from cellvi.module.totalvae import PROTEIN_KEY

    field = model.summary[PROTEIN_KEY]
    m = field.matrix(model.adata)
    return np.asarray(m.toarray() if sp.issparse(m) else m, dtype=np.float64)


def foreground_probability(model, *, proteins: Sequence[str] | None = None,
                           protein_counts=None, ncols: int = 4, figsize=None):
    r"""Plot totalVI's foreground probability of each protein against its counts.

    One panel per protein: each cell at :math:`\log(1 + y)` of its count (x) and the model's
    probability :math:`1 - \pi` that the count is foreground rather than background (y,
    ``model.get_protein_foreground_probability()``). A protein whose cells split into a low
    background cloud and a high foreground one shows the model separating them.

    Parameters
    ----------
    model
        A trained :class:`~cellvi.model.TOTALVI`.
    proteins
        Proteins to draw (default: all, at most 16).
    protein_counts
        The ``(cells, proteins)`` counts (default: read through the model's set-up).
    ncols
        Panels per row.
    figsize
        Size of the figure (default: 3 x 2.6 inches a panel).

    Returns
    -------
    matplotlib.figure.Figure
    """
    if not hasattr(model, "get_protein_foreground_probability"):
        raise TypeError("foreground_probability() needs a TOTALVI model.")
    names = list(model.protein_names)
    if proteins is None:
        proteins = names[:16]
    unknown = [p for p in proteins if p not in names]
    if unknown:
        raise ValueError(f"Proteins {unknown} are not in the model: {names}.")
    prob = model.get_protein_foreground_probability(protein_list=list(proteins))
    counts = _protein_counts(model) if protein_counts is None else np.asarray(protein_counts)
    if counts.shape != (model.adata.n_obs, len(names)):
        raise ValueError(f"protein_counts must be (cells, proteins) = "
                         f"{(model.adata.n_obs, len(names))}, got {counts.shape}.")
    fig, axes = grid(len(proteins), ncols=ncols, panel=(3.0, 2.6), figsize=figsize)
    for ax, p in zip(axes, proteins):
        y = np.log1p(counts[:, names.index(p)])
        ax.scatter(y, np.asarray(prob[p]), s=3, alpha=0.5, linewidths=0, color="C0")
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(str(p), fontsize=9)
        ax.set_xlabel("log(1 + count)", fontsize=8)
        ax.set_ylabel("P(foreground)", fontsize=8)
    fig.tight_layout()
    return fig


def imputed_vs_measured(model, measured, *, genes: Sequence[str] | None = None,
                        dataset: int = -1, normalized: bool = False, ncols: int = 4,
                        figsize=None):
    r"""Plot gimVI's imputed expression of genes against their measured counts.

    For genes held out of a dataset when training (the gimVI benchmark: spatial genes hidden,
    then imputed from the sequencing data), each panel puts every cell at its measured count
    (x, :math:`\log(1 + y)`) and the imputed value (y, :math:`\log(1 + \hat y)`), with the
    Spearman correlation across cells in the title.

    Parameters
    ----------
    model
        A trained :class:`~cellvi.model.GIMVI`.
    measured
        The measured counts of the dataset's cells: an AnnData or DataFrame with the genes as
        columns (rows in the dataset's cell order).
    genes
        Genes to draw (default: those of ``measured`` that the model knows, at most 12).
    dataset
        Index of the dataset in the model (default: the last, a spatial one).
    normalized
        Compare normalised expression instead of expected counts.
    ncols
        Panels per row.
    figsize
        Size of the figure.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from scipy.stats import spearmanr

    if not hasattr(model, "get_imputed_values"):
        raise TypeError("imputed_vs_measured() needs a GIMVI model.")
    if hasattr(measured, "to_df") and hasattr(measured, "var_names"):
        table = measured.to_df()
    elif isinstance(measured, pd.DataFrame):
        table = measured
    else:
        raise TypeError("measured must be an AnnData or a cells x genes DataFrame.")
    known = set(model.var_names)
    if genes is None:
        genes = [g for g in table.columns if g in known][:12]
    missing = [g for g in genes if g not in known or g not in table.columns]
    if missing or not genes:
        raise ValueError(f"Genes {missing or '(none)'} are not both in the model and in "
                         "measured.")
    imputed = model.get_imputed_values(gene_list=list(genes), normalized=normalized)[dataset]
    if imputed.shape[0] != table.shape[0]:
        raise ValueError(f"measured has {table.shape[0]} cells; dataset {dataset} of the model "
                         f"has {imputed.shape[0]}.")
    fig, axes = grid(len(genes), ncols=ncols, panel=(3.0, 2.8), figsize=figsize)
    for ax, (j, g) in zip(axes, enumerate(genes)):
        x = np.log1p(np.asarray(table[g], dtype=np.float64))
        y = np.log1p(np.asarray(imputed[:, j], dtype=np.float64))
        rho = spearmanr(x, y).statistic if x.std() > 0 and y.std() > 0 else float("nan")
        ax.scatter(x, y, s=3, alpha=0.5, linewidths=0, color="C2")
        ax.set_title(f"{g}  (Spearman {rho:.2f})", fontsize=9)
        ax.set_xlabel("measured, log(1 + count)", fontsize=8)
        ax.set_ylabel("imputed, log(1 + value)", fontsize=8)
    fig.tight_layout()
    return fig


def zero_inflation(model, *, threshold: float = 0.5, figsize=(8.0, 3.2)):
    r"""Plot AutoZI's posterior probabilities that genes are zero-inflated.

    Left: the distribution over genes of :math:`q(\delta_g < 1/2)`, the probability that
    gene :math:`g`'s zero-inflated component dominates, with the decision ``threshold``.
    Right: the same probability against each gene's mean count (log scale), genes called
    zero-inflated in colour (lowly expressed genes are where zero inflation is asked).

    Parameters
    ----------
    model
        A trained :class:`~cellvi.model.AUTOZI` (``get_zero_inflation``), or its table.
    threshold
        The decision threshold (the paper's 0.5).
    figsize
        Size of the figure.

    Returns
    -------
    matplotlib.figure.Figure
    """
    if isinstance(model, pd.DataFrame):
        table, means = model, None
    elif hasattr(model, "get_zero_inflation"):
        table = model.get_zero_inflation(threshold=threshold)
        layer = model.summary.layer
        x = model.adata.X if layer is None else model.adata.layers[layer]
        means = pd.Series(np.asarray(x.mean(0)).ravel(), index=list(model.summary.var_names))
    else:
        raise TypeError("zero_inflation() needs an AUTOZI model or its get_zero_inflation "
                        "table.")
    check_frame_columns(table, ["prob_zero_inflated"], "The zero-inflation table")
    prob = table["prob_zero_inflated"].to_numpy(dtype=np.float64)
    called = prob > threshold
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=figsize)
    ax1.hist(prob, bins=np.linspace(0, 1, 21), color="C0")
    ax1.axvline(threshold, ls="--", color="0.3", lw=1)
    ax1.set_xlabel("P(zero-inflated)")
    ax1.set_ylabel("genes")
    ax1.set_title(f"{called.sum()} of {prob.size} zero-inflated", fontsize=10)
    if means is not None:
        genes = table.index.get_level_values(0)
        m = means.reindex(genes).to_numpy(dtype=np.float64)
        ax2.scatter(m[~called], prob[~called], s=6, color="0.6", linewidths=0, label="NB")
        ax2.scatter(m[called], prob[called], s=8, color="C3", linewidths=0, label="ZINB")
        ax2.set_xscale("log")
        ax2.axhline(threshold, ls="--", color="0.3", lw=1)
        ax2.set_xlabel("mean count")
        ax2.set_ylabel("P(zero-inflated)")
        ax2.legend(frameon=False, fontsize=8)
    else:
        ax2.set_visible(False)
    fig.tight_layout()
    return fig


def scores(table: pd.DataFrame, *, figsize=None, title: str | None = None):
    """Plot integration scores of several embeddings as grouped bars (higher is better).

    Parameters
    ----------
    table
        Embeddings as rows, scores as columns (e.g. ``pd.DataFrame({name:
        cellvi.metrics.integration_scores(...)}).T``).
    figsize
        Size of the figure.
    title
        Title of the plot.

    Returns
    -------
    matplotlib.figure.Figure
    """
    if not isinstance(table, pd.DataFrame) or table.empty:
        raise TypeError("scores() needs a non-empty DataFrame: embeddings x scores.")
    values = table.astype(np.float64)
    plt = pyplot()
    n_rows, n_cols = values.shape
    if figsize is None:
        figsize = (1.2 + 0.9 * n_cols, 3.4)
    fig, ax = plt.subplots(figsize=figsize)
    width = 0.8 / n_rows
    cols = palette(n_rows)
    for i, (name, row) in enumerate(values.iterrows()):
        ax.bar(np.arange(n_cols) + (i - (n_rows - 1) / 2) * width, row.to_numpy(), width,
               label=str(name), color=cols[i])
    ax.set_xticks(range(n_cols), [str(c) for c in values.columns], rotation=30, ha="right",
                  fontsize=8)
    ax.set_ylabel("score (higher is better)")
    ax.legend(frameon=False, fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig
