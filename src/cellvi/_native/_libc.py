"""The process's C library through ctypes, where it is glibc (Linux); None elsewhere."""

from __future__ import annotations

import ctypes
import functools
import sys


@functools.cache
def glibc() -> ctypes.CDLL | None:
    """Return the loaded C library if it is glibc on Linux, else None (looked up once)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - raises AttributeError when libc is not glibc
    except (OSError, AttributeError):
        return None
    return libc
