"""AUTOZI: which genes are zero-inflated (Clivio et al., 2019), with scvi-tools' API."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scipy import special

from cellvi._settings import snapshot_settings
from cellvi.data._setup import get_summary
from cellvi.module.autozivae import AutoZIVAE
from cellvi.train import TrainingPlan

from ._vaemodel import VAEModel

__all__ = ["AUTOZI", "AutoZITrainingPlan"]


class AutoZITrainingPlan(TrainingPlan):
    """:class:`~cellvi.train.TrainingPlan` whose Adam takes the steps scvi-tools' AUTOZI takes.

    scvi-tools' AUTOZI minimises the total over the :math:`N` training cells,
    ``N * mean(per-cell terms) + KL_global``; cellvi's module returns the per-cell loss (the
    same objective divided by :math:`N`). Adam's update is invariant to that factor except for
    ``eps`` (added to the root mean square of the gradients) and the L2 ``weight_decay``
    (added to the gradients), so they are given to Adam divided by :math:`N`: the updates are
    those of the total loss with the options as given. (AdamW's decoupled decay does not
    scale: only ``eps`` is divided then.)
    """

    def make_optimizer(self, params) -> torch.optim.Optimizer:  # noqa: D102
        n = max(int(getattr(self, "n_obs_train", 1)), 1)
        eps, decay = self.eps, self.weight_decay
        self.eps = eps / n
        if self.optimizer_name == "Adam":
            self.weight_decay = decay / n
        try:
            return super().make_optimizer(params)
        finally:
            self.eps, self.weight_decay = eps, decay


class AUTOZI(VAEModel):
    r"""Automatic identification of zero-inflated genes (AutoZI; Clivio et al., 2019).

    scVI whose likelihood mixes, for each gene, a negative binomial (weight :math:`\delta_g`)
    and a zero-inflated negative binomial (weight :math:`1 - \delta_g`), with a Beta prior on
    :math:`\delta_g` and a Beta posterior learned with the rest (the module:
    :class:`cellvi.module.AutoZIVAE`). A gene is called zero-inflated when the posterior
    probability :math:`q(\delta_g < 1/2)` exceeds 1/2 (:meth:`get_zero_inflation`). All the
    queries of :class:`~cellvi.model.SCVI` are available. Call :meth:`setup_anndata` first (it
    takes SCVI's arguments; a ``labels_key`` is needed for ``zero_inflation="gene-label"``).

    Parameters
    ----------
    adata
        AnnData set up with :meth:`AUTOZI.setup_anndata`.
    n_hidden
        Width of the hidden layers.
    n_latent
        Dimension of the latent space.
    n_layers
        Hidden layers in the encoder and decoder.
    dropout_rate
        Dropout rate of the encoder.
    dispersion
        ``"gene"``, ``"gene-batch"``, ``"gene-label"`` or ``"gene-cell"``.
    latent_distribution
        ``"normal"`` or ``"ln"`` (logistic normal).
    alpha_prior, beta_prior
        Shapes of the Beta prior of :math:`\delta`, in (0, 1) (0.5 and 0.5: mass near 0 and 1,
        symmetric). One None: one minus the other; both None: the prior is learned.
    minimal_dropout
        Lower bound of the ZINB component's dropout probability (0.01).
    zero_inflation
        ``"gene"`` (one weight per gene), ``"gene-batch"``, ``"gene-label"`` or
        ``"gene-cell"`` (one per gene and cell, with an amortised posterior).
    use_observed_lib_size
        Use the observed total counts as the library size (else a latent log-normal one).
    **module_options
        Any other option of :class:`cellvi.module.AutoZIVAEConfig` (``use_batch_norm``,
        ``use_layer_norm``, ``encode_covariates``, ``log_variational``...).

    Notes
    -----
    Training follows scvi-tools, whose loss for AUTOZI is the total over the training cells,
    ``n_obs * mean(per-cell terms) + KL_global``: Adam's ``eps`` and ``weight_decay`` act on
    that scale. cellvi's loss is the per-cell one, so the plan gives Adam ``eps / n_obs`` and
    ``weight_decay / n_obs`` (:class:`AutoZITrainingPlan`): the same steps.

    Examples
    --------
    >>> cellvi.model.AUTOZI.setup_anndata(adata, batch_key="batch")
    >>> model = cellvi.model.AUTOZI(adata)
    >>> model.train()
    >>> table = model.get_zero_inflation()  # genes x (prob_zero_inflated, delta_mean, ...)
    >>> zi_genes = table.index[table["is_zero_inflated"]]
    """

    _module_cls = AutoZIVAE
    _plan_cls = AutoZITrainingPlan

    def __init__(
        self,
        adata: AnnData,
        n_hidden: int = 128,
        n_latent: int = 10,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        dispersion: Literal["gene", "gene-batch", "gene-label", "gene-cell"] = "gene",
        latent_distribution: Literal["normal", "ln"] = "normal",
        alpha_prior: float | None = 0.5,
        beta_prior: float | None = 0.5,
        minimal_dropout: float = 0.01,
        zero_inflation: Literal["gene", "gene-batch", "gene-label", "gene-cell"] = "gene",
        use_observed_lib_size: bool = True,
        **module_options,
    ):
        summary = get_summary(adata)
        if zero_inflation == "gene-label" and summary.labels_key is None:
            raise ValueError(
                "zero_inflation='gene-label' needs the cells' labels: call "
                "AUTOZI.setup_anndata(adata, labels_key=...) first.")
        if zero_inflation == "gene-batch" and summary.batch_key is None:
            raise ValueError(
                "zero_inflation='gene-batch' needs the cells' batches (with one batch it is "
                "'gene'): call AUTOZI.setup_anndata(adata, batch_key=...) first.")
        super().__init__(
            adata, n_hidden=n_hidden, n_latent=n_latent, n_layers=n_layers,
            dropout_rate=dropout_rate, dispersion=dispersion,
            latent_distribution=latent_distribution, alpha_prior=alpha_prior,
            beta_prior=beta_prior, minimal_dropout=minimal_dropout,
            zero_inflation=zero_inflation, use_observed_lib_size=use_observed_lib_size,
            **module_options,
        )

    def _describe_module(self) -> str:
        c = self.module.config
        prior = ("learned" if self.module.learns_prior
                 else f"Beta({c.priors[0]:g}, {c.priors[1]:g})")
        return (f"{super()._describe_module()}; zero_inflation={c.zero_inflation!r}, prior "
                f"{prior}, minimal_dropout={c.minimal_dropout:g}")

    def _loss_options(self) -> dict:
        return {"n_obs": self._n_obs()}

    def _n_obs(self) -> int:
        """Cells the global KL is shared by: the training cells (all cells before training)."""
        return int(len(self.train_indices)) if len(self.train_indices) else self.adata.n_obs

    @property
    def zero_inflation(self) -> str:
        """What one mixture weight covers (``"gene"``, ``"gene-batch"``...)."""
        return self.module.zero_inflation

    # ------------------------------------------------------------------ the Beta weights
    @snapshot_settings
    @torch.inference_mode()
    def get_alphas_betas(
        self, as_numpy: bool = True, adata: AnnData | None = None,
        indices: Sequence[int] | None = None, batch_size: int | None = None,
    ) -> dict[str, torch.Tensor | np.ndarray]:
        r"""Return the shapes of the Beta posteriors and priors of the NB weights :math:`\delta`.

        Keys ``alpha_posterior``, ``beta_posterior`` (``(genes,)``, or ``(genes, batches /
        labels)``), ``alpha_prior``, ``beta_prior`` (``(1,)`` or ``(batches / labels,)``). For
        ``zero_inflation="gene-cell"`` the posteriors are per cell, ``(cells, genes)``, for the
        cells of ``adata`` / ``indices`` (default: all of the model's).
        """
        self.module.eval()
        if self.zero_inflation != "gene-cell":
            return self.module.get_alphas_betas(as_numpy=as_numpy)
        parts: dict[str, list[torch.Tensor]] = {"alpha_posterior": [], "beta_posterior": []}
        for batch in self._batches(adata, indices, batch_size):
            ab = self.module.get_alphas_betas(as_numpy=False, tensors=batch)
            parts["alpha_posterior"].append(ab["alpha_posterior"].cpu())
            parts["beta_posterior"].append(ab["beta_posterior"].cpu())
        out = {k: torch.cat(v) for k, v in parts.items()}
        priors = self.module.get_alphas_betas(as_numpy=False)
        out.update(alpha_prior=priors["alpha_prior"].cpu(), beta_prior=priors["beta_prior"].cpu())
        return {k: v.numpy() for k, v in out.items()} if as_numpy else out

    def get_zero_inflation(
        self, threshold: float = 0.5, adata: AnnData | None = None,
        indices: Sequence[int] | None = None, batch_size: int | None = None,
    ) -> pd.DataFrame:
        r"""Return the decision table: which genes are zero-inflated, and how probably.

        For each gene (and batch / label) with posterior :math:`\mathrm{Beta}(a, b)` of the NB
        weight :math:`\delta`:

        * ``prob_zero_inflated``: :math:`q(\delta < 1/2) = I_{1/2}(a, b)`, the regularised
          incomplete Beta function: the posterior probability that the ZINB component
          dominates;
        * ``delta_mean``: the posterior mean :math:`a / (a + b)` of the NB weight;
        * ``alpha_posterior``, ``beta_posterior``: :math:`a, b`;
        * ``is_zero_inflated``: ``prob_zero_inflated > threshold`` (the paper's rule at 0.5).

        Rows are the genes; ``(gene, batch)`` or ``(gene, label)`` pairs (a MultiIndex) for
        ``"gene-batch"`` / ``"gene-label"``. For ``"gene-cell"``, each gene's row averages its
        cells (those of ``adata`` / ``indices``): ``prob_zero_inflated`` and ``delta_mean``
        are means over cells, and ``fraction_cells_zero_inflated`` is the fraction of cells
        whose entry passes the threshold; there the probability is that *this cell's* count
        came from the ZINB component (zeros that are dropouts), not the paper's gene-level
        quantity.
        """
        if not 0 < threshold < 1:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}.")
        ab = self.get_alphas_betas(as_numpy=True, adata=adata, indices=indices,
                                   batch_size=batch_size)
        a = ab["alpha_posterior"].astype(np.float64)
        b = ab["beta_posterior"].astype(np.float64)
        prob = special.betainc(a, b, 0.5)  # P(delta < 1/2)
        mean = a / (a + b)
        genes = self._gene_index()
        if self.zero_inflation == "gene-cell":
            return pd.DataFrame({
                "prob_zero_inflated": prob.mean(0), "delta_mean": mean.mean(0),
                "fraction_cells_zero_inflated": (prob > threshold).mean(0),
                "is_zero_inflated": prob.mean(0) > threshold,
            }, index=genes)
        if a.ndim == 2:
            level = "batch" if self.zero_inflation == "gene-batch" else "label"
            groups = (self.summary.batch_categories if level == "batch"
                      else self.summary.label_categories)
            index = pd.MultiIndex.from_product([genes, list(groups)], names=["gene", level])
            a, b, prob, mean = (v.reshape(-1) for v in (a, b, prob, mean))
        else:
            index = genes
        return pd.DataFrame({
            "prob_zero_inflated": prob, "delta_mean": mean, "alpha_posterior": a,
            "beta_posterior": b, "is_zero_inflated": prob > threshold,
        }, index=index)

    # ------------------------------------------------------------------ likelihoods
    @snapshot_settings
    def get_elbo(
        self, adata: AnnData | None = None, indices: Sequence[int] | None = None,
        batch_size: int | None = None,
    ) -> float:
        r"""Return the evidence lower bound per cell, averaged over cells (higher is better).

        :math:`-\overline{(\text{reconstruction} + \mathrm{KL}_\text{local})} -
        \mathrm{KL}_\text{global} / N`, with one draw of the latent variables per cell (and of
        the global weights per minibatch) and :math:`N` the number of training cells: the
        quantity ``history["elbo_validation"]`` reports. (scvi-tools' ``get_elbo`` leaves the
        global term out; it is :math:`\sum_g \mathrm{KL}_g / N`, small per cell.)
        """
        rec, kl = self._loss_terms(adata, indices, batch_size)
        with torch.inference_mode():
            kl_global = float(self.module.compute_global_kl_divergence())
        return float(-(rec + kl).mean()) - kl_global / self._n_obs()

    @snapshot_settings
    @torch.inference_mode()
    def get_marginal_ll(
        self, adata: AnnData | None = None, indices: Sequence[int] | None = None,
        n_mc_samples: int = 1000, batch_size: int | None = None, return_mean: bool = True,
        n_delta_samples: int = 10,
    ) -> float | np.ndarray:
        r"""Estimate :math:`\log p(X)` per cell by importance sampling, the weights integrated out.

        For the global weights (``"gene"``, ``"gene-batch"``, ``"gene-label"``), shared by all
        cells, the estimate is that of the whole data set,

        .. math::

            \log \frac1K \sum_{k=1}^K \frac{p(\delta_k)}{q(\delta_k)}
                \prod_n \hat p(x_n \mid \delta_k), \qquad \delta_k \sim q(\delta),

        with :math:`\hat p(x_n \mid \delta_k)` the importance-sampling estimate over
        :math:`(z, \ell)` with ``n_mc_samples // n_delta_samples`` draws per cell and weight draw
        (a lower bound in expectation, tight as both grow), divided by the number of cells. Its
        cost is that of ``n_mc_samples`` draws per cell, as for SCVI. (scvi-tools uses one draw
        of :math:`z` per draw of :math:`\delta`.) For ``"gene-cell"`` the weights are local and
        the estimate is per cell (``return_mean=False`` gives the values).

        Parameters
        ----------
        adata, indices
            Cells to use (default: all of the model's).
        n_mc_samples
            Draws per cell in all.
        batch_size
            Cells per pass.
        return_mean
            Return the mean per cell; False (``"gene-cell"`` only) returns the per-cell values.
        n_delta_samples
            Draws :math:`K` of the global weights (ignored for ``"gene-cell"``).
        """
        self.module.eval()
        genes = self.summary.n_vars
        cells = batch_size or int(np.clip(2**23 // (100 * genes), 1, 1024))
        if self.zero_inflation == "gene-cell":
            per_pass = int(np.clip(2**22 // (cells * genes), 1, min(100, n_mc_samples)))
            values = np.concatenate([
                self.module.marginal_ll(batch, n_mc_samples=n_mc_samples,
                                        n_mc_samples_per_pass=per_pass).cpu().numpy()
                for batch in self._batches(adata, indices, cells, nonzero=True)
            ])
            return float(values.mean()) if return_mean else values
        if not return_mean:
            raise ValueError(
                "With global zero-inflation weights the marginal likelihood does not split into "
                "cells (every cell shares the weights); use return_mean=True.")
        if n_delta_samples < 1 or n_mc_samples < n_delta_samples:
            raise ValueError(f"Need 1 <= n_delta_samples <= n_mc_samples; got n_delta_samples="
                             f"{n_delta_samples}, n_mc_samples={n_mc_samples}.")
        m = n_mc_samples // n_delta_samples
        per_pass = int(np.clip(2**22 // (cells * genes), 1, min(100, m)))
        q, p = self.module.posterior(), self.module.prior()
        deltas = q.rsample((n_delta_samples,))  # (K, genes[, groups])
        # log p(delta_k) - log q(delta_k): on the logit scale, the Jacobians cancel
        log_ratio = (p.log_prob(deltas) - q.log_prob(deltas)).reshape(n_delta_samples, -1).sum(1)
        totals = torch.zeros(n_delta_samples, dtype=torch.float64)
        n = 0
        for batch in self._batches(adata, indices, cells, nonzero=True):
            n += batch["batch"].shape[0]
            for k in range(n_delta_samples):
                log_px = self.module.marginal_ll(batch, n_mc_samples=m,
                                                 n_mc_samples_per_pass=per_pass,
                                                 delta_logits=deltas[k])
                totals[k] += log_px.double().sum().cpu()
        log_p = torch.logsumexp(totals + log_ratio.double().cpu(), 0) - math.log(n_delta_samples)
        return float(log_p) / max(n, 1)
