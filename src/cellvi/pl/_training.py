"""Training curves from ``model.history``, and a study's trials."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from ._utils import grid

__all__ = ["training_curves", "tuning_history"]

_TITLES = {"elbo": "ELBO (higher is better)", "reconstruction_loss": "reconstruction loss",
           "kl_local": "KL divergence (local)", "loss": "training objective"}


def training_curves(model, *, metrics: Sequence[str] = ("elbo", "reconstruction_loss",
                                                        "kl_local"),
                    ncols: int = 3, figsize=None):
    """Plot per-epoch training and validation metrics from a model's history.

    One panel per metric, a line for each split that the history holds (``<metric>_train``,
    ``<metric>_validation``); with early stopping, a dashed line marks the kept epoch.

    Parameters
    ----------
    model
        A trained model (its ``history`` and ``train_settings``) or a history DataFrame.
    metrics
        Metric names without the split (``"elbo"``, ``"reconstruction_loss"``,
        ``"kl_local"``, ``"loss"``, ``"accuracy"`` ...); those the history lacks are skipped.
    ncols
        Panels per row.
    figsize
        Size of the figure (default: 4 x 3 inches a panel).

    Returns
    -------
    matplotlib.figure.Figure
    """
    history = model if isinstance(model, pd.DataFrame) else getattr(model, "history", None)
    if history is None or not isinstance(history, pd.DataFrame):
        raise TypeError("training_curves needs a trained model or its history DataFrame.")
    if history.empty:
        raise ValueError("The history is empty: train the model first (model.train()).")
    kept = None if isinstance(model, pd.DataFrame) else (
        getattr(model, "train_settings", {}) or {}).get("kept_epoch")
    if isinstance(metrics, str):
        metrics = [metrics]
    present = [m for m in metrics
               if any(f"{m}_{s}" in history for s in ("train", "validation"))]
    if not present:
        raise ValueError(f"The history has none of {list(metrics)} (columns: "
                         f"{list(history.columns)}).")
    fig, axes = grid(len(present), ncols=ncols, panel=(4.0, 3.0), figsize=figsize)
    for ax, m in zip(axes, present):
        for split, style in (("train", "-"), ("validation", "-")):
            col = f"{m}_{split}"
            if col in history:
                values = history[col].dropna()
                ax.plot(values.index, values.to_numpy(), style, label=split, lw=1.4)
        if kept is not None:
            ax.axvline(kept, ls="--", color="0.4", lw=1, label=f"kept epoch {kept}")
        ax.set_title(_TITLES.get(m, m))
        ax.set_xlabel("epoch")
        ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


def tuning_history(result, *, objective: int = 0, figsize=(6.0, 3.6)):
    """Plot a study's trials: each trial's value, the best so far, the defaults' value.

    Complete trials are dots, pruned ones crosses (at the value they reached when stopped),
    the line is the best value so far, and a dashed line is the defaults' trial (the
    ``baseline`` of :func:`cellvi.tune.run_study`). For a study of several objectives, the
    first two are plotted against each other with the Pareto front highlighted.

    Parameters
    ----------
    result
        A :class:`cellvi.tune.TuneResult`.
    objective
        Which objective to plot (single-objective view).
    figsize
        Size of the figure.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from ._utils import pyplot

    trials = getattr(result, "trials", None)
    if not isinstance(trials, pd.DataFrame):
        raise TypeError("tuning_history needs a cellvi.tune.TuneResult.")
    plt = pyplot()
    names, directions = result.objectives, result.directions
    fig, ax = plt.subplots(figsize=figsize)
    done = trials[trials.state.isin(["COMPLETE", "PRUNED"])]
    if len(names) > 1:
        x, y = names[0], names[1]
        complete = done[done.state == "COMPLETE"]
        ax.scatter(complete[x], complete[y], s=22, color="0.6", label="trials")
        front = complete[complete.number.isin(result.pareto_trials)]
        ax.scatter(front[x], front[y], s=40, color="C3", label="Pareto front", zorder=3)
        ax.set_xlabel(f"{x} ({directions[0]})")
        ax.set_ylabel(f"{y} ({directions[1]})")
        ax.legend(frameon=False, fontsize=8)
        fig.tight_layout()
        return fig
    name = names[objective]
    complete = done[done.state == "COMPLETE"]
    pruned = done[done.state == "PRUNED"]
    ax.scatter(complete.number, complete[name], s=24, color="C0", label="complete", zorder=3)
    if len(pruned):
        ax.scatter(pruned.number, pruned[name], marker="x", s=24, color="C1",
                   label="pruned (value when stopped)", zorder=3)
    if len(complete):
        values = complete.set_index("number")[name].sort_index()
        best = (values.cummax() if directions[objective] == "maximize" else values.cummin())
        ax.step(best.index, best.to_numpy(), where="post", color="C2", label="best so far")
        base = complete[complete.baseline]
        if len(base):
            ax.axhline(float(base[name].iloc[0]), ls="--", color="0.4", lw=1,
                       label="defaults")
        lo, hi = np.nanpercentile(complete[name], [0, 100])
        pad = 0.15 * (hi - lo if hi > lo else abs(hi) + 1)
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel("trial")
    ax.set_ylabel(name)
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig
