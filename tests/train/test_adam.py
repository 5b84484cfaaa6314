"""FusedAdam is torch.optim.Adam(fused=True), step for step, without importing the compiler."""

import subprocess
import sys

import pytest
import torch

from cellvi.train._adam import FusedAdam, make_adam


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(30, 7, generator=g)),
            torch.nn.Parameter(torch.randn(7, generator=g))]


@pytest.mark.parametrize("weight_decay", [0.0, 1e-3])
def test_same_parameters_and_state_as_torch_adam(weight_decay):
    ours, ref = _params(), _params()
    a = FusedAdam(ours, lr=1e-2, eps=0.01, weight_decay=weight_decay)
    b = torch.optim.Adam(ref, lr=1e-2, eps=0.01, weight_decay=weight_decay, fused=True)
    for step in range(20):
        for p, q in zip(ours, ref):
            p.grad = torch.cos(p * (step + 1))
            q.grad = torch.cos(q * (step + 1))
        if step == 7:  # a parameter without a gradient is skipped by both
            ours[1].grad = ref[1].grad = None
        a.step()
        b.step()
        for p, q in zip(ours, ref):
            assert torch.equal(p, q)
    sa, sb = a.state_dict(), b.state_dict()
    for k in sb["state"]:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(sa["state"][k][name], sb["state"][k][name])


def test_state_dict_moves_between_the_two_and_schedulers_accept_it():
    a = FusedAdam(_params(), lr=0.1)
    for p in a.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    a.step()
    b = torch.optim.Adam(_params(), lr=0.5, fused=True)
    b.load_state_dict(a.state_dict())
    assert b.param_groups[0]["lr"] == 0.1
    a2 = FusedAdam(_params(), lr=0.5)
    a2.load_state_dict(b.state_dict())
    assert a2.param_groups[0]["lr"] == 0.1 and len(a2.state) == 2
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(a2, patience=0, factor=0.5)
    sched.step(1.0)
    sched.step(2.0)
    assert a2.param_groups[0]["lr"] == 0.05


def test_it_does_not_import_the_compiler():
    code = ("import sys, torch; from cellvi.train._adam import FusedAdam; "
            "p = torch.nn.Parameter(torch.ones(3)); o = FusedAdam([p]); p.grad = p * 1; "
            "o.step(); o.zero_grad(); print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_make_adam_falls_back_to_torch(monkeypatch):
    assert isinstance(make_adam(_params(), lr=1e-3, eps=1e-8, weight_decay=0), FusedAdam)
    monkeypatch.delattr(torch, "_fused_adam_")
    opt = make_adam(_params(), lr=1e-3, eps=1e-8, weight_decay=0)
    assert type(opt) is torch.optim.Adam
