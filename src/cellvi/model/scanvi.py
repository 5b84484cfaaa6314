"""SCANVI: semi-supervised cell-type annotation with the scANVI model (Xu et al., 2021).

Label codes
-----------
``SCANVI.setup_anndata`` orders the label categories as ``classes + [unlabeled_category]``:
code ``i < n_classes`` is the class ``model.class_names[i]`` (the categories of the labels column
other than the unlabelled one, in their categorical order, else sorted), and code ``n_classes``
means "unlabelled". The unlabelled category is therefore never a class, and predictions only ever
name classes. The same mapping is used by :class:`cellvi.model.VAECModel`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from torch import nn

from cellvi import keys
from cellvi.data._loader import CellData, check_genes
from cellvi.data._setup import UNS_KEY, DataSummary, get_summary
from cellvi.data._setup import setup_anndata as _setup_anndata
from cellvi.module import SCANVAE

from ._vaemodel import VAEModel
from .scvi import vae_arguments

#: Spellings that mean "no label"; an ``unlabeled_category`` absent from the column while one of
#: these is present is almost surely a typo.
_UNLABELLED_SPELLINGS = {"unknown", "unlabeled", "unlabelled", "unassigned", "nan", "none", "na",
                         "n/a", "?", "", "-1"}


def setup_semisupervised(
    adata: AnnData,
    labels_key: str,
    unlabeled_category: str | int | None,
    *,
    layer: str | None = None,
    batch_key: str | None = None,
    size_factor_key: str | None = None,
    categorical_covariate_keys: list[str] | None = None,
    continuous_covariate_keys: list[str] | None = None,
    model_name: str = "SCANVI",
) -> DataSummary:
    """Set up an AnnData for a semi-supervised model; see :meth:`SCANVI.setup_anndata`.

    ``unlabeled_category=None`` means every cell is labelled; a reserved name is then recorded
    as the unlabelled category so that queries without labels can still be read.
    """
    if labels_key is None:
        raise ValueError(f"{model_name}.setup_anndata needs a labels_key.")
    if labels_key not in adata.obs:
        raise KeyError(
            f"{labels_key!r} is not a column of adata.obs (columns: {list(adata.obs.columns)})."
        )
    if unlabeled_category is None:
        unl, user_given = "_cellvi_unlabeled", False
    else:
        unl, user_given = str(unlabeled_category), True
    summary = _setup_anndata(
        adata,
        layer=layer,
        batch_key=batch_key,
        labels_key=labels_key,
        size_factor_key=size_factor_key,
        categorical_covariate_keys=categorical_covariate_keys,
        continuous_covariate_keys=continuous_covariate_keys,
    )
    present = summary.label_categories
    classes = [c for c in present if c != unl]
    if not classes:
        raise ValueError(
            f"Every cell of adata.obs[{labels_key!r}] is {unl!r} (the unlabeled category): "
            f"{model_name} needs some labelled cells to learn the classes."
        )
    if user_given and unl not in present:
        lookalikes = [c for c in classes
                      if c.strip().lower() == unl.strip().lower()
                      or c.strip().lower() in _UNLABELLED_SPELLINGS]
        if lookalikes:
            raise ValueError(
                f"unlabeled_category={unl!r} is not in adata.obs[{labels_key!r}], which has "
                f"{lookalikes} instead: did you mean unlabeled_category={lookalikes[0]!r}? "
                f"(Otherwise {lookalikes[0]!r} would become a class.)"
            )
        warnings.warn(
            f"unlabeled_category={unl!r} does not occur in adata.obs[{labels_key!r}]: every cell "
            f"is labelled, so {model_name} is trained fully supervised on the classes {classes}.",
            UserWarning,
            stacklevel=3,
        )
    summary = summary.replace(
        label_categories=[*classes, unl],
        extra={**summary.extra, "unlabeled_category": unl},
    )
    adata.uns[UNS_KEY] = summary.to_json()
    return summary


class SemiSupervisedModel(VAEModel):
    """Shared machinery of the models that learn from partially labelled cells.

    Subclasses build a module with ``classify(x, batch_index, ...)``, ``classification_loss``
    and a ``forward(..., feed_labels=, labelled_tensors=, classification_ratio=)``.
    """

    _labelled_pool: np.ndarray | None = None
    _labelled_rng: np.random.Generator | None = None
    _classification_ratio: float | None = None

    # ----------------------------------------------------------------- labels
    @property
    def unlabeled_category(self) -> str:
        """The label that marks unlabelled cells (never a class)."""
        return self.summary.extra["unlabeled_category"]

    @property
    def class_names(self) -> list[str]:
        """The classes, in code order: code ``i`` is ``class_names[i]``."""
        return [c for c in self.summary.label_categories if c != self.unlabeled_category]

    @property
    def n_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)

    def _label_codes(self) -> np.ndarray:
        """Label code of each cell of the model's AnnData (``n_classes`` = unlabelled)."""
        return self._data().obs[keys.LABELS].numpy().reshape(-1)

    def _data(self, adata: AnnData | None = None) -> CellData:
        key = self.summary.labels_key
        if adata is not None and adata is not self.adata and key in adata.obs:
            values = adata.obs[key]
            if not values.isna().any():
                known = set(self.summary.label_categories)
                unknown = sorted(set(values.astype(str)) - known)
                if unknown:
                    raise ValueError(
                        f"adata.obs[{key!r}] has labels the model does not know: {unknown[:10]}. "
                        f"The model's classes are {self.class_names}; mark cells of other types "
                        f"as {self.unlabeled_category!r} (the unlabeled category), or drop the "
                        "column to treat every cell as unlabelled."
                    )
        return super()._data(adata)

    # ----------------------------------------------------------------- training
    def _default_max_epochs(self) -> int:
        return int(min(round(20000 / self.adata.n_obs * 400), 400))

    def train(
        self,
        max_epochs: int | None = None,
        *,
        n_samples_per_label: int | None = None,
        classification_ratio: float = 50.0,
        lr: float = 1e-3,
        batch_size: int = 128,
        train_size: float = 0.9,
        early_stopping: bool = False,
        early_stopping_patience: int = 45,
        n_epochs_kl_warmup: int | None | Literal["auto"] = "auto",
        n_steps_kl_warmup: int | None = None,
        weight_decay: float = 1e-6,
        eps: float = 0.01,
        reduce_lr_on_plateau: bool = False,
        device: str = "auto",
        seed: int | None = None,
        progress_bar: bool = True,
        data_placement: Literal["auto", "device", "host"] = "auto",
    ) -> SemiSupervisedModel:
        """Fit the model; each step also draws a minibatch of labelled training cells.

        The objective of a step is the ELBO of the usual minibatch (its labelled cells use their
        label, the others are summed over labels) plus ``classification_ratio`` times the
        cross-entropy of the classifier on a minibatch of ``batch_size`` labelled cells drawn at
        random from the training split.

        Parameters
        ----------
        max_epochs
            Passes over the training cells; see the model's documentation for the default.
        n_samples_per_label
            Use at most this many labelled training cells per class for the classification
            loss (drawn once per ``train`` call, with ``seed``); None: all of them.
        classification_ratio
            Weight of the classification loss.
        n_epochs_kl_warmup
            Epochs over which the KL weight rises from 0 to 1. ``"auto"``: 400, or no warm-up
            (weight 1 throughout) for a model started from a trained SCVI, whose encoder and
            decoder were already trained with the full KL.
        lr, batch_size, train_size, early_stopping, early_stopping_patience, \
n_steps_kl_warmup, weight_decay, eps, reduce_lr_on_plateau, device, seed, progress_bar, \
data_placement
            As in :meth:`cellvi.model.SCVI.train`.

        Returns
        -------
        The model itself; ``model.history`` also has ``classification_loss_train``.
        """
        if max_epochs is None:
            max_epochs = self._default_max_epochs()
        if n_epochs_kl_warmup == "auto":
            pretrained = self.summary.extra.get("pretrained_from_scvi", False)
            n_epochs_kl_warmup = None if pretrained else 400
        if n_samples_per_label is not None and n_samples_per_label < 1:
            raise ValueError(f"n_samples_per_label must be >= 1, got {n_samples_per_label}.")
        self._classification_ratio = float(classification_ratio)
        self._n_samples_per_label = n_samples_per_label
        self._labelled_pool = None
        self._labelled_batch_size = max(int(batch_size), 2)
        self._labelled_rng = np.random.default_rng(seed)
        try:
            super().train(
                max_epochs, lr=lr, batch_size=batch_size, train_size=train_size,
                early_stopping=early_stopping, early_stopping_patience=early_stopping_patience,
                n_epochs_kl_warmup=n_epochs_kl_warmup, n_steps_kl_warmup=n_steps_kl_warmup,
                weight_decay=weight_decay, eps=eps, reduce_lr_on_plateau=reduce_lr_on_plateau,
                device=device, seed=seed, progress_bar=progress_bar,
                data_placement=data_placement,
            )
        finally:
            self._labelled_pool = None
        self.train_settings.update(
            classification_ratio=float(classification_ratio),
            n_samples_per_label=n_samples_per_label,
        )
        return self

    def _make_pool(self) -> np.ndarray:
        codes = self._label_codes()
        train = np.asarray(self.train_indices, dtype=np.int64)
        pool = train[codes[train] < self.n_classes]
        if pool.size and self._n_samples_per_label is not None:
            rng = self._labelled_rng
            parts = []
            for c in range(self.n_classes):
                cells = pool[codes[pool] == c]
                if cells.size > self._n_samples_per_label:
                    cells = rng.choice(cells, self._n_samples_per_label, replace=False)
                parts.append(cells)
            pool = np.sort(np.concatenate(parts))
        if pool.size == 0:
            warnings.warn(
                "No labelled cell in the training split: the classifier is trained only through "
                "the ELBO (no classification loss).",
                UserWarning,
                stacklevel=4,
            )
        return pool

    def _labelled_batch(self) -> dict[str, torch.Tensor] | None:
        if self._labelled_pool is None:
            self._labelled_pool = self._make_pool()
        pool = self._labelled_pool
        if pool.size == 0:
            return None
        size = self._labelled_batch_size
        idx = self._labelled_rng.choice(pool, size=size, replace=pool.size < size)
        batch = self._data().batch(np.sort(idx))
        return {k: v.to(self.device) for k, v in batch.items()}

    def _step(self, module: nn.Module, batch: dict, kl_weight: float):
        labelled = None
        if module.training and self._classification_ratio is not None:
            labelled = self._labelled_batch()
        return module(
            batch, kl_weight=kl_weight, feed_labels=True, labelled_tensors=labelled,
            classification_ratio=self._classification_ratio,
        )[2]

    # ----------------------------------------------------------------- prediction
    @torch.inference_mode()
    def predict(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        soft: bool = False,
        batch_size: int | None = None,
    ) -> np.ndarray | pd.DataFrame:
        """Predict the class of each cell with the model's classifier.

        Parameters
        ----------
        adata
            AnnData with the model's genes (default: the model's own). A labels column is not
            needed; if present, its labels must be classes or the unlabeled category.
        indices
            Cells to use (default: all).
        soft
            Return the class probabilities instead of the most likely class.
        batch_size
            Cells per forward pass (default: about 2^22 / genes, e.g. 2,048 for 2,000 genes).

        Returns
        -------
        An array of class names, ``(cells,)``; or, with ``soft=True``, a cells x classes
        DataFrame of probabilities (columns :attr:`class_names`, index the cell names).
        """
        self.module.eval()
        probs = []
        for batch in self._batches(adata, indices, batch_size):
            p = self.module.classify(
                batch[keys.X], batch[keys.BATCH], **self._classify_covariates(batch)
            )
            probs.append(p.cpu().numpy())
        if probs:
            p = np.concatenate(probs)
        else:
            p = np.zeros((0, self.n_classes), dtype=np.float32)
        if soft:
            return pd.DataFrame(p, index=self._obs_names(adata, indices), columns=self.class_names)
        return np.asarray(self.class_names, dtype=object)[p.argmax(1)]

    def _classify_covariates(self, batch: dict) -> dict:
        return {"cont_covs": batch.get(keys.CONT_COVS), "cat_covs": batch.get(keys.CAT_COVS)}

    def _describe_module(self) -> str:
        return (
            super()._describe_module()
            + f"\n  classes ({self.n_classes}): {self.class_names[:10]}"
            + ("..." if self.n_classes > 10 else "")
            + f"; unlabeled category {self.unlabeled_category!r}"
        )


class SCANVI(SemiSupervisedModel):
    """Single-cell annotation using variational inference (scANVI; Xu et al., 2021).

    scVI with a label-aware mixture prior and a classifier on its latent space, trained on cells
    of which only some are labelled; it transfers labels to the unlabelled cells (and to new
    data) while correcting batch effects. The usual workflow trains an :class:`SCVI` first and
    starts from it with :meth:`from_scvi_model`.

    Parameters
    ----------
    adata
        AnnData set up with :meth:`SCANVI.setup_anndata`.
    n_hidden
        Width of the hidden layers.
    n_latent
        Dimension of the latent space.
    n_layers
        Hidden layers of the encoders, decoders and classifier.
    dropout_rate
        Dropout rate of the encoders and classifier.
    dispersion
        ``"gene"``, ``"gene-batch"``, ``"gene-label"`` or ``"gene-cell"``.
    gene_likelihood
        ``"zinb"``, ``"nb"`` or ``"poisson"``.
    linear_classifier
        A linear (no hidden layer) classifier on the latent space.
    **module_options
        Other options of :class:`cellvi.module.SCANVAE` (``y_prior``, ``labels_groups``,
        ``use_labels_groups``, ``classifier_parameters``, ``latent_distribution``,
        ``use_observed_lib_size``, ``encode_covariates``, ``use_batch_norm``, ...).

    Notes
    -----
    Default ``max_epochs`` of :meth:`train`: ``min(round(20000 / n_cells * 400), 400)``; when the
    model was initialised from a trained SCVI (:meth:`from_scvi_model`), a third of that, at least
    2 and at most 20.

    Examples
    --------
    >>> SCVI.setup_anndata(adata, batch_key="batch")
    >>> vae = SCVI(adata).train()
    >>> lvae = SCANVI.from_scvi_model(vae, unlabeled_category="Unknown", labels_key="cell_type")
    >>> lvae.train()
    >>> adata.obs["predicted"] = lvae.predict()
    """

    def __init__(
        self,
        adata: AnnData,
        n_hidden: int = 128,
        n_latent: int = 10,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        dispersion: Literal["gene", "gene-batch", "gene-label", "gene-cell"] = "gene",
        gene_likelihood: Literal["zinb", "nb", "poisson"] = "zinb",
        linear_classifier: bool = False,
        **module_options: Any,
    ):
        super().__init__(
            adata,
            n_hidden=n_hidden,
            n_latent=n_latent,
            n_layers=n_layers,
            dropout_rate=dropout_rate,
            dispersion=dispersion,
            gene_likelihood=gene_likelihood,
            linear_classifier=linear_classifier,
            **module_options,
        )

    def _build_module(self, summary: DataSummary, **kwargs: Any) -> SCANVAE:
        if "unlabeled_category" not in summary.extra:
            raise ValueError(
                "This AnnData was not set up for SCANVI: call "
                "`cellvi.model.SCANVI.setup_anndata(adata, labels_key=..., "
                "unlabeled_category=...)` first."
            )
        kwargs = dict(kwargs)
        if kwargs.pop("linear_classifier", False):
            params = dict(kwargs.get("classifier_parameters") or {})
            params["n_layers"] = 0
            kwargs["classifier_parameters"] = params
        args = vae_arguments(summary)
        args["n_labels"] = summary.n_labels - 1  # the unlabeled category is not a class
        return SCANVAE(**args, **kwargs)

    def _default_max_epochs(self) -> int:
        epochs = super()._default_max_epochs()
        if self.summary.extra.get("pretrained_from_scvi"):
            epochs = min(max(2, round(epochs / 3)), 20)
        return int(epochs)

    @classmethod
    def setup_anndata(
        cls,
        adata: AnnData,
        labels_key: str,
        unlabeled_category: str | int,
        *,
        layer: str | None = None,
        batch_key: str | None = None,
        size_factor_key: str | None = None,
        categorical_covariate_keys: list[str] | None = None,
        continuous_covariate_keys: list[str] | None = None,
    ) -> None:
        """Check an AnnData of raw counts and record its fields, labels included.

        The classes are the categories of ``adata.obs[labels_key]`` other than
        ``unlabeled_category`` (see the module documentation for the code mapping).

        Parameters
        ----------
        adata
            Cells x genes AnnData of raw counts.
        labels_key
            ``obs`` column of the cell labels.
        unlabeled_category
            The value of that column that marks unlabelled cells. If no cell has it, every cell
            is labelled and training is fully supervised (a warning says so) -- unless the
            column has a value that looks like a misspelt unlabelled category (e.g.
            ``"unknown"`` for ``"Unknown"``), which raises.
        layer, batch_key, size_factor_key, categorical_covariate_keys, \
continuous_covariate_keys
            As in :meth:`cellvi.model.SCVI.setup_anndata`.

        Raises
        ------
        KeyError
            ``labels_key`` (or another key) is not a column of ``adata.obs``.
        ValueError
            No cell is labelled; the unlabeled category looks misspelt; labels with missing
            values; or the checks of :meth:`cellvi.model.SCVI.setup_anndata`.
        """
        setup_semisupervised(
            adata,
            labels_key,
            unlabeled_category,
            layer=layer,
            batch_key=batch_key,
            size_factor_key=size_factor_key,
            categorical_covariate_keys=categorical_covariate_keys,
            continuous_covariate_keys=continuous_covariate_keys,
            model_name=cls.__name__,
        )

    @classmethod
    def from_scvi_model(
        cls,
        scvi_model: VAEModel,
        unlabeled_category: str | int,
        *,
        labels_key: str | None = None,
        adata: AnnData | None = None,
        **scanvi_options: Any,
    ) -> SCANVI:
        """Start a SCANVI from a trained SCVI: same architecture, its weights copied.

        The encoder of ``z1`` (and of the library), the decoder and the dispersion are copied;
        the classifier and the ``z2`` layers start fresh. The AnnData is set up for SCANVI with
        the SCVI model's layer, batch key and covariates (this replaces its
        ``uns["_cellvi_setup"]``; the SCVI model keeps working from its own summary).

        Parameters
        ----------
        scvi_model
            A (trained) :class:`cellvi.model.SCVI`.
        unlabeled_category
            The label that marks unlabelled cells.
        labels_key
            ``obs`` column of the labels; default: the one the SCVI model was set up with.
        adata
            AnnData to annotate (default: the SCVI model's own). It must have the SCVI model's
            genes, in the same order, and only batches the SCVI model knows.
        **scanvi_options
            Options of :class:`SCANVI` that do not change the copied architecture
            (``linear_classifier``, ``y_prior``, ``classifier_parameters``, ...).

        Raises
        ------
        ValueError
            No labels key; genes that differ from the SCVI model's (the message names them);
            batches or covariate categories the SCVI model does not know; options that change
            the shape of copied weights.
        """
        s = scvi_model.summary
        labels_key = labels_key if labels_key is not None else s.labels_key
        if labels_key is None:
            raise ValueError(
                "The SCVI model was set up without labels: pass labels_key= (the obs column of "
                "the cell labels)."
            )
        if not getattr(scvi_model, "is_trained", True):
            warnings.warn(
                "The SCVI model has not been trained; SCANVI starts from untrained weights.",
                UserWarning,
                stacklevel=2,
            )
        if adata is None:
            adata = scvi_model.adata
        else:
            try:
                check_genes(adata, s)
            except ValueError as err:
                raise ValueError(
                    f"from_scvi_model: the AnnData does not match the SCVI model. {err}"
                ) from None
        setup_semisupervised(
            adata,
            labels_key,
            unlabeled_category,
            layer=s.layer,
            batch_key=s.batch_key,
            size_factor_key=s.size_factor_key,
            categorical_covariate_keys=list(s.categorical_covariate_keys) or None,
            continuous_covariate_keys=list(s.continuous_covariate_keys) or None,
            model_name=cls.__name__,
        )
        new = _align_categories(get_summary(adata), s)
        new = new.replace(extra={**new.extra, "pretrained_from_scvi": True})
        adata.uns[UNS_KEY] = new.to_json()

        options = {k: v for k, v in scvi_model.init_kwargs.items()}
        options.update(scanvi_options)
        model = cls(adata, **options)
        _copy_weights(scvi_model.module, model.module)
        return model


def _align_categories(new: DataSummary, ref: DataSummary) -> DataSummary:
    """Give ``new`` the batch and covariate codes of ``ref`` (whose weights are reused)."""
    if new.batch_categories != ref.batch_categories:
        unknown = sorted(set(new.batch_categories) - set(ref.batch_categories))
        if unknown:
            raise ValueError(
                f"from_scvi_model: batches {unknown[:10]} of adata.obs[{ref.batch_key!r}] are not "
                f"batches of the SCVI model ({ref.batch_categories[:20]})."
            )
        new = new.replace(
            batch_categories=list(ref.batch_categories),
            library_log_means=list(ref.library_log_means),
            library_log_vars=list(ref.library_log_vars),
        )
    cats = []
    for key, got, want in zip(new.categorical_covariate_keys,
                              new.categorical_covariate_categories,
                              ref.categorical_covariate_categories):
        unknown = sorted(set(got) - set(want))
        if unknown:
            raise ValueError(
                f"from_scvi_model: categories {unknown[:10]} of adata.obs[{key!r}] are unknown "
                "to the SCVI model."
            )
        cats.append(list(want))
    return new.replace(categorical_covariate_categories=cats)


def _copy_weights(src: nn.Module, dst: nn.Module) -> None:
    """Copy every parameter and buffer of ``src`` into the same-named one of ``dst``."""
    theirs = src.state_dict()
    ours = dst.state_dict()
    missing = [k for k in theirs if k not in ours]
    mismatched = [
        f"{k}: {tuple(v.shape)} vs {tuple(ours[k].shape)}"
        for k, v in theirs.items()
        if k in ours and ours[k].shape != v.shape
    ]
    if missing or mismatched:
        raise ValueError(
            "from_scvi_model: the SCANVI architecture does not match the SCVI model's "
            f"(missing {missing[:5]}, different shapes {mismatched[:5]}). Do not change "
            "n_hidden, n_latent, n_layers, dispersion or the covariates."
        )
    dst.load_state_dict(theirs, strict=False)
