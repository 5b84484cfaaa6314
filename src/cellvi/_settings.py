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
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeVar


@dataclass
class Settings:
    """Package-wide settings, available as ``cellvi.settings``.

    Attributes
    ----------
    seed
        Seed of everything random in a model when no ``seed`` is passed: its parameter
        initialisation, and in ``train`` the train/validation split, the minibatch order and
        the training noise. With the same seed (default 0) two runs on the same data give the
        same model, as with ``scvi.settings.seed``. ``None``: fresh randomness each time.
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
    batch_size
        Cells per forward pass of the queries when none is given (None: about 2^22 / genes
        values per pass, e.g. 2,048 cells of 2,000 genes; scvi-tools' setting of that name).
    num_threads
        Set torch's CPU threads (``torch.set_num_threads``) when assigned; None leaves them.
    dl_num_workers
        scvi-tools' data-loader workers: accepted for compatibility; cellvi gathers
        minibatches in the training process (a compiled gather, about 0.1 ms per minibatch),
        so it has no effect.
    verbosity
        Level of the ``"cellvi"`` logger (``logging.WARNING`` by default; ``"INFO"`` or
        ``logging.INFO`` say more), set when assigned.
    """

    seed: int | None = 0
    kernels: Literal["auto", "torch"] = "auto"
    memory_allocator: Literal["tuned", "system"] = "tuned"
    batch_size: int | None = None
    num_threads: int | None = None
    dl_num_workers: int = 0
    verbosity: int | str = logging.WARNING

    def __setattr__(self, name: str, value) -> None:
        if name == "kernels" and value not in ("auto", "torch"):
            raise ValueError(f"settings.kernels must be 'auto' or 'torch', got {value!r}.")
        if name == "memory_allocator" and value not in ("tuned", "system"):
            raise ValueError(
                f"settings.memory_allocator must be 'tuned' or 'system', got {value!r}.")
        if name == "seed" and value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"settings.seed must be None or an integer >= 0, got {value!r}.")
        if name == "batch_size" and value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"settings.batch_size must be None or an integer >= 1, got "
                             f"{value!r}.")
        if name == "num_threads" and value is not None:
            import torch

            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"settings.num_threads must be an integer >= 1, got {value!r}.")
            torch.set_num_threads(value)
        if name == "verbosity":
            logging.getLogger("cellvi").setLevel(value)
        object.__setattr__(self, name, value)

    def as_dict(self) -> dict[str, object]:
        """Return the settings as a plain dict (recorded with each trained model)."""
        return {"seed": self.seed, "kernels": self.kernels,
                "memory_allocator": self.memory_allocator, "batch_size": self.batch_size,
                "num_threads": self.num_threads}


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
