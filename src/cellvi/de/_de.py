r"""Bayesian differential expression from a fitted model, with a false discovery rate that holds.

Two groups of cells :math:`A` and :math:`B` are compared gene by gene on the model's normalised
expression :math:`\rho_{ng}` (the decoder's ``scale``). Two effects can be tested.

``effect="group"`` (the default) is the log2 fold change of the groups' mean expression,

.. math::

    \beta_g = \log_2\Big(\frac1{|A|}\sum_{n \in A} \rho_{ng} + c\Big)
            - \log_2\Big(\frac1{|B|}\sum_{n \in B} \rho_{ng} + c\Big),

with a small pseudocount :math:`c`. The model gives its estimate :math:`\hat\beta_g` (posterior
draws of every cell's :math:`\rho_n`, averaged; an ensemble of models averages their
estimates). The posterior over :math:`z` alone says almost nothing about how wrong
:math:`\hat\beta_g` is: averaged over hundreds of cells its spread is a few thousandths, while
the estimate's actual error (the finite sample of cells and counts, and the decoder's own
approximation error) is one to two tenths on a log2 scale. The standard error is therefore
measured from the data: the sampling error :math:`r_g` of the same contrast computed on the
counts normalised by library size (within batches when batch effects are corrected), plus the
model's excess error, estimated from how far :math:`\hat\beta_g` departs from that count-based
contrast :math:`\tilde\beta_g`,

.. math::

    s_g^2 = r_g^2 + \tfrac12\big(\tau^2_{b(g)} + (\hat\beta_g - \tilde\beta_g)^2\big),

where :math:`\tau^2_b` is a robust mean of :math:`(\hat\beta - \tilde\beta)^2` over the genes of
similar expression (a moderated variance with one prior degree of freedom, as in limma). An
empirical Bayes prior, a point mass plus normal components centred on the genes' common LFC
:math:`m` (:mod:`cellvi.de._eb`), is fitted to all genes' :math:`(\hat\beta_g, s_g)`; it learns
how many genes change and by how much, and gives each gene's posterior.

``mode="change"`` reports :math:`P(|\beta_g - m| \ge \delta \mid \text{data})`: the effect is
measured from the LFC :math:`m` of the bulk of the genes (reported as ``null_lfc``), which
absorbs the shift every unchanged gene's normalised expression undergoes when other genes
change (the idea behind TMM and median-of-ratios normalisation); ``null_lfc=0`` measures it
from 0 instead. ``mode="vanilla"`` reports the direction,
:math:`P(\beta_g > m) / (P(\beta_g > m) + P(\beta_g < m))` (about 0.5 for a gene without an
effect, so that :math:`|\mathrm{BF}|` ranks genes as in scVI's vanilla test), and its FDR
column bounds the rate of calls of the wrong sign, a gene without an effect having none (the
local false sign rate of Stephens, 2017).

``effect="cell"`` is the test of scVI and scvi-tools (Lopez et al., 2018; Boyeau et al.,
2019): the LFC between the expression of *a random cell* of each group, from ``n_samples``
paired posterior draws :math:`(\rho^{(s)}_A, \rho^{(s)}_B)`,
:math:`p_g = \frac1S\sum_s \mathbf 1[|r^{(s)}_g| \ge \delta]` (change; scvi-tools'
``test_mode="two"``, its default ``"three"`` taking the larger of the two one-sided
probabilities instead) or
:math:`\frac1S\sum_s \mathbf 1[\rho^{(s)}_{Ag} > \rho^{(s)}_{Bg}]` (vanilla). It measures how
different two cells are, not whether the groups differ: when cells vary within a group, a gene
with no group difference gets :math:`p_g` near 0.8 (on a simulated design with three
within-group programmes, 0.3-0.9 for the 900 unchanged genes, two thirds above 0.7, against
about 0.85 for the changed ones), so its FDR column does not mean an FDR.

Either way, genes are called at a target false discovery rate :math:`\alpha` by ranking them by
their posterior probability of an effect and keeping the largest set whose mean posterior
probability of no effect, :math:`\frac1k\sum_{i \le k}(1 - p_{(i)})`, is at most :math:`\alpha`
(:func:`fdr_de_prediction`). With ``effect="group"`` this is calibrated: on simulated designs
with known DE genes (sparse and dense counts, with and without batch effects, balanced and
200 vs 2,000 cell groups, small and large effects) the observed false discovery proportion
stays near or below the target (``benchmarks/bench_de.py``, BENCHMARKS.md).
"""

from __future__ import annotations

import warnings
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

from ._eb import effect_posterior, fit_effect_prior, sample_posterior
from ._sampling import estimate_delta, outlier_cells, posterior_scale_draws


class QueryModel(Protocol):
    """What differential expression and correlations need of a model (its public queries).

    Implemented by every model of :mod:`cellvi.model`; this package imports none of them.
    ``filter_outlier_cells`` also needs ``get_latent_representation``, and
    ``weights="importance"`` the module (``inference``, ``generative_inputs``,
    ``generative``, ``generative_scale``, ``log_likelihood_rows``) and the model's
    minibatches (``_batches``, the one private method used here).
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
GROUP_COLUMNS = ["lfc_estimate", "lfc_se", "null_lfc"]
RAW_COLUMNS = [
    "raw_mean1",
    "raw_mean2",
    "non_zeros_proportion1",
    "non_zeros_proportion2",
    "raw_normalized_mean1",
    "raw_normalized_mean2",
]
_LOG_FLOOR = 1e-12  # keeps log2 finite should a scale underflow to 0 with pseudocount=0
_SE_FLOOR = 1e-3  # log2 units: a gene never seen in either group still has some uncertainty
_IW_DEFAULTS = {"n_per_cell": 8, "truncation": True}
_IW_SCVI_TOOLS = {"max_cells", "n_mc_samples", "n_mc_samples_per_pass"}  # accepted, unused


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
    if mode == "change" and delta is None:
        raise ValueError(
            "mode='change' needs a positive delta (a log2 fold change threshold); "
            "differential_expression(delta=None) chooses one from the data."
        )
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
    effect: Literal["group", "cell"] = "group",
    null_lfc: float | Literal["mode"] = "mode",
    ensemble: Sequence[QueryModel] | None = None,
    weights: Literal["uniform", "importance"] = "uniform",
    filter_outlier_cells: bool = False,
    importance_weighting_kwargs: dict | None = None,
    gene_list: Sequence[str] | None = None,
    pseudocount: float | None = None,
    eps: float = 1e-8,
    seed: int | None = None,
    batch_size: int | None = None,
    all_stats: bool = True,
    pseudocounts: float | None = None,
) -> pd.DataFrame:
    """Bayesian differential expression between groups of cells, at a false discovery rate.

    See :mod:`cellvi.de._de` for the statistics. By default (``effect="group"``) the tested
    effect is the log2 fold change of the groups' mean normalised expression, with a
    standard error measured from the data and an empirical Bayes prior fitted to all genes, so
    that ``is_de_fdr_<target>`` holds its false discovery rate; ``effect="cell"`` is the
    random-cell comparison of scvi-tools.

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
        Cells of the two groups, as integer positions, boolean masks or (as in scvi-tools) a
        query string of ``adata.obs`` such as ``"cell_type == 'B cells'"``; ``idx2=None``
        means all other cells.
    mode
        ``"change"``: ``proba_de`` is the posterior probability that the effect is at least
        ``delta`` in absolute value. ``"vanilla"``: ``proba_de`` is the posterior probability
        that it is positive (group 1 above group 2) given that it has a sign, and
        ``is_de_fdr_<target>`` calls the genes whose sign is known at that false sign rate.
    delta
        Smallest log2 fold change that counts as an effect (``"change"`` mode); None chooses
        it from the data: 0.6 times the mean size of the outer components of a three-component
        Gaussian mixture fitted to the genes' LFC estimates, at least 0.1 (scvi-tools' rule).
    batch_correction
        Decode every cell in each batch of ``batchid1`` (group 1) / ``batchid2`` (group 2) and
        average, rather than in its own batch, to remove batch effects from the comparison
        (then the count-based contrast that measures the standard error is computed within
        batches).
    batchid1, batchid2
        Batches to average over (default: all of the model's batches); only with
        ``batch_correction=True``.
    fdr_target
        Target false discovery rate of the ``is_de_fdr_<fdr_target>`` column, in ``(0, 1)``.
    n_samples
        Posterior draws of the expression per group (and per model of an ensemble). With
        ``effect="group"`` they are spread over the group's cells (every cell at least once
        when the group has fewer cells).
    silent
        Hide the progress bar over comparisons.
    effect
        ``"group"``: the LFC of the groups' mean expression, with calibrated probabilities.
        ``"cell"``: the LFC between a random cell of each group (scvi-tools' test; its FDR
        column is not an FDR when cells vary within groups).
    null_lfc
        ``effect="group"``: the LFC of genes without an effect, from which effects are
        measured: ``"mode"`` (default) estimates it from all genes (the centre of the fitted
        prior; under 0.15 in absolute value on the simulated designs), a number fixes it (0:
        effects measured from no change of the normalised expression).
    ensemble
        Further fitted models of the same data and genes (e.g. the same model trained with
        other seeds), pooled with ``model``: their LFC estimates are averaged (``"group"``) or
        their posterior draws pooled (``"cell"``). This averages out part of each decoder's
        approximation error (Boyeau et al., 2023).
    weights
        ``"importance"`` reweights each cell's posterior draws towards the model's exact
        posterior of that cell (Boyeau et al., 2023; :mod:`cellvi.de._sampling`), with at
        least ``n_per_cell`` draws per cell and their likelihood, so it is several times
        slower. ``"uniform"``: the variational posteriors as they are.
    filter_outlier_cells
        Leave out of each group the cells far from it in the latent space (robust Mahalanobis
        distance beyond the chi-square 97.5 % quantile; :func:`cellvi.de._sampling.outlier_cells`).
    importance_weighting_kwargs
        Options of the importance weights: ``n_per_cell`` (draws per cell, 8) and
        ``truncation`` (cap each weight at ``sqrt(n_per_cell)`` times its cell's mean, True).
    gene_list
        Restrict the results to these genes (default: all of the model's genes; the prior of
        ``effect="group"`` is always fitted to all of them).
    pseudocount
        Added to the scales before taking log2 fold changes. None: ``0.1 / median library
        size`` of the compared cells, i.e. the expression of a gene seen about 0.1 times in a
        typical cell, which damps the fold changes of genes too rare to be measured.
    eps
        Regularises the Bayes factor ``log((p + eps) / (1 - p + eps))``.
    seed
        Seeds the drawing of cells and of latent samples (the global random state is left
        untouched).
    all_stats
        Add the count statistics ``raw_mean1/2``, ``non_zeros_proportion1/2`` and
        ``raw_normalized_mean1/2`` (default, as in scvi-tools); False leaves them out.
    pseudocounts
        scvi-tools' name of ``pseudocount`` (give one of the two).
    batch_size
        Cells per forward pass.

    Returns
    -------
    pandas.DataFrame
        Indexed by gene, one block of rows per comparison, each sorted by decreasing
        ``bayes_factor``. Columns: ``proba_de``, ``proba_not_de``, ``bayes_factor``, ``scale1``,
        ``scale2`` (mean posterior scales of the groups), ``lfc_mean``, ``lfc_median``,
        ``lfc_std``, ``lfc_min``, ``lfc_max`` (summaries of posterior draws of the log2 fold
        change of group 1 over group 2: of the groups' means for ``effect="group"``, of random
        cells for ``"cell"``); with ``effect="group"`` also ``lfc_estimate`` and ``lfc_se``
        (the model's estimate and its standard error) and ``null_lfc`` (:math:`m`); in
        ``"change"`` mode ``delta``, in ``"vanilla"`` mode ``proba_m1`` (= ``proba_de``) and
        ``proba_m2`` as scvi-tools names them; ``pseudocounts`` (the pseudocount used);
        ``raw_mean1``, ``raw_mean2`` (mean counts),
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
        ``(0, 1)``; unknown genes or batches; ``batchid1/2`` without ``batch_correction``; an
        unknown ``effect``, ``weights`` or importance option; an ensemble model with other
        genes.
    """
    _check_mode(mode, delta)
    _check_fdr(fdr_target)
    if pseudocounts is not None:  # scvi-tools' name
        if pseudocount is not None and pseudocount != pseudocounts:
            raise ValueError(
                f"pseudocount={pseudocount} and pseudocounts={pseudocounts} disagree: give one "
                "(pseudocounts is scvi-tools' name of the same option).")
        pseudocount = pseudocounts
    if int(n_samples) != n_samples or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples}.")
    if pseudocount is not None and pseudocount < 0:
        raise ValueError(f"pseudocount must be >= 0, got {pseudocount}.")
    if effect not in ("group", "cell"):
        raise ValueError(
            f"effect must be 'group' (the groups' mean expression) or 'cell' (a random cell "
            f"of each group), got {effect!r}."
        )
    if weights not in ("uniform", "importance"):
        raise ValueError(f"weights must be 'uniform' or 'importance', got {weights!r}.")
    if not (null_lfc == "mode" or (isinstance(null_lfc, int | float)
                                    and np.isfinite(null_lfc))):
        raise ValueError(f"null_lfc must be 'mode' or a number, got {null_lfc!r}.")
    iw = dict(_IW_DEFAULTS)
    iw_kwargs = dict(importance_weighting_kwargs or {})
    ignored = sorted(set(iw_kwargs) & _IW_SCVI_TOOLS)
    if ignored:
        warnings.warn(
            f"importance_weighting_kwargs {ignored} are scvi-tools' options of weights against "
            "anchor cells; cellvi weights each cell's draws against its own likelihood "
            "(cellvi.de._sampling), so they have no effect.",
            UserWarning,
            stacklevel=2,
        )
        for k in ignored:
            iw_kwargs.pop(k)
    importance_weighting_kwargs = iw_kwargs
    unknown = sorted(set(importance_weighting_kwargs or {}) - set(iw))
    if unknown:
        raise ValueError(
            f"Unknown importance_weighting_kwargs {unknown}; valid: {sorted(_IW_DEFAULTS)}."
        )
    iw.update(importance_weighting_kwargs or {})
    if int(iw["n_per_cell"]) < 1:
        raise ValueError("importance_weighting_kwargs n_per_cell must be >= 1.")
    models = [model, *(ensemble or [])]
    adata_ = model.adata if adata is None else adata
    for i, m in enumerate(models):
        if i and list(m.summary.var_names) != list(model.summary.var_names):
            raise ValueError(
                f"ensemble model {i - 1} has other genes than `model` "
                f"({m.summary.n_vars} vs {model.summary.n_vars}, or another order): an "
                "ensemble must be fitted to the same genes."
            )
        m.validate_adata(adata)  # checks the genes and counts of a new AnnData
    genes = model.gene_indices(gene_list)  # raises on unknown genes
    gene_names = pd.Index([model.summary.var_names[i] for i in genes])
    tb1, tb2 = _batch_policy(model, batch_correction, batchid1, batchid2)
    if weights == "importance" and any(tb is not None and len(tb) > 1 for tb in (tb1, tb2)):
        raise ValueError(
            "weights='importance' decodes each group in one batch: with batch_correction, "
            "give a single batch in batchid1 and in batchid2 (or use weights='uniform')."
        )
    for m in models[1:]:
        _batch_policy(m, batch_correction, batchid1, batchid2)
    comparisons = _comparisons(adata_, groupby, group1, group2, idx1, idx2)

    counts = get_counts(adata_, model.summary.layer)
    counts = sp.csr_matrix(counts) if sp.issparse(counts) else np.asarray(counts)
    library = np.asarray(counts.sum(axis=1)).reshape(-1)
    cell_batches = _cell_batches(model, adata_)
    rng = np.random.default_rng(seed)
    fork = nullcontext()
    if seed is not None:
        devices = sorted({
            (torch.cuda.current_device() if m.device.index is None else m.device.index)
            for m in models if m.device.type == "cuda"
        })
        fork = torch.random.fork_rng(devices=devices)

    results = []
    fdr_col = f"is_de_fdr_{fdr_target}"
    with fork:
        if seed is not None:
            torch.manual_seed(int(rng.integers(2**62)))
        for name1, name2, cells1, cells2 in tqdm(
            comparisons, desc="DE comparisons", disable=silent
        ):
            if filter_outlier_cells:
                cells1 = _without_outliers(model, adata, cells1, batch_size)
                cells2 = _without_outliers(model, adata, cells2, batch_size)
            c = pseudocount
            if c is None:
                med = float(np.median(library[np.concatenate([cells1, cells2])]))
                c = 0.1 / max(med, 1.0)
            args = dict(adata=adata, cells1=cells1, cells2=cells2, tb1=tb1, tb2=tb2,
                        n_samples=int(n_samples), weights=weights, iw=iw, rng=rng,
                        batch_size=batch_size, pseudocount=c)
            if effect == "group":
                stats = _group_effect(
                    models, **args, counts=counts, library=library, batches=cell_batches,
                    stratify=batch_correction and _same_batches(tb1, tb2), mode=mode,
                    delta=delta, null_lfc=null_lfc, eps=eps,
                )
                stats = {k: (v[genes] if np.ndim(v) else v) for k, v in stats.items()}
                p = stats["proba_de"]
                confidence = p if mode == "change" else 1.0 - stats.pop("lfsr")
            else:
                s1, s2 = _cell_draws(models, **args)
                d = delta
                if mode == "change" and delta is None:
                    lfc = (np.log2(np.maximum(s1 + c, _LOG_FLOOR))
                           - np.log2(np.maximum(s2 + c, _LOG_FLOOR)))
                    d = estimate_delta(lfc.mean(0))
                stats = de_statistics(s1[:, genes], s2[:, genes], mode=mode,
                                      delta=d if mode == "change" else None,
                                      pseudocount=c, eps=eps)
                if mode == "change":
                    stats["delta"] = d
                p = stats["proba_de"]
                confidence = p if mode == "change" else np.maximum(p, 1.0 - p)
            df = pd.DataFrame(stats, index=gene_names)
            if mode == "vanilla":  # scvi-tools' names: P(scale1 > scale2) and its complement
                df["proba_m1"] = df["proba_de"]
                df["proba_m2"] = 1.0 - df["proba_de"]
            else:
                df["delta"] = stats.get("delta", delta)
            df["pseudocounts"] = c
            if all_stats:
                raw1 = _raw_stats(counts, library, cells1, genes)
                raw2 = _raw_stats(counts, library, cells2, genes)
                for key, v1, v2 in zip(
                    ("raw_mean", "non_zeros_proportion", "raw_normalized_mean"), raw1, raw2
                ):
                    df[f"{key}1"] = v1
                    df[f"{key}2"] = v2
            df[fdr_col] = fdr_de_prediction(confidence, fdr_target)
            df["comparison"] = f"{name1} vs {name2}"
            df["group1"] = name1
            df["group2"] = name2
            extra = [k for k in (*GROUP_COLUMNS, "delta", "proba_m1", "proba_m2", "pseudocounts")
                     if k in df]
            df = df[STAT_COLUMNS + extra + (RAW_COLUMNS if all_stats else [])
                    + [fdr_col, "comparison", "group1", "group2"]]
            results.append(df.sort_values("bayes_factor", ascending=False, kind="stable"))
    out = pd.concat(results)
    out.index.name = None
    return out


# --------------------------------------------------------------------------------------------
# the effect of the groups' mean expression
# --------------------------------------------------------------------------------------------
def _group_effect(models, *, adata, cells1, cells2, tb1, tb2, n_samples, weights, iw, rng,
                  batch_size, pseudocount, counts, library, batches, stratify, mode, delta,
                  null_lfc, eps) -> dict[str, np.ndarray]:
    """Posterior statistics of the LFC of the groups' mean expression, for all genes."""
    c = pseudocount
    means1, means2 = [], []
    for m in models:
        means1.append(_group_mean(m, adata, cells1, tb1, n_samples, weights, iw, rng,
                                  batch_size))
        means2.append(_group_mean(m, adata, cells2, tb2, n_samples, weights, iw, rng,
                                  batch_size))
    means1, means2 = np.array(means1), np.array(means2)  # (models, genes)
    estimate = (np.log2(np.maximum(means1 + c, _LOG_FLOOR))
                - np.log2(np.maximum(means2 + c, _LOG_FLOOR))).mean(0)
    reference, ref_se, expr = count_contrast(counts, library, cells1, cells2, c,
                                             batches=batches if stratify else None)
    se = effect_se(estimate, reference, ref_se, expr)
    prior = fit_effect_prior(estimate, se, mode=None if null_lfc == "mode" else float(null_lfc))
    centre = prior.mode
    if mode == "change" and delta is None:
        delta = estimate_delta(estimate - centre)
    post = effect_posterior(prior, estimate, se, delta=delta if mode == "change" else 0.0,
                            centre=centre)
    median, low, high = np.empty_like(estimate), np.empty_like(estimate), np.empty_like(estimate)
    for start in range(0, estimate.size, 2000):  # 1,000 posterior draws, 2,000 genes at a time
        sl = slice(start, start + 2000)
        draws = sample_posterior(prior, estimate[sl], se[sl], 1000, rng)
        median[sl], low[sl], high[sl] = np.median(draws, 0), draws.min(0), draws.max(0)
    if mode == "change":
        p = post["proba_de"]
    else:  # the direction of a signed effect: about 0.5 for a gene without one
        signed = post["proba_pos"] + post["proba_neg"]
        p = np.where(signed > 0, post["proba_pos"] / np.maximum(signed, 1e-300), 0.5)
    out = {
        "proba_de": p,
        "proba_not_de": 1.0 - p,
        "bayes_factor": np.log(p + eps) - np.log(1.0 - p + eps),
        "scale1": means1.mean(0),
        "scale2": means2.mean(0),
        "lfc_mean": post["mean"],
        "lfc_median": median,
        "lfc_std": post["sd"],
        "lfc_min": low,
        "lfc_max": high,
        "lfc_estimate": estimate,
        "lfc_se": se,
        "null_lfc": np.full(estimate.shape, centre),
        "lfsr": post["lfsr"],
    }
    if mode == "change":
        out["delta"] = np.full(estimate.shape, float(delta))
    return out


def _group_mean(model, adata, cells, transform_batch, n_samples, weights, iw, rng,
                batch_size) -> np.ndarray:
    """Posterior mean of the group's mean normalised expression, ``(genes,)``."""
    if cells.size > n_samples:
        cells = np.sort(rng.choice(cells, size=n_samples, replace=False))
    per_cell = max(1, n_samples // cells.size)
    if weights == "uniform":
        scale = model.get_normalized_expression(
            adata=adata, indices=cells, transform_batch=transform_batch, library_size=1,
            n_samples=per_cell, return_mean=True, return_numpy=True, batch_size=batch_size,
        )
        return np.asarray(scale, dtype=np.float64).mean(0)
    draws, log_w = posterior_scale_draws(
        model, adata, cells, max(per_cell, int(iw["n_per_cell"])), transform_batch,
        weights="importance", truncation=bool(iw["truncation"]), batch_size=batch_size,
    )
    return np.einsum("kn,kng->g", np.exp(log_w), draws.astype(np.float64))


def count_contrast(counts, library: np.ndarray, cells1: np.ndarray, cells2: np.ndarray,
                   pseudocount: float, *, batches: np.ndarray | None = None):
    r"""Return the count-based LFC of two groups, its standard error and the expression.

    With :math:`y_{ng} = x_{ng} / \ell_n` the counts normalised by library size, the contrast
    is :math:`\log_2(\bar y_{Ag} + c) - \log_2(\bar y_{Bg} + c)` and its standard error, by the
    delta method, :math:`\sqrt{\sum_G \mathrm{var}(y_{Gg}) / (|G| (\bar y_{Gg} + c)^2)} / \ln 2`.
    With ``batches`` (one label per cell of ``counts``) the contrast is computed within each
    batch that has at least two cells of each group and averaged with weights
    :math:`n_{Ab} n_{Bb} / (n_{Ab} + n_{Bb})`, so that batch effects confounded with the
    groups do not enter it (when no batch qualifies the pooled contrast is returned).

    Returns
    -------
    contrast, se, log_expression
        ``(genes,)`` arrays; ``log_expression`` is :math:`\log(\bar y_g + c)` over both groups.
    """
    def moments(cells):
        x = counts[cells]
        inv = 1.0 / np.maximum(library[cells], 1e-12)
        if sp.issparse(x):
            y = sp.diags(inv) @ x.astype(np.float64)
            mean = np.asarray(y.mean(axis=0)).reshape(-1)
            sq = np.asarray(y.multiply(y).mean(axis=0)).reshape(-1)
        else:
            y = np.asarray(x, dtype=np.float64) * inv[:, None]
            mean, sq = y.mean(0), (y * y).mean(0)
        n = len(cells)
        var_mean = np.maximum(sq - mean**2, 0.0) * n / max(n - 1, 1) / n
        return mean, var_mean, float(inv.mean()) / n

    def contrast(a, b):
        (m1, v1, f1), (m2, v2, f2) = moments(a), moments(b)
        # at least the Poisson noise of the mean plus pseudocount: a group where a gene was
        # never seen is as uncertain as one where it was seen about once
        v1 = np.maximum(v1, (m1 + pseudocount) * f1)
        v2 = np.maximum(v2, (m2 + pseudocount) * f2)
        lfc = np.log2(m1 + pseudocount) - np.log2(m2 + pseudocount)
        var = (v1 / (m1 + pseudocount) ** 2 + v2 / (m2 + pseudocount) ** 2) / np.log(2) ** 2
        return lfc, var

    both = np.concatenate([cells1, cells2])
    expr = np.log(moments(both)[0] + pseudocount)
    if batches is not None:
        parts, weights = [], []
        for b in np.unique(batches[both]):
            a, bb = cells1[batches[cells1] == b], cells2[batches[cells2] == b]
            if a.size >= 2 and bb.size >= 2:
                parts.append(contrast(a, bb))
                weights.append(a.size * bb.size / (a.size + bb.size))
        if parts:
            w = np.asarray(weights) / np.sum(weights)
            lfc = sum(wi * p[0] for wi, p in zip(w, parts))
            var = sum(wi**2 * p[1] for wi, p in zip(w, parts))
            return lfc, np.sqrt(var), expr
    lfc, var = contrast(cells1, cells2)
    return lfc, np.sqrt(var), expr


def effect_se(estimate: np.ndarray, reference: np.ndarray, reference_se: np.ndarray,
              log_expression: np.ndarray, *, n_bins: int | None = None) -> np.ndarray:
    r"""Return the standard error of the model's LFC estimates.

    :math:`s_g^2 = r_g^2 + \frac12(\tau^2_{b(g)} + d_g^2)` with :math:`d_g` the departure of the
    model's estimate from the count-based contrast, :math:`r_g` the contrast's standard error
    and :math:`\tau^2_b` the robust mean square of :math:`d` (its median over 0.4549, the
    median of :math:`\chi^2_1`) among the genes of expression bin :math:`b` (equal-count bins
    of ``log_expression``, about 100 genes each, at most 10). Averaging the pooled and the
    gene's own square is a moderated variance with one prior degree of freedom: a gene whose
    estimate strays far from its counts gets a larger error without one unlucky gene setting
    it alone.

    On simulated designs the model's error on unchanged genes was 1.2-2 times the contrast's
    sampling error alone (largest for rarely detected genes), and heavier-tailed; with this
    standard error the observed FDR stays at or under its target.
    """
    estimate = np.asarray(estimate, dtype=np.float64)
    d2 = (estimate - reference) ** 2
    n = estimate.size
    if n_bins is None:
        n_bins = int(np.clip(n // 100, 1, 10))
    order = np.argsort(log_expression, kind="stable")
    tau2 = np.empty(n)
    for part in np.array_split(order, n_bins):
        if part.size:
            tau2[part] = np.median(d2[part]) / 0.4549
    se2 = np.asarray(reference_se, dtype=np.float64) ** 2 + 0.5 * (tau2 + d2)
    return np.maximum(np.sqrt(se2), _SE_FLOOR)


# --------------------------------------------------------------------------------------------
# the effect between random cells (scvi-tools' test)
# --------------------------------------------------------------------------------------------
def _cell_draws(models, *, adata, cells1, cells2, tb1, tb2, n_samples, weights, iw, rng,
                batch_size, pseudocount) -> tuple[np.ndarray, np.ndarray]:
    """Paired posterior draws of the scale of a random cell of each group, all genes."""
    out = []
    for cells, tb in ((cells1, tb1), (cells2, tb2)):
        parts = []
        for k, m in enumerate(models):
            n = n_samples // len(models) + (k < n_samples % len(models))
            if n == 0:
                continue
            if weights == "uniform":
                picks = np.sort(rng.choice(cells, size=n, replace=True))
                parts.append(np.asarray(m.get_normalized_expression(
                    adata=adata, indices=picks, transform_batch=tb, library_size=1,
                    n_samples=1, return_numpy=True, batch_size=batch_size,
                )))
            else:  # draws resampled by their importance weights (as scvi-tools does)
                pool = cells if cells.size <= n else np.sort(rng.choice(cells, n, replace=False))
                draws, log_w = posterior_scale_draws(
                    m, adata, pool, int(iw["n_per_cell"]), tb, weights="importance",
                    truncation=bool(iw["truncation"]), batch_size=batch_size,
                )
                draws = draws.reshape(-1, draws.shape[-1])
                w = np.exp(log_w.reshape(-1))
                parts.append(draws[rng.choice(draws.shape[0], size=n, p=w / w.sum())])
        draws = np.concatenate(parts)
        out.append(draws[rng.permutation(draws.shape[0])])  # random pairing across groups
    return out[0], out[1]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _without_outliers(model, adata, cells: np.ndarray, batch_size) -> np.ndarray:
    latent = model.get_latent_representation(adata=adata, indices=cells, batch_size=batch_size)
    out = outlier_cells(np.asarray(latent))
    if out.all():
        return cells
    return cells[~out]


def _cell_batches(model, adata: AnnData) -> np.ndarray | None:
    key = getattr(model.summary, "batch_key", None)
    if key is None or key not in adata.obs:
        return None
    return adata.obs[key].astype(str).to_numpy()


def _same_batches(tb1, tb2) -> bool:
    return tb1 is not None and tb2 is not None and set(tb1) == set(tb2)


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


def _query(adata: AnnData, idx, name: str):
    """Turn a string ``idx``, a pandas query of ``adata.obs`` (scvi-tools), into its mask."""
    if not isinstance(idx, str):
        return idx
    try:
        mask = adata.obs.eval(idx)
    except Exception as e:  # pandas raises many kinds (undefined names, syntax, types)
        raise ValueError(
            f"{name}={idx!r} is not a valid query of adata.obs ({type(e).__name__}: {e}); "
            f"columns: {list(adata.obs.columns)[:20]}. Example: \"cell_type == 'B cells'\"."
        ) from e
    mask = np.asarray(mask)
    if mask.dtype != bool or mask.shape != (adata.n_obs,):
        raise ValueError(
            f"{name}={idx!r} must be a condition on adata.obs giving True or False per cell "
            f"(got {mask.dtype} of shape {mask.shape}).")
    return mask


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
        cells1 = _positions(_query(adata, idx1, "idx1"), n, "idx1")
        if idx2 is None:
            cells2 = np.setdiff1d(np.arange(n), cells1)
            name2 = "Rest"
        else:
            cells2 = _positions(_query(adata, idx2, "idx2"), n, "idx2")
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
