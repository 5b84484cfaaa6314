"""TOTALVI: the user-facing totalVI model of CITE-seq data (RNA and surface proteins).

The module is :class:`cellvi.module.TOTALVAE` (its documentation carries the model). This file
declares the data (:class:`ProteinObsmField`: the protein counts with their names and which
proteins each batch measured), fits the empirical background prior
(:func:`fit_two_gaussians`, a small EM in numpy), chooses the training plan and its defaults
(those of scvi-tools 1.4.2), and gives the queries: latent space, denoised RNA and protein
expression, foreground probabilities, differential expression over genes and proteins,
posterior predictive samples, feature correlations and likelihoods.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData

from cellvi import keys
from cellvi._native._outputs import empty as empty_result
from cellvi._settings import current as current_settings
from cellvi._settings import snapshot_settings
from cellvi.data._setup import DataSummary, setup_anndata, standard_fields
from cellvi.data.fields import ObsmCountsField
from cellvi.module.totalvae import PROTEIN_KEY, TOTALVAE
from cellvi.nn._encoders import softmax as softmax_into
from cellvi.train import AdversarialTrainingPlan

from ._vaemodel import VAEModel

__all__ = ["ProteinObsmField", "TOTALVI", "TotalVITrainingPlan", "fit_two_gaussians"]

#: Options of :class:`TOTALVI` that are the model's, not the module's.
_MODEL_OPTIONS = ("empirical_protein_background_prior", "override_missing_proteins")


# --------------------------------------------------------------------------------------------
# the protein field
# --------------------------------------------------------------------------------------------
def check_protein_counts(m: np.ndarray, where: str) -> None:
    """Raise unless ``m`` holds raw protein counts; warn for non-integer estimated counts."""
    if m.size == 0:
        return
    if not np.all(np.isfinite(m)):
        raise ValueError(f"{where} contains NaN or infinite values; pass raw protein counts.")
    low = float(m.min())
    if low < 0:
        raise ValueError(
            f"{where} contains negative values (min {low:g}): totalVI models raw protein counts "
            "(antibody UMIs), not CLR- or otherwise normalised values. Pass the raw counts."
        )
    if np.any(m != np.rint(m)):
        top = float(m.max())
        if top < 30:
            raise ValueError(
                f"{where} looks log-transformed or normalised (non-integer values, max "
                f"{top:.3g}); totalVI models raw protein counts. Pass the raw counts."
            )
        warnings.warn(
            f"{where} has non-integer values (max {top:.3g}); treating them as estimated counts.",
            UserWarning,
            stacklevel=4,
        )


@dataclass(frozen=True)
class ProteinObsmField(ObsmCountsField):
    """Protein counts in ``adata.obsm``, their names, and the proteins each batch measured.

    A protein whose counts are all zero in a batch is taken as not measured there (panels
    differ between experiments): :attr:`batch_mask` records it, and the model leaves it out of
    that batch's likelihood.

    Attributes
    ----------
    batch_key
        Key of the batch field fitted before this one.
    batch_mask
        ``(n_batch, n_proteins)``: whether each batch measured each protein (recorded by
        :meth:`fit`).
    """

    batch_key: str = keys.BATCH
    batch_mask: list[list[bool]] = field(default_factory=list)
    kind: ClassVar[str] = "protein_obsm"

    @property
    def where(self) -> str:
        """Where the proteins are read from, for messages."""
        return f"adata.obsm[{self.obsm_key!r}]"

    @property
    def n_proteins(self) -> int:
        """Number of proteins."""
        return len(self.column_names)

    @property
    def has_missing(self) -> bool:
        """Whether some batch did not measure some protein."""
        return any(not v for row in self.batch_mask for v in row)

    def matrix(self, adata: AnnData) -> np.ndarray:  # noqa: D102
        if self.obsm_key not in adata.obsm:
            raise KeyError(
                f"{self.obsm_key!r} is not in adata.obsm (keys: {list(adata.obsm.keys())}): "
                "pass protein_expression_obsm_key=, the key of the (cells, proteins) counts."
            )
        return super().matrix(adata)

    def names(self, adata: AnnData) -> list[str]:  # noqa: D102
        m = adata.obsm[self.obsm_key]
        names = super().names(adata)
        if self.names_uns_key is not None and isinstance(m, pd.DataFrame):
            columns = [str(c) for c in m.columns]
            if columns != names:
                raise ValueError(
                    f"adata.uns[{self.names_uns_key!r}] names other proteins than the columns "
                    f"of the DataFrame {self.where} (e.g. {names[:3]} vs {columns[:3]}); drop "
                    "protein_names_uns_key to use the columns, or fix the names."
                )
        return names

    def fit(self, adata: AnnData, fitted: Mapping[str, Any]) -> ProteinObsmField:  # noqa: D102
        m = self.matrix(adata)
        check_protein_counts(m, self.where)
        names = self.names(adata)
        if m.shape[1] == 0:
            raise ValueError(f"{self.where} has no protein columns.")
        if len(set(names)) != len(names):
            dup = pd.Index(names)[pd.Index(names).duplicated()].unique()[:5].tolist()
            raise ValueError(
                f"The protein names of {self.where} have duplicates (e.g. {dup}); results are "
                "indexed by protein name, so give every protein a distinct name."
            )
        batch = fitted.get(self.batch_key)
        if batch is None:
            codes, cats = np.zeros(adata.n_obs, dtype=np.int64), ["0"]
        else:
            codes, cats = batch.codes(adata), list(batch.categories)
        mask = np.zeros((len(cats), m.shape[1]), dtype=bool)
        for b in range(len(cats)):
            mask[b] = m[codes == b].sum(axis=0) > 0
        if not mask.any():
            raise ValueError(
                f"{self.where} is all zeros: no protein was measured in any cell. totalVI needs "
                "protein counts (pass the key of the raw antibody counts)."
            )
        never = [names[j] for j in np.flatnonzero(~mask.any(axis=0))]
        if never:
            warnings.warn(
                f"{len(never)} protein(s) of {self.where} are zero in every cell (e.g. "
                f"{never[:5]}): they carry no information and are left out of the likelihood. "
                "Drop them from the matrix if that is not intended.",
                UserWarning,
                stacklevel=4,
            )
        empty = [cats[b] for b in np.flatnonzero(~mask.any(axis=1))]
        if empty:
            warnings.warn(
                f"Batch(es) {empty[:5]} have no protein counts at all: their proteins are "
                "treated as not measured, and the model imputes them from the RNA. If these "
                "cells do have proteins, check the matrix.",
                UserWarning,
                stacklevel=4,
            )
        return replace(self, column_names=names, batch_mask=mask.tolist())

    def check(self, adata: AnnData) -> None:  # noqa: D102
        m = self.matrix(adata)
        names = self.names(adata)
        if names != self.column_names:
            missing = [n for n in self.column_names if n not in set(names)]
            raise ValueError(
                f"{self.where} has other proteins than the model's ({len(names)} vs "
                f"{len(self.column_names)}; missing e.g. {missing[:5]}). Give it the model's "
                "proteins, in the model's order (zeros for proteins it did not measure)."
            )
        check_protein_counts(m, self.where)


# --------------------------------------------------------------------------------------------
# the empirical background prior
# --------------------------------------------------------------------------------------------
def fit_two_gaussians(values: np.ndarray, *, max_iter: int = 200, tol: float = 1e-6,
                      reg_covar: float = 1e-6) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Fit a two-component Gaussian mixture to each column of ``values`` by EM.

    Each column is started from its exact two-means split (the sorted values cut where the
    within-group sum of squares is smallest, which is the global optimum of k-means in one
    dimension), then EM runs until the mean log-likelihood gains less than ``tol``. Variances
    get ``reg_covar`` added, as in scikit-learn's ``GaussianMixture``.

    Parameters
    ----------
    values
        ``(n, k)``: ``k`` independent columns of ``n`` values.
    max_iter, tol, reg_covar
        EM iterations at most, stopping gain and variance floor.

    Returns
    -------
    means, variances, weights
        Each ``(k, 2)``, the components sorted by mean (the first is the lower).
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    n, k = x.shape
    if n < 2:
        raise ValueError(f"fit_two_gaussians needs at least 2 values per column, got {n}.")
    # exact 1-D two-means: split after sorted position i (1 <= i < n)
    s = np.sort(x, axis=0)
    c1, c2 = np.cumsum(s, axis=0), np.cumsum(s * s, axis=0)
    i = np.arange(1, n)[:, None]
    left = c2[:-1] - c1[:-1] ** 2 / i
    right = (c2[-1] - c2[:-1]) - (c1[-1] - c1[:-1]) ** 2 / (n - i)
    cut = np.argmin(left + right, axis=0)  # (k,) last index of the lower group
    threshold = s[cut, np.arange(k)]
    resp = np.stack([x <= threshold, x > threshold], axis=-1).astype(np.float64)  # (n, k, 2)
    resp[:, (resp[..., 1].sum(0) == 0), :] = 0.5  # constant column: both halves alike
    previous = -np.inf
    for _ in range(max_iter):
        nk = resp.sum(0) + 10 * np.finfo(float).eps  # (k, 2)
        means = (resp * x[..., None]).sum(0) / nk
        variances = (resp * (x[..., None] - means) ** 2).sum(0) / nk + reg_covar
        weights = nk / n
        log_p = (np.log(weights) - 0.5 * np.log(2 * np.pi * variances)
                 - 0.5 * (x[..., None] - means) ** 2 / variances)  # (n, k, 2)
        top = log_p.max(-1, keepdims=True)
        log_norm = top + np.log(np.exp(log_p - top).sum(-1, keepdims=True))
        resp = np.exp(log_p - log_norm)
        current = log_norm.mean(0).ravel()  # (k,) mean log-likelihood
        if np.all(np.abs(current - previous) < tol):
            break
        previous = current
    nk = resp.sum(0) + 10 * np.finfo(float).eps
    means = (resp * x[..., None]).sum(0) / nk
    variances = (resp * (x[..., None] - means) ** 2).sum(0) / nk + reg_covar
    weights = nk / n
    order = np.argsort(means, axis=1)
    take = np.take_along_axis
    return take(means, order, 1), take(variances, order, 1), take(weights, order, 1)


#: The background prior's scale is at least this (log counts): a narrower prior than the
#: spread of backgrounds between cells only makes the KL gradient stiff.
MIN_BACKGROUND_SCALE = 0.1


def empirical_background_prior(
    proteins: np.ndarray, codes: np.ndarray, mask: np.ndarray, *, max_cells: int = 10000,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    r"""Start of the background prior: per protein and batch, the lower of two Gaussians.

    For each batch and each protein it measured, a two-component Gaussian mixture is fitted
    to :math:`\log(1 + y)` over the batch's cells (at most ``max_cells``, drawn with ``seed``):
    the lower component is the background. Its mean starts the prior's mean, its standard
    deviation (at least :data:`MIN_BACKGROUND_SCALE`) the prior's scale. Proteins a batch did
    not measure get mean 0 and scale 1 (they are masked anyway).

    Returns ``(mean, scale)``, each ``(n_proteins, n_batch)``.
    """
    n_batch, n_p = mask.shape
    mean = np.zeros((n_p, n_batch))
    scale = np.ones((n_p, n_batch))
    rng = np.random.default_rng(seed)
    for b in range(n_batch):
        cells = np.flatnonzero(codes == b)
        measured = np.flatnonzero(mask[b])
        if cells.size < 2 or measured.size == 0:
            continue
        if cells.size > max_cells:
            cells = np.sort(rng.choice(cells, max_cells, replace=False))
        logs = np.log1p(proteins[np.ix_(cells, measured)].astype(np.float64))
        means, variances, _ = fit_two_gaussians(logs)
        mean[measured, b] = means[:, 0]
        scale[measured, b] = np.maximum(np.sqrt(variances[:, 0]), MIN_BACKGROUND_SCALE)
    return mean, scale


# --------------------------------------------------------------------------------------------
# the training plan
# --------------------------------------------------------------------------------------------
class TotalVITrainingPlan(AdversarialTrainingPlan):
    r"""The adversarial plan as scvi-tools runs it for totalVI: the classifier's step scaled too.

    The model's step is :class:`~cellvi.train.AdversarialTrainingPlan`'s (its loss plus
    ``kappa`` times the fooling term); the classifier then minimises ``kappa`` times its
    cross-entropy (scvi-tools 1.4.2), so that it learns more slowly as the KL warm-up ends and
    ``kappa = 1 - kl_weight`` falls (with Adam's ``eps = 0.01`` the step size follows the
    gradient's scale). Without a classifier this is the plain plan.
    """

    scale_classifier_loss = True


# --------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------
class TOTALVI(VAEModel):
    """total Variational Inference of CITE-seq data (Gayoso, Steier et al., 2021).

    One latent space for the RNA and the surface proteins of each cell, with the protein
    counts split into a background (ambient) and a foreground part; batches are corrected and
    proteins a batch did not measure are imputed. Call :meth:`setup_anndata` (or
    :meth:`setup_mudata`) first.

    Parameters
    ----------
    adata
        AnnData (or MuData) set up with :meth:`setup_anndata` / :meth:`setup_mudata`.
    n_latent
        Dimension of the latent space.
    gene_dispersion
        ``"gene"``, ``"gene-batch"`` or ``"gene-label"``.
    protein_dispersion
        ``"protein"``, ``"protein-batch"`` or ``"protein-label"``.
    gene_likelihood
        ``"nb"`` or ``"zinb"``.
    latent_distribution
        ``"normal"`` or ``"ln"`` (logistic normal).
    empirical_protein_background_prior
        Start the background prior from the data (:func:`empirical_background_prior`); the
        prior is learned either way. None: when there are more than 10 proteins.
    override_missing_proteins
        Do not treat proteins that are all zero in a batch as missing (they are then modelled
        as measured zeros).
    **module_options
        Other options of the module, :class:`cellvi.module.TOTALVAEConfig` (``n_hidden``,
        ``n_layers_encoder``, ``n_layers_decoder``, ``dropout_rate_encoder``,
        ``dropout_rate_decoder``, ``encode_covariates``, ``use_observed_lib_size``,
        ``use_batch_norm``, ``use_layer_norm``, ...). The options that follow from the data
        (genes, proteins, batches, covariates, missing proteins) are set from the set-up.

    Notes
    -----
    Training follows scvi-tools 1.4.2 (:meth:`train`): Adam with lr 4e-3, batch size 256,
    early stopping on the validation ELBO (patience 45), the learning rate reduced on its
    plateau (factor 0.6, patience 30), the KL warm-up over ``0.75 * n_cells`` optimizer steps,
    and, when some protein is missing from some batch, an adversarial batch classifier on the
    latent space (lr 1e-3, :class:`TotalVITrainingPlan`).

    Examples
    --------
    >>> cellvi.model.TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein_expression",
    ...                                    batch_key="batch")
    >>> model = cellvi.model.TOTALVI(adata)
    >>> model.train()
    >>> adata.obsm["X_totalvi"] = model.get_latent_representation()
    >>> rna, protein = model.get_normalized_expression(n_samples=25)
    """

    _module_cls = TOTALVAE
    _plan_cls = TotalVITrainingPlan

    def __init__(
        self,
        adata: AnnData,
        n_latent: int = 20,
        gene_dispersion: Literal["gene", "gene-batch", "gene-label"] = "gene",
        protein_dispersion: Literal["protein", "protein-batch", "protein-label"] = "protein",
        gene_likelihood: Literal["nb", "zinb"] = "nb",
        latent_distribution: Literal["normal", "ln"] = "normal",
        empirical_protein_background_prior: bool | None = None,
        override_missing_proteins: bool = False,
        **module_options: Any,
    ):
        adata = _as_anndata(adata)
        options = dict(n_latent=n_latent, gene_dispersion=gene_dispersion,
                       protein_dispersion=protein_dispersion, gene_likelihood=gene_likelihood,
                       latent_distribution=latent_distribution,
                       empirical_protein_background_prior=empirical_protein_background_prior,
                       override_missing_proteins=override_missing_proteins, **module_options)
        self._constructing = True  # (a loaded model does not warn again)
        super().__init__(adata, **options)
        self._constructing = False
        use_prior = empirical_protein_background_prior
        if use_prior is None:
            use_prior = self.n_proteins > 10
        self._empirical_prior = bool(use_prior)
        if use_prior and "protein_background_prior_mean" not in module_options:
            mask = np.asarray(self.module.config.protein_batch_mask
                              or np.ones((self.module.n_batch, self.n_proteins)), dtype=bool)
            mean, scale = empirical_background_prior(
                self._data().columns[PROTEIN_KEY].values.numpy(),
                self._data().obs[keys.BATCH].numpy().reshape(-1), mask,
                seed=current_settings().seed or 0)
            with torch.no_grad():
                self.module.background_pro_alpha.copy_(torch.from_numpy(mean))
                self.module.background_pro_log_beta.copy_(torch.from_numpy(np.log(scale)))

    # ------------------------------------------------------------------ set-up
    @classmethod
    def setup_anndata(
        cls,
        adata: AnnData,
        *,
        protein_expression_obsm_key: str,
        protein_names_uns_key: str | None = None,
        batch_key: str | None = None,
        layer: str | None = None,
        size_factor_key: str | None = None,
        categorical_covariate_keys: list[str] | None = None,
        continuous_covariate_keys: list[str] | None = None,
    ) -> None:
        """Check an AnnData of RNA and protein counts and record which fields the model reads.

        Writes ``adata.uns["_cellvi_setup"]``; the data themselves are not changed.

        Parameters
        ----------
        adata
            Cells x genes AnnData of raw RNA counts, with the protein counts in ``obsm``.
        protein_expression_obsm_key
            Key of the ``(cells, proteins)`` raw protein counts in ``adata.obsm`` (an array,
            sparse matrix or DataFrame); :func:`cellvi.data.read` puts 10x antibody capture
            there as ``"protein_expression"``.
        protein_names_uns_key
            Key in ``adata.uns`` of the protein names (None: the DataFrame's columns, else
            ``"0" .. "n-1"``).
        batch_key, layer, size_factor_key, categorical_covariate_keys, \
continuous_covariate_keys
            As in :meth:`cellvi.model.SCVI.setup_anndata`.

        Raises
        ------
        KeyError
            A key that is not in ``obsm``, ``uns`` or ``obs``.
        ValueError
            A protein matrix of the wrong shape, negative, non-finite or normalised proteins,
            names that do not match the columns (or repeat), no protein counts at all; the
            checks of :meth:`cellvi.model.SCVI.setup_anndata`.

        Warns
        -----
        UserWarning
            Proteins that are zero in every cell; batches without any protein counts (their
            proteins are imputed); proteins missing from some batch (their likelihood there is
            masked, see ``override_missing_proteins``).
        """
        fields = standard_fields(
            layer=layer, batch_key=batch_key, size_factor_key=size_factor_key,
            categorical_covariate_keys=categorical_covariate_keys,
            continuous_covariate_keys=continuous_covariate_keys,
        )
        fields.append(ProteinObsmField(PROTEIN_KEY, obsm_key=protein_expression_obsm_key,
                                       names_uns_key=protein_names_uns_key))
        setup_anndata(adata, fields)

    @classmethod
    def setup_mudata(
        cls,
        mdata,
        *,
        rna_layer: str | None = None,
        protein_layer: str | None = None,
        batch_key: str | None = None,
        size_factor_key: str | None = None,
        categorical_covariate_keys: list[str] | None = None,
        continuous_covariate_keys: list[str] | None = None,
        modalities: Mapping[str, str] | None = None,
    ) -> None:
        """Set up a MuData with an RNA and a protein modality (see :meth:`setup_anndata`).

        ``modalities`` names them: ``{"rna_layer": "rna", "protein_layer": "prot"}``
        (``rna_layer`` / ``protein_layer`` are then layers of those modalities; None: their
        ``X``). The ``obs`` keys are looked up in ``mdata.obs``, then in the RNA modality's.
        The set-up is written to ``mdata.uns["_cellvi_setup"]``; ``TOTALVI(mdata)`` reads the
        two modalities through it without copying or changing them.

        Raises
        ------
        ValueError
            ``modalities`` missing or naming a modality the MuData does not have; the two
            modalities with different cells; the checks of :meth:`setup_anndata`.
        """
        rna, prot = _modalities(mdata, modalities)
        joint = _joint_anndata(mdata, rna, prot, protein_layer)
        fields = standard_fields(
            layer=rna_layer, batch_key=batch_key, size_factor_key=size_factor_key,
            categorical_covariate_keys=categorical_covariate_keys,
            continuous_covariate_keys=continuous_covariate_keys,
        )
        fields.append(ProteinObsmField(PROTEIN_KEY, obsm_key=PROTEIN_KEY))
        summary = setup_anndata(joint, fields, extra={
            "mudata": {"rna": rna, "protein": prot, "protein_layer": protein_layer}})
        mdata.uns["_cellvi_setup"] = summary.to_json()

    # ------------------------------------------------------------------ options and plan
    def _data_options(self, summary: DataSummary) -> dict[str, Any]:
        if PROTEIN_KEY not in summary:
            raise ValueError(
                "This AnnData was not set up for TOTALVI: call `cellvi.model.TOTALVI."
                "setup_anndata(adata, protein_expression_obsm_key=...)` first."
            )
        proteins: ProteinObsmField = summary[PROTEIN_KEY]
        use_mask = proteins.has_missing and not getattr(self, "_override_missing", False)
        return dict(
            n_input_genes=summary.n_vars,
            n_input_proteins=proteins.n_proteins,
            n_batch=summary.n_batch,
            n_labels=summary.n_labels,
            n_continuous_cov=len(summary.continuous_covariate_keys),
            n_cats_per_cov=summary.n_cats_per_cov,
            use_size_factor_key=summary.size_factor_key is not None,
            library_log_means=summary.library_log_means,
            library_log_vars=summary.library_log_vars,
            protein_batch_mask=proteins.batch_mask if use_mask else None,
        )

    def _module_config(self, summary: DataSummary, options: dict[str, Any]):
        options = dict(options)
        model_options = {k: options.pop(k) for k in _MODEL_OPTIONS if k in options}
        self._override_missing = bool(model_options.get("override_missing_proteins", False))
        proteins = summary.get(PROTEIN_KEY)
        if proteins is not None and proteins.has_missing and not self._override_missing:
            self._warn_missing(proteins, summary)
        return super()._module_config(summary, options)

    def _warn_missing(self, proteins: ProteinObsmField, summary: DataSummary) -> None:
        mask = np.asarray(proteins.batch_mask, dtype=bool)
        partial = [summary.batch_categories[b] for b in range(mask.shape[0])
                   if mask[b].any() and not mask[b].all()]
        if partial and getattr(self, "_constructing", False):
            warnings.warn(
                f"Some proteins have all-zero counts in some batches ({partial[:5]}): they are "
                "treated as not measured there (left out of those batches' likelihood), and the "
                "adversarial batch classifier is on by default. All-zero counts can also be "
                "biology or design: pass override_missing_proteins=True to model them as zeros.",
                UserWarning,
                stacklevel=4,
            )

    def _plan_defaults(self) -> dict[str, Any]:
        adversarial = self.module.protein_batch_mask is not None and self.module.n_batch > 1
        return {
            "lr": 4e-3,
            "early_stopping": True,
            "reduce_lr_on_plateau": True,
            "n_epochs_kl_warmup": None,
            "n_steps_kl_warmup": "auto",
            "adversarial_classifier": adversarial,
            "adversarial_lr": 1e-3,
        }

    def _plan_extras(self, options: dict[str, Any], **context: Any) -> dict[str, Any]:
        # scvi-tools warms up over int(0.75 * n_cells) optimizer steps, which Lightning counts
        # for both optimizers when the adversary is on: half as many minibatches then
        if options.get("n_steps_kl_warmup") != "auto":
            return {}
        steps = int(0.75 * self.adata.n_obs)
        if options.get("adversarial_classifier") not in (False, None):
            steps //= 2
        return {"n_steps_kl_warmup": steps}

    @snapshot_settings
    def train(self, max_epochs: int | None = None, *, batch_size: int = 256,
              **options: Any) -> TOTALVI:
        """Fit the model; the options of :meth:`cellvi.model.SCVI.train`, totalVI's defaults.

        The defaults are scvi-tools 1.4.2's for totalVI: ``batch_size=256``, ``lr=4e-3``,
        ``early_stopping=True`` (on ``elbo_validation``, patience 45),
        ``reduce_lr_on_plateau=True``, a KL warm-up over ``int(0.75 * n_cells)`` optimizer
        steps (no warm-up by epochs), ``adversarial_classifier`` on when a protein is missing
        from a batch (with ``adversarial_lr=1e-3``). Any of them can be given here; cellvi's
        ``n_steps_kl_warmup`` counts minibatches, and its default (``"auto"``) is the number
        of minibatches scvi-tools' warm-up lasts: ``int(0.75 * n_cells)``, halved when the
        adversarial classifier is on (Lightning counts the steps of both optimizers).
        """
        return super().train(max_epochs, batch_size=batch_size, **options)

    # ------------------------------------------------------------------ names
    @property
    def protein_names(self) -> list[str]:
        """The model's proteins, in order."""
        return list(self.summary[PROTEIN_KEY].column_names)

    @property
    def n_proteins(self) -> int:
        """Number of proteins."""
        return len(self.protein_names)

    def protein_indices(self, protein_list: Sequence[str] | None) -> np.ndarray:
        """Positions of ``protein_list`` among the model's proteins (all when None), checked."""
        if protein_list is None:
            return np.arange(self.n_proteins)
        if isinstance(protein_list, str):
            protein_list = [protein_list]
        lookup = {p: i for i, p in enumerate(self.protein_names)}
        missing = [p for p in protein_list if p not in lookup]
        if missing:
            raise ValueError(
                f"Proteins not in the model: {missing[:10]} (the model's: "
                f"{self.protein_names[:10]}{' ...' if self.n_proteins > 10 else ''}).")
        return np.array([lookup[p] for p in protein_list], dtype=np.int64)

    def gene_indices(self, gene_list) -> np.ndarray:  # noqa: D102
        if isinstance(gene_list, str):
            gene_list = [gene_list]
        return super().gene_indices(gene_list)

    # a set-up MuData is read through its joint AnnData view wherever an AnnData is taken
    def _data(self, adata=None, *args, **kwargs):
        return super()._data(_as_anndata(adata, self.summary), *args, **kwargs)

    def _batches(self, adata, *args, **kwargs):
        return super()._batches(_as_anndata(adata, self.summary), *args, **kwargs)

    def _indices(self, adata, *args, **kwargs):
        return super()._indices(_as_anndata(adata, self.summary), *args, **kwargs)

    def _obs_names(self, adata, *args, **kwargs):
        return super()._obs_names(_as_anndata(adata, self.summary), *args, **kwargs)

    def _describe_module(self) -> str:
        m = self.module
        missing = "masked" if m.protein_batch_mask is not None else "none"
        return (
            f"TOTALVAE: n_latent={m.n_latent}, {self.n_proteins} proteins, gene_likelihood="
            f"{m.gene_likelihood!r}, gene_dispersion={m.gene_dispersion!r}, protein_dispersion="
            f"{m.protein_dispersion!r}, latent_distribution={m.latent_distribution!r}; missing "
            f"proteins: {missing}; background prior: "
            f"{'empirical' if getattr(self, '_empirical_prior', False) else 'default'} start"
        )

    # ------------------------------------------------------------------ queries
    def _decode_inputs(self, batch: dict, n_samples: int) -> tuple[dict, dict]:
        inf = self.module.inference(**self.module.inference_inputs(batch), n_samples=n_samples)
        return inf, self.module.generative_inputs(batch, inf)

    def _protein_values(self, dec: dict, *, sample_protein_mixing: bool,
                        include_protein_background: bool, scale_protein: bool) -> torch.Tensor:
        background = torch.sigmoid(dec["mixing"])
        if sample_protein_mixing:
            background = torch.bernoulli(background)
        value = dec["rate_fore"] * (1 - background)
        if include_protein_background:
            value = value + dec["rate_back"] * background
        if scale_protein:
            value = value / value.sum(-1, keepdim=True).clamp(min=1e-12)
        return value

    @snapshot_settings
    @torch.inference_mode()
    def get_normalized_expression(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        n_samples_overall: int | None = None,
        transform_batch: str | Sequence[str] | None = None,
        gene_list: Sequence[str] | None = None,
        protein_list: Sequence[str] | None = None,
        library_size: float | Literal["latent"] = 1,
        n_samples: int = 1,
        sample_protein_mixing: bool = False,
        scale_protein: bool = False,
        include_protein_background: bool = False,
        batch_size: int | None = None,
        return_mean: bool = True,
        return_numpy: bool | None = None,
    ) -> tuple[pd.DataFrame | np.ndarray, pd.DataFrame | np.ndarray]:
        r"""Return the denoised RNA and protein expression, ``(rna, protein)``.

        RNA: the decoder's normalised expression :math:`\rho` times ``library_size``. Protein:
        the foreground, :math:`(1 - \pi)\alpha\beta` (with the background :math:`\pi\beta`
        added when ``include_protein_background``), on the scale of the counts of a batch of
        capture efficiency one.

        Parameters
        ----------
        adata, indices
            Cells to use (default: all of the model's).
        n_samples_overall
            Use this many cells drawn at random (with replacement) from ``indices``.
        transform_batch
            Decode every cell as if from this batch (or the average over these batches); None
            uses each cell's own batch. To impute proteins a batch did not measure, give a batch
            that measured them.
        gene_list, protein_list
            Features to return (default: all; ``[]`` for none).
        library_size
            Multiplier of the RNA expression (1: proportions); ``"latent"``: the expected counts
            at each cell's library size.
        n_samples
            Posterior samples per cell.
        sample_protein_mixing
            Draw the background indicator from :math:`\mathrm{Bernoulli}(\pi)` instead of
            weighting by :math:`1 - \pi`.
        scale_protein
            Make each cell's protein values sum to one.
        include_protein_background
            Add the background component.
        batch_size
            Cells per forward pass.
        return_mean
            Average over the samples.
        return_numpy
            Arrays instead of DataFrames (always arrays ``(n_samples, cells, features)`` when
            ``n_samples > 1`` and not ``return_mean``).
        """
        self.module.eval()
        genes = self.gene_indices(gene_list)
        prots = self.protein_indices(protein_list)
        codes = self.batch_codes(transform_batch)
        idx = self._indices(adata, indices)
        if n_samples_overall is not None:
            idx = np.sort(np.random.default_rng(current_settings().seed).choice(
                idx, int(n_samples_overall)))
        keep_samples = n_samples > 1 and not return_mean
        lead = (n_samples,) if keep_samples else ()
        rna = empty_result((*lead, len(idx), len(genes)))
        protein = torch.empty((*lead, len(idx), len(prots)))
        want_genes, want_proteins = len(genes) > 0, len(prots) > 0
        all_genes = gene_list is None
        start = 0
        for batch in self._batches(adata, idx, batch_size):
            inf, gi = self._decode_inputs(batch, n_samples)
            stop = start + batch[keys.BATCH].shape[0]
            acc_g = acc_p = None
            for code in codes:
                dec = self.module.decode(gi["z"], gi["batch_index"], gi["cont_covs"],
                                         gi["cat_covs"], transform_batch=code,
                                         genes=want_genes, proteins=want_proteins)
                if want_genes:
                    direct = (len(codes) == 1 and all_genes and n_samples == 1
                              and library_size != "latent"
                              and self.module.decoder.scale_activation == "softmax")
                    if direct:  # straight into the result's rows
                        value = softmax_into(dec["gene_logits"], rna[start:stop])
                    else:
                        value = self._gene_values(dec, gi, library_size)
                        if not all_genes:
                            value = value[..., genes]
                    if library_size not in (1, "latent"):
                        value = value * float(library_size) if not direct else value.mul_(
                            float(library_size))
                    acc_g = value if acc_g is None else acc_g + value
                if want_proteins:
                    value = self._protein_values(
                        dec, sample_protein_mixing=sample_protein_mixing,
                        include_protein_background=include_protein_background,
                        scale_protein=scale_protein)[..., prots]
                    acc_p = value if acc_p is None else acc_p + value
            for acc, out in ((acc_g, rna), (acc_p, protein)):
                if acc is None:
                    continue
                if len(codes) > 1:
                    acc = acc / len(codes)
                if n_samples > 1 and return_mean:
                    acc = acc.mean(0)
                target = out[..., start:stop, :]
                if acc.data_ptr() != target.data_ptr():
                    target.copy_(acc)
            start = stop
        rna, protein = rna.numpy(), protein.numpy()
        if keep_samples or return_numpy:
            return rna, protein
        names = self._obs_names(adata, None)[idx] if n_samples_overall is not None else (
            self._obs_names(adata, indices))
        return (
            pd.DataFrame(rna, index=names, copy=False,
                         columns=self._gene_index() if all_genes else self._gene_index()[genes]),
            pd.DataFrame(protein, index=names, copy=False,
                         columns=pd.Index(self.protein_names)[prots]),
        )

    def _gene_values(self, dec: dict, gi: dict, library_size) -> torch.Tensor:
        scale = self.module.decoder.gene_scale(dec["gene_logits"])
        if library_size != "latent":
            return scale
        if self.module.use_size_factor_key:
            return gi["size_factor"] * scale
        return gi["library"].exp() * scale

    @snapshot_settings
    @torch.inference_mode()
    def get_protein_foreground_probability(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        transform_batch: str | Sequence[str] | None = None,
        protein_list: Sequence[str] | None = None,
        n_samples: int = 1,
        batch_size: int | None = None,
        return_mean: bool = True,
        return_numpy: bool | None = None,
    ) -> pd.DataFrame | np.ndarray:
        r"""Return :math:`1 - \pi`, the probability that each protein count is foreground.

        Parameters as in :meth:`get_normalized_expression`. Returns a cells x proteins
        DataFrame (an array with ``return_numpy``, or ``(n_samples, cells, proteins)`` when
        ``n_samples > 1`` and not ``return_mean``).
        """
        self.module.eval()
        prots = self.protein_indices(protein_list)
        codes = self.batch_codes(transform_batch)
        parts = []
        for batch in self._batches(adata, indices, batch_size):
            _, gi = self._decode_inputs(batch, n_samples)
            acc = None
            for code in codes:
                zin = self.module._decoder_input(gi["z"], gi["cont_covs"])
                b = gi["batch_index"] if code is None else torch.full_like(gi["batch_index"],
                                                                           code)
                cats = self.module._cats(b, gi["cat_covs"])
                h = self.module.decoder.hidden_states(zin, *cats, which=["mixing"])
                value = torch.sigmoid(-self.module.decoder.mixing(h["mixing"], *cats))
                value = value[..., prots]
                acc = value if acc is None else acc + value
            acc = acc / len(codes)
            if n_samples > 1 and return_mean:
                acc = acc.mean(0)
            parts.append(acc.numpy())
        out = np.concatenate(parts, axis=-2)
        if return_numpy or (n_samples > 1 and not return_mean):
            return out
        return pd.DataFrame(out, index=self._obs_names(adata, indices),
                            columns=pd.Index(self.protein_names)[prots])

    @snapshot_settings
    @torch.inference_mode()
    def get_protein_background_mean(
        self, adata: AnnData | None = None, indices: Sequence[int] | None = None,
        batch_size: int | None = None, n_samples: int = 1,
    ) -> np.ndarray:
        r"""Return the expected background rate of each cell and protein, ``(cells, proteins)``.

        :math:`\mathbb E[\beta \mid z] = \exp(a + b^2/2)` for ``z`` drawn from the posterior,
        averaged over ``n_samples`` draws (scvi-tools returns one draw of :math:`\beta`).
        """
        self.module.eval()
        parts = []
        for batch in self._batches(adata, indices, batch_size):
            _, gi = self._decode_inputs(batch, n_samples)
            dec = self.module.decode(gi["z"], gi["batch_index"], gi["cont_covs"],
                                     gi["cat_covs"], genes=False)
            value = (dec["back_alpha"] + 0.5 * dec["back_beta"].square()).exp()
            parts.append((value.mean(0) if n_samples > 1 else value).numpy())
        return np.concatenate(parts, axis=0)

    @snapshot_settings
    @torch.inference_mode()
    def get_latent_library_size(
        self, adata: AnnData | None = None, indices: Sequence[int] | None = None,
        give_mean: bool = True, batch_size: int | None = None,
    ) -> np.ndarray:
        """Return the RNA library size of each cell, ``(cells, 1)``.

        The observed totals when the library is observed; else the posterior mean of the
        log-normal (or one draw, ``give_mean=False``).
        """
        self.module.eval()
        parts = []
        for batch in self._batches(adata, indices, batch_size):
            inf = self.module.inference(**self.module.inference_inputs(batch))
            ql = inf["ql"]
            if ql is not None and give_mean:
                value = torch.exp(ql.loc + 0.5 * ql.scale.square())
            else:
                value = inf["library"].exp()
            parts.append(value.numpy())
        return np.concatenate(parts, axis=0)

    @snapshot_settings
    @torch.inference_mode()
    def get_likelihood_parameters(
        self, adata: AnnData | None = None, indices: Sequence[int] | None = None,
        n_samples: int = 1, give_mean: bool = False, batch_size: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Return the parameters of ``p(x, y | z)`` per cell and feature.

        The RNA's ``"mean"``, ``"dispersions"`` (and ``"dropout"`` for ZINB), each
        ``(cells, genes)``, and the proteins' ``"protein_rate_back"``, ``"protein_rate_fore"``
        (efficiency included), ``"protein_mixing"`` (background probability) and
        ``"protein_dispersions"``, each ``(cells, proteins)``; ``(n_samples, ...)`` when
        ``n_samples > 1`` and not ``give_mean``.
        """
        self.module.eval()
        parts: dict[str, list[np.ndarray]] = {}
        for batch in self._batches(adata, indices, batch_size):
            inf = self.module.inference(**self.module.inference_inputs(batch),
                                        n_samples=n_samples)
            gen = self.module.generative(**self.module.generative_inputs(batch, inf))
            px, py = gen["px"], gen["py"]
            eff = py["efficiency"].exp()
            mu = px.mu
            values = {"mean": mu, "dispersions": px.theta.expand_as(mu),
                      "protein_rate_back": eff * py["rate_back"],
                      "protein_rate_fore": eff * py["rate_fore"],
                      "protein_mixing": torch.sigmoid(py["mixing"]),
                      "protein_dispersions": py["r"].expand_as(py["mixing"])}
            if hasattr(px, "zi_logits"):
                values["dropout"] = torch.sigmoid(px.zi_logits)
            for k, v in values.items():
                if n_samples > 1 and give_mean:
                    v = v.mean(0)
                parts.setdefault(k, []).append(v.numpy())
        return {k: np.concatenate(v, axis=-2) for k, v in parts.items()}

    @snapshot_settings
    @torch.inference_mode()
    def get_reconstruction_error(
        self, adata: AnnData | None = None, indices: Sequence[int] | None = None,
        batch_size: int | None = None, return_mean: bool = True,
    ) -> dict[str, float | np.ndarray]:
        """Return the reconstruction error per modality, ``-E_q log p(. | z)`` (positive).

        ``{"reconstruction_loss_gene": ..., "reconstruction_loss_protein": ...}`` (the keys of
        scvi-tools), means over cells, or per-cell arrays with ``return_mean=False``; the
        protein term counts the measured proteins only.
        """
        self.module.eval()
        genes, total = [], []
        for batch in self._batches(adata, indices, batch_size, nonzero=True):
            _, gen, out = self.module(batch, kl_weight=1.0)
            rec_gene = -self.module.gene_log_likelihood(batch[keys.X], gen,
                                                        batch.get(keys.INDICES_NONZERO))
            genes.append(rec_gene.numpy())
            total.append(out.reconstruction_loss.numpy())
        gene, total = np.concatenate(genes), np.concatenate(total)
        protein = total - gene
        if return_mean:
            return {"reconstruction_loss_gene": float(gene.mean()),
                    "reconstruction_loss_protein": float(protein.mean())}
        return {"reconstruction_loss_gene": gene, "reconstruction_loss_protein": protein}

    @snapshot_settings
    @torch.inference_mode()
    def posterior_predictive_sample(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        n_samples: int = 1,
        batch_size: int | None = None,
        gene_list: Sequence[str] | None = None,
        protein_list: Sequence[str] | None = None,
    ) -> dict[str, np.ndarray]:
        """Draw RNA and protein counts from the posterior predictive distribution.

        Returns ``{"rna": ..., "protein": ...}``, each ``(cells, features)`` for one sample,
        else ``(cells, features, n_samples)``. NB and ZINB genes alike.
        """
        self.module.eval()
        genes = self.gene_indices(gene_list)
        prots = self.protein_indices(protein_list)
        rna, protein = [], []
        for batch in self._batches(adata, indices, batch_size):
            r, p = self.module.sample(batch, n_samples=n_samples)
            rna.append(r[:, genes].numpy())
            protein.append(p[:, prots].numpy())
        return {"rna": np.concatenate(rna, axis=0), "protein": np.concatenate(protein, axis=0)}

    # ------------------------------------------------------------------ DE
    @snapshot_settings
    def differential_expression(
        self,
        adata: AnnData | None = None,
        groupby: str | None = None,
        group1: str | Sequence[str] | None = None,
        group2: str | None = None,
        idx1: Sequence[int] | np.ndarray | None = None,
        idx2: Sequence[int] | np.ndarray | None = None,
        mode: Literal["vanilla", "change"] = "change",
        delta: float = 0.25,
        batch_size: int | None = None,
        batch_correction: bool = False,
        batchid1: Sequence[str] | None = None,
        batchid2: Sequence[str] | None = None,
        fdr_target: float = 0.05,
        silent: bool = False,
        protein_prior_count: float = 0.1,
        scale_protein: bool = False,
        sample_protein_mixing: bool = False,
        include_protein_background: bool = False,
        use_field: Sequence[str] | None = None,
        pseudocounts: float = 1e-5,
        n_samples: int = 5000,
        eps: float = 1e-8,
        seed: int | None = None,
    ) -> pd.DataFrame:
        r"""Bayesian differential expression of genes and proteins between groups of cells.

        As :func:`cellvi.de.differential_expression` (Boyeau et al., 2019), on the joint
        vector of each draw: the RNA's normalised expression next to the protein foreground
        plus ``protein_prior_count`` (from :meth:`get_normalized_expression`). Protein rows are
        named ``<protein>_protein``; their ``raw_normalized_mean`` columns are NaN (proteins
        have no library size to normalise by), as in scvi-tools.

        Parameters
        ----------
        adata, groupby, group1, group2, idx1, idx2, batch_correction, batchid1, batchid2, \
fdr_target, silent, n_samples, eps, seed, batch_size
            As in :func:`cellvi.de.differential_expression`.
        mode, delta
            ``"change"`` (default, as scvi-tools' totalVI): ``P(|log2 fold change| >= delta)``;
            ``"vanilla"``: ``P(scale1 > scale2)``.
        protein_prior_count
            Added to the protein values before the fold changes.
        scale_protein, sample_protein_mixing, include_protein_background
            How the protein values are made (:meth:`get_normalized_expression`).
        use_field
            ``["rna", "protein"]`` (default) or one of them.
        pseudocounts
            Added to every value before taking log2 fold changes.

        Returns
        -------
        pandas.DataFrame
            The columns of :func:`cellvi.de.differential_expression`, one block of rows per
            comparison, genes then proteins, each block sorted by decreasing Bayes factor.
        """
        from cellvi.de import de_statistics, fdr_de_prediction
        from cellvi.de._de import (
            RAW_COLUMNS,
            STAT_COLUMNS,
            _batch_policy,
            _comparisons,
            _raw_stats,
        )

        use_field = ["rna", "protein"] if use_field is None else list(use_field)
        unknown = sorted(set(use_field) - {"rna", "protein"})
        if unknown or not use_field:
            raise ValueError(f"use_field must name 'rna' and/or 'protein', got {use_field}.")
        if int(n_samples) != n_samples or n_samples < 1:
            raise ValueError(f"n_samples must be a positive integer, got {n_samples}.")
        if protein_prior_count < 0 or pseudocounts < 0:
            raise ValueError("protein_prior_count and pseudocounts must be >= 0.")
        ad = self.adata if adata is None else _as_anndata(adata, self.summary)
        self.validate_adata(None if adata is None else ad)
        tb1, tb2 = _batch_policy(self, batch_correction, batchid1, batchid2)
        comparisons = _comparisons(ad, groupby, group1, group2, idx1, idx2)
        with_rna, with_protein = "rna" in use_field, "protein" in use_field
        names = []
        if with_rna:
            names += list(self.var_names)
        if with_protein:
            names += [f"{p}_protein" for p in self.protein_names]
        counts = ad.layers[self.summary.layer] if self.summary.layer else ad.X
        counts = sp.csr_matrix(counts) if sp.issparse(counts) else np.asarray(counts)
        library = np.asarray(counts.sum(axis=1)).reshape(-1)
        proteins = self.summary[PROTEIN_KEY].matrix(ad)
        rng = np.random.default_rng(seed)
        devices = [] if self.device.type != "cuda" else [self.device.index or 0]
        fork = torch.random.fork_rng(devices=devices, enabled=seed is not None)

        def draw(cells: np.ndarray, transform_batch) -> np.ndarray:
            picks = np.sort(rng.choice(cells, size=int(n_samples), replace=True))
            rna, prot = self.get_normalized_expression(
                adata=adata, indices=picks, transform_batch=transform_batch,
                gene_list=None if with_rna else [], protein_list=None if with_protein else [],
                return_numpy=True, batch_size=batch_size, scale_protein=scale_protein,
                sample_protein_mixing=sample_protein_mixing,
                include_protein_background=include_protein_background)
            joint = np.concatenate([rna, prot + protein_prior_count], axis=1)
            return joint[rng.permutation(joint.shape[0])]

        fdr_col = f"is_de_fdr_{fdr_target}"
        results = []
        from tqdm.auto import tqdm

        with fork:
            if seed is not None:
                torch.manual_seed(int(rng.integers(2**62)))
            for name1, name2, cells1, cells2 in tqdm(comparisons, desc="DE comparisons",
                                                     disable=silent):
                stats = de_statistics(draw(cells1, tb1), draw(cells2, tb2), mode=mode,
                                      delta=delta, pseudocount=pseudocounts, eps=eps)
                df = pd.DataFrame(stats, index=pd.Index(names))
                raw1, raw2 = [], []
                for cells, raw in ((cells1, raw1), (cells2, raw2)):
                    parts = [[], [], []]
                    if with_rna:
                        for part, v in zip(parts, _raw_stats(counts, library, cells,
                                                             np.arange(self.summary.n_vars))):
                            part.append(v)
                    if with_protein:
                        y = proteins[cells].astype(np.float64)
                        for part, v in zip(parts, (y.mean(0), (y > 0).mean(0),
                                                   np.full(self.n_proteins, np.nan))):
                            part.append(v)
                    raw.extend(np.concatenate(p) for p in parts)
                for key, v1, v2 in zip(("raw_mean", "non_zeros_proportion",
                                        "raw_normalized_mean"), raw1, raw2):
                    df[f"{key}1"], df[f"{key}2"] = v1, v2
                p = df["proba_de"].to_numpy()
                df[fdr_col] = fdr_de_prediction(p if mode == "change" else np.maximum(p, 1 - p),
                                                fdr_target)
                df["comparison"] = f"{name1} vs {name2}"
                df["group1"], df["group2"] = name1, name2
                df = df[STAT_COLUMNS + RAW_COLUMNS + [fdr_col, "comparison", "group1", "group2"]]
                results.append(df.sort_values("bayes_factor", ascending=False, kind="stable"))
        return pd.concat(results)

    # ------------------------------------------------------------------ correlation
    @snapshot_settings
    @torch.inference_mode()
    def get_feature_correlation_matrix(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        n_samples: int = 10,
        batch_size: int = 64,
        rna_size_factor: int = 1000,
        transform_batch: str | Sequence[str] | None = None,
        correlation_type: Literal["spearman", "pearson"] = "spearman",
        log_transform: bool = False,
    ) -> pd.DataFrame:
        r"""Correlation across genes and proteins of denoised posterior samples.

        Each cell gives ``n_samples`` draws: for the genes a Gamma with mean
        ``rna_size_factor`` :math:`\rho` and shape :math:`\theta` (the NB's rate before the
        Poisson), for the proteins a Gamma with mean :math:`\alpha\beta` and shape
        :math:`\phi`, zeroed where a Bernoulli(:math:`\pi`) draw says background. With several
        batches in ``transform_batch`` the matrices are averaged.

        Returns
        -------
        pandas.DataFrame
            ``(genes + proteins)`` square correlation matrix (``"spearman"`` or ``"pearson"``).
        """
        from scipy.stats import rankdata

        from cellvi.de._de import _corr

        if correlation_type not in ("spearman", "pearson"):
            raise ValueError(
                f"correlation_type must be 'spearman' or 'pearson', got {correlation_type!r}.")
        self.module.eval()
        codes = self.batch_codes(transform_batch)
        mats = []
        for code in codes:
            draws = []
            for batch in self._batches(adata, indices, batch_size):
                _, gi = self._decode_inputs(batch, n_samples)
                dec = self.module.decode(gi["z"], gi["batch_index"], gi["cont_covs"],
                                         gi["cat_covs"], transform_batch=code)
                b = gi["batch_index"] if code is None else torch.full_like(gi["batch_index"],
                                                                           code)
                rate = rna_size_factor * self.module.decoder.gene_scale(dec["gene_logits"])
                theta = self.module.gene_theta(b, gi["label"]).expand_as(rate)
                genes = torch.distributions.Gamma(theta, theta / rate.clamp(min=1e-12)).sample()
                phi = self.module.protein_theta(b, gi["label"]).expand_as(dec["rate_fore"])
                prot = torch.distributions.Gamma(phi, phi / dec["rate_fore"].clamp(min=1e-12)
                                                 ).sample()
                prot = prot * (1 - torch.bernoulli(torch.sigmoid(dec["mixing"])))
                joint = torch.cat([genes, prot], dim=-1)  # ([n_samples,] cells, features)
                draws.append(joint.reshape(-1, joint.shape[-1]).double().numpy())
            flat = np.concatenate(draws, axis=0)
            if log_transform:
                g = self.summary.n_vars
                flat[:, :g] = np.log(flat[:, :g] + 1e-8)
                flat[:, g:] = np.log1p(flat[:, g:])
            if correlation_type == "spearman":
                flat = rankdata(flat, axis=0)
            mats.append(_corr(flat))
        names = [*self.var_names, *self.protein_names]
        return pd.DataFrame(np.mean(mats, axis=0), index=names, columns=names)


# --------------------------------------------------------------------------------------------
# MuData
# --------------------------------------------------------------------------------------------
def _is_mudata(data) -> bool:
    return not isinstance(data, AnnData) and isinstance(getattr(data, "mod", None), Mapping)


def _modalities(mdata, modalities: Mapping[str, str] | None) -> tuple[str, str]:
    if not _is_mudata(mdata):
        raise TypeError(
            f"setup_mudata needs a MuData (with .mod), got {type(mdata).__name__}; for an "
            "AnnData use TOTALVI.setup_anndata(adata, protein_expression_obsm_key=...).")
    if not modalities or "rna_layer" not in modalities or "protein_layer" not in modalities:
        raise ValueError(
            "setup_mudata needs modalities={'rna_layer': <RNA modality>, 'protein_layer': "
            f"<protein modality>}}; the MuData has {list(mdata.mod)}.")
    rna, prot = modalities["rna_layer"], modalities["protein_layer"]
    for name in (rna, prot):
        if name not in mdata.mod:
            raise ValueError(f"The MuData has no modality {name!r} (it has {list(mdata.mod)}).")
    return rna, prot


def _joint_anndata(mdata, rna: str, prot: str, protein_layer: str | None) -> AnnData:
    """Return an AnnData of the RNA modality's matrices with the proteins in ``obsm`` (no copy)."""
    r, p = mdata.mod[rna], mdata.mod[prot]
    if list(r.obs_names) != list(p.obs_names):
        raise ValueError(
            f"The modalities {rna!r} and {prot!r} have different cells (or another order); "
            "give both the same obs_names, e.g. with mudata.MuData.intersect_obs().")
    y = p.layers[protein_layer] if protein_layer is not None else p.X
    y = y.toarray() if sp.issparse(y) else np.asarray(y)
    obs = r.obs.copy()
    shared = getattr(mdata, "obs", None)
    if shared is not None:
        for col in shared.columns:
            if col not in obs:
                obs[col] = shared[col].reindex(obs.index).to_numpy()
    out = AnnData(X=r.X, obs=obs, var=r.var, layers=dict(r.layers))
    out.obsm[PROTEIN_KEY] = pd.DataFrame(y, index=r.obs_names,
                                         columns=[str(v) for v in p.var_names])
    return out


def _as_anndata(data, summary: DataSummary | None = None) -> AnnData:
    """Return the AnnData a model reads: ``data`` itself, or the joint view of a MuData."""
    if data is None or not _is_mudata(data):
        return data
    from cellvi.data._setup import UNS_KEY

    text = data.uns.get(UNS_KEY) if summary is None else summary.to_json()
    if text is None:
        raise ValueError("This MuData has not been set up: call TOTALVI.setup_mudata first.")
    info = DataSummary.from_json(text).extra.get("mudata")
    if not info:
        raise ValueError("This set-up is not a MuData set-up: call TOTALVI.setup_mudata.")
    joint = _joint_anndata(data, info["rna"], info["protein"], info["protein_layer"])
    joint.uns[UNS_KEY] = text
    return joint

