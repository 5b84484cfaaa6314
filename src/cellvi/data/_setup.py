"""Registering an AnnData with a model: what is read from where, summarised in one dataclass."""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

UNS_KEY = "_cellvi_setup"


@dataclass(frozen=True)
class DataSummary:
    """Everything a model needs to read an AnnData the way it was trained on.

    Stored (as JSON) in ``adata.uns["_cellvi_setup"]`` by ``setup_anndata`` and saved with the
    model, so that a new AnnData is read with the same genes and category codes.

    Attributes
    ----------
    var_names
        Genes, in order.
    layer
        Layer holding the raw counts (None: ``adata.X``).
    batch_key, batch_categories
        ``obs`` column of the batch and its categories (code ``i`` is ``batch_categories[i]``);
        without a batch key there is one batch, ``"0"``.
    labels_key, label_categories
        Likewise for labels.
    size_factor_key
        ``obs`` column of user size factors, or None.
    categorical_covariate_keys, categorical_covariate_categories
        Extra categorical covariates and their categories.
    continuous_covariate_keys
        Continuous covariates.
    library_log_means, library_log_vars
        Mean and variance of the log total counts per batch (the library prior).
    n_cells
        Number of cells at setup.
    extra
        Model-specific settings (e.g. SCANVI's ``unlabeled_category``).
    """

    var_names: list[str]
    layer: str | None = None
    batch_key: str | None = None
    batch_categories: list[str] = field(default_factory=lambda: ["0"])
    labels_key: str | None = None
    label_categories: list[str] = field(default_factory=lambda: ["0"])
    size_factor_key: str | None = None
    categorical_covariate_keys: list[str] = field(default_factory=list)
    categorical_covariate_categories: list[list[str]] = field(default_factory=list)
    continuous_covariate_keys: list[str] = field(default_factory=list)
    library_log_means: list[float] = field(default_factory=list)
    library_log_vars: list[float] = field(default_factory=list)
    n_cells: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def n_vars(self) -> int:
        """Number of genes."""
        return len(self.var_names)

    @property
    def n_batch(self) -> int:
        """Number of batches."""
        return len(self.batch_categories)

    @property
    def n_labels(self) -> int:
        """Number of labels."""
        return len(self.label_categories)

    @property
    def n_cats_per_cov(self) -> list[int]:
        """Number of categories of each extra categorical covariate."""
        return [len(c) for c in self.categorical_covariate_categories]

    def to_json(self) -> str:
        """Serialise to a JSON string."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> DataSummary:
        """Read back what :meth:`to_json` wrote."""
        return cls(**json.loads(text))

    def replace(self, **changes) -> DataSummary:
        """Return a copy with some fields changed."""
        return replace(self, **changes)


def setup_anndata(
    adata: AnnData,
    *,
    layer: str | None = None,
    batch_key: str | None = None,
    labels_key: str | None = None,
    size_factor_key: str | None = None,
    categorical_covariate_keys: list[str] | None = None,
    continuous_covariate_keys: list[str] | None = None,
    extra: dict | None = None,
) -> DataSummary:
    """Check an AnnData of raw counts and record how a model should read it.

    Writes ``adata.uns["_cellvi_setup"]`` (a JSON string of :class:`DataSummary`) and returns the
    summary. Nothing else in ``adata`` is changed.

    Raises
    ------
    KeyError
        A key that is not in ``adata.obs``, or a layer that does not exist.
    ValueError
        Counts that are negative, NaN, infinite or look normalised; NaN in a covariate; an empty
        AnnData; non-positive size factors.
    """
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise ValueError(f"The AnnData is empty ({adata.n_obs} cells x {adata.n_vars} genes).")
    cat_keys = list(categorical_covariate_keys or [])
    cont_keys = list(continuous_covariate_keys or [])
    for k in [batch_key, labels_key, size_factor_key, *cat_keys, *cont_keys]:
        _check_obs_key(adata, k)
    X = get_counts(adata, layer)
    check_counts(X, where=counts_location(layer))

    batch_categories = _categories(adata, batch_key)
    label_categories = _categories(adata, labels_key)
    cat_categories = [_categories(adata, k) for k in cat_keys]
    for k in cont_keys:
        values = pd.to_numeric(adata.obs[k], errors="coerce").to_numpy(dtype=float)
        if not np.all(np.isfinite(values)):
            raise ValueError(
                f"Continuous covariate adata.obs[{k!r}] has NaN, infinite or non-numeric values; "
                "fill or drop those cells first."
            )
    if size_factor_key is not None:
        sf = pd.to_numeric(adata.obs[size_factor_key], errors="coerce").to_numpy(dtype=float)
        if not np.all(np.isfinite(sf) & (sf > 0)):
            raise ValueError(
                f"Size factors adata.obs[{size_factor_key!r}] must be finite and positive."
            )

    # library-size prior: mean and variance of log total counts per batch
    totals = np.asarray(X.sum(axis=1)).reshape(-1)
    codes = category_codes(adata, batch_key, batch_categories)
    means, variances = [], []
    for b in range(len(batch_categories)):
        log_t = np.log(totals[(codes == b) & (totals > 0)])
        means.append(float(log_t.mean()) if log_t.size else 0.0)
        # floored: a batch whose cells all have the same total would give a zero-width prior
        variances.append(max(float(log_t.var()), 1e-3) if log_t.size > 1 else 1.0)

    summary = DataSummary(
        var_names=[str(v) for v in adata.var_names],
        layer=layer,
        batch_key=batch_key,
        batch_categories=batch_categories,
        labels_key=labels_key,
        label_categories=label_categories,
        size_factor_key=size_factor_key,
        categorical_covariate_keys=cat_keys,
        categorical_covariate_categories=cat_categories,
        continuous_covariate_keys=cont_keys,
        library_log_means=means,
        library_log_vars=variances,
        n_cells=int(adata.n_obs),
        extra=dict(extra or {}),
    )
    adata.uns[UNS_KEY] = summary.to_json()
    return summary


def get_summary(adata: AnnData) -> DataSummary:
    """Return the summary that ``setup_anndata`` stored, or raise a helpful error."""
    if UNS_KEY not in adata.uns:
        raise ValueError(
            "This AnnData has not been set up: call `Model.setup_anndata(adata, ...)` first "
            "(for example `cellvi.model.SCVI.setup_anndata(adata, batch_key='batch')`)."
        )
    return DataSummary.from_json(adata.uns[UNS_KEY])


# ---------------------------------------------------------------------------- checks
def get_counts(adata: AnnData, layer: str | None):
    """Return ``adata.X`` or ``adata.layers[layer]``, raising if the layer does not exist."""
    if layer is None:
        if adata.X is None:
            raise ValueError("adata.X is empty; pass the layer holding raw counts with `layer=`.")
        return adata.X
    if layer not in adata.layers:
        raise KeyError(
            f"Layer {layer!r} is not in adata.layers (available: {list(adata.layers.keys())})."
        )
    return adata.layers[layer]


def counts_location(layer: str | None) -> str:
    """Say where the counts are read from, for messages."""
    return "adata.X" if layer is None else f"adata.layers[{layer!r}]"


def check_counts(X, *, where: str = "adata.X") -> None:
    """Raise if ``X`` is not a matrix of raw counts; warn if it holds non-integer estimates.

    Errors: negative, NaN or infinite values; non-integer values that look normalised or
    log-transformed (maximum below 30, or the same total in every cell). Other non-integer values
    (such as estimated counts) are accepted with a warning.
    """
    values = X.data if sp.issparse(X) else np.asarray(X)
    if hasattr(values, "compute"):  # dask and friends
        values = np.asarray(values)
    if values.size == 0:
        return
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{where} contains NaN or infinite values; pass raw counts.")
    if values.min() < 0:
        raise ValueError(
            f"{where} contains negative values (min {values.min():g}); cellvi models raw counts. "
            "Pass the raw counts, or the layer that holds them with `layer=`."
        )
    if not _all_integer(values):
        totals = np.asarray(X.sum(axis=1)).reshape(-1)
        vmax = float(values.max())
        equal_totals = totals.size > 1 and np.allclose(totals, totals[0], rtol=1e-3)
        if vmax < 30 or equal_totals:
            why = "log-transformed" if vmax < 30 else "normalised to equal totals per cell"
            raise ValueError(
                f"{where} looks {why} (non-integer values, max {vmax:.3g}"
                f"{', identical cell totals' if equal_totals else ''}). cellvi models raw counts: "
                "pass the raw counts, or the layer that holds them with `layer=` "
                "(e.g. adata.layers['counts'])."
            )
        warnings.warn(
            f"{where} has non-integer values (max {vmax:.3g}); treating them as estimated counts. "
            "If they are normalised, pass raw counts instead.",
            UserWarning,
            stacklevel=3,
        )


def _all_integer(values: np.ndarray, chunk: int = 1 << 24) -> bool:
    flat = values.reshape(-1)
    for start in range(0, flat.size, chunk):
        part = flat[start : start + chunk]
        if np.any(part != np.rint(part)):
            return False
    return True


def check_nonempty_cells(X, *, where: str = "adata.X") -> None:
    """Raise if any cell has no counts (needed when the library size is observed)."""
    totals = np.asarray(X.sum(axis=1)).reshape(-1)
    empty = np.flatnonzero(totals <= 0)
    if empty.size:
        raise ValueError(
            f"{empty.size} cell(s) in {where} have no counts (first: row {empty[0]}); their "
            "observed library size is zero. Remove them first, e.g. "
            "`adata = adata[adata.X.sum(axis=1) > 0].copy()` or "
            "`scanpy.pp.filter_cells(adata, min_counts=1)`."
        )


def _check_obs_key(adata: AnnData, key: str | None) -> None:
    if key is not None and key not in adata.obs:
        raise KeyError(
            f"{key!r} is not a column of adata.obs (columns: {list(adata.obs.columns)})."
        )


def _categories(adata: AnnData, key: str | None) -> list[str]:
    if key is None:
        return ["0"]
    col = adata.obs[key]
    if col.isna().any():
        raise ValueError(
            f"adata.obs[{key!r}] has {int(col.isna().sum())} missing value(s); fill them "
            "(e.g. with 'unknown') or drop those cells."
        )
    if isinstance(col.dtype, pd.CategoricalDtype):
        present = set(col.astype(str).unique())
        return [str(c) for c in col.cat.categories if str(c) in present]
    return sorted(str(c) for c in col.astype(str).unique())


def category_codes(adata: AnnData, key: str | None, categories: list[str]) -> np.ndarray:
    """Integer codes of ``adata.obs[key]`` against ``categories``; unknown values raise."""
    if key is None:
        return np.zeros(adata.n_obs, dtype=np.int64)
    _check_obs_key(adata, key)
    col = adata.obs[key]
    if col.isna().any():
        raise ValueError(f"adata.obs[{key!r}] has missing values; fill them or drop those cells.")
    values = col.astype(str).to_numpy()
    lookup = {c: i for i, c in enumerate(categories)}
    codes = np.fromiter((lookup.get(v, -1) for v in values), dtype=np.int64, count=len(values))
    if (codes < 0).any():
        unknown = sorted(set(values[codes < 0]))
        raise ValueError(
            f"adata.obs[{key!r}] has categories the model was not set up with: {unknown[:10]}. "
            f"Known categories: {categories[:20]}."
        )
    return codes
