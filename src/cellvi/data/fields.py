"""Data fields: the pieces of an AnnData a model reads, each a small serialisable object.

A field knows four things about one piece of the data (the counts, the batch column, a protein
matrix in ``obsm``, ...):

* where it lives in the AnnData (``layer``, ``obs_key``, ``obsm_key``, ...);
* how to **fit** itself on the AnnData given to ``setup_anndata``: check it and record what a
  model needs to read other AnnData objects the same way (gene names, category orders, column
  names), as plain JSON-able values (:meth:`Field.fit`);
* how to **check** another AnnData against what it recorded (:meth:`Field.check`);
* how to **read** its per-cell values into a :class:`~cellvi.data._loader.Column`, which slices
  itself into minibatch tensors (:meth:`Field.column`).

A model declares its fields in ``setup_anndata`` (see :func:`cellvi.data.setup_anndata`); the
fitted fields make up the :class:`~cellvi.data.DataSummary` saved with the model. A new kind of
field is one subclass with a unique ``kind``; the summary finds it by that name when it is read
back, and nothing else is ever constructed from a saved file.

Example: the fields SCVI declares for ``setup_anndata(adata, batch_key="batch")``::

    [CountsField(keys.X, layer=None), CategoricalObsField(keys.BATCH, "batch"),
     CategoricalObsField(keys.LABELS, None), LibrarySizeField()]
"""

from __future__ import annotations

import dataclasses
import warnings
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from cellvi import keys

from ._backed import is_backed, stream_stats
from ._sparse import check_sparse_matrix

__all__ = [
    "CategoricalJointObsField",
    "CategoricalObsField",
    "CountsField",
    "Field",
    "LabelsField",
    "LibrarySizeField",
    "NumericalJointObsField",
    "NumericalObsField",
    "ObsmCountsField",
    "check_counts",
    "check_obs_key",
]


@dataclass(frozen=True)
class Field:
    """Base class of the data fields.

    Attributes
    ----------
    key
        Name of the field in the summary and of its tensor in a minibatch (:mod:`cellvi.keys`).
    """

    key: str
    kind: ClassVar[str] = ""
    _kinds: ClassVar[dict[str, type[Field]]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.kind:
            if cls.kind in Field._kinds and Field._kinds[cls.kind] is not cls:
                raise TypeError(f"Two field classes use kind {cls.kind!r}.")
            Field._kinds[cls.kind] = cls

    # --------------------------------------------------------------- to implement
    def fit(self, adata: AnnData, fitted: Mapping[str, Field]) -> Field:
        """Check ``adata`` and return a copy of the field with what it recorded.

        ``fitted`` holds the fields fitted before this one (by key), for fields whose summary
        depends on others (the library-size prior needs the counts and the batches).
        """
        self.check(adata)
        return self

    def check(self, adata: AnnData) -> None:
        """Raise (naming the problem and the fix) if ``adata`` cannot be read by this field."""

    def column(self, adata: AnnData):
        """Return the per-cell values as a :class:`~cellvi.data._loader.Column`, or None."""
        return None

    def fingerprint(self, adata: AnnData) -> str | None:
        """Return a cheap digest of what the field reads (None: nothing per cell).

        A model compares it before each use of its own AnnData: a change after set-up (other
        values, cells, columns) is refused instead of giving stale answers.
        """
        return None

    # --------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values, with the field's ``kind``."""
        return {"kind": self.kind, **dataclasses.asdict(self)}

    @staticmethod
    def from_dict(values: Mapping[str, Any]) -> Field:
        """Read back what :meth:`to_dict` wrote (only known kinds; unknown keys are refused)."""
        values = dict(values)
        kind = values.pop("kind", None)
        cls = Field._kinds.get(kind)
        if cls is None:
            raise ValueError(
                f"Unknown data field kind {kind!r} in the saved set-up (known: "
                f"{sorted(Field._kinds)}); the file was written by a newer cellvi or is damaged."
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"Saved {kind} field has unknown entries {sorted(unknown)}.")
        return cls(**values)


# ------------------------------------------------------------------------------------ counts
@dataclass(frozen=True)
class CountsField(Field):
    """Raw counts: ``adata.X`` or a layer, cells x genes, kept sparse if stored sparse.

    Attributes
    ----------
    layer
        Layer holding the counts (None: ``adata.X``).
    var_names
        The genes, in order (recorded by :meth:`fit`).
    """

    layer: str | None = None
    var_names: list[str] = field(default_factory=list)
    kind: ClassVar[str] = "counts"

    @property
    def where(self) -> str:
        """Where the counts are read from, for messages."""
        return counts_location(self.layer)

    def matrix(self, adata: AnnData):
        """Return ``adata.X`` or the layer, raising if it does not exist."""
        return get_counts(adata, self.layer)

    def fit(self, adata: AnnData, fitted: Mapping[str, Field]) -> CountsField:  # noqa: D102
        check_counts(self.matrix(adata), where=self.where)
        names = [str(v) for v in adata.var_names]
        if len(set(names)) != len(names):
            dup = pd.Index(names)[pd.Index(names).duplicated()].unique()[:5].tolist()
            warnings.warn(
                f"adata.var_names has duplicates (e.g. {dup}); results are indexed by gene name, "
                "so call adata.var_names_make_unique() to tell them apart.",
                UserWarning,
                stacklevel=4,
            )
        return replace(self, var_names=names)

    def check(self, adata: AnnData) -> None:  # noqa: D102
        check_genes(adata, self.var_names)
        check_counts(self.matrix(adata), where=self.where)

    def column(self, adata: AnnData):  # noqa: D102
        from ._loader import CountsColumn, DiskCountsColumn

        X = self.matrix(adata)
        return DiskCountsColumn(self.key, X) if is_backed(X) else CountsColumn(self.key, X)

    def fingerprint(self, adata: AnnData) -> str | None:  # noqa: D102
        return matrix_fingerprint(self.matrix(adata))


@dataclass(frozen=True)
class ObsmCountsField(Field):
    """A second count matrix in ``adata.obsm`` (for example CITE-seq protein counts).

    Attributes
    ----------
    obsm_key
        Key of the ``(cells, features)`` matrix in ``adata.obsm`` (array, sparse matrix or
        DataFrame).
    names_uns_key
        Key in ``adata.uns`` of the feature names (default: the DataFrame's columns, else
        ``"0" .. "n-1"``).
    column_names
        The features, in order (recorded by :meth:`fit`).
    """

    obsm_key: str = ""
    names_uns_key: str | None = None
    column_names: list[str] = field(default_factory=list)
    kind: ClassVar[str] = "obsm_counts"

    def matrix(self, adata: AnnData) -> np.ndarray:
        """Return the matrix as dense float32 ``(cells, features)``."""
        if self.obsm_key not in adata.obsm:
            raise KeyError(
                f"{self.obsm_key!r} is not in adata.obsm (keys: {list(adata.obsm.keys())})."
            )
        m = adata.obsm[self.obsm_key]
        if isinstance(m, pd.DataFrame):
            m = m.to_numpy()
        m = m.toarray() if sp.issparse(m) else np.asarray(m)
        if m.ndim != 2 or m.shape[0] != adata.n_obs:
            raise ValueError(
                f"adata.obsm[{self.obsm_key!r}] must be a (cells, features) matrix with "
                f"{adata.n_obs} rows, got shape {m.shape}."
            )
        return np.ascontiguousarray(m, dtype=np.float32)

    def names(self, adata: AnnData) -> list[str]:
        """Return the feature names of ``adata`` (see :attr:`names_uns_key`)."""
        m = adata.obsm[self.obsm_key]
        if self.names_uns_key is not None:
            if self.names_uns_key not in adata.uns:
                raise KeyError(f"{self.names_uns_key!r} is not in adata.uns.")
            names = [str(v) for v in np.asarray(adata.uns[self.names_uns_key]).reshape(-1)]
            if len(names) != m.shape[1]:
                raise ValueError(
                    f"adata.uns[{self.names_uns_key!r}] has {len(names)} names but "
                    f"adata.obsm[{self.obsm_key!r}] has {m.shape[1]} columns."
                )
            return names
        if isinstance(m, pd.DataFrame):
            return [str(c) for c in m.columns]
        return [str(i) for i in range(m.shape[1])]

    def fit(self, adata: AnnData, fitted: Mapping[str, Field]) -> ObsmCountsField:  # noqa: D102
        check_counts(self.matrix(adata), where=f"adata.obsm[{self.obsm_key!r}]")
        return replace(self, column_names=self.names(adata))

    def check(self, adata: AnnData) -> None:  # noqa: D102
        m = self.matrix(adata)
        names = self.names(adata)
        if names != self.column_names:
            missing = [n for n in self.column_names if n not in set(names)]
            raise ValueError(
                f"adata.obsm[{self.obsm_key!r}] has other features than the model's "
                f"({len(names)} vs {len(self.column_names)}; missing e.g. {missing[:5]}). Give it "
                "the model's features, in the model's order."
            )
        check_counts(m, where=f"adata.obsm[{self.obsm_key!r}]")

    def column(self, adata: AnnData):  # noqa: D102
        from ._loader import ArrayColumn

        return ArrayColumn(self.key, self.matrix(adata))

    def fingerprint(self, adata: AnnData) -> str | None:  # noqa: D102
        return matrix_fingerprint(self.matrix(adata))


# ------------------------------------------------------------------------------- categorical
@dataclass(frozen=True)
class CategoricalObsField(Field):
    """One categorical ``obs`` column, read as integer codes ``(cells, 1)``.

    Without a column (``obs_key=None``) every cell has code 0 of one category, ``"0"``.

    Attributes
    ----------
    obs_key
        The ``obs`` column (None: a single category).
    categories
        The categories in code order (recorded by :meth:`fit`): the column's categorical order
        when it is categorical (categories without cells dropped), else sorted.
    """

    obs_key: str | None = None
    categories: list[str] = field(default_factory=lambda: ["0"])
    kind: ClassVar[str] = "categorical_obs"

    def fit(self, adata: AnnData, fitted: Mapping[str, Field]) -> CategoricalObsField:  # noqa: D102
        check_obs_key(adata, self.obs_key)
        return replace(self, categories=categories_of(adata, self.obs_key))

    def check(self, adata: AnnData) -> None:  # noqa: D102
        self.codes(adata)

    def codes(self, adata: AnnData) -> np.ndarray:
        """Integer codes ``(cells,)`` of ``adata``; unknown categories raise."""
        return category_codes(adata, self.obs_key, self.categories)

    def column(self, adata: AnnData):  # noqa: D102
        from ._loader import ArrayColumn

        if self.obs_key is None:  # one category: a broadcast zero, not 8 bytes per cell
            return ArrayColumn.constant(self.key, adata.n_obs, 0)
        return ArrayColumn(self.key, self.codes(adata).reshape(-1, 1))

    def fingerprint(self, adata: AnnData) -> str | None:  # noqa: D102
        return obs_fingerprint(adata, [self.obs_key])


@dataclass(frozen=True)
class LabelsField(CategoricalObsField):
    """Cell labels of a semi-supervised model: the classes, then one "unlabelled" category.

    Code ``i < n_classes`` is class ``categories[i]``; code ``n_classes`` (the last) means
    unlabelled. A query AnnData without the column is read as all unlabelled.

    Attributes
    ----------
    unlabeled_category
        The value of the column that marks unlabelled cells (recorded: a reserved name when the
        user gave None, i.e. every cell is labelled).
    """

    unlabeled_category: str = "_cellvi_unlabeled"
    kind: ClassVar[str] = "labels"

    @property
    def classes(self) -> list[str]:
        """The classes, in code order (the unlabelled category excluded)."""
        return [c for c in self.categories if c != self.unlabeled_category]

    def fit(self, adata: AnnData, fitted: Mapping[str, Field]) -> LabelsField:  # noqa: D102
        if self.obs_key is None:
            raise ValueError("A semi-supervised model needs a labels_key.")
        check_obs_key(adata, self.obs_key)
        present = categories_of(adata, self.obs_key)
        classes = [c for c in present if c != self.unlabeled_category]
        if not classes:
            raise ValueError(
                f"Every cell of adata.obs[{self.obs_key!r}] is {self.unlabeled_category!r} (the "
                "unlabeled category): the model needs some labelled cells to learn the classes."
            )
        return replace(self, categories=[*classes, self.unlabeled_category])

    def codes(self, adata: AnnData) -> np.ndarray:  # noqa: D102
        if self.obs_key not in adata.obs:  # a query without labels: every cell is unlabelled
            return np.full(adata.n_obs, len(self.categories) - 1, dtype=np.int64)
        values = adata.obs[self.obs_key]
        if not values.isna().any():
            unknown = sorted(set(values.astype(str)) - set(self.categories))
            if unknown:
                raise ValueError(
                    f"adata.obs[{self.obs_key!r}] has labels the model does not know: "
                    f"{unknown[:10]}. The model's classes are {self.classes}; mark cells of other "
                    f"types as {self.unlabeled_category!r} (the unlabeled category), or drop the "
                    "column to treat every cell as unlabelled."
                )
        return category_codes(adata, self.obs_key, self.categories)


@dataclass(frozen=True)
class CategoricalJointObsField(Field):
    """Several categorical ``obs`` columns, read as codes ``(cells, n_columns)``.

    Attributes
    ----------
    obs_keys
        The columns.
    categories
        The categories of each column (recorded by :meth:`fit`).
    """

    obs_keys: list[str] = field(default_factory=list)
    categories: list[list[str]] = field(default_factory=list)
    kind: ClassVar[str] = "categorical_joint_obs"

    def fit(self, adata: AnnData, fitted: Mapping[str, Field]) -> CategoricalJointObsField:  # noqa: D102
        for k in self.obs_keys:
            check_obs_key(adata, k)
        return replace(self, categories=[categories_of(adata, k) for k in self.obs_keys])

    def check(self, adata: AnnData) -> None:  # noqa: D102
        self._codes(adata)

    def _codes(self, adata: AnnData) -> np.ndarray:
        return np.stack(
            [category_codes(adata, k, c) for k, c in zip(self.obs_keys, self.categories)], axis=1
        )

    def column(self, adata: AnnData):  # noqa: D102
        from ._loader import ArrayColumn

        return ArrayColumn(self.key, self._codes(adata)) if self.obs_keys else None

    def fingerprint(self, adata: AnnData) -> str | None:  # noqa: D102
        return obs_fingerprint(adata, self.obs_keys)


# --------------------------------------------------------------------------------- numerical
@dataclass(frozen=True)
class NumericalJointObsField(Field):
    """Several numeric ``obs`` columns, read as float32 ``(cells, n_columns)``; finite only.

    Attributes
    ----------
    obs_keys
        The columns.
    """

    obs_keys: list[str] = field(default_factory=list)
    kind: ClassVar[str] = "numerical_joint_obs"

    def check(self, adata: AnnData) -> None:  # noqa: D102
        for k in self.obs_keys:
            check_obs_key(adata, k)
            numeric_obs(adata, k, what="Continuous covariate")

    def column(self, adata: AnnData):  # noqa: D102
        from ._loader import ArrayColumn

        if not self.obs_keys:
            return None
        values = [numeric_obs(adata, k, what="Continuous covariate") for k in self.obs_keys]
        return ArrayColumn(self.key, np.stack(values, axis=1).astype(np.float32))

    def fingerprint(self, adata: AnnData) -> str | None:  # noqa: D102
        return obs_fingerprint(adata, self.obs_keys)


@dataclass(frozen=True)
class NumericalObsField(Field):
    """One numeric ``obs`` column, float32 ``(cells, 1)``; finite (and positive if asked).

    Attributes
    ----------
    obs_key
        The column.
    positive
        Require values > 0 (size factors).
    """

    obs_key: str = ""
    positive: bool = False
    kind: ClassVar[str] = "numerical_obs"

    def _values(self, adata: AnnData) -> np.ndarray:
        check_obs_key(adata, self.obs_key)
        what = "Size factors" if self.positive else "Numeric column"
        v = numeric_obs(adata, self.obs_key, what=what)
        if self.positive and not np.all(v > 0):
            raise ValueError(f"{what} adata.obs[{self.obs_key!r}] must be finite and positive.")
        return v

    def check(self, adata: AnnData) -> None:  # noqa: D102
        self._values(adata)

    def column(self, adata: AnnData):  # noqa: D102
        from ._loader import ArrayColumn

        return ArrayColumn(self.key, self._values(adata).astype(np.float32).reshape(-1, 1))

    def fingerprint(self, adata: AnnData) -> str | None:  # noqa: D102
        return obs_fingerprint(adata, [self.obs_key])


# ------------------------------------------------------------------------- summary-only
@dataclass(frozen=True)
class LibrarySizeField(Field):
    """The prior of the library size: mean and variance of log total counts, per batch.

    Read nothing per cell; :meth:`fit` records the statistics from the counts field
    (``counts_key``) and the batch field (``batch_key``) fitted before it.

    Attributes
    ----------
    counts_key, batch_key
        Keys of the fields it summarises.
    log_means, log_vars
        Per batch (recorded by :meth:`fit`); variances are floored at 1e-3 so that a batch of
        equal totals does not give a zero-width prior, and a batch of one cell gets 1.
    """

    key: str = "library_size"
    counts_key: str = keys.X
    batch_key: str = keys.BATCH
    log_means: list[float] = field(default_factory=list)
    log_vars: list[float] = field(default_factory=list)
    kind: ClassVar[str] = "library_size"

    def fit(self, adata: AnnData, fitted: Mapping[str, Field]) -> LibrarySizeField:  # noqa: D102
        counts = fitted[self.counts_key]
        batch = fitted.get(self.batch_key)
        totals = row_totals(counts.matrix(adata))
        if batch is None:
            codes, n_batch = np.zeros(adata.n_obs, dtype=np.int64), 1
        else:
            codes, n_batch = batch.codes(adata), len(batch.categories)
        means, variances = [], []
        for b in range(n_batch):
            log_t = np.log(totals[(codes == b) & (totals > 0)])
            means.append(float(log_t.mean()) if log_t.size else 0.0)
            variances.append(max(float(log_t.var()), 1e-3) if log_t.size > 1 else 1.0)
        return replace(self, log_means=means, log_vars=variances)


# ------------------------------------------------------------------------------ fingerprints
#: Above this many values a fingerprint reads an evenly spaced sample of that many.
FINGERPRINT_FULL = 1 << 16


def row_totals(X) -> np.ndarray:
    """Total of each row (cell), also for a matrix on disk (one cached streaming pass)."""
    if is_backed(X):
        return stream_stats(X).totals
    return np.asarray(X.sum(axis=1)).reshape(-1)


def matrix_fingerprint(X) -> str:
    """Return a cheap digest of a matrix: shape, type and a CRC of its stored values and indices.

    Up to :data:`FINGERPRINT_FULL` values the whole arrays are read; beyond, an evenly spaced
    sample of that many (about 0.3 ms whatever the size). Edits of all or many values (a
    normalisation, a log transform, in place or not), a new matrix, other cells or genes are
    seen; a change of a few values in a large matrix may not be.
    """
    if is_backed(X):
        stats = stream_stats(X)
        return f"disk|{stats.shape}|{stats.nnz}|{stats.crc}"

    def crc(a) -> int:
        a = np.asarray(a)
        if a.size > FINGERPRINT_FULL:
            a = a[:: a.size // FINGERPRINT_FULL]
        return zlib.crc32(np.ascontiguousarray(a).view(np.uint8))

    parts = [type(X).__name__, str(X.shape), str(X.dtype)]
    if sp.issparse(X):
        parts += [str(X.nnz), str(crc(X.data)), str(crc(X.indices)), str(crc(X.indptr))]
    else:
        parts.append(str(crc(np.asarray(X).reshape(-1))))
    return "|".join(parts)


def obs_fingerprint(adata: AnnData, obs_keys) -> str | None:
    """Return a digest of ``obs`` columns (a sample of their values in cell order), or None."""
    keys_ = [k for k in obs_keys if k is not None]
    if not keys_:
        return None
    parts = []
    for k in keys_:
        if k not in adata.obs:
            parts.append(f"{k}:missing")
            continue
        col = adata.obs[k]
        if len(col) > FINGERPRINT_FULL:
            col = col.iloc[:: len(col) // FINGERPRINT_FULL]
        h = pd.util.hash_pandas_object(col, index=False).to_numpy()
        parts.append(f"{k}:{len(adata.obs)}:{zlib.crc32(h.view(np.uint8))}")
    return "|".join(parts)


# ------------------------------------------------------------------------------------ checks
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
    if is_backed(X):  # on disk: one streaming pass, shared with the rest of the set-up
        _check_streamed(stream_stats(X), where)
        return
    check_sparse_matrix(X, where=where)
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


def _check_streamed(stats, where: str) -> None:
    """Run the checks of :func:`check_counts` on the statistics of one streaming pass."""
    if not stats.finite:
        raise ValueError(f"{where} contains NaN or infinite values; pass raw counts.")
    if stats.minimum < 0:
        raise ValueError(
            f"{where} contains negative values (min {stats.minimum:g}); cellvi models raw "
            "counts. Pass the raw counts, or the layer that holds them with `layer=`."
        )
    if not stats.integer:
        t = stats.totals
        equal_totals = t.size > 1 and np.allclose(t, t[0], rtol=1e-3)
        if stats.maximum < 30 or equal_totals:
            why = "log-transformed" if stats.maximum < 30 else "normalised to equal totals"
            raise ValueError(f"{where} looks {why} (non-integer values, max "
                             f"{stats.maximum:.3g}); cellvi models raw counts.")
        warnings.warn(f"{where} has non-integer values (max {stats.maximum:.3g}); treating "
                      "them as estimated counts.", UserWarning, stacklevel=4)


def _all_integer(values: np.ndarray, chunk: int = 1 << 24) -> bool:
    flat = values.reshape(-1)
    for start in range(0, flat.size, chunk):
        part = flat[start : start + chunk]
        if np.any(part != np.rint(part)):
            return False
    return True


def check_genes(adata: AnnData, var_names: Sequence[str]) -> None:
    """Raise if ``adata``'s genes differ from ``var_names``, naming the differences."""
    names = [str(v) for v in adata.var_names]
    if names == list(var_names):
        return
    ref = set(var_names)
    got = set(names)
    missing = [g for g in var_names if g not in got]
    extra = [g for g in names if g not in ref]
    if missing or extra:
        raise ValueError(
            f"The AnnData's genes differ from the model's ({len(var_names)} genes): "
            f"{len(missing)} missing (e.g. {missing[:5]}), {len(extra)} unexpected "
            f"(e.g. {extra[:5]}). Subset or reorder it with `adata[:, model_genes]` where "
            "model_genes are the model's var_names."
        )
    raise ValueError(
        "The AnnData has the model's genes but in a different order; reorder it with "
        "`adata = adata[:, model.var_names].copy()`."
    )


def check_obs_key(adata: AnnData, key: str | None) -> None:
    """Raise a ``KeyError`` naming the columns if ``key`` is not a column of ``adata.obs``."""
    if key is not None and key not in adata.obs:
        raise KeyError(
            f"{key!r} is not a column of adata.obs (columns: {list(adata.obs.columns)})."
        )


def numeric_obs(adata: AnnData, key: str, *, what: str) -> np.ndarray:
    """Column ``key`` of ``adata.obs`` as float64; NaN, infinite or non-numeric values raise."""
    check_obs_key(adata, key)
    values = pd.to_numeric(adata.obs[key], errors="coerce").to_numpy(dtype=float)
    if not np.all(np.isfinite(values)):
        raise ValueError(
            f"{what} adata.obs[{key!r}] has NaN, infinite or non-numeric values; fill or drop "
            "those cells first."
        )
    return values


def categories_of(adata: AnnData, key: str | None) -> list[str]:
    """Categories of ``adata.obs[key]`` in code order (``["0"]`` without a key)."""
    if key is None:
        return ["0"]
    col = adata.obs[key]
    if col.isna().any():
        raise ValueError(
            f"adata.obs[{key!r}] has {int(col.isna().sum())} missing value(s); fill them "
            "(e.g. with 'unknown') or drop those cells."
        )
    if isinstance(col.dtype, pd.CategoricalDtype):  # the categories whose codes occur
        seen = np.bincount(col.cat.codes.to_numpy().astype(np.int64),
                           minlength=len(col.cat.categories)) > 0
        return [str(c) for c, s in zip(col.cat.categories, seen) if s]
    return sorted(str(c) for c in col.astype(str).unique())


def category_codes(adata: AnnData, key: str | None, categories: Sequence[str]) -> np.ndarray:
    """Integer codes of ``adata.obs[key]`` against ``categories``; unknown values raise."""
    if key is None:
        return np.zeros(adata.n_obs, dtype=np.int64)
    check_obs_key(adata, key)
    col = adata.obs[key]
    if col.isna().any():
        raise ValueError(f"adata.obs[{key!r}] has missing values; fill them or drop those cells.")
    # vectorised: a categorical column is mapped through its (few) categories, any other column
    # through a hash of the known categories; no per-cell Python strings are made (on 10 million
    # cells the per-cell loop took about 70 bytes a cell at its peak and seconds)
    if isinstance(col.dtype, pd.CategoricalDtype):
        table = pd.Index(categories).get_indexer(col.cat.categories.astype(str))
        codes = table[col.cat.codes.to_numpy()].astype(np.int64, copy=False)
    else:
        codes = pd.Index(categories).get_indexer(col.astype(str)).astype(np.int64, copy=False)
    if (codes < 0).any():
        unknown = sorted({str(v) for v in col[codes < 0].astype(str).unique()})
        raise ValueError(
            f"adata.obs[{key!r}] has categories the model was not set up with: {unknown[:10]}. "
            f"Known categories: {list(categories)[:20]}."
        )
    return codes
