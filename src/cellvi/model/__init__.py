"""User-facing models: each a thin class around a module of :mod:`cellvi.module`."""

from ._base import BaseModel
from .scanvi import SCANVI
from .scvi import SCVI
from .vaec import VAECModel

__all__ = ["BaseModel", "SCANVI", "SCVI", "VAECModel"]
