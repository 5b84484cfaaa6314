r"""``torch.optim.Adam(fused=True)`` without its first-use cost: the same update, the same state.

Building or stepping a ``torch.optim`` optimizer imports ``torch._dynamo`` (its
``add_param_group`` and ``step`` are wrapped to keep the compiler out), which takes 1.1 s in a
fresh process on the 2-core test machine: a quarter of the 20-epoch Kang benchmark's
training time, paid by every first ``train()``. :class:`FusedAdam` is a
``torch.optim.Optimizer`` (schedulers accept it, ``state_dict``/``load_state_dict`` work and
are interchangeable with ``torch.optim.Adam``'s) whose step calls the same fused kernel,
``torch._fused_adam_``, directly. A test checks that its parameters and state are equal, bit
for bit, to ``torch.optim.Adam(fused=True)``'s after every step.

The update (L2 weight decay added to the gradient, as ``torch.optim.Adam`` does):

.. math::

    g_t = \nabla f(\theta_{t-1}) + \lambda \theta_{t-1}, \quad
    m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t, \quad
    v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2, \\
    \theta_t = \theta_{t-1}
        - \eta\, \frac{m_t / (1 - \beta_1^t)}{\sqrt{v_t / (1 - \beta_2^t)} + \epsilon}.

:func:`make_adam` is the one seam: it returns a :class:`FusedAdam` when the fused kernel exists
and every parameter is a floating-point tensor on the CPU or a CUDA device, else
``torch.optim.Adam`` itself (the reference path).
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from collections.abc import Iterable

import torch

__all__ = ["FusedAdam", "make_adam"]

_HOOKS = ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks",
          "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks",
          "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks")


def _plain(fn):
    """Return the undecorated function behind torch's ``_disable_dynamo`` wrapper, or None."""
    return getattr(fn, "__wrapped__", None)


def available(params: list[torch.Tensor]) -> bool:
    """Whether :class:`FusedAdam` can run on ``params``."""
    return (hasattr(torch, "_fused_adam_") and _plain(torch.optim.Optimizer.add_param_group)
            is not None and bool(params)
            and all(p.dtype.is_floating_point and p.device.type in ("cpu", "cuda")
                    for p in params))


class FusedAdam(torch.optim.Optimizer):
    """Adam as ``torch.optim.Adam(fused=True)`` computes it, without importing the compiler.

    Parameters
    ----------
    params
        Parameters or parameter groups (dicts with ``"params"`` and any option).
    lr, betas, eps, weight_decay
        As for ``torch.optim.Adam``.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        # what torch.optim.Optimizer.__init__ sets, with add_param_group called undecorated
        self.defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                             amsgrad=False, maximize=False, foreach=None, capturable=False,
                             differentiable=False, fused=True, decoupled_weight_decay=False)
        for name in _HOOKS:
            setattr(self, name, OrderedDict())
        self.state = defaultdict(dict)
        self.param_groups = []
        groups = list(params)
        if not groups:
            raise ValueError("optimizer got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for group in groups:
            self.add_param_group(group)

    def add_param_group(self, param_group: dict) -> None:  # noqa: D102
        _plain(torch.optim.Optimizer.add_param_group)(self, param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the gradients (``set_to_none=False``: zero them), as torch's optimizers do."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_().zero_()

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102
        loss = None if closure is None else closure()
        for group in self.param_groups:
            params, grads, exp_avg, exp_avg_sq, steps = [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p,
                                                           memory_format=torch.preserve_format)
                params.append(p)
                grads.append(p.grad)
                exp_avg.append(state["exp_avg"])
                exp_avg_sq.append(state["exp_avg_sq"])
                steps.append(state["step"])
            if not params:
                continue
            torch._foreach_add_(steps, 1.0)
            beta1, beta2 = group["betas"]
            for device in {p.device for p in params}:  # the kernel takes one device at a time
                on = [i for i, p in enumerate(params) if p.device == device]
                torch._fused_adam_(
                    [params[i] for i in on], [grads[i] for i in on], [exp_avg[i] for i in on],
                    [exp_avg_sq[i] for i in on], [], [steps[i] for i in on], lr=group["lr"],
                    beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                    eps=group["eps"], amsgrad=False, maximize=False,
                )
        return loss


def make_adam(params: Iterable[torch.Tensor], *, lr: float, eps: float,
              weight_decay: float) -> torch.optim.Optimizer:
    """Adam over ``params``: :class:`FusedAdam` where it runs, else ``torch.optim.Adam``."""
    params = list(params)
    if available(params):
        return FusedAdam(params, lr=lr, eps=eps, weight_decay=weight_decay)
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.Adam(params, lr=lr, eps=eps, weight_decay=weight_decay, fused=fused)
