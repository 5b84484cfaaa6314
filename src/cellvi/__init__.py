"""cellvi: deep generative models of single-cell omics counts (the scVI family)."""

__version__ = "0.1.0"

from . import data, de, distributions, external, metrics, model, module, nn, pl, plot, tune  # noqa: E402
from ._settings import settings  # noqa: E402

__all__ = [
    "data",
    "de",
    "distributions",
    "external",
    "metrics",
    "model",
    "module",
    "nn",
    "pl",
    "plot",
    "settings",
    "tune",
    "__version__",
]
