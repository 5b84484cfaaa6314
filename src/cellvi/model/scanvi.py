"""SCANVI: semi-supervised cell-type annotation with the scANVI model (Xu et al., 2021).

Label codes
-----------
``SCANVI.setup_anndata`` orders the label categories as ``classes + [unlabeled_category]``:
code ``i < n_classes`` is the class ``model.class_names[i]`` (the categories of the labels column
other than the unlabelled one, in their categorical order, else sorted), and code ``n_classes``
means "unlabelled". The unlabelled category is therefore never a class, and predictions only ever
name classes (:class:`cellvi.data.fields.LabelsField`). The same mapping is used by
:class:`cellvi.model.VAECModel`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from torch import nn

from cellvi import keys
from cellvi._settings import snapshot_settings
from cellvi.data._loader import check_genes
from cellvi.data._setup import (
    UNS_KEY,
    DataSummary,
    get_summary,
    setup_anndata,
    standard_fields,
)
from cellvi.data.fields import LabelsField, categories_of, check_obs_key
from cellvi.module import SCANVAE
from cellvi.train import SemiSupervisedTrainingPlan

from ._vaemodel import VAEModel

#: Spellings that mean "no label"; an ``unlabeled_category`` absent from the column while one of
#: these is present is almost surely a typo.
_UNLABELLED_SPELLINGS = {"unknown", "unlabeled", "unlabelled", "unassigned", "nan", "none", "na",
                         "n/a", "?", "", "-1"}


def labels_field(adata: AnnData, labels_key: str | None, unlabeled_category: str | int | None,
                 *, model_name: str) -> LabelsField:
    """Return the labels field of a semi-supervised model, checking the unlabelled category.

    ``unlabeled_category=None`` means every cell is labelled; a reserved name is then recorded
    as the unlabelled category so that queries without labels can still be read.
    """
    if labels_key is None:
        raise ValueError(f"{model_name}.setup_anndata needs a labels_key.")
    check_obs_key(adata, labels_key)
    if unlabeled_category is None:
        return LabelsField(keys.LABELS, labels_key)
    unl = str(unlabeled_category)
    present = categories_of(adata, labels_key)
    if unl not in present:
        classes = [c for c in present if c != unl]
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
            stacklevel=4,
        )
    return LabelsField(keys.LABELS, labels_key, unlabeled_category=unl)


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
    """Set up an AnnData for a semi-supervised model; see :meth:`SCANVI.setup_anndata`."""
    labels = labels_field(adata, labels_key, unlabeled_category, model_name=model_name)
    return setup_anndata(adata, standard_fields(
        layer=layer, batch_key=batch_key, labels=labels, size_factor_key=size_factor_key,
        categorical_covariate_keys=categorical_covariate_keys,
        continuous_covariate_keys=continuous_covariate_keys,
    ))


class SemiSupervisedModel(VAEModel):
    """Shared machinery of the models that learn from partially labelled cells.

    Their module has ``classify(x, batch_index, ...)``, ``classification_loss`` and a
    ``forward(..., feed_labels=, labelled_tensors=, classification_ratio=)``; they train with
    :class:`~cellvi.train.SemiSupervisedTrainingPlan`, whose labelled minibatches the model
    draws (:meth:`_plan_extras`). ``train`` takes the plan's options, ``classification_ratio``
    (50) among them, and ``n_samples_per_label``: use at most this many labelled training cells
    per class for the classification loss (drawn once per ``train`` call, with ``seed``).
    """

    _plan_cls = SemiSupervisedTrainingPlan

    # ----------------------------------------------------------------- labels
    @property
    def _labels(self) -> LabelsField:
        return self.summary[keys.LABELS]

    @property
    def unlabeled_category(self) -> str:
        """The label that marks unlabelled cells (never a class)."""
        return self._labels.unlabeled_category

    @property
    def class_names(self) -> list[str]:
        """The classes, in code order: code ``i`` is ``class_names[i]``."""
        return self._labels.classes

    @property
    def n_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)

    def _label_codes(self) -> np.ndarray:
        """Label code of each cell of the model's AnnData (``n_classes`` = unlabelled)."""
        return self._data().obs[keys.LABELS].numpy().reshape(-1)

    def _data_options(self, summary: DataSummary) -> dict[str, Any]:
        if not isinstance(summary.get(keys.LABELS), LabelsField):
            raise ValueError(
                f"This AnnData was not set up for {type(self).__name__}: call "
                f"`cellvi.model.{type(self).__name__}.setup_anndata(adata, labels_key=..., "
                "unlabeled_category=...)` first."
            )
        options = super()._data_options(summary)
        options["n_labels"] = len(summary[keys.LABELS].classes)  # unlabelled is not a class
        return options

    def _loss_options(self) -> dict[str, Any]:
        return {"feed_labels": True}

    # ----------------------------------------------------------------- training
    def _plan_defaults(self) -> dict[str, Any]:
        # a model started from a trained SCVI was already trained with the full KL
        pretrained = self.summary.extra.get("pretrained_from_scvi", False)
        return {"n_epochs_kl_warmup": None if pretrained else 400}

    def _plan_extras(self, options: dict[str, Any], **context: Any) -> dict[str, Any]:
        n_per_label = options.pop("n_samples_per_label", None)
        if n_per_label is not None and n_per_label < 1:
            raise ValueError(f"n_samples_per_label must be >= 1, got {n_per_label}.")
        rng = context["rngs"]["labelled"] = np.random.default_rng(context["seed"])
        pool = self._labelled_pool(context["train_indices"], n_per_label, rng)
        self._n_samples_per_label = n_per_label
        if pool.size == 0:
            warnings.warn(
                "No labelled cell in the training split: the classifier is trained only through "
                "the ELBO (no classification loss).",
                UserWarning,
                stacklevel=4,
            )
            return {"labelled_sampler": None}
        data, device = self._data(), context["device"]

        def sample(size: int) -> dict[str, torch.Tensor]:
            idx = rng.choice(pool, size=size, replace=pool.size < size)
            return {k: v.to(device) for k, v in data.batch(np.sort(idx)).items()}

        return {"labelled_sampler": sample,
                "labelled_batch_size": max(int(context["batch_size"]), 2)}

    def _labelled_pool(self, train: np.ndarray, n_per_label: int | None,
                       rng: np.random.Generator) -> np.ndarray:
        codes = self._label_codes()
        train = np.asarray(train, dtype=np.int64)
        pool = train[codes[train] < self.n_classes]
        if pool.size and n_per_label is not None:
            parts = []
            for c in range(self.n_classes):
                cells = pool[codes[pool] == c]
                if cells.size > n_per_label:
                    cells = rng.choice(cells, n_per_label, replace=False)
                parts.append(cells)
            pool = np.sort(np.concatenate(parts))
        return pool

    @snapshot_settings
    def train(self, max_epochs: int | None = None, *, calibrate: bool = True,
              **kwargs: Any) -> SemiSupervisedModel:
        """Train (see :meth:`cellvi.model.SCVI.train`), then calibrate the class probabilities.

        Calibration is temperature scaling (Guo et al., 2017): the classifier's log
        probabilities are divided by one temperature :math:`T` before the softmax, with
        :math:`T` the maximum a posteriori value on the labelled validation cells
        (``model.validation_indices``), under a log-normal prior of scale 1 on :math:`T`
        (:func:`fit_temperature`). The prior keeps :math:`T` finite when every validation
        cell is already classified correctly, where the likelihood alone would send it to 0.
        The predicted classes never change; the probabilities of :meth:`predict` do. The
        temperature is a buffer of the module, saved with the model; training starts again
        from :math:`T = 1`.

        Measured on CellBench, one protocol labelled and the other predicted (its cells
        unlabelled in training, or never seen): accuracy 1.00 with a mean top probability of
        0.89-0.96, an expected calibration error of 0.04-0.11, and 0.004-0.022 after
        calibration (:math:`T` 0.47-0.62; eight runs). The classifier is trained against a
        KL term that pulls every unlabelled cell's label distribution towards the class
        prior, hence the underconfidence. Where it is overconfident instead (hard simulated
        designs, accuracy 0.5-0.9) :math:`T` comes out above 1 and the error fell from
        0.04-0.21 to 0.03-0.08, but validation cells calibrate the reference batches: when
        the query batch is classified worse than they are, its probabilities stay too high
        (in one of those four runs the error rose from 0.04 to 0.08).

        Parameters
        ----------
        max_epochs
            Passes over the training cells (default: see the class notes).
        calibrate
            Fit the temperature after training (default). False keeps :math:`T = 1`.
        **kwargs
            The options of :meth:`cellvi.model.SCVI.train` (``batch_size``, ``train_size``,
            ``seed``, ...) and of :class:`~cellvi.train.SemiSupervisedTrainingPlan`
            (``classification_ratio``, ...), and ``n_samples_per_label``.

        Returns
        -------
        The model itself. ``model.train_settings["calibration"]`` records the temperature,
        the number of labelled validation cells it was fitted on and their accuracy and
        expected calibration error before and after; the last row of ``model.history``
        gains ``temperature`` and ``calibration_error_validation_calibrated``.
        """
        temperature = getattr(self.module, "temperature", None)
        if not isinstance(temperature, torch.Tensor):  # a module without a temperature
            return super().train(max_epochs, **kwargs)
        with torch.no_grad():
            temperature.fill_(1.0)
        super().train(max_epochs, **kwargs)
        info = self._calibrate() if calibrate else {"temperature": 1.0, "reason": "calibrate=False"}
        self.train_settings["calibration"] = info
        if "calibration_error_validation_calibrated" in info and not self.history.empty:
            last = self.history.index[-1]
            self.history.loc[last, "temperature"] = info["temperature"]
            self.history.loc[last, "calibration_error_validation_calibrated"] = info[
                "calibration_error_validation_calibrated"]
        return self

    @torch.inference_mode()
    def _calibrate(self) -> dict[str, Any]:
        """Fit and set the module's temperature on the labelled validation cells."""
        from cellvi.train._plan import expected_calibration_error

        val = np.asarray(self.validation_indices, dtype=np.int64)
        codes = self._label_codes()
        cells = val[(codes[val] >= 0) & (codes[val] < self.n_classes)]
        if cells.size == 0:
            warnings.warn(
                "No labelled validation cell: the class probabilities are left uncalibrated "
                "(temperature 1). Train with train_size < 1 and labelled cells to calibrate them.",
                UserWarning,
                stacklevel=3,
            )
            return {"temperature": 1.0, "n_cells": 0, "reason": "no labelled validation cell"}
        self.module.eval()
        devices = [self.device] if self.device.type == "cuda" else []
        parts = []
        with torch.random.fork_rng(devices=devices):  # the encoder draws z: keep the stream
            for batch in self._batches(None, cells, None):
                parts.append(self.module.classify_log_probs(
                    batch[keys.X], batch[keys.BATCH], **self._classify_covariates(batch)
                ).double().cpu())
        log_p = torch.cat(parts)
        y = torch.as_tensor(codes[cells], dtype=torch.long)
        temperature = fit_temperature(log_p, y)
        self.module.temperature.fill_(temperature)
        before = log_p.exp()
        after = torch.softmax(log_p / temperature, dim=-1)
        return {
            "temperature": temperature,
            "n_cells": int(cells.size),
            "accuracy_validation": float((before.argmax(1) == y).double().mean()),
            "calibration_error_validation": expected_calibration_error(before, y),
            "calibration_error_validation_calibrated": expected_calibration_error(after, y),
        }

    # ----------------------------------------------------------------- prediction
    @snapshot_settings
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
            Return the class probabilities instead of the most likely class. They are
            temperature-scaled (calibrated on the labelled validation cells by :meth:`train`,
            ``model.train_settings["calibration"]``), so a top probability of 0.9 means about
            nine correct calls in ten.
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
        Other options of the module, :class:`cellvi.module.SCANVAEConfig` (``y_prior``,
        ``labels_groups``, ``use_labels_groups``, ``classifier_parameters``,
        ``latent_distribution``, ``use_observed_lib_size``, ``encode_covariates``,
        ``use_batch_norm``, ...).

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

    _module_cls = SCANVAE

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
        new = new.with_field(ref[keys.BATCH]).with_field(ref["library_size"])
    if keys.CAT_COVS in new:
        for key, got, want in zip(new.categorical_covariate_keys,
                                  new.categorical_covariate_categories,
                                  ref.categorical_covariate_categories):
            unknown = sorted(set(got) - set(want))
            if unknown:
                raise ValueError(
                    f"from_scvi_model: categories {unknown[:10]} of adata.obs[{key!r}] are "
                    "unknown to the SCVI model."
                )
        new = new.with_field(replace(new[keys.CAT_COVS],
                                     categories=ref.categorical_covariate_categories))
    return new


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


def fit_temperature(log_probs: torch.Tensor, labels: torch.Tensor, *, prior_scale: float = 1.0,
                    bounds: tuple[float, float] = (0.02, 50.0)) -> float:
    r"""Return the temperature that calibrates class log probabilities on labelled cells.

    The maximum a posteriori :math:`T` of

    .. math::

        -\sum_i \log \mathrm{softmax}(\ell_i / T)_{y_i} + \frac{(\log T)^2}{2 s^2},

    the negative log likelihood of the labels under the scaled probabilities plus a normal
    prior of scale :math:`s` (``prior_scale``) on :math:`\log T`. The likelihood is unimodal
    in :math:`\log T` (convex in :math:`1 / T`) and decreases towards :math:`T \to 0` when
    every cell is classified correctly; the prior then stops :math:`T` where the likelihood
    gains little (about 0.2-0.4 for a few dozen cells), and it matters less the more cells
    there are. Found by golden-section search over ``bounds``.

    Parameters
    ----------
    log_probs
        ``(cells, classes)`` log probabilities (normalised or not: logits work too).
    labels
        ``(cells,)`` class codes.
    prior_scale
        Scale :math:`s` of the prior on :math:`\log T`; ``inf`` gives the maximum likelihood.
    bounds
        Smallest and largest temperature considered.

    Returns
    -------
    float
        The temperature (1 when there are no cells).
    """
    log_probs = torch.as_tensor(log_probs, dtype=torch.float64)
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if log_probs.ndim != 2 or log_probs.shape[0] != labels.shape[0]:
        raise ValueError(
            f"log_probs must be (cells, classes) with one label per cell; got "
            f"{tuple(log_probs.shape)} and {labels.shape[0]} labels."
        )
    if labels.numel() == 0:
        return 1.0
    if labels.min() < 0 or labels.max() >= log_probs.shape[1]:
        raise ValueError(f"labels must be class codes in [0, {log_probs.shape[1]}).")
    if not prior_scale > 0:
        raise ValueError(f"prior_scale must be > 0, got {prior_scale}.")
    # -inf log probabilities (a class the classifier rules out) stay -inf at any temperature
    log_probs = torch.where(torch.isfinite(log_probs), log_probs, torch.full_like(log_probs, -1e30))
    picked = log_probs.gather(1, labels[:, None]).squeeze(1)

    def objective(t: float) -> float:
        scaled = log_probs / math.exp(t)
        nll = float((torch.logsumexp(scaled, dim=1) - picked / math.exp(t)).sum())
        return nll + (0.0 if math.isinf(prior_scale) else t * t / (2 * prior_scale**2))

    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    ratio = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = objective(c), objective(d)
    for _ in range(80):  # the bracket shrinks to 1e-16 of its width
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = objective(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = objective(d)
    return float(math.exp((a + b) / 2))
