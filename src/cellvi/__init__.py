"""cellvi: deep generative models of single-cell omics counts (the scVI family)."""

__version__ = "0.1.0"

from . import data, de, distributions, external, model, module, nn  # noqa: E402
from ._settings import settings  # noqa: E402

__all__ = [
    "data",
    "de",
    "distributions",
    "external",
    "model",
    "module",
    "nn",
    "settings",
    "__version__",
]
