"""Native kernels: small C files compiled on first use, cached, and called through ctypes.

cellvi is a pure-Python package: nothing is compiled when it is installed. Where a C compiler
is available (``$CC``, else ``cc``, ``gcc`` or ``clang``), the first call that can use a kernel
compiles it once, in about a second, into the cache directory (``$CELLVI_CACHE_DIR``, else
``$XDG_CACHE_HOME/cellvi``, else ``~/.cache/cellvi``), under a name that depends on the source,
the compiler, the flags and the CPU, so a shared home directory on a mixed cluster is safe.
When nothing compiles (no compiler, an unusual platform), :func:`library` returns None and the
callers use their PyTorch code, which computes the same values; set
``cellvi.settings.kernels = "torch"`` to force that path.

Where torch runs GNU OpenMP (its Linux wheels), the kernels use OpenMP too and link
``libgomp.so.1``, which resolves to the copy torch has already loaded, so they share torch's
thread pool and thread count instead of starting a second one; elsewhere they run on one
thread.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch  # first: its libgomp.so.1 is the OpenMP runtime the kernels link to

from cellvi._native._libc import KEEP_FREED_BYTES, glibc
from cellvi._settings import current as current_settings

__all__ = [
    "cache_dir", "csr_matmul", "enabled", "gather_rows", "library", "ptr", "signatures",
    "status", "tune_allocator", "usable",
]

_SOURCES = ("nb_rows.c",)
_log = logging.getLogger("cellvi")
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_status = "not loaded yet"
_tried = False
_allocator_tuned = False

#: C types of the exported functions' parameters and results, as ctypes types.
_C_TYPES = {"int64_t": ctypes.c_int64, "int": ctypes.c_int, "float": ctypes.c_float,
            "double": ctypes.c_double}
_EXPORTED = re.compile(r"^(int64_t|int)\s+(cellvi_\w+)\s*\(([^)]*)\)\s*\{", re.MULTILINE)


def signatures(source: str) -> dict[str, tuple[type, list[type]]]:
    """Return the ctypes ``(restype, argtypes)`` of each ``cellvi_*`` function in ``source``.

    The C definitions are the one declaration of the interface: pointers become
    ``c_void_p``, ``int64_t``/``int``/``float``/``double`` their ctypes types.
    """
    out = {}
    for ret, name, params in _EXPORTED.findall(source):
        argtypes = []
        for param in params.split(","):
            param = " ".join(param.split())
            if "*" in param:
                argtypes.append(ctypes.c_void_p)
                continue
            kind = param.replace("const ", "").rsplit(" ", 1)[0]
            if kind not in _C_TYPES:
                raise TypeError(f"{name}: parameter {param!r} has no ctypes mapping")
            argtypes.append(_C_TYPES[kind])
        out[name] = (_C_TYPES[ret], argtypes)
    return out


def cache_dir() -> Path:
    """Directory of the compiled kernels."""
    if os.environ.get("CELLVI_CACHE_DIR"):
        return Path(os.environ["CELLVI_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cellvi"


def status() -> str:
    """Whether the native kernels are in use, and if not, why (for bug reports)."""
    return _status


def library() -> ctypes.CDLL | None:
    """Return the compiled kernels, compiling them on the first call; None if impossible."""
    global _lib, _status, _tried
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            try:
                _lib = _load()
                _status = f"in use: {_lib._name}"
            except Exception as err:  # noqa: BLE001 - any failure means: use the torch path
                _lib = None
                _status = f"not available ({err}); using the PyTorch code"
                _log.info("cellvi native kernels %s", _status)
            _tried = True
    return _lib


def enabled() -> bool:
    """Whether the kernels are allowed (``cellvi.settings.kernels``) and built."""
    return current_settings().kernels == "auto" and library() is not None


def gather_rows(X, idx, *, rows: bool, transpose: bool) -> dict | None:
    """Rows ``idx`` of a scipy CSR matrix as CSR arrays (and its transpose), in one C pass.

    Returns ``{"crow", "cols", "vals"}`` (int64, int64, float32 numpy arrays; explicit zeros
    dropped), with ``"rows"`` (each entry's row) and ``"tcrow", "tcols", "tvals"`` (the
    ``(genes, cells)`` transpose) when asked; None when ``X`` is not float32 with int32 or
    int64 indices (the caller then uses numpy).
    """
    if X.data.dtype != np.float32 or X.indptr.dtype != X.indices.dtype or (
            X.indptr.dtype not in (np.int32, np.int64)):
        return None
    idx = np.ascontiguousarray(idx, dtype=np.int64)
    n, n_cols = len(idx), X.shape[1]
    cap = int((X.indptr[idx + 1] - X.indptr[idx]).sum())
    out = {"crow": np.empty(n + 1, np.int64), "cols": np.empty(cap, np.int64),
           "vals": np.empty(cap, np.float32)}
    if rows:
        out["rows"] = np.empty(cap, np.int64)
    if transpose:
        out.update(tcrow=np.empty(n_cols + 1, np.int64), tcols=np.empty(cap, np.int64),
                   tvals=np.empty(cap, np.float32))

    def p(a):
        return None if a is None else a.ctypes.data

    nnz = library().cellvi_gather_rows(
        n, p(idx), p(X.indptr), p(X.indices), int(X.indptr.dtype == np.int64), p(X.data),
        n_cols, p(out["crow"]), p(out["cols"]), p(out["vals"]), p(out.get("rows")),
        p(out.get("tcrow")), p(out.get("tcols")), p(out.get("tvals")))
    if nnz < 0:
        raise MemoryError("cellvi_gather_rows could not allocate its counters")
    if nnz < cap:  # explicit zeros were dropped
        for k in ("cols", "vals", "rows", "tcols", "tvals"):
            if k in out:
                out[k] = out[k][:nnz]
    return out


def usable(*tensors) -> bool:
    """Whether the kernels apply to these tensors: float32 on the CPU, and the kernels built.

    None entries are ignored; ``cellvi.settings.kernels = "torch"`` turns the kernels off.
    """
    if not enabled():
        return False
    for t in tensors:
        if t is not None and (t.device.type != "cpu" or t.dtype != torch.float32):
            return False
    return True


def ptr(t) -> int | None:
    """Address of a tensor's first element for a ctypes call; None for None."""
    return None if t is None else t.data_ptr()


def csr_matmul(crow, cols, values, dense):
    """Return ``A @ dense`` for the CSR matrix ``A = (crow, cols, values)`` (float32, CPU).

    ``dense`` is ``(n_cols, K)``; each output row is written once (no zero-fill, no copy).
    """
    n_rows = crow.shape[0] - 1
    dense = dense.contiguous()
    crow, cols = crow.to(torch.int64), cols.to(torch.int64)
    out = torch.empty(n_rows, dense.shape[1], dtype=dense.dtype)
    library().cellvi_csr_matmul(n_rows, dense.shape[1], ptr(crow), ptr(cols), ptr(values),
                                ptr(dense), ptr(out), torch.get_num_threads())
    return out


def _cpu_tag() -> str:
    """Describe the CPU's instruction set (``-march=native`` depends on it)."""
    tag = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("flags", "Features", "model name")):
                    tag += line
    except OSError:
        pass
    return tag


def _flag_sets() -> list[list[str]]:
    arch = ["-mcpu=native"] if platform.machine() in ("arm64", "aarch64") else ["-march=native"]
    base = ["-O3", "-fPIC", "-shared", "-std=gnu11"]
    sets = [base + arch, base]
    if _torch_uses_libgomp():  # link the runtime torch already runs: one shared thread pool
        sets = [s + ["-fopenmp"] for s in sets] + sets
    return sets


def _torch_uses_libgomp() -> bool:
    """Whether GNU OpenMP (``libgomp``) is loaded in this process (torch's Linux wheels).

    Other torch builds (Intel or LLVM OpenMP, macOS) get single-threaded kernels rather than a
    second OpenMP runtime competing with torch's for the same cores.
    """
    try:
        with open("/proc/self/maps") as fh:
            return any("libgomp" in line for line in fh)
    except OSError:
        return False


def _compilers() -> list[str]:
    names = [os.environ["CC"]] if os.environ.get("CC") else []
    names += ["cc", "gcc", "clang"]
    found = []
    for name in names:
        path = shutil.which(name)
        if path and path not in found:
            found.append(path)
    return found


def _load() -> ctypes.CDLL:
    here = Path(__file__).parent
    source = "".join((here / name).read_text() for name in _SOURCES)
    compilers = _compilers()
    if not compilers:
        raise RuntimeError("no C compiler found (set $CC)")
    errors = []
    out_dir = cache_dir()
    for cc in compilers:
        version = _run([cc, "--version"]).stdout.splitlines()[:1]
        for flags in _flag_sets():
            key = hashlib.sha256(
                "\n".join([source, cc, *version, *flags, _cpu_tag(), sys.platform]).encode()
            ).hexdigest()[:16]
            target = out_dir / f"cellvi_native_{key}.so"
            if not target.exists():
                out_dir.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
                os.close(fd)
                try:
                    sources = [str(here / name) for name in _SOURCES]
                    proc = _run([cc, *flags, "-o", tmp, *sources, "-lm"])
                    if proc.returncode != 0:
                        errors.append(f"{cc} {' '.join(flags)}: {proc.stderr.strip()[-300:]}")
                        continue
                    os.replace(tmp, target)  # atomic: other processes see all or nothing
                finally:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
            try:
                lib = ctypes.CDLL(str(target))
            except OSError as err:
                errors.append(f"{target}: {err}")
                continue
            for name, (restype, argtypes) in signatures(source).items():
                fn = getattr(lib, name)
                fn.argtypes, fn.restype = argtypes, restype
            return lib
    raise RuntimeError("compilation failed: " + " | ".join(errors))


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def tune_allocator() -> bool:
    """Keep freed memory in the process between training steps (glibc only; once per process).

    A training step allocates and frees a few tensors of 1-4 MB. With glibc's default
    settings, freeing them shrinks the heap, and the next step maps and zeroes the same pages
    again: about 700 page faults per 128-cell step on 2,000 genes, 15-20 % of the step. This
    sets ``M_MMAP_THRESHOLD`` to 32 MiB (smaller blocks come from the heap) and
    ``M_TRIM_THRESHOLD`` to 256 MiB (the heap keeps up to that much free memory), which is what
    glibc's own adaptive rule converges to for such programs, minus the trimming. The peak
    memory is unchanged; the process may hold up to 256 MiB of freed memory afterwards.
    Called by ``train()`` and the queries of the models (a process-wide change, recorded in
    ``model.train_settings``); skipped when ``cellvi.settings.memory_allocator`` is
    ``"system"``, on other C libraries, and on other systems. Returns whether it applied.
    """
    global _allocator_tuned
    if _allocator_tuned or current_settings().memory_allocator != "tuned":
        return _allocator_tuned
    libc = glibc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = (mallopt(_M_MMAP_THRESHOLD, 32 << 20) == 1
          and mallopt(_M_TRIM_THRESHOLD, KEEP_FREED_BYTES) == 1)
    _allocator_tuned = ok
    return ok
