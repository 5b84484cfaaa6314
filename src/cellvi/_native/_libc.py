"""The process's C library through ctypes, where it is glibc (Linux); None elsewhere."""

from __future__ import annotations

import ctypes
import functools
import sys

#: Freed memory cellvi lets the process keep for reuse: glibc's trim threshold as
#: :func:`cellvi._native.tune_allocator` sets it, and the largest result block
#: :mod:`cellvi._native._outputs` keeps.
KEEP_FREED_BYTES = 256 << 20


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
