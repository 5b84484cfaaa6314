"""Shared helpers for the cellvi-vs-scvi-tools benchmarks.

Every measurement runs in a fresh Python subprocess (:func:`run_worker`) so that the peak
resident memory (``ru_maxrss``) and the import cost belong to one tool only. A worker writes a
JSON dict to the path it is given; the parent collects these dicts and prints them side by side
(:func:`print_comparison`).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
KANG_PATH = REPO_ROOT.parent / "shared" / "data" / "kang_ifnb"
TOOLS = ("cellvi", "scvi-tools")

_THREAD_ENV = (
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS",
)


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
def load_kang(path: str | os.PathLike = KANG_PATH, n_top_genes: int | None = 2000):
    """Kang et al. IFN-beta PBMCs (ctrl + stim, ``obs["batch"]``) as cells x genes raw counts.

    Uses cellvi's own reader (``cellvi.data.kang_ifnb``) so both tools get the very same
    matrix and gene selection.
    """
    from cellvi.data import kang_ifnb

    return kang_ifnb(path, n_top_genes=n_top_genes)


def split_indices(n: int, train_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The train/validation split cellvi's ``model.train(train_size=, seed=)`` makes.

    ``numpy.random.default_rng(seed).permutation(n)``: the first ``ceil(train_size * n)`` cells
    train, the rest validate (both sorted). The benchmarks hand this split to scvi-tools
    explicitly and check that cellvi made the same one, so both are scored on the same cells.
    """
    perm = np.random.default_rng(seed).permutation(n)
    n_train = int(np.ceil(train_size * n))
    return np.sort(perm[:n_train]), np.sort(perm[n_train:])


# --------------------------------------------------------------------------------------------
# threads, timers, memory
# --------------------------------------------------------------------------------------------
def thread_env(n_threads: int) -> dict[str, str]:
    """Environment for a worker limited to ``n_threads`` (set before torch/numba import)."""
    env = dict(os.environ)
    for key in _THREAD_ENV:
        env[key] = str(n_threads)
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU comparison, even on a machine with a GPU
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env


def set_threads(n_threads: int) -> None:
    """Limit torch's intra- and inter-op thread pools (call once, early, in the worker)."""
    import torch

    torch.set_num_threads(n_threads)
    try:
        torch.set_num_interop_threads(n_threads)
    except RuntimeError:  # already set, or parallel work has started
        pass


class Timer:
    """Wall-clock timer: ``with timer("train"): ...`` then ``timer.times["train"]`` (seconds)."""

    def __init__(self):
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 if sys.platform != "darwin" else rss / 2**20


# --------------------------------------------------------------------------------------------
# subprocesses
# --------------------------------------------------------------------------------------------
def run_worker(script: str | os.PathLike, args: Sequence[str], n_threads: int,
               quiet: bool = False) -> dict:
    """Run ``python script --worker-out FILE *args`` in a fresh process; return its JSON dict.

    The worker inherits this interpreter (run the benchmarks with ``.bench-venv/bin/python``)
    and a thread-limited environment. Its stdout/stderr pass through unless ``quiet``.
    """
    with tempfile.TemporaryDirectory(prefix="cellvi-bench-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(script), "--worker-out", str(out), *map(str, args)]
        start = time.perf_counter()
        proc = subprocess.run(
            cmd, env=thread_env(n_threads), cwd=REPO_ROOT,
            stdout=subprocess.PIPE if quiet else None,
            stderr=subprocess.STDOUT if quiet else None, text=True,
        )
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            tail = (proc.stdout or "")[-4000:] if quiet else ""
            raise RuntimeError(f"worker failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
        result = json.loads(out.read_text())
    result["process_wall_s"] = wall
    return result


def write_result(path: str | os.PathLike, result: dict) -> None:
    """Write a worker's result (adding its peak RSS) as JSON."""
    result = {**result, "peak_rss_mb": peak_rss_mb()}
    Path(path).write_text(json.dumps(result, indent=1, default=_to_builtin))


def _to_builtin(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj)}")


# --------------------------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------------------------
def _summary(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def _fmt(mean: float, std: float, digits: int) -> str:
    if np.isnan(mean):
        return "-"
    text = f"{mean:,.{digits}f}"
    return text + (f" ± {std:,.{digits}f}" if std > 0 else "")


def print_comparison(results: dict[str, list[dict]], metrics: Sequence[tuple[str, str, int, str]],
                     title: str = "") -> None:
    """Print one row per metric, one column per tool, and the cellvi-vs-scvi-tools comparison.

    ``results`` maps a tool name to its list of worker dicts (one per repeat); ``metrics`` is a
    list of ``(key, label, digits, compare)`` with ``compare`` either ``"ratio"``
    (cellvi / scvi-tools, e.g. for times and memory) or ``"reldiff"`` (``(cellvi - scvi-tools) /
    |scvi-tools|``, e.g. for ELBOs). Values are mean ± sd over repeats.
    """
    tools = [t for t in TOOLS if results.get(t)]
    both = len(tools) == 2
    header = ["metric", *tools] + (["cellvi vs scvi-tools"] if both else [])
    rows = []
    for key, label, digits, compare in metrics:
        cells = [label]
        means = {}
        for tool in tools:
            mean, std = _summary([r.get(key) for r in results[tool]])
            means[tool] = mean
            cells.append(_fmt(mean, std, digits))
        if both:
            a, b = means["cellvi"], means["scvi-tools"]
            if np.isnan(a) or np.isnan(b) or b == 0:
                cells.append("-")
            elif compare == "ratio":
                cells.append(f"x{a / b:.2f}")
            else:
                cells.append(f"{100 * (a - b) / abs(b):+.2f}%")
        rows.append(cells)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    if title:
        print(f"\n{title}")
    print(line)
    print("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in
                    enumerate(zip(header, widths))))
    print(line)
    for r in rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                        enumerate(zip(r, widths))))
    print(line)
