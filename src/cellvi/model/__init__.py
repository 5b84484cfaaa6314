"""User-facing models: each a thin class around a module of :mod:`cellvi.module`."""

from ._base import BaseModel
from .autozi import AUTOZI
from .gimvi import GIMVI
from .linear_scvi import LinearSCVI
from .scanvi import SCANVI
from .scvi import SCVI
from .totalvi import TOTALVI
from .vaec import VAECModel

__all__ = ["AUTOZI", "BaseModel", "GIMVI", "LinearSCVI", "SCANVI", "SCVI", "TOTALVI", "VAECModel"]
