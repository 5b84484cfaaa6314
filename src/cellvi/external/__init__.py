"""Convenience wrappers for users of other single-cell toolkits (scanpy)."""

from ._scvi import scvi

__all__ = ["scvi"]
