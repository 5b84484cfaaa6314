r"""Bayesian differential expression from posterior samples (Boyeau et al., 2019).

For two groups of cells :math:`A` and :math:`B`, let :math:`\rho_{a g}` and :math:`\rho_{b g}`
be the normalised expression (the decoder's ``scale``) of gene :math:`g` in a random cell of each
group. Sampling a cell of each group and one posterior draw of its latent variable gives paired
draws :math:`(\rho^{(s)}_{A g}, \rho^{(s)}_{B g})_{s=1}^S` of the group-level expression.

``mode="vanilla"`` tests :math:`H_{1g}: \rho_{A g} > \rho_{B g}` against its complement:

.. math::

    p_g = \frac1S \sum_s \mathbf 1[\rho^{(s)}_{A g} > \rho^{(s)}_{B g}], \qquad
    \mathrm{BF}_g = \log\frac{p_g + \epsilon}{1 - p_g + \epsilon}.

``mode="change"`` uses the log fold change :math:`r_g = \log_2(\rho_{A g} + c) - \log_2(\rho_{B g}
+ c)` with a small pseudocount :math:`c`, and tests :math:`|r_g| \ge \delta`:
:math:`p_g = \frac1S \sum_s \mathbf 1[|r^{(s)}_g| \ge \delta]`. Genes are called differentially
expressed at a target posterior false discovery rate :math:`\alpha` by ranking them by
:math:`p_g` and keeping the largest set whose mean posterior probability of being null,
:math:`\frac1k\sum_{i \le k} (1 - p_{(i)})`, is at most :math:`\alpha`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from typing import Literal, Protocol

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData
from scipy.stats import rankdata
from tqdm.auto import tqdm

from cellvi.data._setup import DataSummary, get_counts


class QueryModel(Protocol):
    """What differential expression and correlations need of a model (its public queries).

    Implemented by every model of :mod:`cellvi.model`; this package imports none of them.
    """

    adata: AnnData
    summary: DataSummary
    device: torch.device

    def validate_adata(self, adata: AnnData | None) -> None:
        """Raise unless the model can read ``adata`` (its genes, counts and categories)."""

    def gene_indices(self, gene_list: Sequence[str] | None) -> np.ndarray:
        """Positions of genes among the model's (all when None); unknown genes raise."""

    def batch_codes(self, transform_batch) -> list[int | None]:
        """Codes of batch names; unknown batches raise."""

    def get_normalized_expression(self, adata=None, indices=None, transform_batch=None,
                                  gene_list=None, library_size=1, n_samples=1, return_mean=True,
                                  return_numpy=False, batch_size=None):
        """Return denoised expression (:meth:`cellvi.model.SCVI.get_normalized_expression`)."""

__all__ = [
    "QueryModel",
    "de_statistics",
    "differential_expression",
    "fdr_de_prediction",
    "feature_correlation_matrix",
]

STAT_COLUMNS = [
    "proba_de",
    "proba_not_de",
    "bayes_factor",
    "scale1",
    "scale2",
    "lfc_mean",
    "lfc_median",
    "lfc_std",
    "lfc_min",
    "lfc_max",
]
RAW_COLUMNS = [
    "raw_mean1",
    "raw_mean2",
    "non_zeros_proportion1",
    "non_zeros_proportion2",
    "raw_normalized_mean1",
    "raw_normalized_mean2",
]
_LOG_FLOOR = 1e-12  # keeps log2 finite should a scale underflow to 0 with pseudocount=0


# --------------------------------------------------------------------------------------------
# statistics on posterior samples (pure numpy)
# --------------------------------------------------------------------------------------------
def de_statistics(
    scale1: np.ndarray,
    scale2: np.ndarray,
    *,
    mode: Literal["vanilla", "change"] = "vanilla",
    delta: float | None = 0.25,
    pseudocount: float = 0.0,
    eps: float = 1e-8,
) -> dict[str, np.ndarray]:
    """Posterior DE statistics per gene from paired samples of normalised expression.

    Parameters
    ----------
    scale1, scale2
        ``(n_samples, genes)`` paired posterior draws of the normalised expression of the two
        groups (row ``s`` of each is one draw; the pairing is arbitrary but fixed).
    mode
        ``"vanilla"``: ``proba_de`` is ``P(scale1 > scale2)``. ``"change"``: ``proba_de`` is
        ``P(|LFC| >= delta)`` with ``LFC = log2(scale1 + c) - log2(scale2 + c)``.
    delta
        Threshold on the absolute log2 fold change (``"change"`` mode only).
    pseudocount
        ``c`` above, added to the scales before taking logs.
    eps
        Keeps the Bayes factor finite when a probability is 0 or 1.

    Returns
    -------
    dict
        ``(genes,)`` arrays: ``proba_de``, ``proba_not_de`` (``1 - proba_de``), ``bayes_factor``
        (``log((p + eps) / (1 - p + eps))``), ``scale1``, ``scale2`` (posterior mean scales),
        and ``lfc_mean``, ``lfc_median``, ``lfc_std``, ``lfc_min``, ``lfc_max`` (posterior
        summaries of the log2 fold change, computed in both modes).
    """
    scale1 = np.asarray(scale1, dtype=np.float64)
    scale2 = np.asarray(scale2, dtype=np.float64)
    if scale1.ndim != 2 or scale1.shape != scale2.shape:
        raise ValueError(
            "scale1 and scale2 must be (n_samples, genes) arrays of the same shape, got "
            f"{scale1.shape} and {scale2.shape}."
        )
    _check_mode(mode, delta)
    if pseudocount < 0:
        raise ValueError(f"pseudocount must be >= 0, got {pseudocount}.")
    lfc = np.log2(np.maximum(scale1 + pseudocount, _LOG_FLOOR)) - np.log2(
        np.maximum(scale2 + pseudocount, _LOG_FLOOR)
    )  # (n_samples, genes)
    if mode == "vanilla":
        proba_de = (scale1 > scale2).mean(axis=0)
    else:
        proba_de = (np.abs(lfc) >= delta).mean(axis=0)
    proba_not_de = 1.0 - proba_de
    return {
        "proba_de": proba_de,
        "proba_not_de": proba_not_de,
        "bayes_factor": np.log(proba_de + eps) - np.log(proba_not_de + eps),
        "scale1": scale1.mean(axis=0),
        "scale2": scale2.mean(axis=0),
        "lfc_mean": lfc.mean(axis=0),
        "lfc_median": np.median(lfc, axis=0),
        "lfc_std": lfc.std(axis=0),
        "lfc_min": lfc.min(axis=0),
        "lfc_max": lfc.max(axis=0),
    }


def fdr_de_prediction(proba_de: np.ndarray, fdr_target: float = 0.05) -> np.ndarray:
    """Call genes differentially expressed at a target posterior false discovery rate.

    Genes are sorted by decreasing posterior probability of being DE; the ``k`` first are
    called, with ``k`` the largest number whose posterior expected false discovery proportion,
    the mean of ``1 - proba_de`` over the called genes, is at most ``fdr_target``.

    Parameters
    ----------
    proba_de
        ``(genes,)`` posterior probabilities of being differentially expressed.
    fdr_target
        Target posterior FDR, in ``(0, 1)``.

    Returns
    -------
    numpy.ndarray
        ``(genes,)`` boolean mask of the genes called DE.
    """
    _check_fdr(fdr_target)
    p = np.asarray(proba_de, dtype=np.float64).reshape(-1)
    order = np.argsort(-p, kind="stable")
    expected_fdp = np.cumsum(1.0 - p[order]) / np.arange(1, p.size + 1)
    ok = np.flatnonzero(expected_fdp <= fdr_target + 1e-12)
    n_called = int(ok[-1]) + 1 if ok.size else 0
    called = np.zeros(p.size, dtype=bool)
    called[order[:n_called]] = True
    return called


# --------------------------------------------------------------------------------------------
# the model-level entry point
# --------------------------------------------------------------------------------------------
def differential_expression(
    model: QueryModel,
    adata: AnnData | None = None,
    groupby: str | None = None,
    group1: str | Iterable[str] | None = None,
    group2: str | None = None,
    idx1: Sequence[int] | np.ndarray | None = None,
    idx2: Sequence[int] | np.ndarray | None = None,
    mode: Literal["vanilla", "change"] = "vanilla",
    delta: float | None = 0.25,
    batch_correction: bool = False,
    batchid1: Iterable[str] | None = None,
    batchid2: Iterable[str] | None = None,
    fdr_target: float = 0.05,
    n_samples: int = 5000,
    silent: bool = False,
    *,
    gene_list: Sequence[str] | None = None,
    pseudocount: float | None = None,
    eps: float = 1e-8,
    seed: int | None = None,
    batch_size: int | None = None,
) -> pd.DataFrame:
    """Bayesian differential expression between groups of cells (Boyeau et al., 2019).

    For each comparison, ``n_samples`` cells are drawn with replacement from each group, one
    posterior sample of the normalised expression is decoded per drawn cell, and the two sets of
    draws are paired to estimate, per gene, the posterior probability of differential
    expression (see :mod:`cellvi.de._de` for the formulas).

    Parameters
    ----------
    model
        A trained model with ``get_normalized_expression`` (SCVI, LinearSCVI, SCANVI...).
    adata
        AnnData with the model's genes (default: the model's own).
    groupby
        ``adata.obs`` column defining the groups. Give either ``groupby`` or ``idx1``.
    group1
        A group of ``groupby``, or several (each is compared in turn). None: every group is
        compared with ``group2`` (or with the rest of the cells).
    group2
        The reference group; None: all cells not in the compared group ("Rest").
    idx1, idx2
        Cells of the two groups, as integer positions or boolean masks; ``idx2=None`` means
        all other cells.
    mode
        ``"vanilla"`` (``proba_de = P(scale1 > scale2)``, a directional test) or ``"change"``
        (``proba_de = P(|log2 fold change| >= delta)``).
    delta
        Threshold on the absolute log2 fold change in ``"change"`` mode; must be positive.
    batch_correction
        Decode every cell in each batch of ``batchid1`` (group 1) / ``batchid2`` (group 2) and
        average, rather than in its own batch, to remove batch effects from the comparison.
    batchid1, batchid2
        Batches to average over (default: all of the model's batches); only with
        ``batch_correction=True``.
    fdr_target
        Target posterior false discovery rate of the ``is_de_fdr_<fdr_target>`` column, in
        ``(0, 1)``. In ``"change"`` mode genes are ranked by ``proba_de``; in ``"vanilla"`` mode by
        the probability of the more likely direction, ``max(proba_de, proba_not_de)``, so that
        the rate controlled is that of wrongly signed calls.
    n_samples
        Posterior draws per group.
    silent
        Hide the progress bar over comparisons.
    gene_list
        Restrict the results to these genes (default: all of the model's genes).
    pseudocount
        Added to the scales before taking log2 fold changes. None: ``0.1 / median library
        size`` of the compared cells, i.e. the expression of a gene seen about 0.1 times in a
        typical cell, which damps the fold changes of genes too rare to be measured.
    eps
        Regularises the Bayes factor ``log((p + eps) / (1 - p + eps))``.
    seed
        Seeds the drawing of cells and of latent samples (the global random state is left
        untouched).
    batch_size
        Cells per forward pass.

    Returns
    -------
    pandas.DataFrame
        Indexed by gene, one block of rows per comparison, each sorted by decreasing
        ``bayes_factor``. Columns: ``proba_de``, ``proba_not_de``, ``bayes_factor``, ``scale1``,
        ``scale2``, ``lfc_mean``, ``lfc_median``, ``lfc_std``, ``lfc_min``, ``lfc_max`` (posterior
        log2 fold change of group 1 over group 2), ``raw_mean1``, ``raw_mean2`` (mean counts),
        ``non_zeros_proportion1``, ``non_zeros_proportion2``, ``raw_normalized_mean1``,
        ``raw_normalized_mean2`` (mean of counts scaled to 10,000 per cell),
        ``is_de_fdr_<fdr_target>``, ``comparison`` (e.g. ``"B vs Rest"``), ``group1`` and
        ``group2``.

    Raises
    ------
    KeyError
        ``groupby`` is not a column of ``adata.obs``.
    ValueError
        Both or neither of ``groupby`` and ``idx1``; a group not in ``groupby``; an empty
        group; overlapping ``idx1`` and ``idx2``; ``delta <= 0``; ``fdr_target`` outside
        ``(0, 1)``; unknown genes or batches; ``batchid1/2`` without ``batch_correction``.
    """
    _check_mode(mode, delta)
    _check_fdr(fdr_target)
    if int(n_samples) != n_samples or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples}.")
    if pseudocount is not None and pseudocount < 0:
        raise ValueError(f"pseudocount must be >= 0, got {pseudocount}.")
    adata_ = model.adata if adata is None else adata
    model.validate_adata(adata)  # checks the genes and counts of a new AnnData
    genes = model.gene_indices(gene_list)  # raises on unknown genes
    gene_names = pd.Index([model.summary.var_names[i] for i in genes])
    gene_list = None if gene_list is None else list(gene_names)
    tb1, tb2 = _batch_policy(model, batch_correction, batchid1, batchid2)
    comparisons = _comparisons(adata_, groupby, group1, group2, idx1, idx2)

    counts = get_counts(adata_, model.summary.layer)
    counts = sp.csr_matrix(counts) if sp.issparse(counts) else np.asarray(counts)
    library = np.asarray(counts.sum(axis=1)).reshape(-1)
    rng = np.random.default_rng(seed)
    fork = nullcontext()
    if seed is not None:
        dev = model.device
        devices = []
        if dev.type == "cuda":
            devices = [torch.cuda.current_device() if dev.index is None else dev.index]
        fork = torch.random.fork_rng(devices=devices)

    def draw(cells: np.ndarray, transform_batch) -> np.ndarray:
        picks = np.sort(rng.choice(cells, size=int(n_samples), replace=True))
        out = model.get_normalized_expression(
            adata=adata,
            indices=picks,
            transform_batch=transform_batch,
            gene_list=gene_list,
            library_size=1,
            n_samples=1,
            return_numpy=True,
            batch_size=batch_size,
        )
        return out[rng.permutation(out.shape[0])]  # random pairing across the two groups

    results = []
    fdr_col = f"is_de_fdr_{fdr_target}"
    with fork:
        if seed is not None:
            torch.manual_seed(int(rng.integers(2**62)))
        for name1, name2, cells1, cells2 in tqdm(
            comparisons, desc="DE comparisons", disable=silent
        ):
            c = pseudocount
            if c is None:
                med = float(np.median(library[np.concatenate([cells1, cells2])]))
                c = 0.1 / max(med, 1.0)
            stats = de_statistics(
                draw(cells1, tb1),
                draw(cells2, tb2),
                mode=mode,
                delta=delta,
                pseudocount=c,
                eps=eps,
            )
            raw1 = _raw_stats(counts, library, cells1, genes)
            raw2 = _raw_stats(counts, library, cells2, genes)
            df = pd.DataFrame(stats, index=gene_names)
            for key, v1, v2 in zip(
                ("raw_mean", "non_zeros_proportion", "raw_normalized_mean"), raw1, raw2
            ):
                df[f"{key}1"] = v1
                df[f"{key}2"] = v2
            p = df["proba_de"].to_numpy()
            confidence = p if mode == "change" else np.maximum(p, 1.0 - p)
            df[fdr_col] = fdr_de_prediction(confidence, fdr_target)
            df["comparison"] = f"{name1} vs {name2}"
            df["group1"] = name1
            df["group2"] = name2
            df = df[STAT_COLUMNS + RAW_COLUMNS + [fdr_col, "comparison", "group1", "group2"]]
            results.append(df.sort_values("bayes_factor", ascending=False, kind="stable"))
    out = pd.concat(results)
    out.index.name = None
    return out


def _raw_stats(counts, library: np.ndarray, cells: np.ndarray, genes: np.ndarray):
    """Mean counts, fraction of non-zero counts and mean counts per 10,000, per gene."""
    x = counts[cells].astype(np.float64)
    lib = np.maximum(library[cells], 1e-12)
    if sp.issparse(x):
        mean = np.asarray(x.mean(axis=0)).reshape(-1)
        nonzero = np.asarray((x != 0).mean(axis=0)).reshape(-1)
        norm = np.asarray((sp.diags(1e4 / lib) @ x).mean(axis=0)).reshape(-1)
    else:
        x = np.asarray(x, dtype=np.float64)
        mean = x.mean(axis=0)
        nonzero = (x != 0).mean(axis=0)
        norm = (x * (1e4 / lib)[:, None]).mean(axis=0)
    return mean[genes], nonzero[genes], norm[genes]


def _check_mode(mode: str, delta: float | None) -> None:
    if mode not in ("vanilla", "change"):
        raise ValueError(f"mode must be 'vanilla' or 'change', got {mode!r}.")
    if mode == "change" and delta is None:
        raise ValueError("mode='change' needs a positive delta (a log2 fold change threshold).")
    if delta is not None and not delta > 0:
        raise ValueError(f"delta must be > 0 (a log2 fold change threshold), got {delta}.")


def _check_fdr(fdr_target: float) -> None:
    if not 0 < fdr_target < 1:
        raise ValueError(f"fdr_target must be in (0, 1), got {fdr_target}.")


def _batch_policy(model, batch_correction: bool, batchid1, batchid2):
    """``transform_batch`` for each group: None (own batches) or a list of batch names."""
    if not batch_correction:
        if batchid1 is not None or batchid2 is not None:
            raise ValueError(
                "batchid1/batchid2 are only used with batch_correction=True; without it every "
                "cell is decoded in its own batch."
            )
        return None, None
    cats = list(model.summary.batch_categories)
    out = []
    for ids in (batchid1, batchid2):
        names = cats if ids is None else [ids] if isinstance(ids, str | int) else list(ids)
        if not names:
            raise ValueError("batchid1/batchid2 must name at least one batch.")
        model.batch_codes(names)  # raises on unknown batches
        out.append([str(n) for n in names])
    return out[0], out[1]


def _positions(idx, n: int, name: str) -> np.ndarray:
    idx = np.asarray(idx)
    if idx.dtype == bool:
        if idx.shape != (n,):
            raise ValueError(f"Boolean {name} must have one entry per cell ({n}), got {idx.shape}.")
        idx = np.flatnonzero(idx)
    if idx.size and not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"{name} must hold integer positions or be a boolean mask.")
    idx = idx.astype(np.int64).reshape(-1)
    if idx.size and (idx.min() < -n or idx.max() >= n):
        raise IndexError(f"{name} must be in [0, {n}); got {idx.min()}..{idx.max()}.")
    return np.unique(idx % n)


def _comparisons(adata: AnnData, groupby, group1, group2, idx1, idx2):
    """List of ``(name1, name2, cells1, cells2)``, checked."""
    n = adata.n_obs
    if groupby is not None and (idx1 is not None or idx2 is not None):
        raise ValueError("Give either groupby (with group1/group2) or idx1/idx2, not both.")
    if groupby is None:
        if group1 is not None or group2 is not None:
            raise ValueError("group1/group2 name groups of `groupby`; pass groupby as well.")
        if idx1 is None:
            raise ValueError("Give groupby (an adata.obs column) or idx1 (the cells of group 1).")
        cells1 = _positions(idx1, n, "idx1")
        if idx2 is None:
            cells2 = np.setdiff1d(np.arange(n), cells1)
            name2 = "Rest"
        else:
            cells2 = _positions(idx2, n, "idx2")
            name2 = "idx2"
            overlap = np.intersect1d(cells1, cells2)
            if overlap.size:
                raise ValueError(
                    f"idx1 and idx2 overlap in {overlap.size} cells (e.g. {overlap[:5].tolist()}); "
                    "the groups must be disjoint."
                )
        for name, cells in (("idx1", cells1), (name2 if idx2 is None else "idx2", cells2)):
            if cells.size == 0:
                what = "the rest of the cells" if name == "Rest" else name
                raise ValueError(f"Empty group: {what} has no cells.")
        return [("idx1", name2, cells1, cells2)]

    if groupby not in adata.obs:
        raise KeyError(
            f"groupby {groupby!r} is not a column of adata.obs (columns: {list(adata.obs)})."
        )
    col = adata.obs[groupby]
    labels = col.astype(str).to_numpy()
    if isinstance(col.dtype, pd.CategoricalDtype):
        present = set(labels)
        order = [str(c) for c in col.cat.categories if str(c) in present]
    else:
        order = list(pd.unique(labels))

    def cells_of(group) -> np.ndarray:
        g = str(group)
        if g not in order:
            raise ValueError(
                f"Group {group!r} is not in adata.obs[{groupby!r}] (or has no cells); groups: "
                f"{order[:20]}{' ...' if len(order) > 20 else ''}."
            )
        return np.flatnonzero(labels == g)

    if group2 is not None:
        cells2_ref = cells_of(group2)
    if group1 is None:
        firsts = [g for g in order if group2 is None or g != str(group2)]
    elif isinstance(group1, str) or not isinstance(group1, Iterable):
        firsts = [str(group1)]
    else:
        firsts = [str(g) for g in group1]
    if not firsts:
        raise ValueError(f"adata.obs[{groupby!r}] has no group to compare.")
    out = []
    for g in firsts:
        cells1 = cells_of(g)
        if group2 is None:
            cells2 = np.flatnonzero(labels != g)
            if cells2.size == 0:
                raise ValueError(
                    f"Empty group: every cell is in group {g!r} of adata.obs[{groupby!r}], so "
                    "there is no rest to compare it with."
                )
            out.append((g, "Rest", cells1, cells2))
        else:
            if g == str(group2):
                raise ValueError(f"group1 and group2 are the same group, {g!r}.")
            out.append((g, str(group2), cells1, cells2_ref))
    return out


# --------------------------------------------------------------------------------------------
# gene-gene correlation
# --------------------------------------------------------------------------------------------
def feature_correlation_matrix(
    model: QueryModel,
    adata: AnnData | None = None,
    indices: Sequence[int] | None = None,
    n_samples: int = 10,
    transform_batch: str | Sequence[str] | None = None,
    correlation_type: Literal["spearman", "pearson"] = "spearman",
    *,
    gene_list: Sequence[str] | None = None,
    batch_size: int | None = None,
) -> pd.DataFrame:
    """Gene-gene correlation of the denoised expression.

    ``n_samples`` posterior samples of the normalised expression are drawn per cell and stacked
    into a ``(n_samples * cells, genes)`` matrix whose columns are correlated. With several
    batches in ``transform_batch``, one matrix is computed per batch (every cell decoded as if
    from that batch) and the matrices are averaged.

    Parameters
    ----------
    model
        A trained model with ``get_normalized_expression``.
    adata, indices
        Cells to use (default: all of the model's).
    n_samples
        Posterior samples per cell.
    transform_batch
        Batch or batches to decode in; None: each cell's own batch.
    correlation_type
        ``"spearman"`` (rank) or ``"pearson"``.
    gene_list
        Genes to correlate (default: all).
    batch_size
        Cells per forward pass.

    Returns
    -------
    pandas.DataFrame
        Genes x genes correlation matrix (NaN for a gene whose expression never varies).
    """
    if correlation_type not in ("spearman", "pearson"):
        raise ValueError(
            f"correlation_type must be 'spearman' or 'pearson', got {correlation_type!r}."
        )
    if int(n_samples) != n_samples or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples}.")
    genes = model.gene_indices(gene_list)
    names = [model.summary.var_names[i] for i in genes]
    if transform_batch is None or isinstance(transform_batch, str | int):
        batches = [transform_batch]
    else:
        batches = list(transform_batch)
    mats = []
    for b in batches:
        x = model.get_normalized_expression(
            adata=adata,
            indices=indices,
            transform_batch=b,
            gene_list=gene_list,
            n_samples=int(n_samples),
            return_mean=False,
            return_numpy=True,
            batch_size=batch_size,
        )
        x = np.asarray(x, dtype=np.float64).reshape(-1, len(genes))
        if x.shape[0] < 2:
            raise ValueError("Need at least two cells or samples to compute correlations.")
        if correlation_type == "spearman":
            x = rankdata(x, axis=0)
        mats.append(_corr(x))
    return pd.DataFrame(np.mean(mats, axis=0), index=names, columns=names)


def _corr(x: np.ndarray) -> np.ndarray:
    """Pearson correlation of the columns of ``x``."""
    x = x - x.mean(axis=0)
    norm = np.sqrt((x * x).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        c = (x.T @ x) / np.outer(norm, norm)
    c[:, norm == 0] = np.nan
    c[norm == 0, :] = np.nan
    ok = norm > 0
    c[ok, ok] = 1.0
    return np.clip(c, -1.0, 1.0)
