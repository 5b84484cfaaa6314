"""What the plots share: matplotlib on demand, panel grids, colours."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd


def pyplot():
    """Return ``matplotlib.pyplot``, or raise naming the extra to install."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("cellvi.pl needs matplotlib: pip install 'cellvi[plot]'.") from None
    return plt


def grid(n: int, *, ncols: int, panel: tuple[float, float], figsize=None):
    """Return a figure of ``n`` panels in rows of ``ncols``; unused axes are hidden."""
    plt = pyplot()
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    if figsize is None:
        figsize = (panel[0] * ncols, panel[1] * nrows)
    fig, axes = plt.subplots(nrows, ncols, figsize=figsize, squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def palette(n: int) -> list:
    """``n`` distinct colours: tab10, tab20, then evenly spaced hues."""
    plt = pyplot()
    if n <= 10:
        return [plt.get_cmap("tab10")(i) for i in range(n)]
    if n <= 20:
        return [plt.get_cmap("tab20")(i) for i in range(n)]
    return [plt.get_cmap("hsv")(i / n) for i in range(n)]


def is_categorical(values) -> bool:
    """Whether an ``obs`` column is drawn with a legend (not a colour bar)."""
    s = pd.Series(values)
    return not (pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s))


def check_frame_columns(frame: pd.DataFrame, columns, what: str) -> None:
    """Raise naming the missing columns of ``frame``."""
    missing = [c for c in columns if c not in frame]
    if missing:
        raise KeyError(f"{what} lacks the column(s) {missing} (columns: {list(frame.columns)}).")


def finite(values) -> np.ndarray:
    """Values as float, with infinities clipped to the finite range (for axes)."""
    v = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(v)
    if ok.any() and not ok.all():
        v = np.clip(v, v[ok].min(), v[ok].max())
    return v
