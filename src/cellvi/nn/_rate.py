r"""Normalised expression and expected counts from the decoder's logits, in one pass.

.. math::

    \rho = \mathrm{softmax}(h), \qquad \mu = e^{\ell} \rho + \epsilon,

with :math:`h` the decoder's ``(..., cells, genes)`` logits, :math:`\ell` the log library size
and :math:`\epsilon` a tiny floor (see :data:`cellvi.module.vae.RATE_FLOOR`). On float32 CPU
tensors the compiled kernel ``cellvi/_native/nb_rows.c`` computes both outputs in one pass and
the gradient in another, with

.. math::

    \frac{\partial}{\partial h} = \rho \odot (y - \langle \rho, y\rangle), \quad
    y = \bar\rho + e^{\ell} \bar\mu, \qquad
    \frac{\partial}{\partial \ell} = e^{\ell} \langle \rho, \bar\mu \rangle,

where :math:`\bar\rho, \bar\mu` are the upstream gradients; elsewhere it is the same three
PyTorch operations.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from cellvi import _native

__all__ = ["softmax_rate"]


def softmax_rate(
    logits: torch.Tensor, library: torch.Tensor, floor: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(softmax(logits, -1), exp(library) * softmax(logits, -1) + floor)``.

    ``logits`` is ``(..., cells, genes)`` (a view with strided rows is fine); ``library`` is the
    log library size, broadcastable to ``(..., cells, 1)``.
    """
    if _native.usable(logits, library) and logits.dim() >= 1 and logits.shape[-1] > 0:
        return _SoftmaxRate.apply(logits, library, float(floor))
    scale = logits.softmax(-1)
    rate = library.exp() * scale
    return scale, (rate + floor if floor else rate)


class _SoftmaxRate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, library, floor):  # noqa: D102
        lead, n_genes = logits.shape[:-1], logits.shape[-1]
        rows = lead.numel()
        flat = logits.reshape(rows, n_genes)
        if flat.stride(-1) != 1:
            flat = flat.contiguous()
        log_lib = library.expand(*lead, 1).reshape(rows).contiguous()
        scale = torch.empty(rows, n_genes, dtype=logits.dtype)
        rate = torch.empty(rows, n_genes, dtype=logits.dtype)
        _native.library().cellvi_softmax_rate(
            rows, n_genes, _native.ptr(flat), flat.stride(0), _native.ptr(log_lib), floor,
            _native.ptr(scale), _native.ptr(rate), torch.get_num_threads())
        ctx.save_for_backward(scale, log_lib)
        ctx.shapes = (logits.shape, library.shape)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None, not zeros
        return scale.reshape(logits.shape), rate.reshape(logits.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_scale, g_rate):  # noqa: D102
        scale, log_lib = ctx.saved_tensors
        logits_shape, library_shape = ctx.shapes
        rows, n_genes = scale.shape
        g_scale = None if g_scale is None else g_scale.reshape(rows, n_genes).contiguous()
        g_rate = None if g_rate is None else g_rate.reshape(rows, n_genes).contiguous()
        d_logits = torch.empty_like(scale)
        want_lib = ctx.needs_input_grad[1] and g_rate is not None
        d_lib = torch.empty(rows, dtype=scale.dtype) if want_lib else None
        if g_scale is None and g_rate is None:
            d_logits.zero_()
        else:
            _native.library().cellvi_softmax_rate_backward(
                rows, n_genes, _native.ptr(scale), _native.ptr(log_lib), _native.ptr(g_scale),
                _native.ptr(g_rate), _native.ptr(d_logits), _native.ptr(d_lib),
                torch.get_num_threads())
        if d_lib is not None:  # summed over what the library was broadcast along
            d_lib = d_lib.reshape(*logits_shape[:-1], 1).sum_to_size(library_shape)
        return d_logits.reshape(logits_shape), d_lib, None
