"""Registering an AnnData with a model: its fitted fields, summarised in one serialisable object."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from anndata import AnnData

from cellvi import keys

from .fields import (
    CategoricalJointObsField,
    CategoricalObsField,
    CountsField,
    Field,
    LibrarySizeField,
    NumericalJointObsField,
    NumericalObsField,
    check_counts,
    check_genes,
    check_obs_key,
    counts_location,
    get_counts,
)

__all__ = [
    "DataSummary",
    "UNS_KEY",
    "check_counts",
    "check_genes",
    "check_nonempty_cells",
    "check_obs_key",
    "counts_location",
    "get_counts",
    "get_summary",
    "setup_anndata",
    "standard_fields",
]

UNS_KEY = "_cellvi_setup"
#: Version of the summary's JSON layout; 1 was a flat record of the standard keys.
SUMMARY_VERSION = 2


@dataclass(frozen=True)
class DataSummary:
    """Everything a model needs to read an AnnData the way it was trained on: its fitted fields.

    Stored (as JSON) in ``adata.uns["_cellvi_setup"]`` by ``setup_anndata`` and saved with the
    model, so that a new AnnData is read with the same genes and category codes. Fields are
    looked up by key, ``summary[keys.BATCH]``; the properties below read the standard ones.

    Attributes
    ----------
    fields
        The fitted fields (:mod:`cellvi.data.fields`), in the order they were fitted.
    n_cells
        Number of cells at setup.
    extra
        Model-specific settings that are not data fields (e.g. ``pretrained_from_scvi``).
    """

    fields: tuple[Field, ...]
    n_cells: int = 0
    extra: dict = field(default_factory=dict)

    # --------------------------------------------------------------- fields by key
    def __getitem__(self, key: str) -> Field:
        for f in self.fields:
            if f.key == key:
                return f
        raise KeyError(f"The data set-up has no {key!r} field (fields: {self.keys()}).")

    def __contains__(self, key: str) -> bool:
        return any(f.key == key for f in self.fields)

    def get(self, key: str, default: Any = None) -> Any:
        """Return the field of ``key``, or ``default``."""
        return self[key] if key in self else default

    def keys(self) -> list[str]:
        """Return the keys of the fields, in order."""
        return [f.key for f in self.fields]

    def with_field(self, new: Field) -> DataSummary:
        """Return a copy with ``new`` replacing the field of the same key (or appended)."""
        if new.key in self:
            return replace(self, fields=tuple(new if f.key == new.key else f for f in self.fields))
        return replace(self, fields=(*self.fields, new))

    def replace(self, **changes) -> DataSummary:
        """Return a copy with some attributes (``fields``, ``n_cells``, ``extra``) changed."""
        return replace(self, **changes)

    # --------------------------------------------------------------- the standard fields
    @property
    def var_names(self) -> list[str]:
        """Genes, in order."""
        return list(self[keys.X].var_names)

    @property
    def layer(self) -> str | None:
        """Layer holding the raw counts (None: ``adata.X``)."""
        return self[keys.X].layer

    def _obs_key(self, key: str) -> str | None:
        f = self.get(key)
        return None if f is None else f.obs_key

    @property
    def batch_key(self) -> str | None:
        """``obs`` column of the batch (None: one batch)."""
        return self._obs_key(keys.BATCH)

    @property
    def batch_categories(self) -> list[str]:
        """Batch categories in code order (``["0"]`` without a batch key)."""
        f = self.get(keys.BATCH)
        return ["0"] if f is None else list(f.categories)

    @property
    def labels_key(self) -> str | None:
        """``obs`` column of the labels."""
        return self._obs_key(keys.LABELS)

    @property
    def label_categories(self) -> list[str]:
        """Label categories in code order."""
        f = self.get(keys.LABELS)
        return ["0"] if f is None else list(f.categories)

    @property
    def size_factor_key(self) -> str | None:
        """``obs`` column of user size factors, or None."""
        return self._obs_key(keys.SIZE_FACTOR)

    @property
    def categorical_covariate_keys(self) -> list[str]:
        """Extra categorical covariates."""
        f = self.get(keys.CAT_COVS)
        return [] if f is None else list(f.obs_keys)

    @property
    def categorical_covariate_categories(self) -> list[list[str]]:
        """Categories of each extra categorical covariate."""
        f = self.get(keys.CAT_COVS)
        return [] if f is None else [list(c) for c in f.categories]

    @property
    def continuous_covariate_keys(self) -> list[str]:
        """Continuous covariates."""
        f = self.get(keys.CONT_COVS)
        return [] if f is None else list(f.obs_keys)

    @property
    def library_log_means(self) -> list[float]:
        """Mean of the log total counts per batch (the library prior)."""
        f = self.get("library_size")
        return [] if f is None else list(f.log_means)

    @property
    def library_log_vars(self) -> list[float]:
        """Variance of the log total counts per batch."""
        f = self.get("library_size")
        return [] if f is None else list(f.log_vars)

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

    # --------------------------------------------------------------- serialisation
    def to_json(self) -> str:
        """Serialise to a JSON string."""
        return json.dumps({
            "version": SUMMARY_VERSION,
            "fields": [f.to_dict() for f in self.fields],
            "n_cells": self.n_cells,
            "extra": self.extra,
        })

    @classmethod
    def from_json(cls, text: str) -> DataSummary:
        """Read back what :meth:`to_json` wrote (also the flat layout of version 1)."""
        values = json.loads(text)
        if not isinstance(values, dict):
            raise ValueError("The saved data set-up is not a JSON object.")
        version = values.get("version", 1)
        if version == 1:
            return _from_version_1(values)
        if version != SUMMARY_VERSION:
            raise ValueError(
                f"The saved data set-up has version {version}; this cellvi reads version "
                f"{SUMMARY_VERSION}. Upgrade cellvi, or set the AnnData up again."
            )
        return cls(
            fields=tuple(Field.from_dict(f) for f in values["fields"]),
            n_cells=int(values.get("n_cells", 0)),
            extra=dict(values.get("extra", {})),
        )


def _from_version_1(v: Mapping[str, Any]) -> DataSummary:
    """Read the flat layout that cellvi wrote before fields existed."""
    fields: list[Field] = [
        CountsField(keys.X, layer=v.get("layer"), var_names=list(v["var_names"])),
        CategoricalObsField(keys.BATCH, v.get("batch_key"),
                            list(v.get("batch_categories", ["0"]))),
    ]
    extra = dict(v.get("extra", {}))
    if "unlabeled_category" in extra:
        from .fields import LabelsField

        fields.append(LabelsField(keys.LABELS, v.get("labels_key"),
                                  list(v.get("label_categories", ["0"])),
                                  unlabeled_category=extra.pop("unlabeled_category")))
    else:
        fields.append(CategoricalObsField(keys.LABELS, v.get("labels_key"),
                                          list(v.get("label_categories", ["0"]))))
    if v.get("size_factor_key") is not None:
        fields.append(NumericalObsField(keys.SIZE_FACTOR, v["size_factor_key"], positive=True))
    if v.get("categorical_covariate_keys"):
        fields.append(CategoricalJointObsField(
            keys.CAT_COVS, list(v["categorical_covariate_keys"]),
            [list(c) for c in v["categorical_covariate_categories"]]))
    if v.get("continuous_covariate_keys"):
        fields.append(NumericalJointObsField(keys.CONT_COVS,
                                             list(v["continuous_covariate_keys"])))
    fields.append(LibrarySizeField(log_means=list(v.get("library_log_means", [])),
                                   log_vars=list(v.get("library_log_vars", []))))
    return DataSummary(tuple(fields), n_cells=int(v.get("n_cells", 0)), extra=extra)


def standard_fields(
    *,
    layer: str | None = None,
    batch_key: str | None = None,
    labels: CategoricalObsField | None = None,
    labels_key: str | None = None,
    size_factor_key: str | None = None,
    categorical_covariate_keys: Sequence[str] | None = None,
    continuous_covariate_keys: Sequence[str] | None = None,
) -> list[Field]:
    """Return the fields of the scVI family: counts, batch, labels, covariates, size factor.

    ``labels`` replaces the plain labels field (a :class:`~cellvi.data.fields.LabelsField` for
    the semi-supervised models).
    """
    fields: list[Field] = [
        CountsField(keys.X, layer=layer),
        CategoricalObsField(keys.BATCH, batch_key),
        labels if labels is not None else CategoricalObsField(keys.LABELS, labels_key),
    ]
    if size_factor_key is not None:
        fields.append(NumericalObsField(keys.SIZE_FACTOR, size_factor_key, positive=True))
    if categorical_covariate_keys:
        fields.append(CategoricalJointObsField(keys.CAT_COVS, list(categorical_covariate_keys)))
    if continuous_covariate_keys:
        fields.append(NumericalJointObsField(keys.CONT_COVS, list(continuous_covariate_keys)))
    fields.append(LibrarySizeField())
    return fields


def setup_anndata(
    adata: AnnData,
    fields: Iterable[Field] | None = None,
    *,
    layer: str | None = None,
    batch_key: str | None = None,
    labels_key: str | None = None,
    size_factor_key: str | None = None,
    categorical_covariate_keys: list[str] | None = None,
    continuous_covariate_keys: list[str] | None = None,
    extra: dict | None = None,
) -> DataSummary:
    """Check an AnnData of raw counts against ``fields`` and record how a model should read it.

    Each field is fitted in turn (it checks its part of the AnnData and records what it needs,
    see :mod:`cellvi.data.fields`). Without ``fields``, the standard fields of the scVI family
    are built from the keyword arguments (:func:`standard_fields`).

    Writes ``adata.uns["_cellvi_setup"]`` (a JSON string of :class:`DataSummary`) and returns the
    summary. Nothing else in ``adata`` is changed.

    Raises
    ------
    KeyError
        A key that is not in ``adata.obs``, or a layer that does not exist.
    ValueError
        Counts that are negative, NaN, infinite or look normalised; NaN in a covariate; an empty
        AnnData; non-positive size factors; two fields with the same key.
    """
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise ValueError(f"The AnnData is empty ({adata.n_obs} cells x {adata.n_vars} genes).")
    if fields is None:
        fields = standard_fields(
            layer=layer, batch_key=batch_key, labels_key=labels_key,
            size_factor_key=size_factor_key,
            categorical_covariate_keys=categorical_covariate_keys,
            continuous_covariate_keys=continuous_covariate_keys,
        )
    fitted: dict[str, Field] = {}
    for f in fields:
        if f.key in fitted:
            raise ValueError(f"Two data fields have the key {f.key!r}.")
        fitted[f.key] = f.fit(adata, fitted)
    summary = DataSummary(tuple(fitted.values()), n_cells=int(adata.n_obs),
                          extra=dict(extra or {}))
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


def data_fingerprint(adata: AnnData, summary: DataSummary) -> dict[str, str | None]:
    """Return digests of what a model reads of ``adata``: its cells, genes and each field.

    Cells and genes: their number, the identity of the index object (a subset, a reorder or a
    rename in place replaces it) and a sample of the names.
    """
    import zlib

    import numpy as np
    import pandas as pd

    from .fields import FINGERPRINT_FULL

    def index_digest(index) -> str:
        sample = index[:: max(1, len(index) // FINGERPRINT_FULL)]
        h = pd.util.hash_pandas_object(pd.Index(sample), index=False).to_numpy()
        return f"{len(index)}:{id(index)}:{zlib.crc32(h.view(np.uint8))}"

    out = {"cells": index_digest(adata.obs_names), "genes": index_digest(adata.var_names)}
    for f in summary.fields:
        out[f.key] = f.fingerprint(adata)
    return out


def describe_change(before: dict, after: dict, summary: DataSummary) -> str | None:
    """Say what changed between two :func:`data_fingerprint` results (None if nothing)."""
    what = []
    for key, old in before.items():
        if after.get(key) == old:
            continue
        if key == "cells":
            what.append(f"its cells ({old.split(':')[0]} -> {after[key].split(':')[0]} cells, "
                        "or other names/order)")
        elif key == "genes":
            what.append("its genes")
        else:
            f = summary.get(key)
            where = (getattr(f, "where", None) or getattr(f, "obs_key", None)
                     or getattr(f, "obs_keys", None) or getattr(f, "obsm_key", None) or key)
            what.append(f"{where if isinstance(where, str) else list(where)}")
    return ", ".join(what) if what else None


def check_nonempty_cells(X, *, where: str = "adata.X") -> None:
    """Raise if any cell has no counts (needed when the library size is observed)."""
    import numpy as np

    from .fields import row_totals

    totals = row_totals(X)
    empty = np.flatnonzero(totals <= 0)
    if empty.size:
        raise ValueError(
            f"{empty.size} cell(s) in {where} have no counts (first: row {empty[0]}); their "
            "observed library size is zero. Remove them first, e.g. "
            "`adata = adata[adata.X.sum(axis=1) > 0].copy()` or "
            "`scanpy.pp.filter_cells(adata, min_counts=1)`."
        )
