r"""Per-cell sums of count log-likelihoods, computed where the work is.

A model's loss needs :math:`\sum_g \log p(x_g)` per cell, not the elementwise values. For the
negative binomial,

.. math::

    \log \mathrm{NB}(x \mid \mu, \theta) =
        \underbrace{-\theta\,\mathrm{log1p}(\mu/\theta)}_{\log \mathrm{NB}(0)}
        + x \log\frac{\mu}{\theta + \mu}
        + \underbrace{\log\Gamma(x + \theta) - \log\Gamma(\theta) - \log\Gamma(x + 1)}_{=\,0
        \text{ when } x = 0},

so the Gamma-function terms (and their digamma gradients, the most expensive part of a training
step) are evaluated only on the non-zero counts, typically 5-30% of a single-cell matrix. The
result equals the sum of :func:`~cellvi.distributions.log_nb_positive` /
:func:`~cellvi.distributions.log_zinb_positive` (a test checks it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.distributions import Distribution

from cellvi import _native

from .negative_binomial import NegativeBinomial
from .zero_inflated_negative_binomial import ZeroInflatedNegativeBinomial

__all__ = [
    "log_prob_rows", "nb_log_prob_rows", "nb_log_prob_rows_softmax",
    "nb_log_prob_rows_softmax_grad",
]

_ONE = torch.ones(())


def _compact(t: torch.Tensor) -> torch.Tensor:
    """Undo ``expand``: dimensions with stride 0 become size 1 (a view, nothing computed).

    A tensor that is exactly ``base.expand(...)`` (as the distributions' ``broadcast_all`` makes
    of a per-gene theta) gives back ``base`` itself, so that its gradient reaches ``base``
    without an expand and a slice to undo in the backward pass.
    """
    base = t._base
    if (base is not None and t.dim() >= base.dim() and t.data_ptr() == base.data_ptr()
            and all(b in (1, n) for b, n in zip(base.shape[::-1], t.shape[::-1]))
            and t.stride() == base.expand(t.shape).stride()):
        return base
    for d in range(t.dim()):
        if t.stride(d) == 0 and t.shape[d] > 1:
            t = t.narrow(d, 0, 1)
    return t


def nb_log_prob_rows(
    x: torch.Tensor,
    mu: torch.Tensor,
    theta: torch.Tensor,
    zi_logits: torch.Tensor | None = None,
    nonzero: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Sum over the last dimension of the NB (or ZINB, with ``zi_logits``) log-pmf.

    Parameters
    ----------
    x
        Counts, ``(..., cells, genes)``, broadcastable to ``mu``; or a sparse CSR
        ``(cells, genes)`` tensor without explicit zeros.
    mu
        Means, ``(..., cells, genes)``; must be positive where ``x > 0``.
    theta
        Inverse dispersions, broadcastable to ``mu`` (e.g. ``(genes,)``).
    zi_logits
        Zero-inflation logits, same shape as ``mu``; None for the plain NB.
    nonzero
        ``(2, nnz)`` (row, column) positions of the non-zero entries of a 2-D ``x`` (the data
        loader provides them from the sparse matrix); found with ``torch.nonzero`` when None.

    Returns
    -------
    torch.Tensor
        ``(..., cells)`` log-likelihood sums, differentiable in ``mu``, ``theta`` and
        ``zi_logits`` (analytic gradients, see :class:`_NBRows`).
    """
    lead, n_genes = mu.shape[:-1], mu.shape[-1]
    theta = _compact(theta)  # (genes,)-sized when one inverse dispersion per gene
    if theta.numel() != n_genes:
        theta = theta.expand(mu.shape)
    shared = x.dim() == 2 and mu.dim() >= 2 and x.shape[0] == mu.shape[-2]
    # the same counts under every leading (Monte Carlo) index when shared; else counts with
    # leading dimensions of their own, taken as one flat matrix of rows
    n_rows = x.shape[0] if shared else lead.numel()
    n_samples = lead.numel() // max(n_rows, 1)
    shape3 = (n_samples, n_rows, n_genes)
    mu3 = mu.reshape(shape3)
    zi3 = None if zi_logits is None else zi_logits.expand(mu.shape).reshape(shape3)
    th3 = theta if theta.numel() == n_genes else theta.reshape(shape3)
    if shared and _native_ok(mu3, th3, zi3):
        out = _NBRowsNative.apply(mu3, th3, zi3, *_csr(x, nonzero))
        return out.reshape(lead)
    if shared:  # entries found once
        rows, cols, values = _entries(x, nonzero)
    else:
        rows, cols, values = _entries(x.expand(mu.shape).reshape(n_rows, n_genes), None)
    out = _NBRows.apply(mu3, th3, zi3, values.to(mu.dtype), rows, cols)  # (samples, rows)
    return out.reshape(lead)


@torch.no_grad()
def nb_log_prob_rows_softmax(
    x: torch.Tensor,
    logits: torch.Tensor,
    library: torch.Tensor,
    rate_floor: float,
    theta: torch.Tensor,
    zi_logits: torch.Tensor | None = None,
    nonzero: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Return :func:`nb_log_prob_rows` at :math:`\mu = e^{\ell} \mathrm{softmax}(h) + \epsilon`.

    The value of ``nb_log_prob_rows(x, softmax_rate(logits, library, rate_floor)[1], theta,
    zi_logits, nonzero)``. On float32 CPU tensors one compiled pass makes each row's expected
    counts in a small buffer and uses them there, so the ``(..., cells, genes)`` normalised
    expression and rate are never written out (what the marginal log-likelihood needs, for
    hundreds of samples per cell); elsewhere it is that composition.

    Parameters
    ----------
    x
        ``(cells, genes)`` counts, dense or sparse CSR.
    logits
        The decoder's ``(..., cells, genes)`` logits :math:`h` of the normalised expression.
    library
        Log library size :math:`\ell`, broadcastable to ``(..., cells, 1)``.
    rate_floor
        :math:`\epsilon`.
    theta, zi_logits, nonzero
        As for :func:`nb_log_prob_rows`.
    """
    from cellvi.nn._rate import softmax_rate  # nn imports distributions: import when called

    lead, n_genes = logits.shape[:-1], logits.shape[-1]
    shared = x.dim() == 2 and logits.dim() >= 2 and x.shape[0] == logits.shape[-2]
    if not (shared and _native_ok(logits, theta, zi_logits) and _native.usable(library)):
        rate = softmax_rate(logits, library, rate_floor)[1]
        return nb_log_prob_rows(x, rate, theta, zi_logits, nonzero)
    n_rows = x.shape[0]
    shape3 = (lead.numel() // max(n_rows, 1), n_rows, n_genes)
    lg, lg_s, lg_n = _kernel_rows(logits.reshape(shape3))
    log_lib = library.expand(*lead, 1).reshape(-1).contiguous()
    zi, zi_s, zi_n = _kernel_rows(
        None if zi_logits is None else zi_logits.expand(logits.shape).reshape(shape3))
    theta = _compact(theta)
    if theta.numel() != n_genes:
        theta = theta.expand(logits.shape).reshape(shape3)
    theta, th_s, th_n = _kernel_rows(theta, n_genes)
    crow, cols, values = _csr(x, nonzero)
    out = torch.empty(shape3[:2], dtype=logits.dtype)
    ptr = _native.ptr
    code = _native.library().cellvi_nb_rows_softmax(
        *shape3, ptr(lg), lg_s, lg_n, ptr(log_lib), float(rate_floor),
        ptr(theta), th_s, th_n, ptr(zi), zi_s, zi_n, ptr(crow), ptr(cols), ptr(values), ptr(out),
        torch.get_num_threads())
    if code != 0:
        raise MemoryError(f"cellvi_nb_rows_softmax could not allocate {6 * n_genes} floats")
    return out.reshape(lead)


def nb_log_prob_rows_softmax_grad(
    x: torch.Tensor,
    logits: torch.Tensor,
    log_library: torch.Tensor,
    rate_floor: float,
    theta: torch.Tensor,
    zi_logits: torch.Tensor | None,
    weights: torch.Tensor,
    d_log_library: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    r"""Row log-likelihoods from the decoder's logits, with weighted gradients (compiled kernel).

    With :math:`\mu = e^{\ell} \mathrm{softmax}(h) + \epsilon` and
    :math:`r_i = \sum_g \log p(x_{ig} \mid \mu_{ig}, \theta_g, \pi_{ig})`, returns
    ``(r, d_logits, d_zi, d_theta)``: the ``(cells,)`` values of
    :func:`nb_log_prob_rows_softmax` and the gradients of :math:`\sum_i w_i r_i` with respect to
    ``logits`` ``(cells, genes)``, ``zi_logits`` (None for the NB) and ``theta`` ``(genes,)``.
    For a training step whose loss is a weighted sum of the rows, the weights are known before
    the step, and one pass per row gives everything: the expected counts and the per-entry
    derivatives stay in a row buffer. Needs the kernels (:func:`cellvi._native.usable`), float32
    CPU tensors, one theta per gene; no autograd. ``d_log_library``, when given (a contiguous
    float32 ``(cells,)`` tensor), receives the gradient of :math:`\sum_i w_i r_i` with respect
    to ``log_library`` (for a modelled library size), formed in the same pass.
    """
    n, n_genes = logits.shape
    crow, cols, values = _csr(x, None)
    logits, theta = logits.contiguous(), theta.contiguous()
    zi_logits = None if zi_logits is None else zi_logits.contiguous()
    log_library = log_library.reshape(n).contiguous()
    weights = weights.reshape(n).to(torch.float32).contiguous()
    out = torch.empty(n)
    d_logits = torch.empty(n, n_genes)
    d_zi = None if zi_logits is None else torch.empty(n, n_genes)
    d_theta = torch.empty(n_genes)
    ptr = _native.ptr
    args = (n, n_genes, ptr(logits), ptr(log_library), float(rate_floor), ptr(theta),
            ptr(zi_logits), ptr(crow), ptr(cols), ptr(values), ptr(weights), ptr(out),
            ptr(d_logits), ptr(d_zi), ptr(d_theta))
    if d_log_library is None:
        code = _native.library().cellvi_nb_softmax_train(*args, torch.get_num_threads())
    else:
        if not (d_log_library.is_contiguous() and d_log_library.numel() == n
                and d_log_library.dtype == torch.float32):
            raise ValueError("d_log_library must be a contiguous float32 (cells,) tensor.")
        code = _native.library().cellvi_nb_softmax_train_lib(
            *args, ptr(d_log_library), torch.get_num_threads())
    if code != 0:
        raise MemoryError(f"cellvi_nb_softmax_train could not allocate {9 * n_genes} floats")
    return out, d_logits, d_zi, d_theta


class _NBRows(torch.autograd.Function):
    r"""Per-row NB / ZINB log-likelihood with hand-written gradients.

    Works on ``(samples, cells, genes)`` means with the non-zero entries of one
    ``(cells, genes)`` count matrix, shared by all samples. With :math:`r = \mu/\theta`,
    :math:`a = -\theta \log(1 + r) = \log \mathrm{NB}(0)`, :math:`s = \sigma(\pi)` and
    :math:`p_0 = s + (1 - s)\, e^{a}` (the probability of a zero under the ZINB), the dense
    part (every entry) is :math:`\log p_0` (ZINB) or :math:`a` (NB). With
    :math:`w = (1 - s) e^a / p_0` (the share of the NB component in a zero; 1 for the NB),

    .. math::

        \partial_\mu = -\frac{w}{1 + r}, \quad
        \partial_\theta = w \Big(\frac{r}{1 + r} - \log(1 + r)\Big), \quad
        \partial_\pi = \frac{s}{p_0} - s = 1 - w - s.

    The non-zero counts add :math:`\log\Gamma(x+\theta) - \log\Gamma(\theta) -
    \log\Gamma(x+1) + x \log\frac{\mu}{\theta+\mu}` plus, for the ZINB,
    :math:`a - \mathrm{softplus}(\pi) - \log p_0`, with their gradients, on the non-zero
    entries only; the Gamma terms once for all samples unless :math:`\theta` differs between
    samples. One autograd node replaces about forty, and the dense work is a handful of passes
    over ``(samples, cells, genes)`` (done in place when no gradient is needed). A row where
    :math:`p_0` underflows to 0 in floating point (:math:`\pi` and :math:`a` both below about
    -100 in float32) is recomputed as :math:`\log(e^\pi + e^a) - \mathrm{softplus}(\pi)`.
    """

    @staticmethod
    def forward(ctx, mu, theta, zi, values, rows, cols):  # noqa: D102
        n_samples, n_rows, n_genes = mu.shape
        grad = any(ctx.needs_input_grad[:3])
        flat = rows * n_genes + cols  # (nnz,) positions in one (cells * genes) matrix

        def at_nz(t):  # (samples, cells, genes) -> (samples, nnz)
            return _at(t, flat)

        r = mu / theta  # (samples, cells, genes)
        if grad:
            log1p_r = torch.log1p(r)
            a = log1p_r * -theta  # log NB(0)
        else:  # in place: one buffer
            log1p_r = None
            a = r.log1p_().mul_(-theta)
            r = None
        s = p0 = bad = None
        if zi is None:
            log_p0 = a
        else:
            a_nz = at_nz(a)
            s = torch.sigmoid(zi)  # probability of the zero component
            p0 = a.exp_().lerp_(_ONE.to(a), s)  # s + (1 - s) NB(0): probability of a zero
            log_p0 = torch.log(p0) if grad else p0.log_()
        dense = log_p0.sum(-1)  # (samples, cells)
        if zi is not None and not bool(torch.isfinite(dense).all()):
            # p0 underflowed to 0: the same value, computed stably, in those rows
            bad = torch.nonzero(~torch.isfinite(dense.reshape(-1))).reshape(-1)
            th_b = theta.expand(mu.shape).reshape(-1, n_genes)[bad]
            a_b = -th_b * torch.log1p(mu.reshape(-1, n_genes)[bad] / th_b)
            zi_b = zi.reshape(-1, n_genes)[bad]
            log_p0.reshape(-1, n_genes)[bad] = torch.logaddexp(zi_b, a_b) - F.softplus(zi_b)
            dense = log_p0.sum(-1)

        # non-zero entries: (samples, nnz), or (nnz,) for what no sample changes
        mu_nz = at_nz(mu)
        per_gene = theta.numel() == n_genes
        th_varies = not per_gene and n_samples > 1 and theta.stride(0) != 0
        if per_gene:
            th_gene = theta.reshape(-1)
            th_nz = th_gene[cols]
            lgamma_th = torch.lgamma(th_gene)[cols]  # Gamma function per gene only
        else:
            th_nz = at_nz(theta) if th_varies else theta[0].reshape(-1)[flat]
            lgamma_th = torch.lgamma(th_nz)
        terms = torch.lgamma(values + th_nz) - lgamma_th - torch.lgamma(values + 1)
        if n_samples > 1 and terms.dim() == 1:  # the same for every sample: summed once
            gamma_rows = torch.zeros(n_rows, dtype=mu.dtype, device=mu.device).index_add_(
                0, rows, terms)
            terms = values * (torch.log(mu_nz) - torch.log(th_nz + mu_nz))
        else:
            gamma_rows = None
            terms = terms + values * (torch.log(mu_nz) - torch.log(th_nz + mu_nz))
        if zi is not None:
            terms += a_nz - F.softplus(zi[:, rows, cols]) - at_nz(log_p0)
        out = dense.index_add(1, rows, terms.expand(n_samples, -1))
        if gamma_rows is not None:
            out += gamma_rows

        if grad:
            ctx.save_for_backward(theta, zi, values, rows, cols, flat, r, log1p_r, s, p0,
                                  mu_nz, th_nz, bad)
            ctx.per_gene, ctx.th_varies = per_gene, th_varies
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # noqa: D102
        (theta, zi, values, rows, cols, flat, r, log1p_r, s, p0, mu_nz, th_nz,
         bad) = ctx.saved_tensors
        n_samples, n_rows, n_genes = r.shape

        def at_nz(t):
            return _at(t, flat)

        g_rows = grad.unsqueeze(-1)  # (samples, cells, 1)
        g_nz = grad[:, rows]  # (samples, nnz)
        inv = (r + 1).reciprocal_()  # theta / (theta + mu)
        # d/dtheta of log NB(0), every entry: r / (1 + r) - log(1 + r) = 1 - inv - log(1 + r)
        dth = torch.add(inv, log1p_r).neg_().add_(1)
        inv_nz = at_nz(inv)
        values_over_mu = values / mu_nz
        if zi is None:
            d_zi = None
            dmu = inv.mul_(-g_rows)
            dmu_nz = values_over_mu * inv_nz  # x/mu - x/(theta+mu)
            dth_nz = -values / (th_nz + mu_nz)
        else:
            one_minus_w = torch.div(s, p0)  # 1 - w: w is the share of the NB in a zero
            if bad is not None:  # rows where p0 underflowed
                th_b = theta.expand(r.shape).reshape(-1, n_genes)[bad]
                a_b = log1p_r.reshape(-1, n_genes)[bad] * -th_b
                zi_b = zi.reshape(-1, n_genes)[bad]
                one_minus_w.reshape(-1, n_genes)[bad] = -torch.expm1(
                    a_b - torch.logaddexp(zi_b, a_b))
            d_zi = torch.sub(one_minus_w, s)  # 1 - w - s
            c = at_nz(one_minus_w)  # the non-zero entries weigh the NB term fully
            d_zi.reshape(n_samples, -1).index_add_(1, flat, -c)
            d_zi.mul_(g_rows)
            w = one_minus_w.neg_().add_(1)
            dth.mul_(w)
            dmu = inv.mul_(w).mul_(-g_rows)
            dmu_nz = inv_nz * (values_over_mu - c)
            dth_nz = c * (1 - inv_nz - at_nz(log1p_r)) - values / (th_nz + mu_nz)
        dmu.reshape(n_samples, -1).index_add_(1, flat, dmu_nz * g_nz)
        # digamma terms of the Gamma functions, (nnz,) or (samples, nnz)
        g_gamma = g_nz if ctx.th_varies else g_nz.sum(0)
        if ctx.per_gene:
            dth_gene = (grad.reshape(1, -1) @ dth.reshape(-1, n_genes)).reshape(-1)  # (genes,)
            per_entry = (dth_nz * g_nz).sum(0) + torch.digamma(values + th_nz) * g_gamma
            dth_gene.index_add_(0, cols, per_entry)
            g_gene = torch.zeros_like(dth_gene).index_add_(0, cols, g_gamma)
            dth_gene -= torch.digamma(theta.reshape(-1)) * g_gene
            d_theta = dth_gene.reshape(theta.shape)
        else:
            dth.mul_(g_rows)
            dth.reshape(n_samples, -1).index_add_(1, flat, dth_nz * g_nz)
            dig = (torch.digamma(values + th_nz) - torch.digamma(th_nz)) * g_gamma
            if ctx.th_varies:
                dth.reshape(n_samples, -1).index_add_(1, flat, dig)
            else:  # theta is shared by the samples: its gradient sums over them
                dth[0].reshape(-1).index_add_(0, flat, dig)
            d_theta = dth.sum_to_size(theta.shape)
        return dmu, d_theta, d_zi, None, None, None


def _native_ok(mu: torch.Tensor, theta: torch.Tensor, zi: torch.Tensor | None) -> bool:
    """Whether the compiled kernel applies: float32 on the CPU, kernels allowed and built."""
    return _native.usable(mu, theta, zi)


def _csr(
    x: torch.Tensor, nonzero: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(crow, cols, values) of the non-zero counts of a 2-D ``x``: int64, int64, float32."""
    if x.layout == torch.sparse_csr:
        crow, cols, values = x.crow_indices(), x.col_indices(), x.values()
    else:
        rows, cols, values = _entries(x, nonzero)
        if nonzero is not None and rows.numel() > 1 and bool((rows[1:] < rows[:-1]).any()):
            order = torch.argsort(rows, stable=True)  # given positions not in row order
            rows, cols, values = rows[order], cols[order], values[order]
        crow = torch.zeros(x.shape[0] + 1, dtype=torch.int64, device=x.device)
        torch.cumsum(torch.bincount(rows, minlength=x.shape[0]), 0, out=crow[1:])
    return (crow.to(torch.int64).contiguous(), cols.to(torch.int64).contiguous(),
            values.to(torch.float32).contiguous())


def _rows_contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` itself when each row's last-dimension entries are adjacent in memory, else a copy."""
    if t is None or t.stride(-1) == 1:
        return t
    return t.contiguous()


def _kernel_rows(
    t: torch.Tensor | None, per_gene: int | None = None
) -> tuple[torch.Tensor | None, int, int]:
    """``(t, sample stride, row stride)`` as the kernels read a ``(samples, rows, genes)`` input.

    A ``t`` of ``per_gene`` entries (one theta per gene) gets strides 0: the same entries for
    every row. None stays None.
    """
    if t is None:
        return None, 0, 0
    if per_gene is not None and t.numel() == per_gene:
        return t.contiguous(), 0, 0
    t = _rows_contiguous(t)
    return t, t.stride(0), t.stride(1)


class _NBRowsNative(torch.autograd.Function):
    """:class:`_NBRows` by the compiled kernel ``cellvi/_native/nb_rows.c`` (float32, CPU).

    The kernel computes the per-row values and, when a gradient is needed, the per-entry
    derivatives of each row's sum in the same pass; the backward (one more kernel pass) scales
    them by the upstream gradient of each row and sums them over cells for a per-gene theta.
    """

    @staticmethod
    def forward(ctx, mu, theta, zi, crow, cols, values):  # noqa: D102
        n_samples, n_rows, n_genes = mu.shape
        grad = any(ctx.needs_input_grad[:3])
        # views unless genes are strided
        mu, mu_s, mu_n = _kernel_rows(mu)
        zi, zi_s, zi_n = _kernel_rows(zi)
        theta, th_s, th_n = _kernel_rows(theta, n_genes)
        out = torch.empty(n_samples, n_rows, dtype=mu.dtype)
        dmu = dth = dzi = None
        if grad:
            dmu = torch.empty(mu.shape, dtype=mu.dtype)
            dth = torch.empty(mu.shape, dtype=mu.dtype)
            dzi = None if zi is None else torch.empty(mu.shape, dtype=mu.dtype)

        ptr = _native.ptr
        code = _native.library().cellvi_nb_rows(
            n_samples, n_rows, n_genes, ptr(mu), mu_s, mu_n, ptr(theta), th_s,
            th_n, ptr(zi), zi_s, zi_n, ptr(crow), ptr(cols), ptr(values), ptr(out), ptr(dmu),
            ptr(dth), ptr(dzi), torch.get_num_threads(),
        )
        if code != 0:
            raise MemoryError(f"cellvi_nb_rows could not allocate {5 * n_genes} floats")
        if grad:
            ctx.save_for_backward(dmu, dth, dzi)
            ctx.theta_shape = theta.shape
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # noqa: D102
        dmu, dth, dzi = ctx.saved_tensors
        n_genes = dmu.shape[-1]
        per_gene = len(ctx.theta_shape) == 0 or ctx.theta_shape.numel() == n_genes
        grad = grad.contiguous()
        d_mu = torch.empty_like(dmu)
        d_zi = None if dzi is None else torch.empty_like(dzi)
        d_th = torch.empty(n_genes if per_gene else dth.shape, dtype=dth.dtype)
        ptr = _native.ptr
        _native.library().cellvi_nb_rows_backward(
            grad.numel(), n_genes, ptr(grad), ptr(dmu), ptr(dzi), ptr(dth), int(per_gene),
            ptr(d_mu), ptr(d_zi), ptr(d_th), torch.get_num_threads())
        d_th = d_th.reshape(ctx.theta_shape) if per_gene else d_th.sum_to_size(ctx.theta_shape)
        return d_mu, d_th, d_zi, None, None, None


def _at(t: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """Entries ``flat`` of each ``(cells, genes)`` matrix of ``t``: ``(samples, nnz)``."""
    return t.reshape(t.shape[0], -1).index_select(1, flat)


def _entries(
    x: torch.Tensor, nonzero: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, column, value) of the non-zero counts of a 2-D dense or sparse CSR ``x``."""
    if x.layout == torch.sparse_csr:
        cols, values = x.col_indices(), x.values()
        if nonzero is not None:
            rows = nonzero[0]
        else:
            counts = x.crow_indices().diff()
            rows = torch.repeat_interleave(torch.arange(x.shape[0], device=x.device), counts)
        return rows, cols, values
    if nonzero is not None:
        rows, cols = nonzero[0], nonzero[1]
    else:
        rows, cols = torch.nonzero(x, as_tuple=True)
    return rows, cols, x[rows, cols]


def log_prob_rows(
    px: Distribution, x: torch.Tensor, nonzero: torch.Tensor | None = None
) -> torch.Tensor:
    """``px.log_prob(x).sum(-1)``, through :func:`nb_log_prob_rows` for NB and ZINB."""
    if isinstance(px, ZeroInflatedNegativeBinomial):
        return nb_log_prob_rows(x, px.mu, px.theta, px.zi_logits, nonzero)
    if isinstance(px, NegativeBinomial):
        return nb_log_prob_rows(x, px.mu, px.theta, nonzero=nonzero)
    if x.layout == torch.sparse_csr:
        x = x.to_dense()
    return px.log_prob(x).sum(-1)
