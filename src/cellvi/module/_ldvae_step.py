r"""The LDVAE (LinearSCVI) training step with its gradients written out: no autograd graph.

:class:`~cellvi.module.LDVAE` trained by :func:`~cellvi.train.train_module` is, for the
settings most users train with (see :func:`unsupported`), one minibatch of :math:`n` cells
through scVI's encoders (:func:`cellvi.module._vae_step.encode`: a sparse first layer, then
linear -> [batch norm] -> ReLU -> [dropout] layers, a Normal posterior drawn by
reparameterisation) for :math:`z` and, when the library size is modelled (LinearSCVI's
default), for the log library :math:`\ell`, and then the linear decoder

.. math::

    a &= z W + b + C[s], \qquad \mathrm{logits} = \mathrm{BN}(a), \qquad
    \pi = \mathrm{BN}_\pi(z W_\pi + b_\pi + C_\pi[s]), \qquad
    \mu = e^{\ell}\, \mathrm{softmax}(\mathrm{logits}) + 10^{-8}, \\
    L &= \frac1n \sum_i \Big[-\log \mathrm{ZINB}(x_i \mid \mu_i, \theta, \pi_i)
        + w\, \mathrm{KL}(q(z_i) \,\|\, \mathcal N(0, I))
        + \mathrm{KL}\big(q(\ell_i) \,\|\, \mathcal N(\mu_{s_i}, \sigma^2_{s_i})\big)\Big]

(:math:`b` only with ``bias=True``, the batch norms only with ``use_batch_norm`` in
``"decoder"``/``"both"``, :math:`C[s]` the batch's and covariates' rows, :math:`\pi` only for the
ZINB; :math:`z` is followed by the continuous covariates when the module has any, and with
``encode_covariates`` the encoders read those after the genes and the categorical codes in
their layers). :func:`training_step` computes :math:`L` with the operations ``LDVAE.forward``
runs, in the same order and drawing the same random numbers, and then every gradient by the
chain rule (:math:`\bar u = \partial L / \partial u`):

.. math::

    \bar{\mathrm{logits}}, \bar\pi, \bar\theta, \bar\ell &\text{ from one kernel pass per cell
    (} \texttt{cellvi\_nb\_softmax\_train\_lib} \text{, weights } -1/n \text{)}, \qquad
    \bar a = \mathrm{BN}^\top(\bar{\mathrm{logits}}), \\
    \bar W &= z^\top \bar a, \quad \bar b = \textstyle\sum_i \bar a_i, \quad
    \bar C_c = \textstyle\sum_{i: s_i = c} \bar a_i, \quad
    \bar z = \bar a W^\top + \bar a_\pi W_\pi^\top, \\
    \bar m_\ell &= \bar\ell + \tfrac1n (m_\ell - \mu_s) / \sigma_s^2, \quad
    \bar\sigma_\ell = \bar\ell\, \varepsilon_\ell + \tfrac1n (\sigma_\ell / \sigma_s^2
    - 1 / \sigma_\ell),

and the encoders' backward of :func:`cellvi.module._vae_step.encode_backward`. For the NB the
zero-inflation map is computed only when it has a batch norm, and only its running statistics
are then updated (``LDVAE.forward`` updates them although the map's output is not used); its
parameters get no gradient, as under autograd. Tests check the loss, every gradient, the
batch-norm statistics and the random stream against autograd through ``LDVAE.forward`` for
each supported option.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributions import Normal, kl_divergence

from cellvi import _native, keys
from cellvi.distributions._rowsum import nb_log_prob_rows_softmax_grad
from cellvi.nn import LinearDecoderSCVI
from cellvi.nn._layers import CovariateLinear, FCLayers

from ._base import RATE_FLOOR, LossOutput, row_sums
from ._vae_step import _plain_layers, encode, encode_backward

__all__ = ["SUPPORTED", "WRITES_OUT", "training_step", "unsupported"]

Tensors = dict[str, torch.Tensor]


def _any(value: Any) -> bool:
    return True


#: Every option of :class:`~cellvi.module.ldvae.LDVAEConfig`, with the values for which
#: :func:`training_step` computes exactly what ``LDVAE.forward`` and autograd compute. An
#: option not listed here makes the step refuse (a test checks that every option is listed).
SUPPORTED: dict[str, Callable[[Any], bool]] = {
    "n_input": _any,
    "n_batch": _any,
    "n_labels": _any,
    "n_hidden": _any,
    "n_latent": _any,
    "n_layers": _any,
    "n_continuous_cov": _any,
    "n_cats_per_cov": _any,
    "dropout_rate": _any,
    "dispersion": lambda v: v == "gene",
    "log_variational": _any,
    "gene_likelihood": lambda v: v in ("zinb", "nb"),
    "latent_distribution": lambda v: v == "normal",
    "encode_covariates": _any,
    "deeply_inject_covariates": _any,
    "use_batch_norm": _any,
    "use_layer_norm": lambda v: v == "none",
    "use_size_factor_key": lambda v: v is False,
    "use_observed_lib_size": _any,
    "library_log_means": _any,
    "library_log_vars": _any,
    "var_activation": lambda v: v is None,
    "bias": _any,
}

#: The methods whose computation the step writes out (those of the VAE's step, with LDVAE's
#: ``_make_decoder``): a subclass of LDVAE overriding any of them trains through autograd.
WRITES_OUT = ("forward", "inference", "generative", "loss", "inference_inputs",
              "generative_inputs", "_theta", "_decoder_cats", "_decoder_input",
              "_encoder_input", "_make_decoder", "_make_encoder", "_encoder_cat_list",
              "_cats", "_library_prior")


def unsupported(module: nn.Module, *, device: torch.device | str = "cpu",
                sparse: bool = True) -> str | None:
    """Why :func:`training_step` does not apply to ``module`` here, or None when it does.

    It applies to an LDVAE whose config passes :data:`SUPPORTED`, with float32 parameters,
    trained on the CPU on sparse minibatches with the compiled kernels available.
    """
    config = getattr(module, "config", None)
    if config is None:
        return "the module has no config"
    for name, value in config.as_dict().items():
        rule = SUPPORTED.get(name)
        if rule is None:
            return f"option {name!r} of {type(config).__name__} is not known to the fused step"
        if not rule(value):
            return f"{name}={value!r} is not supported by the fused step"
    if torch.device(device).type != "cpu":
        return f"the fused step runs on the CPU only (device {device})"
    if not sparse:
        return "the minibatches are dense"
    if not _native.enabled() or _native.library() is None:
        return f"the compiled kernels are off or unavailable ({_native.status()})"
    decoder = module.decoder
    if type(decoder) is not LinearDecoderSCVI or not (
            _linear_layer(decoder.factor_regressor)
            and _linear_layer(decoder.px_dropout_decoder)):
        return "the decoder is not LDVAE's linear decoder -> [batch norm]"
    encoders = [module.z_encoder] + ([module.l_encoder] if module.l_encoder is not None else [])
    for encoder in encoders:
        if encoder.var_activation is not torch.exp or encoder.distribution != "normal":
            return "an encoder's variance activation is not exp"
        if not _plain_layers(encoder.encoder):
            return "the encoder layers are not linear -> [batch norm] -> ReLU -> [dropout]"
    if not all(p.dtype == torch.float32 and p.device.type == "cpu"
               for p in module.parameters()):
        return "the parameters are not float32 on the CPU"
    return None


def _linear_layer(layers: FCLayers) -> bool:
    """One linear map, then a batch norm or nothing (what the step writes out)."""
    if len(layers.linears) != 1 or type(layers.linears[0]) is not CovariateLinear:
        return False
    post = list(layers.posts[0])
    if not post:
        return True
    bn = post[0]
    return (len(post) == 1 and type(bn) is nn.BatchNorm1d and bn.affine
            and bn.track_running_stats and bn.momentum is not None)


@torch.no_grad()
def training_step(module: nn.Module, tensors: Tensors, kl_weight: float) -> LossOutput:
    """Loss of a sparse minibatch, with each parameter's ``.grad`` set to its gradient.

    ``module`` must pass :func:`unsupported` (None), be in training mode, and ``tensors`` hold
    the counts as a CSR tensor with its transpose (``keys.X``, ``keys.X_T``), as the training
    loop's sparse minibatches do. Gradients are written, not accumulated: call it on a model
    whose gradients are None (``optimizer.zero_grad()``). Returns what ``module(tensors,
    kl_weight=...)[2]`` returns (without an autograd graph).
    """
    x, x_t = tensors[keys.X], tensors[keys.X_T]
    batch_index = tensors[keys.BATCH]
    cat_covs, cont_covs = tensors.get(keys.CAT_COVS), tensors.get(keys.CONT_COVS)
    n = x.shape[0]

    # ---- forward, as VAE.inference / generative / loss compute it
    values = torch.log1p(x.values()) if module.log_variational else x.values()
    values_t = torch.log1p(x_t.values()) if module.log_variational else x_t.values()
    encoded = module.encode_covariates
    enc_cats = module._cats(batch_index, cat_covs) if encoded else []
    enc_dense = cont_covs if encoded else None  # continuous covariates after the genes
    z, qz = encode(module.z_encoder, x, values, enc_cats, enc_dense)  # (n, latent)
    if module.use_observed_lib_size:
        ql = None
        library = torch.log(row_sums(x)).unsqueeze(-1)  # (n, 1)
    else:
        library, ql = encode(module.l_encoder, x, values, enc_cats, enc_dense)  # (n, 1), log

    cats = module._decoder_cats(batch_index, cat_covs, None)
    decoder = module.decoder
    inputs = module._decoder_input(z, cont_covs)  # (n, latent [+ n_cont])
    logits, scale_tape = _linear_forward(decoder.factor_regressor, inputs, cats)  # (n, genes)
    zinb = module.gene_likelihood == "zinb"
    dropout = decoder.px_dropout_decoder
    zi = zi_tape = None
    if zinb:
        zi, zi_tape = _linear_forward(dropout, inputs, cats)  # (n, genes)
    elif len(dropout.posts[0]):  # a batch norm (what _linear_layer allows)
        # the NB's zero-inflation output is unused, but its batch norm statistics move
        _linear_forward(dropout, inputs, cats, statistics_only=True)
    theta = module.px_r.exp()  # (genes,)

    weights = torch.full((n,), -1.0 / n)  # d loss / d log p(x_i), known before the step
    d_library = None if ql is None else torch.empty(n)
    log_px, d_logits, d_zi, d_theta = nb_log_prob_rows_softmax_grad(
        x, logits, library, RATE_FLOOR, theta, zi if zinb else None, weights,
        d_log_library=d_library)  # (n,), (n, genes), (n, genes) or None, (genes,)

    reconstruction = -log_px  # (n,)
    mean, std = qz["mean"], qz["std"]
    kl_z = (0.5 * (std.square() + mean.square() - 1) - std.log()).sum(-1)  # (n,)
    kl_local = {"kl_z": kl_z}
    weighted = kl_weight * kl_z
    if ql is not None:
        prior = module._library_prior(batch_index)  # (n, 1) means and scales
        posterior = Normal(ql["mean"], ql["std"], validate_args=False)
        kl_l = kl_divergence(posterior, prior).sum(-1)  # (n,)
        kl_local["kl_l"] = kl_l
        weighted = weighted + kl_l
    loss = torch.mean(reconstruction + weighted)

    # ---- backward
    module.px_r.grad = d_theta * theta
    d_z = _linear_backward(decoder.factor_regressor, scale_tape, d_logits, cats, inputs)
    if zinb:
        d_z += _linear_backward(dropout, zi_tape, d_zi, cats, inputs)
    d_z = d_z[:, : z.shape[1]]  # (n, latent): the covariates' columns need no gradient

    c = kl_weight / n
    d_mean = d_z + c * mean
    d_std = d_z * qz["eps"] + c * (std - std.reciprocal())
    encode_backward(module.z_encoder, qz, d_mean, d_std, enc_cats, x_t, values_t)
    if ql is not None:
        d_lib = d_library.unsqueeze(-1)  # (n, 1)
        m, s = ql["mean"], ql["std"]
        prior_var = prior.scale.square()
        d_m = d_lib + (m - prior.loc) / prior_var / n
        d_s = d_lib * ql["eps"] + (s / prior_var - s.reciprocal()) / n
        encode_backward(module.l_encoder, ql, d_m, d_s, enc_cats, x_t, values_t)
    return LossOutput(loss=loss, reconstruction_loss=reconstruction, kl_local=kl_local)


def _linear_forward(
    layers: FCLayers, z: torch.Tensor, cats: list, *, statistics_only: bool = False
) -> tuple[torch.Tensor, dict]:
    """One linear decoder map ``BN(z W [+ b] + C[s])``, as ``FCLayers.forward`` computes it.

    With ``statistics_only``, only the batch norm's running statistics are updated (the same
    values: ``batch_norm_update_stats`` is the update ``native_batch_norm`` makes).
    """
    linear, post = layers.linears[0], layers.posts[0]
    a = torch.mm(z, linear.weight) if linear.bias is None else torch.addmm(
        linear.bias, z, linear.weight)
    tables = iter(linear.cat_weights)
    for n_cat, cat in zip(linear.n_cat_list, cats):  # CovariateLinear.add_covariates, in place
        if n_cat:  # the same rows as table[codes]; index_select gathers them 5x faster
            a += next(tables).index_select(0, cat.reshape(-1).long())  # (n, genes)
    tape = {}
    if len(post):
        bn = post[0]
        bn.num_batches_tracked.add_(1)
        if statistics_only:
            torch.batch_norm_update_stats(a, bn.running_mean, bn.running_var, bn.momentum)
            return a, tape
        y, save_mean, save_invstd = torch.native_batch_norm(
            a, bn.weight, bn.bias, bn.running_mean, bn.running_var, True, bn.momentum, bn.eps)
        tape["bn"] = (a, save_mean, save_invstd)
        a = y
    return a, tape


def _linear_backward(
    layers: FCLayers, tape: dict, d: torch.Tensor, cats: list, z: torch.Tensor
) -> torch.Tensor:
    """Set the gradients of one linear decoder map from ``d`` (its output's); return ``z``'s."""
    linear, post = layers.linears[0], layers.posts[0]
    if "bn" in tape:
        bn = post[0]
        a, save_mean, save_invstd = tape["bn"]
        d, bn.weight.grad, bn.bias.grad = torch.ops.aten.native_batch_norm_backward(
            d, a, bn.weight, bn.running_mean, bn.running_var, save_mean, save_invstd, True,
            bn.eps, [True, True, True])
    tables = iter(linear.cat_weights)
    for n_cat, cat in zip(linear.n_cat_list, cats):
        if n_cat:
            table = next(tables)
            table.grad = torch.zeros_like(table).index_add_(0, cat.reshape(-1).long(), d)
    if linear.bias is not None:
        linear.bias.grad = d.sum(0)
    linear.weight.grad = z.t().mm(d)  # (latent, genes)
    return d.mm(linear.weight.t())  # (n, latent)
