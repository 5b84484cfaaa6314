"""Differential expression: volcano plots of a DE table."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd

from ._utils import check_frame_columns, finite, grid

__all__ = ["volcano"]


def volcano(de: pd.DataFrame, *, lfc: str = "lfc_mean",
            score: Literal["bayes_factor", "proba_de"] = "bayes_factor",
            de_column: str | None = None, n_labels: int = 8, comparisons=None,
            ncols: int = 3, figsize=None):
    """Plot a volcano of a differential-expression table: effect size against evidence.

    Each gene is a point at its log fold change (``lfc``, x) and its Bayes factor or posterior
    probability of being DE (``score``, y); genes called DE (``de_column``, default the
    table's ``is_de_fdr_<target>`` column) are coloured, and the ``n_labels`` of them with
    the largest absolute fold change named (the highest-scoring genes when none is called).
    A table of several comparisons (its ``comparison`` column, as
    ``model.differential_expression(groupby=...)`` gives) gets a panel per comparison.

    Parameters
    ----------
    de
        The table of ``model.differential_expression`` (genes as index).
    lfc
        Column of the effect size (``"lfc_mean"``, ``"lfc_median"``, ``"lfc_estimate"``).
    score
        ``"bayes_factor"`` (log Bayes factor) or ``"proba_de"``.
    de_column
        Boolean column of the DE calls (default: the first ``is_de_fdr_*`` column, if any).
    n_labels
        Genes named per panel.
    comparisons
        The comparisons to draw (default: all).
    ncols
        Panels per row.
    figsize
        Size of the figure (default: 4.2 x 3.6 inches a panel).

    Returns
    -------
    matplotlib.figure.Figure
    """
    if not isinstance(de, pd.DataFrame):
        raise TypeError("volcano needs the DataFrame of model.differential_expression().")
    if score not in ("bayes_factor", "proba_de"):
        raise ValueError(f"score must be 'bayes_factor' or 'proba_de', got {score!r}.")
    check_frame_columns(de, [lfc, score], "The DE table")
    if de_column is None:
        fdr = [c for c in de.columns if str(c).startswith("is_de_fdr")]
        de_column = fdr[0] if fdr else None
    elif de_column not in de:
        raise KeyError(f"de_column {de_column!r} is not a column of the DE table.")
    if "comparison" in de:
        groups = list(pd.unique(de["comparison"]))
        if comparisons is not None:
            unknown = [c for c in comparisons if c not in groups]
            if unknown:
                raise ValueError(f"comparisons {unknown} are not in the table: {groups}.")
            groups = list(comparisons)
        parts = [(g, de[de["comparison"] == g]) for g in groups]
    else:
        parts = [("", de)]
    fig, axes = grid(len(parts), ncols=ncols, panel=(4.2, 3.6), figsize=figsize)
    for ax, (name, part) in zip(axes, parts):
        x, y = finite(part[lfc]), finite(part[score])
        called = (part[de_column].to_numpy(dtype=bool) if de_column is not None
                  else np.zeros(len(part), dtype=bool))
        ax.scatter(x[~called], y[~called], s=6, color="0.65", linewidths=0, label="not DE")
        ax.scatter(x[called], y[called], s=8, color="C3", linewidths=0,
                   label=f"DE ({called.sum()})" + (f", {de_column}" if de_column else ""))
        # the called genes of largest effect (Bayes factors saturate: many tie at the top)
        rank = np.where(called, np.abs(x), -np.inf) if called.any() else y
        top = np.argsort(-rank, kind="stable")[:n_labels]
        for k, i in enumerate(sorted(top, key=lambda i: x[i])):
            ax.annotate(str(part.index[i]), (x[i], y[i]), fontsize=7,
                        xytext=(2, 2 - 8 * (k % 3)), textcoords="offset points")
        ax.axvline(0, color="0.8", lw=0.8, zorder=0)
        ax.set_xlabel(f"log fold change ({lfc})", fontsize=9)
        ax.set_ylabel("log Bayes factor" if score == "bayes_factor" else "P(DE)", fontsize=9)
        ax.set_title(str(name), fontsize=10)
        ax.legend(frameon=False, fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig
