"""User-facing models: each a thin class around a module of :mod:`cellvi.module`."""

from ._base import BaseModel
from .scvi import SCVI

__all__ = ["BaseModel", "SCVI"]
