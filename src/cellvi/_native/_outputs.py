"""Memory for the queries' large results, reused from one call to the next.

A query such as ``get_normalized_expression`` returns a new ``(cells, genes)`` array on every
call. Made with ``torch.empty``, its memory has to be faulted in anew each time (about 1 ms
per 4 MB, a fifth of the call on 10,000 cells x 1,000 genes), for two reasons:

- glibc maps blocks above its mmap threshold (at most 32 MiB) separately and unmaps them when
  freed, so each call maps and zeroes fresh pages;
- below it, ``torch.empty`` asks for 64-byte aligned memory (``posix_memalign``), which looks
  for a little more than the block the previous result freed; that block does not fit, the heap
  grows, and the new pages are faulted in.

:func:`empty` takes the memory from ``malloc`` itself (aligned to 64 bytes by hand, so each
request matches the block freed by the one before), and keeps the most recently freed result
block, up to 256 MiB, to hand to the next result that fits it. At most one such block is held;
a request it does not fit frees it. ``cellvi.settings.memory_allocator = "system"`` turns this
off (plain ``torch.empty``), as it does on systems without glibc.
"""

from __future__ import annotations

import ctypes
import functools
import math
import threading
import weakref

import numpy as np
import torch

from cellvi._native._libc import KEEP_FREED_BYTES, glibc
from cellvi._settings import current as current_settings

__all__ = ["empty", "held_bytes"]

_MIN_BYTES = 1 << 20  # smaller results gain nothing: glibc's heap reuses them as they are
_KEEP_BYTES = KEEP_FREED_BYTES  # the largest freed block kept for reuse
_ALIGN = 64

_lock = threading.Lock()
_spare: tuple[int, int] | None = None  # (address, bytes) of the one freed block kept


@functools.cache
def _malloc_free():
    """Return glibc's ``malloc`` and ``free`` through ctypes, or None elsewhere."""
    libc = glibc()
    if libc is None:
        return None
    malloc, free = libc.malloc, libc.free
    malloc.restype, malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    free.restype, free.argtypes = None, [ctypes.c_void_p]
    return malloc, free


def empty(shape: tuple[int, ...]) -> torch.Tensor:
    """Return an uninitialised float32 CPU tensor of ``shape``, like ``torch.empty``.

    A result of 1 MiB or more takes its memory from ``malloc`` as the module's docstring says,
    when ``cellvi.settings.memory_allocator`` is ``"tuned"`` (glibc only). The memory is
    released when the tensor and every array or view made from it are gone, and the last block
    released is kept for the next result. Otherwise this is ``torch.empty``.
    """
    count = math.prod(shape)
    nbytes = 4 * count
    functions = _malloc_free() if current_settings().memory_allocator == "tuned" else None
    if functions is None or nbytes < _MIN_BYTES:
        return torch.empty(shape, dtype=torch.float32)
    malloc, free = functions
    global _spare
    with _lock:
        block, _spare = _spare, None
    if block is not None and not nbytes + _ALIGN <= block[1] <= 2 * nbytes:
        free(block[0])  # too small, or much too large to hold on to for this result
        block = None
    if block is None:
        address = malloc(nbytes + _ALIGN)
        if not address:
            raise MemoryError(f"could not allocate {nbytes / 2**20:.0f} MiB for the result")
        block = (address, nbytes + _ALIGN)
    start = -(-block[0] // _ALIGN) * _ALIGN  # the first 64-byte boundary in the block
    memory = (ctypes.c_float * count).from_address(start)
    done = weakref.finalize(memory, _release, *block)  # when no array uses ``memory`` any more
    done.atexit = False
    return torch.from_numpy(np.frombuffer(memory, dtype=np.float32).reshape(shape))


def _release(address: int, nbytes: int) -> None:
    """Keep a freed result block for the next result (freeing the one kept before)."""
    global _spare
    free = _malloc_free()[1]
    if nbytes > _KEEP_BYTES:
        free(address)
        return
    with _lock:
        old, _spare = _spare, (address, nbytes)
    if old is not None:
        free(old[0])


def held_bytes() -> int:
    """Return the bytes of freed result memory kept for reuse (0 or one block)."""
    block = _spare
    return 0 if block is None else block[1]
