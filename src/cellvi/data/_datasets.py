"""Small real datasets: one shipped with the package, one read from a local data folder.

Also home of :func:`highly_variable_genes`, the gene-selection rule used to build them.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._readers import read_mtx

__all__ = ["pbmc_ifnb", "kang_ifnb", "highly_variable_genes"]

_PACKAGED = "_datasets/pbmc_ifnb.h5ad"
_KANG_DEFAULT = "../shared/data/kang_ifnb"
_KANG_BATCHES = ("ctrl", "stim")


# --------------------------------------------------------------------------------------------
# highly variable genes
# --------------------------------------------------------------------------------------------
def _loess(x: np.ndarray, y: np.ndarray, span: float = 0.3, chunk: int = 256) -> np.ndarray:
    """Fit ``y ~ x`` by local quadratic regression and return the fitted values at ``x``.

    For every point, a quadratic is fitted by weighted least squares to its ``ceil(span * n)``
    nearest neighbours in ``x``, with tricube weights ``(1 - (d / d_max)^3)^3`` where ``d_max``
    is the largest neighbour distance (the classic loess smoother, evaluated exactly at each
    point, without robustness iterations).
    """
    n = x.size
    order = np.argsort(x, kind="stable")
    xs, ys = x[order], y[order]
    q = int(min(n, max(3, np.ceil(span * n))))
    # The q nearest neighbours of a point in sorted 1-D data form a contiguous window
    # [lo, lo + q); slide the window right while that brings it closer to the point.
    lo = np.empty(n, dtype=np.int64)
    left = 0
    for i in range(n):
        while left + q < n and xs[left + q] - xs[i] < xs[i] - xs[left]:
            left += 1
        lo[i] = left
    # Points with the same x share their window and so their fit: fit each distinct x once, so
    # that tied points get the same value to the last bit on every machine.
    first = np.r_[True, xs[1:] != xs[:-1]]
    points = np.flatnonzero(first)
    fitted = np.empty(points.size)
    offsets = np.arange(q)
    for start in range(0, points.size, chunk):
        pos = np.arange(start, min(points.size, start + chunk))
        idx = points[pos]
        win = lo[idx, None] + offsets[None, :]
        u = xs[win] - xs[idx, None]
        d_max = np.abs(u).max(axis=1, keepdims=True)
        d = np.abs(u) / np.where(d_max > 0, d_max, 1.0)
        w = np.clip(1.0 - d**3, 0.0, None) ** 3
        w = np.where(d_max > 0, w, 1.0)
        # scale u for conditioning; the fit at u = 0 is the intercept.
        us = u / np.where(d_max > 0, d_max, 1.0)
        wy = w * ys[win]
        s, t = [w.sum(axis=1)], [wy.sum(axis=1)]
        for k in range(1, 5):  # repeated products: much faster than float powers
            w = w * us
            s.append(w.sum(axis=1))
            if k < 3:
                wy = wy * us
                t.append(wy.sum(axis=1))
        a = np.stack(
            [np.stack(s[0:3], -1), np.stack(s[1:4], -1), np.stack(s[2:5], -1)], axis=1
        )  # (chunk, 3, 3)
        b = np.stack(t, -1)[..., None]
        fitted[pos] = (np.linalg.pinv(a, rcond=1e-10) @ b)[:, 0, 0]
    out = np.empty(n)
    out[order] = fitted[np.cumsum(first) - 1]
    return out


def _standardized_variance(x: sp.csr_matrix, span: float) -> np.ndarray:
    """Seurat-v3 style variance of each gene's counts after standardising by the trend."""
    n = x.shape[0]
    mean = np.asarray(x.mean(axis=0)).ravel()
    sq = np.asarray(x.multiply(x).mean(axis=0)).ravel()
    var = (sq - mean**2) * n / max(n - 1, 1)
    out = np.zeros(x.shape[1])
    ok = var > 0
    if ok.sum() < 3:
        return out
    trend = _loess(np.log10(mean[ok]), np.log10(var[ok]), span=span)
    std = np.zeros_like(mean)
    std[ok] = np.sqrt(10.0**trend)
    # Clip each count at mean + sqrt(n) * std, then take the variance in units of std^2.
    clip = mean + np.sqrt(n) * std
    xc = x.tocsc(copy=True)
    cols = np.repeat(np.arange(x.shape[1]), np.diff(xc.indptr))
    xc.data = np.minimum(xc.data.astype(np.float64), clip[cols])
    s1 = np.asarray(xc.sum(axis=0)).ravel()
    s2 = np.asarray(xc.multiply(xc).sum(axis=0)).ravel()
    ss = s2 - 2.0 * mean * s1 + n * mean**2
    out[ok] = ss[ok] / ((n - 1) * std[ok] ** 2)
    return out


#: Significant bits kept of each gene's score before ranking (about 9 decimal digits).
SCORE_BITS = 30


def _round_score(score: np.ndarray) -> np.ndarray:
    """Round scores to :data:`SCORE_BITS` significant bits, so that ranks ignore rounding noise.

    Many genes of a real dataset have identical counts (for example a single count of 1 in one
    cell) and so the same score in exact arithmetic; in floating point, the loess fit and the
    sums behind it can differ in their last bits between machines (SIMD widths and memory
    alignment change the order of additions). Measured on the Kang data: a relative noise of
    1e-13 on the trend changed 14-24 of the 2,000 selected genes before this rounding, none
    after it. Ties left after rounding are broken by gene position.
    """
    mantissa, exponent = np.frexp(score)
    return np.ldexp(np.round(mantissa * 2.0**SCORE_BITS) / 2.0**SCORE_BITS, exponent)


def highly_variable_genes(
    adata: anndata.AnnData,
    *,
    n_top_genes: int,
    batch_key: str | None = None,
    layer: str | None = None,
    span: float = 0.3,
) -> np.ndarray:
    """Select the most variable genes from raw counts (a Seurat v3-like rule).

    Within each batch, a loess curve (local quadratic, ``span``) is fitted to log10 variance
    against log10 mean of the raw counts, over genes with non-zero variance. Each count is
    standardised by the fitted standard deviation, ``z = (x - mean) / std``, clipped above at
    ``sqrt(n_cells)`` so that a single outlier cell cannot dominate, and the gene's score is the
    variance of these clipped z-values (constant genes score 0). Genes are ranked by score within
    each batch. With several batches, genes are ordered first by the number of batches in which
    they are among the ``n_top_genes`` best, then by their mean rank over batches (then by their
    position, so the result is deterministic), and the first ``n_top_genes`` are kept.

    Scores are rounded to about nine significant digits (:data:`SCORE_BITS`) before ranking, so
    that genes with identical counts tie exactly and the selection does not depend on the
    machine's floating-point rounding. With scanpy installed, its maintained
    ``scanpy.pp.highly_variable_genes(adata, flavor="seurat_v3")`` is the rule to prefer; this
    one needs no extra dependency and is the definition of :func:`pbmc_ifnb`'s genes.

    Parameters
    ----------
    adata
        Cells x genes AnnData holding raw counts.
    n_top_genes
        Number of genes to select.
    batch_key
        Column of ``adata.obs`` with the batch of each cell; ``None`` for a single batch.
    layer
        Layer holding the counts; ``None`` for ``X``.
    span
        Fraction of genes in each local fit of the mean-variance trend.

    Returns
    -------
    numpy.ndarray
        Boolean mask over genes, ``True`` for the selected ones, in ``adata.var`` order.
    """
    n_genes = adata.n_vars
    if not 0 < n_top_genes <= n_genes:
        raise ValueError(f"n_top_genes must be in [1, {n_genes}], got {n_top_genes}.")
    x = adata.X if layer is None else adata.layers[layer]
    x = sp.csr_matrix(x, dtype=np.float64)
    if batch_key is None:
        groups = [np.arange(adata.n_obs)]
    else:
        if batch_key not in adata.obs:
            raise KeyError(f"batch_key {batch_key!r} is not a column of adata.obs.")
        codes = pd.Categorical(adata.obs[batch_key]).codes
        groups = [np.flatnonzero(codes == c) for c in np.unique(codes)]
    ranks = np.empty((len(groups), n_genes))
    for i, rows in enumerate(groups):
        score = _round_score(_standardized_variance(x[rows], span))
        order = np.argsort(-score, kind="stable")
        ranks[i, order] = np.arange(n_genes)
    n_top_in = (ranks < n_top_genes).sum(axis=0)
    mean_rank = ranks.mean(axis=0)
    best = np.lexsort((np.arange(n_genes), mean_rank, -n_top_in))[:n_top_genes]
    mask = np.zeros(n_genes, dtype=bool)
    mask[best] = True
    return mask


# --------------------------------------------------------------------------------------------
# datasets
# --------------------------------------------------------------------------------------------
def _resolve_kang(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    if str(path) == _KANG_DEFAULT:
        # also look next to the source checkout (repo/src/cellvi/data -> repo/../shared/data)
        alt = Path(__file__).resolve().parents[4] / "shared" / "data" / "kang_ifnb"
        if alt.is_dir():
            return alt
    raise FileNotFoundError(
        f"The Kang et al. (2018) IFN-beta folder {str(p.resolve())!r} does not exist. Pass "
        "path= pointing at a folder holding ctrl_/stim_counts_genes_x_cells.mtx.gz, "
        "ctrl_/stim_genes.txt and ctrl_/stim_barcodes.txt, or use cellvi.data.pbmc_ifnb() for "
        "the small copy shipped with the package."
    )


def kang_ifnb(
    path: str | os.PathLike = _KANG_DEFAULT, *, n_top_genes: int | None = None
) -> anndata.AnnData:
    """Read the two-condition Kang et al. (2018) IFN-beta PBMC data from a local folder.

    The folder holds, for each condition ``ctrl`` and ``stim``, a genes x cells Matrix Market
    file ``<cond>_counts_genes_x_cells.mtx.gz`` with ``<cond>_genes.txt`` and
    ``<cond>_barcodes.txt`` (one name per line). Both conditions are concatenated; if their
    gene lists differ, only the shared genes are kept (in the control file's order).

    Parameters
    ----------
    path
        The folder. A relative path is taken from the current directory; the default is also
        looked up next to the source checkout.
    n_top_genes
        If given, keep only this many most variable genes, chosen with
        :func:`highly_variable_genes` using ``batch_key="batch"``.

    Returns
    -------
    anndata.AnnData
        Cells x genes raw counts (``float32`` CSR) with ``obs["batch"]`` categorical
        (``"ctrl"``, ``"stim"``); with ``n_top_genes``, ``var["highly_variable"]`` is ``True``
        for every kept gene.

    Raises
    ------
    FileNotFoundError
        If the folder or one of its files is missing.
    """
    folder = _resolve_kang(path)
    parts = []
    for cond in _KANG_BATCHES:
        files = [
            folder / f"{cond}_{name}"
            for name in ("counts_genes_x_cells.mtx.gz", "genes.txt", "barcodes.txt")
        ]
        for f in files:
            if not f.exists():
                raise FileNotFoundError(f"Missing {str(f)!r} in the Kang IFN-beta folder.")
        part = read_mtx(files[0], var_names=files[1], obs_names=files[2], transpose=True)
        part.obs["batch"] = cond
        parts.append(part)
    genes = parts[0].var_names
    for part in parts[1:]:
        if not part.var_names.equals(genes):
            genes = genes[genes.isin(part.var_names)]
    parts = [p[:, genes] if not p.var_names.equals(genes) else p for p in parts]
    adata = anndata.AnnData(
        X=sp.csr_matrix(sp.vstack([p.X for p in parts]), dtype=np.float32),
        obs=pd.concat([p.obs for p in parts]),
        var=pd.DataFrame(index=pd.Index(genes, dtype=str)),
    )
    adata.obs["batch"] = pd.Categorical(adata.obs["batch"], categories=list(_KANG_BATCHES))
    if not adata.obs_names.is_unique:
        adata.obs_names_make_unique()
    if n_top_genes is not None:
        mask = highly_variable_genes(adata, n_top_genes=n_top_genes, batch_key="batch")
        adata = adata[:, mask].copy()
        adata.var["highly_variable"] = True
    return adata


def pbmc_ifnb() -> anndata.AnnData:
    """Load the small PBMC interferon-beta dataset shipped with cellvi (no download).

    A subset of Kang et al. (2018), *Multiplexed droplet single-cell RNA-sequencing using
    natural genetic variation*, Nature Biotechnology 36:89-94: human PBMCs profiled with 10x
    Genomics, either untreated (``"ctrl"``) or stimulated with interferon-beta (``"stim"``),
    1,000 cells of each. Genes are the most variable ones of the 9,015 in the source, chosen on
    both conditions with :func:`highly_variable_genes` (``batch_key="batch"``); as many were kept
    as fit in a package file under 2 MB. The file is built by ``scripts/make_demo_dataset.py``.

    Returns
    -------
    anndata.AnnData
        A fresh object on every call, with 2,000 cells x the selected genes:

        * ``X``: raw integer UMI counts as a ``float32`` :class:`scipy.sparse.csr_matrix`;
        * ``obs["batch"]``: categorical, ``"ctrl"`` or ``"stim"``; ``obs_names`` are barcodes;
        * ``var["highly_variable"]``: all ``True``; ``var_names`` are gene symbols.
    """
    ref = resources.files("cellvi.data").joinpath(_PACKAGED)
    with resources.as_file(ref) as p:
        adata = anndata.read_h5ad(p)
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    adata.obs["batch"] = pd.Categorical(adata.obs["batch"], categories=list(_KANG_BATCHES))
    return adata
