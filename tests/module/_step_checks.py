"""The check every written-out step's test makes: its gradients and buffers equal autograd's."""

from __future__ import annotations

import torch
from torch import nn


def assert_same_gradients(written: nn.Module, reference: nn.Module, zero: set[str], *,
                          rtol: float) -> None:
    """Assert the gradients and buffers of ``written`` equal those of ``reference``.

    ``reference`` was trained one step through autograd, ``written`` through the written-out
    step from the same state. Parameters in ``zero`` (biases followed by batch norm: their
    true gradient is zero) must be rounding-small in both; the others equal to float32
    summation order (``rtol``, and an absolute tolerance of 1e-5 of the largest entry); a
    parameter without a gradient in one must have none in the other; buffers (batch-norm
    running statistics and counts) must be equal.
    """
    params = dict(written.named_parameters())
    ref_params = dict(reference.named_parameters())
    for name, p in reference.named_parameters():
        g, ref = params[name].grad, p.grad
        assert (g is None) == (ref is None), name  # e.g. the NB's unused zero-inflation map
        if ref is None:
            continue
        if name in zero:
            bound = 1e-4 * ref_params[name.replace("bias", "weight")].grad.abs().max()
            assert g.abs().max() <= bound and ref.abs().max() <= bound, name
            continue
        torch.testing.assert_close(g, ref, rtol=rtol, atol=1e-5 * ref.abs().max().item(),
                                   msg=name)
    buffers = dict(written.named_buffers())
    for name, b in reference.named_buffers():
        assert torch.equal(buffers[name], b), name
