r"""The imputation benchmark of the scVI paper: hide some counts, impute them, score.

Lopez et al. (2018) hide 10% of the non-zero entries of the count matrix (set to zero:
``mode="uniform"``; or thinned to a Binomial(x, 0.2) draw: ``mode="binomial"``), fit the model on
the corrupted matrix, and compare each hidden entry's original count with the model's imputed
value, the expected count :math:`\ell_n \rho_{ng}` of its negative binomial (scVI's
``px_rate``), by the median absolute error. :func:`hide_counts` corrupts an AnnData and keeps
what it hid; :func:`imputation_score` scores a model trained on it (reuse);
:func:`imputation_benchmark` does both and trains the model in between (retrain).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import scipy.sparse as sp
from anndata import AnnData

__all__ = ["hide_counts", "imputation_benchmark", "imputation_score"]

HIDDEN_KEY = "cellvi_hidden"


def _counts(adata: AnnData, layer: str | None):
    if layer is None:
        return adata.X
    if layer not in adata.layers:
        raise KeyError(f"layer {layer!r} is not in adata.layers (layers: {list(adata.layers)}).")
    return adata.layers[layer]


def hide_counts(
    adata: AnnData,
    *,
    rate: float = 0.1,
    mode: Literal["uniform", "binomial"] = "uniform",
    layer: str | None = None,
    seed: int = 0,
    key_added: str | None = None,
    copy: bool = False,
) -> AnnData | None:
    r"""Hide a share of the non-zero counts, keeping their original values to score imputation.

    ``rate`` of the non-zero entries (chosen uniformly without replacement, seeded) are set to
    zero (``mode="uniform"``) or replaced by a Binomial(x, 0.2) draw of their count x
    (``mode="binomial"``), as in the scVI paper's imputation benchmark. With ``"uniform"``, a
    cell whose every non-zero entry was chosen keeps its first one (models with the observed
    library size refuse empty cells), so slightly fewer than ``rate`` may be hidden.

    Writes the corrupted counts into ``adata.X`` (or ``layer``; kept sparse when it is) and
    ``adata.uns[key_added]`` (default ``"cellvi_hidden"``): ``rows``, ``cols`` (the hidden
    entries' positions), ``values`` (their original counts), ``mode``, ``rate``, ``layer``,
    ``seed``. Set the AnnData up for a model *after* this (the counts changed).

    Parameters
    ----------
    adata
        Cells x genes raw counts.
    rate
        Share of the non-zero entries to hide, in (0, 1).
    mode
        ``"uniform"`` (set them to zero) or ``"binomial"`` (thin them).
    layer
        Layer holding the counts (None: ``adata.X``).
    seed
        Seed of the choice (and of the thinning).
    key_added
        Key of the record in ``adata.uns``.
    copy
        Corrupt and return a copy, leaving ``adata`` as it was.

    Returns
    -------
    The corrupted copy with ``copy=True``, else None.
    """
    if not (isinstance(rate, float | int) and not isinstance(rate, bool) and 0 < rate < 1):
        raise ValueError(f"rate must be a number in (0, 1), got {rate!r}.")
    if mode not in ("uniform", "binomial"):
        raise ValueError(f"mode must be 'uniform' or 'binomial', got {mode!r}.")
    key = HIDDEN_KEY if key_added is None else key_added
    if copy:
        adata = adata.copy()
    x = _counts(adata, layer)
    sparse = sp.issparse(x)
    m = sp.csr_matrix(x, copy=True) if sparse else np.array(x, copy=True)
    if sparse:
        m.sum_duplicates()
        m.eliminate_zeros()
        rows = np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))
        cols = m.indices.astype(np.int64)
        vals = m.data
    else:
        rows, cols = np.nonzero(m)
        vals = m[rows, cols]
    if np.any(vals < 0) or np.any(vals != np.round(vals)):
        raise ValueError("hide_counts needs raw integer counts; pass the layer holding them "
                         "(layer=...).")
    n_hide = int(np.floor(rate * vals.size))
    if n_hide < 1:
        raise ValueError(f"rate={rate} of {vals.size} non-zero entries hides none; use a "
                         "larger rate or more data.")
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(vals.size, size=n_hide, replace=False))
    if mode == "uniform":  # no cell loses all its counts: one of its entries stays
        per_row = np.bincount(rows, minlength=m.shape[0])
        hit = np.bincount(rows[pick], minlength=m.shape[0])
        emptied = np.flatnonzero((hit == per_row) & (per_row > 0))
        if emptied.size:
            first = np.searchsorted(rows[pick], emptied)
            pick = np.delete(pick, first)
            n_hide = pick.size
    original = np.asarray(vals[pick], dtype=np.float64).copy()
    new = (np.zeros(n_hide) if mode == "uniform"
           else rng.binomial(original.astype(np.int64), 0.2).astype(np.float64))
    if sparse:
        m.data[pick] = new.astype(m.data.dtype)
        m.eliminate_zeros()
    else:
        m[rows[pick], cols[pick]] = new.astype(m.dtype)
    if layer is None:
        adata.X = m
    else:
        adata.layers[layer] = m
    adata.uns[key] = {"rows": rows[pick].astype(np.int64), "cols": cols[pick].astype(np.int64),
                      "values": original, "mode": mode, "rate": float(rate),
                      "layer": "" if layer is None else layer, "seed": int(seed)}
    return adata if copy else None


def _hidden(adata: AnnData, key: str) -> dict[str, Any]:
    if key not in adata.uns:
        raise KeyError(f"adata.uns has no {key!r}: hide counts first with "
                       f"cellvi.metrics.hide_counts(adata, key_added={key!r}).")
    rec = adata.uns[key]
    for field in ("rows", "cols", "values"):
        if field not in rec:
            raise ValueError(f"adata.uns[{key!r}] lacks {field!r}; it was not written by "
                             "hide_counts.")
    return rec


def _expected_counts(model, adata: AnnData | None, cells: np.ndarray,
                     chunk: int = 1024) -> np.ndarray:
    """Return the expected counts ``(len(cells), genes)``: the NB mean (scVI's px_rate)."""
    parts = []
    for start in range(0, len(cells), chunk):
        idx = cells[start:start + chunk]
        if hasattr(model, "get_likelihood_parameters"):
            values = model.get_likelihood_parameters(adata=adata, indices=idx)["mean"]
        else:
            values = model.get_normalized_expression(adata=adata, indices=idx,
                                                     library_size="latent", return_numpy=True)
        parts.append(np.asarray(values, dtype=np.float64))
    return np.concatenate(parts)


def imputation_score(model, adata: AnnData | None = None, *,
                     key: str = HIDDEN_KEY) -> dict[str, float]:
    r"""Score a model's imputation of the counts hidden by :func:`hide_counts`.

    The imputed value of a hidden entry is the model's expected count there, the mean of its
    negative binomial (for ZINB the NB mean, scVI's ``px_rate``), for the cell's observed (or
    modelled) library size on the corrupted counts. The model must have been trained on the
    corrupted counts, else the hidden values leak in.

    Parameters
    ----------
    model
        A trained model whose AnnData (or ``adata``) was corrupted by :func:`hide_counts`.
    adata
        The corrupted AnnData (default: the model's).
    key
        The record's key in ``adata.uns``.

    Returns
    -------
    dict
        ``median_absolute_error`` (the scVI paper's score, lower is better),
        ``mean_absolute_error``, ``pearson`` and ``spearman`` correlations of the imputed and
        original values, and ``n_entries``.
    """
    from scipy.stats import rankdata

    data = model.adata if adata is None else adata
    rec = _hidden(data, key)
    rows = np.asarray(rec["rows"], dtype=np.int64)
    cols = np.asarray(rec["cols"], dtype=np.int64)
    truth = np.asarray(rec["values"], dtype=np.float64)
    cells, inverse = np.unique(rows, return_inverse=True)
    expected = _expected_counts(model, adata, cells)
    imputed = expected[inverse, cols]
    err = np.abs(imputed - truth)

    def corr(a, b):
        if a.std() == 0 or b.std() == 0:
            return float("nan")
        return float(np.corrcoef(a, b)[0, 1])

    return {"median_absolute_error": float(np.median(err)),
            "mean_absolute_error": float(err.mean()),
            "pearson": corr(imputed, truth),
            "spearman": corr(rankdata(imputed), rankdata(truth)),
            "n_entries": int(truth.size)}


def imputation_benchmark(
    model_cls,
    adata: AnnData,
    *,
    rate: float = 0.1,
    mode: Literal["uniform", "binomial"] = "uniform",
    seed: int = 0,
    setup_kwargs: dict[str, Any] | None = None,
    model_kwargs: dict[str, Any] | None = None,
    train_kwargs: dict[str, Any] | None = None,
) -> tuple[dict[str, float], Any]:
    """Hide counts of a copy of ``adata``, train a new model on it, and score its imputation.

    Parameters
    ----------
    model_cls
        The model class (``cellvi.model.SCVI``, ...).
    adata
        Raw counts; it is not changed (a copy is corrupted).
    rate, mode, seed
        As in :func:`hide_counts` (``seed`` also seeds the training).
    setup_kwargs
        Options of ``model_cls.setup_anndata`` for the copy (``layer`` included; default none).
    model_kwargs, train_kwargs
        Options of the model and of its ``train``.

    Returns
    -------
    (dict, model)
        :func:`imputation_score`'s scores and the trained model.
    """
    setup_kwargs = dict(setup_kwargs or {})
    corrupted = hide_counts(adata, rate=rate, mode=mode, layer=setup_kwargs.get("layer"),
                            seed=seed, copy=True)
    corrupted.uns.pop("_cellvi_setup", None)
    model_cls.setup_anndata(corrupted, **setup_kwargs)
    model = model_cls(corrupted, **(model_kwargs or {}))
    model.train(**{"seed": seed, "progress_bar": False, **(train_kwargs or {})})
    return imputation_score(model), model
