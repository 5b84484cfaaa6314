r"""The scANVI training step: the scVI part written out, the label part in autograd.

:class:`~cellvi.module.SCANVAE` trained by the semi-supervised plan
(:class:`~cellvi.train.SemiSupervisedTrainingPlan`) computes, per minibatch of :math:`n` cells
and a minibatch of :math:`m` labelled cells,

.. math::

    L = \frac1n \sum_i \Big[-\log p(x_i \mid z_{1,i})
        + w\,\big(\mathrm{KL}_{z_1,i} + \mathrm{KL}_{z_2,i} + \mathrm{KL}_{y,i}\big)\Big]
        + \lambda\, \frac1m \sum_j -\log q(y_j \mid \bar z_{1,j}),

with :math:`z_1 = m + \varepsilon\sigma` from the scVI encoder, :math:`\bar z_1` the posterior
mean of the labelled cells and :math:`\lambda` the classification ratio (see
:mod:`cellvi.module.scanvae` for the KL terms). Its cost is the scVI part: the first encoder
layer over all genes, the decoder's heads over all genes and the ZINB/NB likelihood. Those are
the pieces :mod:`cellvi.module._vae_step` writes out, and this step composes them:

* the encoder (:func:`~cellvi.module._vae_step.encode` and ``encode_backward`` on sparse
  rows; SCANVAE's loader gives dense rows, made CSR here from their non-zero positions, with
  dense products for the first layer above a share of non-zero counts: see :func:`_rows`),
  the decoder layers (:func:`~cellvi.module._vae_step._layers_forward` /
  ``_layers_backward``) and the compiled likelihood kernel, which gives
  :math:`\partial L / \partial \mathrm{logits}` in one pass per row (the upstream gradient
  of each row, :math:`-1/n`, is known before the step);
* the label part acts on ``(cells, n_latent)``-sized tensors only. The ``z2`` networks
  enumerated over the classes (:math:`q(z_2 \mid z_1, y)`, :math:`p(z_1 \mid z_2, y)` on
  ``(classes x cells, n_latent)`` rows, with :math:`\log p(z_1 \mid z_2, y)` and
  :math:`\mathrm{KL}(q(z_2) \| p(z_2))`) are written out (:func:`_label_terms`, with
  ``_layers_forward`` / ``_layers_backward``). The classifier :math:`q(y \mid z_1)`, the
  per-class weights, :math:`\mathrm{KL}(q(y) \| p(y))`, :math:`\log q(z_1 \mid x)` and the
  cross-entropy run through autograd from leaf tensors: the posterior's ``mean`` and ``std``
  (with :math:`z_1 = m + \varepsilon\sigma` rebuilt from them), the two ``(cells, classes)``
  terms of the ``z2`` networks and the posterior mean of the labelled cells. One backward call,
  seeded with the decoder's :math:`\partial L / \partial z_1`, gives the classifier's
  gradients, :math:`\partial L / \partial m`, :math:`\partial L / \partial \sigma` and the
  gradients of the two terms, from which the ``z2`` networks' backward adds its
  :math:`\partial L / \partial z_1`;
* the labelled cells' encoder pass is written out the same way (the gradient of its mean
  only: the classifier reads the posterior mean) and its encoder gradients are added to those
  of the minibatch, as autograd would accumulate them.

The classifier and the class prior are the module's own (``log_q_y``, ``label_head``), so
every option of the label part (class prior, label groups, classifier options) is what the
module computes. The operations run in the module's order, drawing the same random numbers and
updating the batch-norm statistics in the same order; a test checks the loss, every gradient,
the statistics and the random stream against autograd through ``SCANVAE.forward``.

Measured (one thread, CPU time of one step of 128 cells x 2,000 genes, 8 classes, 128
labelled cells, on a machine with other load): 19-22 ms against 23-27 ms through autograd at
5 % non-zero (x1.16-1.20), 29-31 ms against 31 ms at 47 % (x1.01-1.06). The step is bound by
the matrix products over the genes that both paths run at the sgemm rate (the decoder heads'
six and the first encoder layer's four at 47 %, about 60 % of the step) and the likelihood.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributions import Normal

from cellvi import keys
from cellvi.distributions._rowsum import nb_log_prob_rows_softmax_grad

from . import _vae_step
from ._base import RATE_FLOOR, LossOutput, one_hot, row_sums
from ._vae_step import (
    _any,
    _layers_backward,
    _layers_forward,
    backward_to_first_layer,
    decoder_backward,
    decoder_forward,
    encode,
    encode_backward,
    encode_from_first_layer,
)

__all__ = ["LABEL_SUPPORTED", "WRITES_OUT", "training_step", "unsupported"]

Tensors = dict[str, torch.Tensor]


#: The options of :class:`~cellvi.module.scanvae.SCANVAEConfig` beyond the VAE's, with the
#: values the step supports. The label part runs through the module's own methods in autograd,
#: so all of their values are. An option listed nowhere makes the step refuse (a test checks
#: that every option is listed).
LABEL_SUPPORTED: dict[str, Callable[[Any], bool]] = {
    "y_prior": _any,
    "classifier_parameters": _any,
    "classification_ratio": _any,
    "labels_groups": _any,
    "use_labels_groups": _any,
    "linear_classifier": _any,
}

#: The methods of SCANVAE whose computation the step writes out or reproduces (the VAE's, those
#: SCANVAE overrides, the z2 networks' terms and the classification pass): a subclass
#: overriding any of them computes something else and trains through autograd. ``log_q_y``
#: (the classifier) is called, not written out, so a subclass may change it.
WRITES_OUT = (*_vae_step.WRITES_OUT, "classification_loss", "_log_classify",
              "_classifier_latent", "_labels", "_label_terms")


class _AsVAE:
    """The module seen with its VAE options only (for :func:`._vae_step.unsupported`)."""

    def __init__(self, module: nn.Module, config):
        self._module, self.config = module, config

    def __getattr__(self, name):
        return getattr(self._module, name)


def unsupported(module: nn.Module, *, device: torch.device | str = "cpu") -> str | None:
    """Why :func:`training_step` does not apply to ``module`` here, or None when it does.

    The VAE options must pass :data:`cellvi.module._vae_step.SUPPORTED` with the rest of
    :func:`cellvi.module._vae_step.unsupported`'s conditions (CPU, float32, compiled kernels,
    the plain layers); the label options :data:`LABEL_SUPPORTED`. Dense and sparse minibatches
    are both taken.
    """
    from .vae import VAEConfig

    config = getattr(module, "config", None)
    if config is None:
        return "the module has no config"
    values = config.as_dict()
    vae_names = set(VAEConfig.names())
    for name, value in values.items():
        if name in vae_names:
            continue
        rule = LABEL_SUPPORTED.get(name)
        if rule is None:
            return f"option {name!r} of {type(config).__name__} is not known to the fused step"
        if not rule(value):
            return f"{name}={value!r} is not supported by the fused step"
    vae_config = VAEConfig(**{k: v for k, v in values.items() if k in vae_names})
    reason = _vae_step.unsupported(_AsVAE(module, vae_config), device=device, sparse=True)
    if reason:
        return reason
    for net in (module.encoder_z2_z1, module.decoder_z1_z2):
        if net.var_activation is not torch.exp or net.distribution != "normal":
            return "the z2 networks are not Normal heads with an exp variance"
        if not _vae_step._plain_layers(net.encoder):
            return "the z2 networks' layers are not linear -> [batch norm] -> ReLU -> [dropout]"
    return None


@torch.no_grad()
def training_step(
    module: nn.Module, tensors: Tensors, kl_weight: float, *, feed_labels: bool = False,
    labelled_tensors: Tensors | None = None, classification_ratio: float | None = None,
) -> LossOutput:
    """Loss of a minibatch, with each parameter's ``.grad`` set to its gradient.

    Computes what ``module(tensors, kl_weight=kl_weight, feed_labels=feed_labels,
    labelled_tensors=labelled_tensors, classification_ratio=classification_ratio)[2]``
    computes, and the gradients its ``loss.backward()`` gives, without an autograd graph over
    the genes. ``module`` must pass :func:`unsupported` and be in training mode; ``tensors``
    (and ``labelled_tensors``) hold the counts dense (with ``keys.INDICES_NONZERO`` when the
    loader gives it) or as CSR with ``keys.X_T``. Gradients are written, not accumulated: call
    it on a module whose gradients are None.
    """
    encoder = module.z_encoder
    log1p = module.log_variational

    # ---- forward: the scVI part, as SCANVAE.inference / generative compute it
    rows = _rows(tensors, log1p)
    x = rows["csr"]  # (n, genes) CSR
    n = x.shape[0]
    z, enc = _encode(encoder, rows)  # (n, latent)
    library = torch.log(row_sums(x)).unsqueeze(-1)  # (n, 1)
    cats = module._decoder_cats(tensors[keys.BATCH], tensors.get(keys.CAT_COVS), None)
    h1, dec_tape, logits, zi = decoder_forward(module, z, cats)  # (n, hidden), ..., (n, genes)
    theta = module.px_r.exp()  # (genes,)
    weights = torch.full((n,), -1.0 / n)  # d loss / d log p(x_i)
    log_px, d_logits, d_zi, d_theta = nb_log_prob_rows_softmax_grad(
        x, logits, library, RATE_FLOOR, theta, zi, weights)
    reconstruction = -log_px  # (n,)

    # ---- the label part (and the classifier's cross-entropy): autograd on (cells, latent)
    with torch.enable_grad():
        mean = enc["mean"].detach().requires_grad_()
        std = enc["std"].detach().requires_grad_()
        u = mean + enc["eps"] * std  # z1, the same value as z
        log_qz1 = Normal(mean, std, validate_args=False).log_prob(u).sum(-1)  # (n,)
        with torch.no_grad():  # the z2 networks over every class: written out below
            terms = _label_terms(module, u.detach())
        log_pz1 = terms["log_pz1"].requires_grad_()  # (n, n_labels)
        kl_z2_all = terms["kl_z2"].requires_grad_()  # (n, n_labels)
        log_qy = module.log_q_y(u)  # (n, n_labels)
        qy = log_qy.exp()
        y, labelled = module.label_head.feed(tensors.get(keys.LABELS), n, x.device, feed_labels)
        w = torch.where(labelled.unsqueeze(-1), one_hot(y, module.n_labels), qy)
        kl_z1 = log_qz1 - (w * log_pz1).sum(-1)
        kl_z2 = (w * kl_z2_all).sum(-1)
        kl_y = module.label_head.kl_y(log_qy, y, labelled, qy)
        weighted = kl_weight * (kl_z1 + kl_z2 + kl_y)  # (n,)
        objective = weighted.sum() / n  # the part of the loss that autograd differentiates
        lab = None
        if labelled_tensors is not None:
            ratio = module.classification_ratio if classification_ratio is None else (
                classification_ratio)
            rows_l = _rows(labelled_tensors, log1p, need_csr=False)  # no likelihood here
            _, lab = _encode(encoder, rows_l)
            mean_l = lab["mean"].detach().requires_grad_()
            cross_entropy = module.label_head.cross_entropy(
                module.log_q_y(encoder.transform(mean_l)), labelled_tensors[keys.LABELS])
            objective = objective + ratio * cross_entropy

    # ---- backward: decoder by hand, then the label part seeded with its d z1
    d_z = decoder_backward(module, h1, dec_tape, cats, d_logits, d_zi, d_theta * theta)
    with torch.enable_grad():
        torch.autograd.backward([objective, u], [torch.ones_like(objective), d_z])
    d_u = _label_terms_backward(module, terms, log_pz1.grad, kl_z2_all.grad)  # (n, latent)
    mean.grad.add_(d_u)  # through z1 = mean + eps * std
    std.grad.add_(d_u * enc["eps"])

    if lab is not None:  # the labelled cells' encoder gradients, then the minibatch's, summed
        d_mean_l = mean_l.grad if mean_l.grad is not None else torch.zeros_like(mean_l)
        _encode_backward(encoder, lab, d_mean_l, torch.zeros_like(d_mean_l), rows_l)
        first_grads = [p.grad for p in encoder.parameters()]
    _encode_backward(encoder, enc, mean.grad, std.grad, rows)
    if lab is not None:
        for p, g in zip(encoder.parameters(), first_grads):
            if g is not None:
                p.grad = g if p.grad is None else p.grad.add_(g)

    kl_local = {"kl_z1": kl_z1.detach(), "kl_z2": kl_z2.detach(), "kl_y": kl_y.detach()}
    out = LossOutput(loss=torch.mean(reconstruction + weighted.detach()),
                     reconstruction_loss=reconstruction, kl_local=kl_local)
    if lab is not None:
        module.label_head.add_classification(out, cross_entropy.detach(), ratio)
    return out


# ---------------------------------------------------------------------- the z2 networks
def _normal_head(encoder: nn.Module, x: torch.Tensor, cats: list) -> dict:
    """Forward of an :class:`~cellvi.nn.Encoder` on dense ``x`` (its operations, its draws)."""
    h, tape = _layers_forward(encoder.encoder, None, x, cats)
    mean, raw_var = nn.functional.linear(h, encoder.mean_var.weight,
                                         encoder.mean_var.bias).chunk(2, dim=-1)
    exp_var = raw_var.exp()
    std = (exp_var + encoder.var_eps).sqrt()
    eps = torch.empty_like(mean).normal_()  # as Normal.rsample
    return {"h": h, "tape": tape, "mean": mean, "std": std, "eps": eps, "exp_var": exp_var,
            "sample": mean + eps * std}


def _normal_head_backward(encoder: nn.Module, saved: dict, d_mean: torch.Tensor,
                          d_std: torch.Tensor, cats: list) -> torch.Tensor:
    """Set an encoder's gradients from those of its ``mean`` and ``std``; return its input's."""
    d_raw_var = d_std * saved["exp_var"] / (2 * saved["std"])
    d_out = torch.cat([d_mean, d_raw_var], dim=-1)
    encoder.mean_var.weight.grad = d_out.t().mm(saved["h"])
    encoder.mean_var.bias.grad = d_out.sum(0)
    d_h = d_out.mm(encoder.mean_var.weight)
    return _layers_backward(encoder.encoder, saved["tape"], d_h, cats, need_input_grad=True)


def _label_terms(module: nn.Module, u: torch.Tensor) -> dict:
    r"""``SCANVAE._label_terms(u, u)`` written out, with what its backward needs.

    For every cell and class :math:`k` (class-major rows, as the module stacks them):
    :math:`q(z_2 \mid z_1, k) = \mathcal N(m_2, s_2^2)`, :math:`z_2 = m_2 + \varepsilon_2 s_2`,
    :math:`p(z_1 \mid z_2, k) = \mathcal N(m_3, s_3^2)`; ``log_pz1`` is
    :math:`\sum_d \log \mathcal N(u_d \mid m_3, s_3^2)` and ``kl_z2``
    :math:`\sum_d \tfrac12(s_2^2 + m_2^2 - 1 - \log s_2^2)`, both ``(cells, n_labels)``.
    """
    n, k = u.shape[0], module.n_labels
    ys = torch.arange(k, device=u.device).repeat_interleave(n).unsqueeze(-1)  # (k n, 1)
    u_rep = u.repeat(k, 1)  # (k n, latent), class-major
    q2 = _normal_head(module.encoder_z2_z1, u_rep, [ys])
    p1 = _normal_head(module.decoder_z1_z2, q2["sample"], [ys])  # its sample is drawn, unused
    diff = u_rep - p1["mean"]
    var = p1["std"].square()
    log_pz1 = (-diff.square() / (2 * var) - p1["std"].log()
               - math.log(math.sqrt(2 * math.pi))).sum(-1)
    var2 = q2["std"].square()
    kl_z2 = (0.5 * (var2 + q2["mean"].square() - 1 - var2.log())).sum(-1)
    return {"ys": ys, "q2": q2, "p1": p1, "diff": diff, "var": var,
            "log_pz1": log_pz1.reshape(k, n).T, "kl_z2": kl_z2.reshape(k, n).T}


def _label_terms_backward(module: nn.Module, saved: dict, d_log_pz1: torch.Tensor | None,
                          d_kl_z2: torch.Tensor | None) -> torch.Tensor:
    r"""Set the z2 networks' gradients from those of ``log_pz1`` and ``kl_z2``; return ``d u``.

    With :math:`\delta = u - m_3`: :math:`\partial \log p / \partial m_3 = \delta / s_3^2 =
    -\partial \log p / \partial u`, :math:`\partial \log p / \partial s_3 = \delta^2 / s_3^3
    - 1 / s_3`; :math:`\partial \mathrm{KL} / \partial m_2 = m_2`,
    :math:`\partial \mathrm{KL} / \partial s_2 = s_2 - 1 / s_2`; :math:`z_2` carries
    :math:`\bar z_2` to :math:`\bar m_2` and :math:`\varepsilon_2 \bar z_2` to :math:`\bar s_2`.
    """
    q2, p1, ys = saved["q2"], saved["p1"], saved["ys"]
    n, k = d_log_pz1.shape if d_log_pz1 is not None else d_kl_z2.shape
    g1 = (torch.zeros(n, k) if d_log_pz1 is None else d_log_pz1).T.reshape(-1, 1)  # (k n, 1)
    g2 = (torch.zeros(n, k) if d_kl_z2 is None else d_kl_z2).T.reshape(-1, 1)
    s3 = p1["std"]
    ratio = saved["diff"] / saved["var"]  # (k n, latent)
    d_m3 = g1 * ratio
    d_s3 = g1 * (saved["diff"] * ratio / s3 - s3.reciprocal())
    d_z2 = _normal_head_backward(module.decoder_z1_z2, p1, d_m3, d_s3, [ys])
    s2 = q2["std"]
    d_m2 = d_z2 + g2 * q2["mean"]
    d_s2 = d_z2 * q2["eps"] + g2 * (s2 - s2.reciprocal())
    d_u_rep = _normal_head_backward(module.encoder_z2_z1, q2, d_m2, d_s2, [ys]) - d_m3
    return d_u_rep.reshape(k, n, -1).sum(0)  # (n, latent)


# ---------------------------------------------------------------------- the counts' layouts
#: Above this share of non-zero counts, a dense minibatch's first encoder layer is two dense
#: products (forward, weight gradient); below it, the sparse ones of the VAE step on CSR rows
#: built here (with their transpose, for the weight gradient). See :func:`_rows`.
DENSE_FIRST_LAYER_ABOVE = 0.35


def _rows(tensors: Tensors, log1p: bool, *, need_csr: bool = True) -> dict:
    """Return the minibatch's counts in the layouts the step uses.

    ``"csr"``: the ``(cells, genes)`` counts as CSR (the likelihood kernel and the library size
    read them; None for dense rows with a dense first layer unless ``need_csr``);
    ``"dense"``: the encoder's dense input ``log(1 + x)`` (or ``x``) when the first layer is
    dense products, else None; ``"t"``: the CSR transpose for the sparse weight gradient (built
    when needed). Dense rows (SCANVAE's loader gives them) are made CSR from their non-zero
    positions (``keys.INDICES_NONZERO``). Their first layer is dense above
    :data:`DENSE_FIRST_LAYER_ABOVE` non-zero: per product for 128 x 2,000, the sparse forward
    and transposed weight gradient (with the transpose, a counting sort) take 0.2 ms at 5 %
    and 1.2 ms at 47 % non-zero, the dense ones 1.6-1.7 ms at any share (one thread).
    """
    x = tensors[keys.X]
    if x.layout == torch.sparse_csr:
        return {"csr": x, "dense": None, "t": tensors.get(keys.X_T), "log1p": log1p}
    nonzero = tensors.get(keys.INDICES_NONZERO)
    nnz = nonzero.shape[1] if nonzero is not None else int(torch.count_nonzero(x))
    dense = None
    if nnz > DENSE_FIRST_LAYER_ABOVE * x.numel():
        dense = torch.log1p(x) if log1p else x
    csr = _as_csr(x, nonzero) if need_csr or dense is None else None
    return {"csr": csr, "dense": dense, "t": None, "log1p": log1p}


def _values(x: torch.Tensor, log1p: bool) -> torch.Tensor:
    """Return the encoder's input on the pattern of CSR ``x``: ``log(1 + x)`` or ``x``."""
    return torch.log1p(x.values()) if log1p else x.values()


def _encode(encoder: nn.Module, rows: dict) -> tuple[torch.Tensor, dict]:
    """Forward of the ``z`` encoder (``Encoder.forward``'s operations) on :func:`_rows`."""
    if rows["dense"] is None:
        return encode(encoder, rows["csr"], _values(rows["csr"], rows["log1p"]), [])
    first = encoder.encoder.linears[0]
    a0 = torch.addmm(first.bias, rows["dense"], first.weight)  # (n, hidden), as CovariateLinear
    return encode_from_first_layer(encoder, a0, [])


def _encode_backward(encoder: nn.Module, saved: dict, d_mean: torch.Tensor,
                     d_std: torch.Tensor, rows: dict) -> None:
    """Set the encoder's gradients from those of ``mean`` and ``std`` (either layout)."""
    if rows["dense"] is None:  # the VAE step's sparse backward
        x_t = rows["t"] if rows["t"] is not None else _transpose(rows["csr"])
        encode_backward(encoder, saved, d_mean, d_std, [], x_t, _values(x_t, rows["log1p"]))
        return
    d_a0 = backward_to_first_layer(encoder, saved, d_mean, d_std, [])
    encoder.encoder.linears[0].weight.grad = rows["dense"].t().mm(d_a0)  # (genes, hidden)


def _as_csr(x: torch.Tensor, nonzero: torch.Tensor | None) -> torch.Tensor:
    """Dense ``x`` as CSR, built from its non-zero positions when given."""
    if nonzero is None:
        return x.to_sparse_csr()
    rows, cols = nonzero[0], nonzero[1]
    if rows.numel() > 1 and bool((rows[1:] < rows[:-1]).any()):  # not in row order
        order = torch.argsort(rows, stable=True)
        rows, cols = rows[order], cols[order]
    n, n_genes = x.shape
    crow = torch.zeros(n + 1, dtype=torch.int64)
    torch.cumsum(torch.bincount(rows, minlength=n), 0, out=crow[1:])
    values = x.reshape(-1).index_select(0, rows * n_genes + cols)
    return torch.sparse_csr_tensor(crow, cols.contiguous(), values, x.shape,
                                   check_invariants=False)


def _transpose(x: torch.Tensor) -> torch.Tensor:
    """Return the ``(genes, cells)`` CSR transpose of a CSR ``x`` (a counting sort)."""
    import numpy as np
    import scipy.sparse as sp

    n, n_genes = x.shape
    csc = sp.csr_matrix((x.values().numpy(), x.col_indices().numpy(),
                         x.crow_indices().numpy()), shape=(n, n_genes)).tocsc()
    t = torch.from_numpy
    return torch.sparse_csr_tensor(t(csc.indptr.astype(np.int64)),
                                   t(csc.indices.astype(np.int64)), t(csc.data), (n_genes, n),
                                   check_invariants=False)
