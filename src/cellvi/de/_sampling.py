r"""Posterior draws for differential expression: importance weights, outlier cells, delta.

Importance weights (Boyeau et al., PNAS 2023, "lvm-DE"). The draws
:math:`z_{nk} \sim q(z \mid x_n)` of a group's cells come from the variational posteriors;
weighting each cell's draws by

.. math::

    w_{nk} \propto \frac{p(x_n \mid z_{nk})\, p(z_{nk})}{q(z_{nk} \mid x_n)},
    \qquad \sum_k w_{nk} = \frac1{N},

(self-normalised within the cell; with a modelled library the library's prior and posterior
enter the same way) makes them draws from the mixture of the model's exact posteriors
:math:`\frac1N\sum_n p(z \mid x_n)`, correcting the variational approximation. scvi-tools
targets the same mixture with weights normalised across the cells through estimates of each
anchor cell's :math:`p(x_a)`; on a simulated group of 100 cells those weights put 50-99 % of the
mass on one cell (an effective sample of 1-4 draws out of 100-400), which turns the group's mean
expression into that of a cell or two. Within-cell weights cannot concentrate on one cell.
:math:`p(z)` is the standard normal (as in scvi-tools, this assumes the module's prior on
:math:`z` is standard normal).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from scipy.stats import chi2
from torch.distributions import Normal

__all__ = ["estimate_delta", "outlier_cells", "posterior_scale_draws"]


# --------------------------------------------------------------------------------------------
# draws of the normalised expression, optionally importance-weighted
# --------------------------------------------------------------------------------------------
@torch.inference_mode()
def posterior_scale_draws(model, adata, cells: np.ndarray, n_per_cell: int, transform_batch,
                          *, weights: str = "uniform", truncation: bool = True,
                          batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(draws, log_weights)``: ``n_per_cell`` draws of the scale for every cell.

    ``draws`` is ``(n_per_cell, len(cells), genes)``, ``log_weights`` ``(n_per_cell,
    len(cells))``: the log importance weights, normalised within each cell and summing to 1
    over all draws (uniform for ``weights="uniform"``). ``transform_batch`` is a batch name,
    or None (each cell's own batch); the weights always use the cell's own batch.
    ``truncation`` caps each weight at ``sqrt(n_per_cell)`` times its cell's mean weight
    (Ionides, 2008).
    """
    n_cells = len(cells)
    if weights == "uniform":
        out = model.get_normalized_expression(
            adata=adata, indices=cells, transform_batch=transform_batch, library_size=1,
            n_samples=n_per_cell, return_mean=False, return_numpy=True, batch_size=batch_size,
        )
        out = np.asarray(out).reshape(n_per_cell, n_cells, -1)
        return out, np.full((n_per_cell, n_cells), -math.log(n_per_cell * n_cells))
    module = model.module
    module.eval()
    (code,) = model.batch_codes(transform_batch)
    draws, log_w = [], []
    for batch in model._batches(adata, cells, batch_size, nonzero=True):
        inf = module.inference(**module.inference_inputs(batch), n_samples=n_per_cell)
        if n_per_cell == 1:  # give the draws their leading dimension
            inf = {k: (v.unsqueeze(0) if k in ("z", "z_untransformed", "library") else v)
                   for k, v in inf.items()}
        gen_inputs = module.generative_inputs(batch, inf)
        draws.append(module.generative_scale(**gen_inputs, transform_batch=code).cpu())
        zu = inf["z_untransformed"]  # (k, cells, n_latent)
        lw = (module.log_likelihood_rows(batch, inf)
              + Normal(0.0, 1.0).log_prob(zu).sum(-1)
              - inf["qz"].log_prob(zu).sum(-1))
        if inf.get("ql") is not None:  # a modelled library: its prior over its posterior
            pl = module.generative(**gen_inputs)["pl"]
            lib = inf["library"]
            lw = lw + (pl.log_prob(lib) - inf["ql"].log_prob(lib)).sum(-1)
        log_w.append(lw.to(torch.float64).cpu())
    draws = torch.cat(draws, dim=1).numpy()
    log_w = torch.cat(log_w, dim=1)  # (k, cells)
    log_w = log_w - torch.logsumexp(log_w, 0, keepdim=True)  # per cell
    if truncation and n_per_cell > 1:
        cap = 0.5 * math.log(n_per_cell) - math.log(n_per_cell)
        log_w = torch.clamp(log_w, max=cap)
        log_w = log_w - torch.logsumexp(log_w, 0, keepdim=True)
    return draws, (log_w - math.log(n_cells)).numpy()


# --------------------------------------------------------------------------------------------
# outlier cells in the latent space
# --------------------------------------------------------------------------------------------
def outlier_cells(latent: np.ndarray, *, quantile: float = 0.975, support: float = 0.75,
                  n_steps: int = 20) -> np.ndarray:
    r"""Return a boolean mask of the cells far from their group in the latent space.

    A robust centre and covariance are fitted by concentration steps of the minimum
    covariance determinant estimator (Rousseeuw & Van Driessen, 1999): starting from the
    coordinate-wise median, each step refits the mean and covariance on the ``support``
    fraction of cells closest in Mahalanobis distance. The covariance is then rescaled so that
    the median squared distance is the :math:`\chi^2_d` median, and cells whose squared distance
    exceeds the :math:`\chi^2_d` ``quantile`` are outliers. (scvi-tools' ``EllipticEnvelope``
    instead removes a fixed 10 % of the cells.)

    Returns all-False when there are too few cells (``< 2 d + 2``) to estimate a covariance.
    """
    x = np.asarray(latent, dtype=np.float64)
    n, d = x.shape
    if n < 2 * d + 2:
        return np.zeros(n, dtype=bool)
    h = max(int(np.ceil(support * n)), d + 1)
    centre = np.median(x, axis=0)
    mad = np.median(np.abs(x - centre), axis=0) * 1.4826
    mad = np.where(mad > 0, mad, 1.0)
    dist = (((x - centre) / mad) ** 2).sum(1)
    keep = np.argsort(dist)[:h]
    cov = None
    for _ in range(n_steps):
        mean = x[keep].mean(0)
        cov = np.cov(x[keep], rowvar=False) + 1e-9 * np.eye(d)
        try:
            inv = np.linalg.inv(cov)
        except np.linalg.LinAlgError:
            return np.zeros(n, dtype=bool)
        diff = x - mean
        dist = np.einsum("ij,jk,ik->i", diff, inv, diff)
        new = np.sort(np.argsort(dist)[:h])
        if np.array_equal(new, np.sort(keep)):
            break
        keep = new
    scale = np.median(dist) / chi2.ppf(0.5, d)
    return dist / max(scale, 1e-12) > chi2.ppf(quantile, d)


# --------------------------------------------------------------------------------------------
# effect-size threshold from the data
# --------------------------------------------------------------------------------------------
def estimate_delta(lfc: np.ndarray, *, coef: float = 0.6, min_delta: float = 0.1,
                   n_iter: int = 300) -> float:
    """Choose the LFC threshold from the genes' LFCs (scvi-tools' rule, Boyeau et al., 2023).

    A three-component Gaussian mixture is fitted to the LFCs (EM from the 10 %, 50 % and 90 %
    quantiles); the threshold is ``coef`` times the mean absolute value of the outer two
    components' means, and at least ``min_delta``.
    """
    v = np.asarray(lfc, dtype=np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    if v.size < 3 or np.ptp(v) == 0:
        return float(min_delta)
    mu = np.quantile(v, [0.1, 0.5, 0.9])
    var = np.full(3, v.var() / 3 + 1e-12)
    pi = np.full(3, 1 / 3)
    for _ in range(n_iter):
        log_r = (np.log(pi) - 0.5 * np.log(2 * np.pi * var)
                 - 0.5 * (v[:, None] - mu) ** 2 / var)
        log_r -= log_r.max(1, keepdims=True)
        r = np.exp(log_r)
        r /= r.sum(1, keepdims=True)
        nk = r.sum(0) + 1e-12
        new_mu = (r * v[:, None]).sum(0) / nk
        var = np.maximum((r * (v[:, None] - new_mu) ** 2).sum(0) / nk, 1e-8)
        pi = nk / nk.sum()
        if np.allclose(new_mu, mu, atol=1e-10):
            mu = new_mu
            break
        mu = new_mu
    mu = np.sort(mu)
    value = coef * (abs(mu[0]) + abs(mu[-1])) / 2
    if not np.isfinite(value):
        warnings.warn("Could not estimate delta; using min_delta.", UserWarning, stacklevel=2)
        return float(min_delta)
    return float(max(min_delta, value))
