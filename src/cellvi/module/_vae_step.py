r"""The scVI training step with its gradients written out: no autograd graph on the hot path.

:class:`~cellvi.module.VAE` trained by :func:`~cellvi.train.train_module` is, for the settings
most users train with (see :func:`supports`), one minibatch of :math:`n` cells through

.. math::

    a^{(0)} &= \log(1 + X)\, W_0 + b_0, \qquad
    h^{(0)} = \mathrm{drop}\big(\mathrm{relu}(\mathrm{BN}(a^{(0)}))\big)
    \quad (\text{more layers alike}), \\
    [m, v] &= h W_q^\top + b_q, \quad \sigma^2 = e^{v} + \epsilon_v, \quad
    z = m + \varepsilon \sigma, \\
    h' &= \mathrm{relu}\big(\mathrm{BN}(z W_1 + b_1 + C[s])\big), \quad
    \rho = \mathrm{softmax}(h' W_s^\top + b_s), \quad
    \pi = h' W_d^\top + b_d, \quad \mu = e^{\ell} \rho + 10^{-8}, \\
    L &= \frac1n \sum_i \Big[-\log \mathrm{ZINB}(x_i \mid \mu_i, \theta, \pi_i)
        + w \sum_k \big(\tfrac12(\sigma_{ik}^2 + m_{ik}^2 - 1) - \log \sigma_{ik}\big)\Big].

:func:`training_step` computes :math:`L` exactly as ``VAE.forward`` does (the same operations
in the same order, drawing the same random numbers) and then the gradient of every parameter
by the chain rule written out below, in about 60 tensor operations instead of the ~600 an
autograd graph dispatches and records. The likelihood, its gradient and the softmax's
backward are one compiled kernel (``cellvi_nb_softmax_train``): since the loss is a mean, the
upstream gradient of each cell's log-likelihood, :math:`-1/n`, is known before the step, and
neither the expected counts nor their derivatives are ever written out.

The backward pass, from the heads down (:math:`\bar u` is :math:`\partial L / \partial u`):

.. math::

    \bar W_s &= \bar{\mathrm{logits}}^\top h', \quad \bar W_d = \bar\pi^\top h', \quad
    \bar h' = \bar{\mathrm{logits}}\, W_s + \bar\pi\, W_d, \quad
    \bar a' = \mathrm{BN}^\top(\bar h' \odot [h' > 0]), \\
    \bar W_1 &= z^\top \bar a', \quad \bar C = \textstyle\sum_{i: s_i = c} \bar a'_i, \quad
    \bar z = \bar a' W_1^\top, \\
    \bar m &= \bar z + \tfrac{w}{n} m, \quad
    \bar\sigma = \bar z \varepsilon + \tfrac{w}{n}(\sigma - 1/\sigma), \quad
    \bar v = \bar\sigma \, e^{v} / (2\sigma), \\
    \bar W_q &= [\bar m, \bar v]^\top h, \quad \bar h = [\bar m, \bar v]\, W_q, \quad
    \bar W_0 = \log(1 + X)^\top \,\mathrm{BN}^\top(\bar h \odot \mathrm{mask}),

with :math:`\mathrm{BN}^\top` batch normalisation's own backward (``native_batch_norm_backward``).
A test checks the loss, every gradient, the batch-norm statistics and the random stream
against autograd through ``VAE.forward`` for each supported option.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from cellvi import _native, keys
from cellvi.distributions._rowsum import nb_log_prob_rows_softmax_grad
from cellvi.nn import DecoderSCVI
from cellvi.nn._layers import CovariateLinear, Dropout, FCLayers

from ._base import RATE_FLOOR, LossOutput, row_sums

__all__ = ["SUPPORTED", "WRITES_OUT", "supports", "training_step", "unsupported"]

Tensors = dict[str, torch.Tensor]


def _any(value: Any) -> bool:
    return True


#: Every option of :class:`~cellvi.module.vae.VAEConfig`, with the values for which
#: :func:`training_step` computes exactly what ``VAE.forward`` and autograd compute. An option
#: that is not listed here makes the step refuse (a test checks that every option is listed, so
#: a new option of the VAE must be classified here before the suite passes).
SUPPORTED: dict[str, Callable[[Any], bool]] = {
    "n_input": _any,
    "n_batch": _any,
    "n_labels": _any,
    "n_hidden": _any,
    "n_latent": _any,
    "n_layers": _any,
    "n_continuous_cov": lambda v: v == 0,
    "n_cats_per_cov": _any,
    "dropout_rate": _any,
    "dispersion": lambda v: v == "gene",
    "log_variational": _any,
    "gene_likelihood": lambda v: v in ("zinb", "nb"),
    "latent_distribution": lambda v: v == "normal",
    "encode_covariates": lambda v: v is False,
    "deeply_inject_covariates": _any,
    "use_batch_norm": _any,
    "use_layer_norm": lambda v: v == "none",
    "use_size_factor_key": lambda v: v is False,
    "use_observed_lib_size": lambda v: v is True,
    "library_log_means": _any,  # unused with the observed library size
    "library_log_vars": _any,
    "var_activation": lambda v: v is None,
}

#: The methods of the VAE whose computation the step writes out: a module class that
#: overrides any of them computes something else, and trains through autograd.
WRITES_OUT = ("forward", "inference", "generative", "loss", "inference_inputs",
              "generative_inputs", "_theta", "_decoder_cats", "_decoder_input",
              "_encoder_input", "_make_decoder", "_make_encoder", "_encoder_cat_list")


def unsupported(module: nn.Module, *, device: torch.device | str = "cpu",
                sparse: bool = True) -> str | None:
    """Why :func:`training_step` does not apply to ``module`` here, or None when it does.

    It applies to a module with the VAE's computation (see :data:`WRITES_OUT`) whose config
    passes :data:`SUPPORTED`, with float32 parameters, trained on the CPU on sparse
    minibatches with the compiled kernels available.
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
    decoder, encoder = module.decoder, module.z_encoder
    if type(decoder) is not DecoderSCVI or decoder.scale_activation != "softmax":
        return "the decoder is not scVI's softmax decoder"
    if encoder.var_activation is not torch.exp:
        return "the encoder's variance activation is not exp"
    if not (_plain_layers(encoder.encoder) and _plain_layers(decoder.px_decoder)):
        return "the layers are not linear -> [batch norm] -> ReLU -> [dropout]"
    if not all(p.dtype == torch.float32 and p.device.type == "cpu"
               for p in module.parameters()):
        return "the parameters are not float32 on the CPU"
    return None


def supports(module: nn.Module, *, device: torch.device | str = "cpu",
             sparse: bool = True) -> bool:
    """Whether ``module`` trains through :func:`training_step` (on ``device``)."""
    fused = getattr(module, "fused_training_step", None)
    return fused is not None and fused(device=device, sparse=sparse)[0] is not None


def _plain_layers(layers: FCLayers) -> bool:
    """Linear -> [batch norm] -> ReLU -> [dropout] in every layer (what the step writes out)."""
    for linear, post in zip(layers.linears, layers.posts):
        kinds = [type(m) for m in post]
        if kinds and kinds[0] is nn.BatchNorm1d:
            bn = post[0]
            if not (bn.affine and bn.track_running_stats and bn.momentum is not None):
                return False
            kinds = kinds[1:]
        if kinds not in ([nn.ReLU], [nn.ReLU, Dropout]):
            return False
        if kinds[-1] is Dropout and post[-1].inplace:
            return False
        if type(linear) is not CovariateLinear or linear.bias is None:
            return False
    return True


@torch.no_grad()
def training_step(module: nn.Module, tensors: Tensors, kl_weight: float) -> LossOutput:
    """Loss of a sparse minibatch, with each parameter's ``.grad`` set to its gradient.

    ``module`` must satisfy :func:`supports`, be in training mode, and ``tensors`` hold the
    counts as a CSR tensor with its transpose (``keys.X``, ``keys.X_T``), as the training
    loop's sparse minibatches do. Gradients are written, not accumulated: call it on a model
    whose gradients are None (``optimizer.zero_grad()``). Returns what ``module(tensors,
    kl_weight=...)[2]`` returns (without an autograd graph).
    """
    x, x_t = tensors[keys.X], tensors[keys.X_T]
    batch_index = tensors[keys.BATCH]
    cat_covs = tensors.get(keys.CAT_COVS)
    encoder = module.z_encoder
    n = x.shape[0]

    # ---- forward, as VAE.inference / generative / loss compute it
    values = torch.log1p(x.values()) if module.log_variational else x.values()
    values_t = torch.log1p(x_t.values()) if module.log_variational else x_t.values()
    z, enc = encode(encoder, x, values, [])  # (n, latent)
    mean, std, eps = enc["mean"], enc["std"], enc["eps"]
    library = torch.log(row_sums(x)).unsqueeze(-1)  # (n, 1)

    cats = module._decoder_cats(batch_index, cat_covs, None)
    h1, dec_tape, logits, zi = decoder_forward(module, z, cats)  # (n, hidden), ..., (n, genes)
    theta = module.px_r.exp()  # (genes,)

    weights = torch.full((n,), -1.0 / n)  # d loss / d log p(x_i), known before the step
    log_px, d_logits, d_zi, d_theta = nb_log_prob_rows_softmax_grad(
        x, logits, library, RATE_FLOOR, theta, zi, weights)  # (n,), (n, genes), ..., (genes,)

    reconstruction = -log_px  # (n,)
    kl_z = (0.5 * (std.square() + mean.square() - 1) - std.log()).sum(-1)  # (n,)
    loss = torch.mean(reconstruction + kl_weight * kl_z)

    # ---- backward
    d_z = decoder_backward(module, h1, dec_tape, cats, d_logits, d_zi, d_theta * theta)

    c = kl_weight / n
    d_mean = d_z + c * mean
    d_std = d_z * eps + c * (std - std.reciprocal())
    encode_backward(encoder, enc, d_mean, d_std, [], x_t, values_t)
    return LossOutput(loss=loss, reconstruction_loss=reconstruction, kl_local={"kl_z": kl_z})


def decoder_forward(
    module: nn.Module, z: torch.Tensor, cats: list
) -> tuple[torch.Tensor, list, torch.Tensor, torch.Tensor | None]:
    """Run scVI's decoder on ``z`` as ``DecoderSCVI`` does, up to its heads' outputs.

    Returns the hidden output ``h1``, what :func:`_layers_forward` recorded, the scale head's
    logits and the zero-inflation logits (None unless the likelihood is the ZINB).
    """
    decoder = module.decoder
    h1, tape = _layers_forward(decoder.px_decoder, None, z, cats)  # (n, hidden)
    scale, dropout = decoder.px_scale_decoder, decoder.px_dropout_decoder
    logits = nn.functional.linear(h1, scale.weight, scale.bias)  # (n, genes)
    zinb = module.gene_likelihood == "zinb"
    zi = nn.functional.linear(h1, dropout.weight, dropout.bias) if zinb else None
    return h1, tape, logits, zi


def decoder_backward(
    module: nn.Module, h1: torch.Tensor, tape: list, cats: list, d_logits: torch.Tensor,
    d_zi: torch.Tensor | None, d_px_r: torch.Tensor,
) -> torch.Tensor:
    """Set the gradients of scVI's decoder from those of its heads; return ``d z`` ``(n, latent)``.

    ``h1`` is the hidden output the heads read and ``tape`` what :func:`_layers_forward`
    recorded for the decoder's layers; ``d_logits`` / ``d_zi`` the gradients of the scale and
    zero-inflation heads' outputs (``d_zi`` None for the NB), ``d_px_r`` that of ``px_r``.
    """
    decoder = module.decoder
    scale, dropout = decoder.px_scale_decoder, decoder.px_dropout_decoder
    module.px_r.grad = d_px_r
    scale.weight.grad = d_logits.t().mm(h1)  # (genes, hidden)
    scale.bias.grad = d_logits.sum(0)
    d_h1 = d_logits.mm(scale.weight)  # (n, hidden)
    if d_zi is not None:
        dropout.weight.grad = d_zi.t().mm(h1)
        dropout.bias.grad = d_zi.sum(0)
        d_h1.addmm_(d_zi, dropout.weight)
    return _layers_backward(decoder.px_decoder, tape, d_h1, cats, need_input_grad=True)


def encode(
    encoder: nn.Module, x: torch.Tensor, values: torch.Tensor, cats: list,
    dense: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """Forward of an :class:`~cellvi.nn.Encoder` on sparse rows, as ``Encoder.forward`` does it.

    ``x`` is the CSR minibatch, ``values`` the encoder's input values on its pattern
    (``log1p`` of the counts, or the counts); ``cats`` the categorical codes injected in its
    layers (empty unless the covariates are encoded); ``dense`` the ``(n, n_cont)`` columns
    that follow the genes (encoded continuous covariates), or None. Returns the
    reparameterised sample ``mean + eps * std`` ``(n, n_output)`` (drawing the dropout masks,
    then ``eps``, as the module does) and what :func:`encode_backward` needs: ``mean``,
    ``std``, ``eps``.
    """
    crow, cols = x.crow_indices(), x.col_indices()
    first = encoder.encoder.linears[0]
    if dense is None:
        a0 = nn.functional.embedding_bag(cols, first.weight, crow[:-1], mode="sum",
                                         per_sample_weights=values) + first.bias  # (n, hidden)
    else:  # as CovariateLinear on SparseRows with dense columns
        n_genes = x.shape[1]
        a0 = nn.functional.embedding_bag(cols, first.weight[:n_genes], crow[:-1], mode="sum",
                                         per_sample_weights=values)
        a0 = a0 + dense @ first.weight[n_genes:]
        a0 = a0 + first.bias
    sample, saved = encode_from_first_layer(encoder, a0, cats)
    saved["dense"] = dense
    return sample, saved


def encode_from_first_layer(
    encoder: nn.Module, a0: torch.Tensor, cats: list
) -> tuple[torch.Tensor, dict]:
    """Run the rest of an encoder's forward, given its first layer's pre-activation ``a0``.

    Returns the reparameterised sample ``(n, n_output)`` and what the backward needs, as
    :func:`encode` does (whatever computed ``a0``: sparse or dense products).
    """
    h, tape = _layers_forward(encoder.encoder, a0, None, cats)  # (n, hidden)
    mean, raw_var = nn.functional.linear(h, encoder.mean_var.weight,
                                         encoder.mean_var.bias).chunk(2, dim=-1)  # (n, out)
    exp_var = raw_var.exp()
    var = exp_var + encoder.var_eps
    std = var.sqrt()
    eps = torch.empty_like(mean).normal_()  # as Normal.rsample
    sample = mean + eps * std  # (n, out)
    return sample, {"h": h, "tape": tape, "mean": mean, "std": std, "eps": eps,
                    "exp_var": exp_var}


def encode_backward(
    encoder: nn.Module, saved: dict, d_mean: torch.Tensor, d_std: torch.Tensor, cats: list,
    x_t: torch.Tensor, values_t: torch.Tensor,
) -> None:
    """Set the gradients of an encoder from those of its posterior's ``mean`` and ``std``.

    ``saved`` is what :func:`encode` returned; ``x_t`` the minibatch's transposed CSR and
    ``values_t`` the encoder's input values on its pattern.
    """
    d_a0 = backward_to_first_layer(encoder, saved, d_mean, d_std, cats).contiguous()
    first = encoder.encoder.linears[0]
    grad = _native.csr_matmul(x_t.crow_indices(), x_t.col_indices(), values_t,
                              d_a0)  # (genes, hidden)
    dense = saved.get("dense")
    if dense is not None:  # the rows of the dense columns
        grad = torch.cat([grad, dense.t().mm(d_a0)])  # (genes + n_cont, hidden)
    first.weight.grad = grad


def backward_to_first_layer(
    encoder: nn.Module, saved: dict, d_mean: torch.Tensor, d_std: torch.Tensor, cats: list
) -> torch.Tensor:
    """Set an encoder's gradients above its first layer's product; return ``d a0`` ``(n, hidden)``.

    ``saved`` is what :func:`encode_from_first_layer` returned; the first layer's bias gradient
    is set too, its weight gradient (sparse or dense product) is the caller's.
    """
    d_raw_var = d_std * saved["exp_var"] / (2 * saved["std"])
    d_out = torch.cat([d_mean, d_raw_var], dim=-1)  # (n, 2 out)
    encoder.mean_var.weight.grad = d_out.t().mm(saved["h"])
    encoder.mean_var.bias.grad = d_out.sum(0)
    d_h = d_out.mm(encoder.mean_var.weight)  # (n, hidden)
    d_a0 = _layers_backward(encoder.encoder, saved["tape"], d_h, cats, need_input_grad=False)
    encoder.encoder.linears[0].bias.grad = d_a0.sum(0)
    return d_a0


def _layers_forward(
    layers: FCLayers, a0: torch.Tensor | None, x: torch.Tensor | None, cats: list
) -> tuple[torch.Tensor, list]:
    """Run ``layers`` (first pre-activation ``a0`` given, or computed from ``x``).

    Returns the output and, per layer, what its backward needs.
    """
    tape = []
    for i, (linear, post) in enumerate(zip(layers.linears, layers.posts)):
        # the first layer's sparse product (and bias) is given as a0; its input is then None
        a = a0 if i == 0 and a0 is not None else torch.addmm(linear.bias, x, linear.weight)
        a = linear.add_covariates(a, cats)  # (n, out)
        saved = {"input": x}
        y = a
        if isinstance(post[0], nn.BatchNorm1d):
            bn = post[0]
            bn.num_batches_tracked.add_(1)
            y, save_mean, save_invstd = torch.native_batch_norm(
                a, bn.weight, bn.bias, bn.running_mean, bn.running_var, True, bn.momentum,
                bn.eps)
            saved.update(bn=(a, save_mean, save_invstd))
        y = torch.relu(y)
        saved["relu"] = y
        drop = post[-1]
        if isinstance(drop, Dropout) and drop.p > 0:
            keep = torch.zeros_like(y) if drop.p == 1 else drop.keep_mask(y)
            saved["keep"] = keep
            y = y * keep
        tape.append(saved)
        x = y
    return x, tape


def _layers_backward(
    layers: FCLayers, tape: list, d_out: torch.Tensor, cats: list, *, need_input_grad: bool
) -> torch.Tensor:
    """Set the gradients of ``layers`` from ``d_out``; return the gradient of its input.

    For the first layer, the gradient of its pre-activation is returned when its input is
    sparse (``tape[0]["input"]`` is None); the caller sets that layer's weight gradient.
    """
    d = d_out
    for i in range(len(tape) - 1, -1, -1):
        linear, post, saved = layers.linears[i], layers.posts[i], tape[i]
        if "keep" in saved:
            d = d * saved["keep"]
        d = torch.ops.aten.threshold_backward(d, saved["relu"], 0)
        if "bn" in saved:
            bn = post[0]
            a, save_mean, save_invstd = saved["bn"]
            d, bn.weight.grad, bn.bias.grad = torch.ops.aten.native_batch_norm_backward(
                d, a, bn.weight, bn.running_mean, bn.running_var, save_mean, save_invstd, True,
                bn.eps, [True, True, True])
        weights = iter(linear.cat_weights)
        for n_cat, cat in zip(linear.n_cat_list, cats):
            if n_cat:
                table = next(weights)
                table.grad = torch.zeros_like(table).index_add_(0, cat.reshape(-1).long(), d)
        x = saved["input"]
        if x is None:  # the sparse first layer: its weight gradient is the caller's
            return d
        linear.bias.grad = d.sum(0)
        linear.weight.grad = x.t().mm(d)  # (in, out)
        if i > 0 or need_input_grad:
            d = d.mm(linear.weight.t())  # (n, in)
    return d
