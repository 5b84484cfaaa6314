"""cellvi's Adam takes exactly the steps of torch.optim.Adam; the plateau rule matches torch's."""

import pytest
import torch

from cellvi.train._adam import Adam, ReduceLROnPlateau


def _params(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(7, 5, generator=g)),
            torch.nn.Parameter(torch.randn(5, generator=g))]


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_adam_matches_torch(fused, weight_decay):
    ours, ref = _params(0), _params(0)
    opt = Adam(ours, lr=1e-2, eps=0.01, weight_decay=weight_decay)
    opt._fused = opt._fused and fused
    ref_opt = torch.optim.Adam(ref, lr=1e-2, eps=0.01, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(1)
    for step in range(25):
        grads = [torch.randn(p.shape, generator=g) for p in ours]
        for p, q, gr in zip(ours, ref, grads):
            p.grad, q.grad = gr.clone(), gr.clone()
        if step == 3:  # a parameter without a gradient is left alone by both
            ours[1].grad = ref[1].grad = None
        opt.step()
        ref_opt.step()
        for p, q in zip(ours, ref):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
    opt.zero_grad()
    assert all(p.grad is None for p in ours)


def test_adam_rejects_no_parameters():
    with pytest.raises(ValueError, match="no trainable parameters"):
        Adam([torch.nn.Parameter(torch.zeros(2), requires_grad=False)])


def test_plateau_matches_torch():
    ours = Adam(_params(0), lr=1.0)
    ref_opt = torch.optim.Adam(_params(0), lr=1.0)
    sched = ReduceLROnPlateau(ours, factor=0.5, patience=2)
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(ref_opt, mode="min", factor=0.5,
                                                     patience=2, threshold=0.0)
    values = [5, 4, 4, 4, 4, 3, 3.5, 3.2, 3.1, 3.0, 2.9, 3, 3, 3, 3, 3, 3, 3, 3]
    for v in values:
        sched.step(v)
        ref.step(v)
        assert ours.lr == pytest.approx(ref_opt.param_groups[0]["lr"])
    assert ours.lr < 1.0
