"""softmax_rate equals softmax + library scaling, values and gradients, native or not."""

import pytest
import torch

import cellvi
from cellvi import _native
from cellvi.nn._rate import softmax_rate


def _plain(logits, library, floor):
    scale = logits.softmax(-1)
    return scale, library.exp() * scale + floor


@pytest.mark.parametrize("kernels", ["auto", "torch"])
@pytest.mark.parametrize("layout", ["cells", "strided", "samples"])
def test_softmax_rate_matches_plain_formula(kernels, layout, monkeypatch):
    monkeypatch.setattr(cellvi.settings, "kernels", kernels)
    gen = torch.Generator().manual_seed(0)
    n, g = 37, 203
    if layout == "samples":  # (samples, cells, genes) logits, (cells, 1) library shared
        logits = torch.randn(3, n, g, generator=gen) * 4
    elif layout == "strided":  # the first half of a fused decoder head
        logits = (torch.randn(n, 2 * g, generator=gen) * 4)[:, :g]
    else:
        logits = torch.randn(n, g, generator=gen) * 4
    logits[..., 0, :5] = torch.tensor([-200.0, 90.0, 0.0, -1e3, 5.0])  # underflow and spread
    library = torch.randn(n, 1, generator=gen) + 7
    logits = logits.detach().requires_grad_()
    library.requires_grad_()
    scale, rate = softmax_rate(logits, library, 1e-8)
    ref64 = [t.detach().double().requires_grad_() for t in (logits, library)]
    ref_scale, ref_rate = _plain(*ref64, 1e-8)
    torch.testing.assert_close(scale.double(), ref_scale, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(rate.double(), ref_rate, rtol=1e-5, atol=1e-6)
    w_scale = torch.randn(scale.shape, generator=gen)
    w_rate = torch.randn(rate.shape, generator=gen) * 1e-3
    for use_scale in (True, False):  # the loss may use the rate only
        loss = (rate * w_rate).sum() + ((scale * w_scale).sum() if use_scale else 0)
        grads = torch.autograd.grad(loss, (logits, library))
        ref_loss = (ref_rate * w_rate.double()).sum() + (
            (ref_scale * w_scale.double()).sum() if use_scale else 0)
        refs = torch.autograd.grad(ref_loss, ref64, retain_graph=True)
        for a, b in zip(grads, refs):
            assert a.shape == b.shape
            torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))
        scale, rate = softmax_rate(logits, library, 1e-8)


def test_native_softmax_rate_is_used_and_keeps_nan():
    if _native.library() is None:
        pytest.skip(_native.status())
    logits = torch.randn(4, 100, requires_grad=True)
    scale, rate = softmax_rate(logits, torch.zeros(4, 1), 0.0)
    assert "SoftmaxRate" in type(scale.grad_fn).__name__
    bad = logits.detach().clone()
    bad[1, 7] = float("nan")
    scale, rate = softmax_rate(bad, torch.zeros(4, 1), 0.0)
    assert torch.isnan(scale[1]).all() and torch.isfinite(scale[[0, 2, 3]]).all()
