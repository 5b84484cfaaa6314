"""Package-wide settings, and the snapshot of them that one call runs with.

``cellvi.settings`` is what the user sets. A public entry point (``train`` and the queries of
the models) takes a snapshot of it when it starts (:func:`snapshot_settings`), and everything
below it reads that snapshot through :func:`current`: a call runs with the settings it started
with, whatever changes meanwhile, and ``model.train_settings["settings"]`` records them.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeVar


@dataclass
class Settings:
    """Package-wide settings, available as ``cellvi.settings``.

    Attributes
    ----------
    seed
        Seed of the parameter initialisation of every new model (models built with the same
        seed on the same data start from the same parameters); ``None`` draws from torch's
        global generator.
    kernels
        ``"auto"`` (default): compute the NB/ZINB likelihood of float32 CPU tensors with a
        small C kernel, compiled on first use (about a second) when a C compiler is found and
        cached (see :mod:`cellvi._native`), else with PyTorch operations. ``"torch"``: always
        the PyTorch operations. Both give the same values up to float32 rounding. With the
        kernels, SCVI models with scVI's usual settings train on the CPU through a step whose
        gradients are written out instead of recorded by autograd (the same loss and gradients,
        about a fifth faster; see :mod:`cellvi.module._vae_step`); ``"torch"`` also turns that
        off.
    memory_allocator
        ``"tuned"`` (default): on Linux with glibc, the first minibatch sets glibc's
        ``M_MMAP_THRESHOLD`` (32 MiB) and ``M_TRIM_THRESHOLD`` (256 MiB) so that memory freed
        after a training step is reused instead of being returned to the system and faulted
        in again (15-20 % of a CPU step; see :func:`cellvi._native.tune_allocator`). It is a
        process-wide setting. Large query results (``get_normalized_expression``) take their
        memory from ``malloc`` directly, and the last one freed (up to 256 MiB) is kept for the
        next call's result (see :mod:`cellvi._native._outputs`). ``"system"``: leave the C
        library's allocator as it is, and make results with ``torch.empty``.
    """

    seed: int | None = 0
    kernels: Literal["auto", "torch"] = "auto"
    memory_allocator: Literal["tuned", "system"] = "tuned"


    def as_dict(self) -> dict[str, object]:
        """Return the settings as a plain dict (recorded with each trained model)."""
        return {"seed": self.seed, "kernels": self.kernels,
                "memory_allocator": self.memory_allocator}


settings = Settings()

_active: contextvars.ContextVar[Settings | None] = contextvars.ContextVar(
    "cellvi_settings", default=None)

F = TypeVar("F", bound=Callable)


def current() -> Settings:
    """Return the settings of the running call (its snapshot), else ``cellvi.settings``."""
    return _active.get() or settings


def snapshot_settings(fn: F) -> F:
    """Run ``fn`` with a snapshot of ``cellvi.settings`` taken when it is called.

    Nested calls keep the outermost snapshot.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _active.get() is not None:
            return fn(*args, **kwargs)
        token = _active.set(dataclasses.replace(settings))
        try:
            return fn(*args, **kwargs)
        finally:
            _active.reset(token)

    return wrapper
