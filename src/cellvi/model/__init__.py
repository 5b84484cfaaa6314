"""User-facing models: each a thin class around a module of :mod:`cellvi.module`."""

from ._base import BaseModel
from .linear_scvi import LinearSCVI
from .scanvi import SCANVI
from .scvi import SCVI
from .vaec import VAECModel

__all__ = ["BaseModel", "LinearSCVI", "SCANVI", "SCVI", "VAECModel"]
