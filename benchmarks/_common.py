"""Shared helpers for the cellvi-vs-scvi-tools benchmarks.

Every measurement runs in a fresh Python subprocess (:func:`run_worker`) so that the peak
resident memory (``VmHWM``) and the import cost belong to one tool only. A worker writes a
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

# scVI's defaults, given explicitly to both tools so that both train the same model
MODEL_KWARGS = dict(
    n_hidden=128, n_latent=10, n_layers=1, dropout_rate=0.1, dispersion="gene",
    gene_likelihood="zinb",
)
LR = 1e-3
BATCH_SIZE = 128
TRAIN_SIZE = 0.9
N_EPOCHS_KL_WARMUP = 400

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
def thread_env(n_threads: int, gpu: bool = False) -> dict[str, str]:
    """Environment for a worker limited to ``n_threads`` (set before torch/numba import).

    Unless ``gpu``, any GPU is hidden: a CPU comparison even on a machine with one.
    """
    env = dict(os.environ)
    for key in _THREAD_ENV:
        env[key] = str(n_threads)
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
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
    """Peak resident set size of this process so far, in MiB.

    On Linux this is ``VmHWM`` from ``/proc/self/status``: the high-water mark of this
    program's own memory. ``ru_maxrss`` is not: ``exec`` carries the parent's peak into it
    (the kernel keeps the larger of the two), so a worker started by a driver that had imported
    both tools (about 560 MiB) reported at least that much, whatever it used itself. Elsewhere
    ``ru_maxrss`` is used.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 if sys.platform != "darwin" else rss / 2**20


def minor_faults() -> int:
    """Minor page faults of this process so far: mostly pages it touched for the first time."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def fresh_memory_ms_per_mb(mib: int = 64) -> dict:
    """Time writing ``mib`` MiB of freshly mapped memory, then the same memory again.

    The first pass faults every page in; the second writes memory that is already there. On
    the test VM the first costs about twenty times the second, and every call that returns a
    large new array pays it (BENCHMARKS.md, eighth round).
    Returns ``{"fresh_ms_per_mib", "resident_ms_per_mib"}``.
    """
    import mmap

    size = mib << 20
    with mmap.mmap(-1, size) as m:
        a = np.frombuffer(m, dtype=np.uint8)
        start = time.perf_counter()
        a[:] = 1
        fresh = time.perf_counter() - start
        start = time.perf_counter()
        a[:] = 2
        resident = time.perf_counter() - start
        del a
    return {"fresh_ms_per_mib": fresh * 1e3 / mib, "resident_ms_per_mib": resident * 1e3 / mib}


# --------------------------------------------------------------------------------------------
# subprocesses
# --------------------------------------------------------------------------------------------
def run_worker(script: str | os.PathLike, args: Sequence[str], n_threads: int,
               quiet: bool = False, gpu: bool = False) -> dict:
    """Run ``python script --worker-out FILE *args`` in a fresh process; return its JSON dict.

    The worker inherits this interpreter (run the benchmarks with ``.bench-venv/bin/python``)
    and a thread-limited environment. Its stdout/stderr pass through unless ``quiet``.
    """
    with tempfile.TemporaryDirectory(prefix="cellvi-bench-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(script), "--worker-out", str(out), *map(str, args)]
        start = time.perf_counter()
        proc = subprocess.run(
            cmd, env=thread_env(n_threads, gpu), cwd=REPO_ROOT,
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


def print_comparison(results: dict[str, list[dict]], metrics: Sequence[tuple], title: str = "",
                     ) -> None:
    """Print one row per metric, one column per tool, and the cellvi-vs-scvi-tools comparison.

    ``results`` maps a tool name to its list of worker dicts (one per repeat); ``metrics`` is a
    list of ``(key, label, digits, compare)`` with ``compare`` either ``"ratio"``
    (cellvi / scvi-tools, e.g. for times and memory) or ``"reldiff"`` (``(cellvi - scvi-tools) /
    |scvi-tools|``, e.g. for ELBOs). Values are mean ± sd over repeats; a fifth element
    ``"min"`` shows the minimum over repeats instead (best time on a shared, noisy machine).
    """
    tools = [t for t in TOOLS if results.get(t)]
    both = len(tools) == 2
    header = ["metric", *tools] + (["cellvi vs scvi-tools"] if both else [])
    rows = []
    for key, label, digits, compare, *stat in metrics:
        cells = [label]
        means = {}
        for tool in tools:
            values = [r.get(key) for r in results[tool]]
            if stat == ["min"]:
                mean, std = _summary([min(v for v in values if v is not None)])
            else:
                mean, std = _summary(values)
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


# --------------------------------------------------------------------------------------------
# reference environment (used by bench_speed.py)
# --------------------------------------------------------------------------------------------
BENCH_VENV = REPO_ROOT / ".bench-venv"
SETUP_SCRIPT = REPO_ROOT / "benchmarks" / "setup_reference.sh"


def ensure_reference_env(script: str | os.PathLike, argv: Sequence[str]) -> None:
    """Make sure the benchmark runs in ``.bench-venv`` with scvi-tools installed.

    Runs ``setup_reference.sh`` when the environment is missing (or cannot import scvi-tools),
    then, if this interpreter is not the reference one, re-executes ``script argv`` with it.
    Returns only when the current interpreter can import both scvi-tools and cellvi.
    """
    py = BENCH_VENV / "bin" / "python"
    ok = py.exists() and subprocess.run(
        [str(py), "-c", "import scvi, cellvi"], env=thread_env(1),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    ).returncode == 0
    if not ok:
        print(f"[bench] reference environment missing or broken: running {SETUP_SCRIPT}",
              flush=True)
        subprocess.run(["bash", str(SETUP_SCRIPT)], check=True, cwd=REPO_ROOT)
    if Path(sys.prefix).resolve() != BENCH_VENV.resolve():
        print(f"[bench] re-running with {py}", flush=True)
        os.execv(str(py), [str(py), str(script), *argv])


# --------------------------------------------------------------------------------------------
# machine load: is anything else using the CPUs?
# --------------------------------------------------------------------------------------------
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_stat_busy_s() -> float | None:
    """CPU seconds spent busy by the whole machine since boot (all cores), from /proc/stat."""
    try:
        with open("/proc/stat") as fh:
            fields = fh.readline().split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in fields[:7])
    return (user + nice + system + irq + softirq) / _CLK_TCK


def _own_cpu_s() -> float:
    """CPU seconds used by this process (all threads) and its finished children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class CpuMonitor:
    """CPU used by *other* processes while a block runs, in cores (machine busy minus ours).

    ``with mon: ...`` then ``mon.others_cores`` (e.g. 0.05 on a quiet machine, 1.0 when another
    process kept one core busy) and ``mon.own_cores`` (this process's average parallelism).
    """

    def __enter__(self):
        self._t0 = time.perf_counter()
        self._busy0 = _proc_stat_busy_s()
        self._own0 = _own_cpu_s()
        self.loadavg_start = os.getloadavg()[0]
        return self

    def __exit__(self, *exc):
        wall = max(time.perf_counter() - self._t0, 1e-9)
        busy1 = _proc_stat_busy_s()
        own = _own_cpu_s() - self._own0
        self.wall_s = wall
        self.own_cores = own / wall
        self.others_cores = (
            float("nan") if busy1 is None or self._busy0 is None
            else max(0.0, (busy1 - self._busy0 - own) / wall)
        )
        return False


def others_busy_cores(sample_s: float = 3.0) -> float:
    """Cores kept busy by other processes during the next ``sample_s`` seconds (we sleep)."""
    with CpuMonitor() as mon:
        time.sleep(sample_s)
    return mon.others_cores


def wait_for_quiet(loadavg_max: float = 1.5, others_max: float = 0.5, max_wait_s: float = 180,
                   poll_s: float = 20, sample_s: float = 3.0, log=print) -> dict:
    """Wait (polling) until the machine is quiet enough for a timed measurement.

    Quiet means the 1-minute load average is at most ``loadavg_max`` *or* other processes use at
    most ``others_max`` cores over a ``sample_s`` sample taken while we sleep. (The load average
    also counts our own recent work, e.g. the worker that just finished, and decays over about
    a minute; the sample does not.) Gives up after ``max_wait_s`` and measures anyway.

    Returns ``{"loadavg1", "others_cores", "waited_s", "quiet"}`` at the time it returned;
    ``waited_s`` counts the polling sleeps only, not the ``sample_s`` samples.
    """
    waited = 0.0
    while True:
        others = others_busy_cores(sample_s)
        load = os.getloadavg()[0]
        quiet = load <= loadavg_max or others <= others_max
        if quiet or waited + poll_s > max_wait_s:
            return {"loadavg1": load, "others_cores": others, "waited_s": waited,
                    "quiet": quiet}
        log(f"[bench] machine busy (1-min load {load:.2f}, other processes {others:.2f} "
            f"cores); waiting {poll_s:.0f} s ...")
        time.sleep(poll_s)
        waited += poll_s


# --------------------------------------------------------------------------------------------
# reporting: medians and scvi-tools / cellvi speed-ups
# --------------------------------------------------------------------------------------------
def _median_range(values: Sequence[float]) -> tuple[float, float, float]:
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    arr = arr[~np.isnan(arr)]
    if arr.size == 0:
        return float("nan"), float("nan"), float("nan")
    return float(np.median(arr)), float(arr.min()), float(arr.max())


def _fmt_median(values: Sequence[float], digits: int) -> str:
    med, lo, hi = _median_range(values)
    if np.isnan(med):
        return "-"
    text = f"{med:,.{digits}f}"
    if hi > lo:
        text += f" [{lo:,.{digits}f}, {hi:,.{digits}f}]"
    return text


def print_speedup_table(results: dict[str, list[dict]],
                        metrics: Sequence[tuple[str, str, int, str]], title: str = "") -> str:
    """Print (and return) one row per metric: the median [min, max] over repeats per tool, and
    the comparison, oriented so that a value above 1 favours cellvi.

    ``compare`` is ``"time"`` (scvi-tools / cellvi: the speed-up), ``"rate"`` (cellvi /
    scvi-tools, for throughputs), ``"mem"`` (scvi-tools / cellvi), ``"reldiff"``
    (``(cellvi - scvi-tools) / |scvi-tools|`` in %, e.g. for ELBOs) or ``""`` (no comparison).
    Comparisons use the medians.
    """
    tools = [t for t in TOOLS if results.get(t)]
    both = len(tools) == 2
    header = ["metric", *tools] + (["scvi-tools/cellvi"] if both else [])
    rows = []
    for key, label, digits, compare in metrics:
        if not any(r.get(key) is not None for t in tools for r in results[t]):
            continue
        cells = [label]
        med = {}
        for tool in tools:
            vals = [r.get(key) for r in results[tool]]
            med[tool] = _median_range(vals)[0]
            cells.append(_fmt_median(vals, digits))
        if both:
            a, b = med["cellvi"], med["scvi-tools"]
            if not compare or np.isnan(a) or np.isnan(b) or a == 0 or b == 0:
                cells.append("")
            elif compare in ("time", "mem"):
                cells.append(f"x{b / a:.2f}")
            elif compare == "rate":
                cells.append(f"x{a / b:.2f}")
            else:
                cells.append(f"{100 * (a - b) / abs(b):+.2f}% (c-s)/|s|")
        rows.append(cells)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    out = [f"\n{title}"] if title else []
    out.append(line)
    out.append("  ".join(h.ljust(w) if i == 0 else h.rjust(w)
                         for i, (h, w) in enumerate(zip(header, widths))))
    out.append(line)
    for r in rows:
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(r, widths))))
    out.append(line)
    text = "\n".join(out)
    print(text, flush=True)
    return text
