"""Head-to-head speed and memory: cellvi vs scvi-tools 1.4.2 on the same data and settings.

For every dataset the two tools run alternately, ``--repeats`` times each (the order flips
every repeat), each run in a fresh subprocess so that its peak resident memory (``VmHWM``)
and its timings belong to one tool only. Every run uses the same settings: scVI with the
default architecture (n_hidden 128, n_latent 10, 1 layer, dropout 0.1, ZINB, gene dispersion),
Adam lr 1e-3, batch size 128, ``train_size=0.9`` with the *same* validation cells for both
tools (``_common.split_indices``, passed to scvi-tools as ``external_indexing``), KL warm-up
over 400 epochs, no early stopping, CPU only, ``--threads`` threads (``torch.set_num_threads``
plus OMP/MKL/OPENBLAS/NUMBA env vars), ``obs["batch"]`` as ``batch_key`` when the data has
batches. scvi-tools gets ``accelerator="cpu"``, no progress bar, and
``check_val_every_n_epoch=1`` (``--scvi-val-every``): by default it would skip the validation
pass that cellvi makes every epoch.

Each run measures, after import and setup:

* ``model.train(...)`` for E epochs: wall time, training throughput (training cells x E / s);
  also the time of each epoch (training steps plus the validation pass; cellvi's history
  ``time`` column, a Lightning callback for scvi-tools), the steady throughput (training cells
  / median epoch time) and the time ``train()`` spends outside the epochs (set-up);
* the validation ELBO after E epochs: the last epoch of the history (scvi-tools logs the
  *negative* ELBO, negated here) and ``get_elbo`` on the fixed validation cells (torch seeded);
* ``get_latent_representation()``, ``get_normalized_expression()`` on all cells, default
  arguments, and ``get_marginal_ll(indices=subset, n_mc_samples=N)`` on a fixed subset of cells:
  each called ``--query-calls`` times back to back after one quiet check (torch seeded before
  every call, so every call does the same work). The table gives the first call (which follows
  the 3 s quiet check and, in a fresh process, faults in its output's pages) and the median of
  all the calls (what a session that keeps querying a model gets);
* the peak RSS after training and at the end of the process;
* the CPU used by *other* processes during training (``others_cores``), to judge validity.

Before each timed block the machine must be quiet (``_common.wait_for_quiet``): the 1-minute
load average at most 1.5 or other processes using at most 0.5 cores (measured over 3 s while we
sleep); otherwise it polls every 20 s, up to ``--max-wait`` s per run and ``--wait-budget`` s in
all, and then measures anyway. The load before and during each timed block is recorded.

Datasets (``--datasets``, comma-separated):

* ``kang``: Kang et al. IFN-beta PBMCs, 2,000 cells, 2,000 most variable genes, batch ctrl/stim;
* ``tenx``: ``../shared/data/tenx_10k_subset.h5ad``, 10,000 cells x 1,000 genes, no batches
  (cells without any count are dropped, for both tools: cellvi refuses them);
* ``sim100k``: simulated NB counts, 100,000 x 2,000 CSR, ~6% non-zero, 2 batches (cached);
* ``sim1m``: simulated, 1,000,000 x 2,000 CSR, cellvi only: one epoch, wall time and peak RSS.

* ``dens<P>`` (e.g. ``dens27``): simulated NB counts at ``P`` % non-zero entries,
  ``--density-cells`` x ``--density-genes`` (20,000 x 2,000) with ``--density-batches`` (3)
  batches; ``--density-sweep 5,12,27,47`` adds one such dataset per share. The genes' mean
  expression is shifted (one constant on the log scale, found by bisection on the expected
  share of non-zero entries) so that the share is ``P`` %; types, batch effects and
  dispersions are those of the other simulations.

Simulated data are generated chunk-wise (never densified) with a fixed seed and cached as
``.h5ad`` under ``--cache-dir``, so both tools read identical files.

Models (``--models``, comma-separated, default ``scvi``): ``scvi`` (the settings above),
``linearscvi`` (LinearSCVI with its defaults, given to both tools: NB, a modelled library,
batch norm, no decoder bias) and ``scanvi`` (SCANVI from scratch with the settings above, the
labels ``obs["cell_type"]`` with a fixed ``--scanvi-unlabeled`` share of cells, 0.5, set to
``"Unknown"``; cellvi without its post-training calibration, which scvi-tools does not do).
The same protocol for each: one subprocess per run, tools alternating, the same split. The
queries are timed for ``scvi`` only; the other models report training and the validation
ELBO.

Run::

    python benchmarks/bench_speed.py                  # sets up .bench-venv if needed, ~40 min
    python benchmarks/bench_speed.py --datasets kang --repeats 1 --epochs-kang 2
    python benchmarks/bench_speed.py --density-sweep 5,12,27,47 --models scvi,linearscvi,scanvi \\
        --repeats 2                                   # the density sweep against scvi-tools
    python benchmarks/bench_speed.py --profile-step --density-sweep 5,47 --threads 1
                                                      # where one fused step's time goes

``--profile-step`` runs cellvi only, in the calling process (no subprocesses, no scvi-tools):
the pieces of one fused step per model and density, timed exclusively, the likelihood kernel
split into its dense and per-non-zero parts, and the machine's sgemm and exp/log peaks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

# the settings both tools get, identical in every benchmark
MODEL_KWARGS = _common.MODEL_KWARGS
LR, BATCH_SIZE, TRAIN_SIZE = _common.LR, _common.BATCH_SIZE, _common.TRAIN_SIZE
N_EPOCHS_KL_WARMUP = _common.N_EPOCHS_KL_WARMUP

TENX_PATH = _common.REPO_ROOT.parent / "shared" / "data" / "tenx_10k_subset.h5ad"
DATASETS = ("kang", "tenx", "sim100k", "sim1m")
DEFAULT_EPOCHS = {"kang": 20, "tenx": 5, "sim100k": 1, "sim1m": 1}
DEFAULT_CELLS = {"sim100k": 100_000, "sim1m": 1_000_000}
SIM_GENES = 2000
MODELS = ("scvi", "linearscvi", "scanvi")
# LinearSCVI's defaults (both tools' own), given explicitly to both
LINEAR_KWARGS = dict(n_hidden=128, n_latent=10, n_layers=1, dropout_rate=0.1,
                     dispersion="gene", gene_likelihood="nb")

# the timed queries: result key, the call, and what it covers
QUERIES = [
    ("latent", "get_latent_representation()", " all cells"),
    ("normalized", "get_normalized_expression()", " all cells"),
    ("marginal_ll", "get_marginal_ll(subset, n_mc_samples)", ""),
]

METRICS = [
    ("train_s", "train wall time (s)", 2, "time"),
    ("cells_per_s", "training throughput (train cells x epochs / s)", 0, "rate"),
    ("s_per_epoch", "time per epoch (s)", 3, "time"),
    ("epoch_median_s", "epoch time (s), median over epochs (incl. validation)", 3, "time"),
    ("steady_cells_per_s", "steady throughput (train cells / median epoch time)", 0, "rate"),
    ("train_overhead_s", "train() time outside the epochs (s)", 2, "time"),
    ("elbo_validation_last", "validation ELBO / cell, last epoch (history)", 2, "reldiff"),
    ("elbo_validation_fixed", "validation ELBO / cell, get_elbo(fixed val cells)", 2,
     "reldiff"),
    *(row for key, call, cells in QUERIES for row in (
        (f"{key}_s", f"{call}{cells} (s), median of calls", 3, "time"),
        (f"{key}_first_s", f"{call}, first call (s)", 3, "time"),
        (f"{key}_first_faults", f"{call}, first call: page faults", 0, ""),
    )),
    ("marginal_ll", "marginal log-likelihood / cell (subset)", 2, "reldiff"),
    ("peak_gpu_mb", "peak GPU memory allocated by torch (MiB)", 0, "mem"),
    ("peak_rss_train_mb", "peak RSS after training (MiB)", 0, "mem"),
    ("peak_rss_mb", "peak RSS, whole process (MiB)", 0, "mem"),
    ("import_s", "import time (s)", 2, "time"),
    ("load_data_s", "data loading (s)", 2, ""),
    ("train_others_cores", "other processes' CPU during training (cores)", 2, ""),
    ("train_own_cores", "own CPU during training (cores)", 2, ""),
    ("loadavg_before_train", "1-min load average before training", 2, ""),
]


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
def _sim_params(n_genes: int, seed: int, n_types: int = 8, n_batches: int = 2):
    rng = np.random.default_rng([seed, 0])
    log_mu = rng.normal(np.log(0.03), 1.3, n_genes)  # gives ~6% non-zero, ~180 counts / cell
    de = rng.random((n_types, n_genes)) < 0.1
    lfc = np.where(de, rng.normal(0.0, 1.5, (n_types, n_genes)), 0.0)
    batch_fx = rng.normal(0.0, 0.25, (n_batches, n_genes))
    theta = np.exp(rng.normal(np.log(2.0), 0.6, n_genes))
    return log_mu, lfc, batch_fx, theta


def _sim_chunk(start: int, m: int, n_genes: int, seed: int, params, n_types: int = 8,
               n_batches: int = 2):
    """Cells ``start .. start+m`` of the simulation as CSR: NB(mu, theta) counts sampled by
    inverting the CDF, only for the entries that are not zero (the dense part is one uniform
    draw and P(X=0) per entry). Each chunk has its own seed, so the data do not depend on the
    chunk size."""
    import scipy.sparse as sp

    log_mu, lfc, batch_fx, theta = params
    rng = np.random.default_rng([seed, 1, start])
    cell_type = rng.integers(0, n_types, m)
    batch = np.arange(start, start + m) % n_batches
    lib = np.exp(rng.normal(0.0, 0.35, m))
    mu = (lib[:, None] * np.exp(log_mu + lfc[cell_type] + batch_fx[batch])).astype(np.float32)
    th = theta.astype(np.float32)
    q = mu / (th + mu)
    p0 = np.exp(th * np.log1p(-q))  # P(X = 0)
    u = rng.random((m, n_genes), dtype=np.float32)
    rows, cols = np.nonzero(u > p0)
    del mu
    u = u[rows, cols].astype(np.float64)
    q = q[rows, cols].astype(np.float64)
    pmf = p0[rows, cols].astype(np.float64)
    t = theta[cols]
    cdf = pmf.copy()
    counts = np.zeros(rows.size, np.float32)
    active = np.arange(rows.size)
    k = 0
    while active.size and k < 100_000:
        k += 1
        pmf = pmf * (k - 1 + t) / k * q
        cdf = cdf + pmf
        done = u <= cdf
        counts[active[done]] = k
        keep = ~done
        active, u, q, t, pmf, cdf = (a[keep] for a in (active, u, q, t, pmf, cdf))
    indptr = np.zeros(m + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=m), out=indptr[1:])
    X = sp.csr_matrix((counts, cols.astype(np.int32), indptr), shape=(m, n_genes))
    return X, cell_type, batch


def sim_path(cache_dir: str, n_cells: int, n_genes: int = SIM_GENES, seed: int = 0) -> Path:
    return Path(cache_dir) / f"sim_nb_{n_cells}x{n_genes}_seed{seed}.h5ad"


def _density_params(n_genes: int, seed: int, n_batches: int, density: float):
    """``_sim_params`` with every gene's log mean shifted by one constant, chosen so that the
    expected share of non-zero entries (over types, batches and library sizes) is ``density``."""
    from scipy.special import ndtri

    log_mu, lfc, batch_fx, theta = _sim_params(n_genes, seed, n_batches=n_batches)
    lib = np.exp(0.35 * ndtri((np.arange(128) + 0.5) / 128))  # _sim_chunk's library sizes
    base = (log_mu + lfc[:, None, :] + batch_fx[None, :, :])[..., None, :]  # (t, b, 1, g)

    def share(shift: float) -> float:
        mu = lib[:, None] * np.exp(base + shift)  # (types, batches, libs, genes)
        return float(np.mean(1.0 - (theta / (theta + mu)) ** theta))

    lo, hi = -15.0, 15.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if share(mid) < density else (lo, mid)
    return log_mu + 0.5 * (lo + hi), lfc, batch_fx, theta


def density_path(cache_dir: str, n_cells: int, n_genes: int, n_batches: int, percent: int,
                 seed: int = 0) -> Path:
    return (Path(cache_dir)
            / f"sim_dens{percent}_{n_cells}x{n_genes}_{n_batches}b_seed{seed}.h5ad")


def make_sim(path: Path, n_cells: int, n_genes: int = SIM_GENES, seed: int = 0,
             chunk: int = 20_000, n_batches: int = 2, params=None) -> dict:
    """Generate the simulated dataset chunk-wise and write it to ``path`` (atomically).

    ``params`` (default ``_sim_params(n_genes, seed)``) and ``n_batches`` (2) set the design.
    """
    import anndata
    import pandas as pd
    import scipy.sparse as sp

    params = _sim_params(n_genes, seed) if params is None else params
    data, indices, indptr = [], [], [np.zeros(1, np.int64)]
    types, batches = [], []
    nnz = 0
    for start in range(0, n_cells, chunk):
        X, cell_type, batch = _sim_chunk(start, min(chunk, n_cells - start), n_genes, seed,
                                         params, n_batches=n_batches)
        data.append(X.data)
        indices.append(X.indices)
        indptr.append(X.indptr[1:] + nnz)
        nnz += X.nnz
        types.append(cell_type)
        batches.append(batch)
    X = sp.csr_matrix(
        (np.concatenate(data), np.concatenate(indices), np.concatenate(indptr)),
        shape=(n_cells, n_genes),
    )
    del data, indices
    obs = pd.DataFrame(
        {"batch": pd.Categorical.from_codes(np.concatenate(batches),
                                            [f"b{i}" for i in range(n_batches)]),
         "cell_type": pd.Categorical([f"t{i}" for i in np.concatenate(types)])},
        index=[f"cell{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame(index=[f"gene{j}" for j in range(n_genes)])
    adata = anndata.AnnData(X=X, obs=obs, var=var)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.h5ad")
    adata.write_h5ad(tmp)
    os.replace(tmp, path)
    lib = np.asarray(X.sum(axis=1)).ravel()
    return {"path": str(path), "n_cells": n_cells, "n_genes": n_genes, "nnz": int(X.nnz),
            "density": X.nnz / (n_cells * n_genes), "median_counts_per_cell": float(
                np.median(lib)), "file_mb": path.stat().st_size / 2**20}


def _density_percent(name: str) -> int | None:
    """``27`` for the dataset name ``dens27``; None for the other datasets."""
    if name.startswith("dens") and name[4:].isdigit() and 0 < int(name[4:]) < 100:
        return int(name[4:])
    return None


def _density_file(args, name: str) -> Path:
    return density_path(args.cache_dir, args.density_cells, args.density_genes,
                        args.density_batches, _density_percent(name), args.data_seed)


def load_dataset(name: str, args):
    """The AnnData of a dataset and its batch key (``None`` without batches)."""
    import anndata
    import scipy.sparse as sp

    if name == "kang":
        adata, batch_key = _common.load_kang(args.kang_data, n_top_genes=2000), "batch"
    elif name == "tenx":
        adata, batch_key = anndata.read_h5ad(args.tenx_data), None
        adata.var_names_make_unique()
        # cellvi refuses cells without counts (one of the 10,000): drop them for both tools
        keep = np.asarray(adata.X.sum(axis=1)).ravel() > 0
        if not keep.all():
            adata = adata[keep].copy()
    elif _density_percent(name) is not None:
        adata = anndata.read_h5ad(_density_file(args, name))
        batch_key = "batch"
    else:
        n_cells = args.sim_cells[name]
        adata = anndata.read_h5ad(sim_path(args.cache_dir, n_cells, SIM_GENES, args.data_seed))
        batch_key = "batch"
    if name in ("sim100k", "sim1m") or _density_percent(name) is not None:
        assert sp.issparse(adata.X) and adata.X.format == "csr", "simulated X must be CSR"
    return adata, batch_key


# --------------------------------------------------------------------------------------------
# workers (one fresh subprocess per measurement)
# --------------------------------------------------------------------------------------------
_WAITED = {"s": 0.0}


def _quiet(args, log_prefix: str) -> dict:
    left = args.max_wait - _WAITED["s"]  # --max-wait bounds all the waits of one worker
    if left <= 0:
        return {"loadavg1": os.getloadavg()[0], "others_cores": float("nan"), "waited_s": 0.0,
                "quiet": None}
    q = _common.wait_for_quiet(
        max_wait_s=left, log=lambda m: print(f"{log_prefix} {m}", flush=True),
    )
    _WAITED["s"] += q["waited_s"]
    return q


def _timed(name: str, fn, args, res: dict, prefix: str, calls: int = 1,
           seed: int | None = None):
    """Wait for a quiet machine once, then time ``fn()`` ``calls`` times in a row.

    Stores ``{name}_s`` (the median of the calls: the one call's time when ``calls`` is 1),
    ``{name}_first_s`` (the first), ``{name}_calls_s`` (all) and the load around them;
    returns the last call's result. With ``seed``, ``torch`` is seeded before every call
    (outside the timing), so that every call does the same work (and gives the same result).
    """
    import torch

    q = _quiet(args, prefix)
    res[f"loadavg_before_{name}"] = q["loadavg1"]
    res[f"others_before_{name}"] = q["others_cores"]
    times, faults, out = [], [], None
    with _common.CpuMonitor() as mon:
        for _ in range(max(1, calls)):
            out = None  # free the last output first: one output at a time, as for one call
            if seed is not None:
                torch.manual_seed(seed)
            before = _common.minor_faults()
            start = time.perf_counter()
            out = fn()
            if args.device == "cuda":
                torch.cuda.synchronize()  # the GPU's queued work belongs to this call
            times.append(time.perf_counter() - start)
            faults.append(_common.minor_faults() - before)
    res[f"{name}_s"] = float(np.median(times))
    res[f"{name}_first_s"] = times[0]
    res[f"{name}_calls_s"] = times
    # page faults of each call: mostly memory the process had not touched before
    res[f"{name}_first_faults"] = faults[0]
    res[f"{name}_calls_faults"] = faults
    res[f"{name}_others_cores"] = mon.others_cores
    res[f"{name}_own_cores"] = mon.own_cores
    return out


def _marginal_subset(n: int, size: int) -> np.ndarray:
    if n <= size:
        return np.arange(n)
    return np.sort(np.random.default_rng(12345).choice(n, size=size, replace=False))


def worker(args) -> dict:
    tool, name = args.worker_tool, args.worker_dataset
    prefix = f"[{tool}/{name}]"
    timer = _common.Timer()
    with timer("import"):
        import torch

        if tool == "scvi-tools":
            import logging
            import warnings

            import scvi

            warnings.filterwarnings("ignore")
            for logger in ("scvi", "lightning", "lightning.pytorch", "lightning.fabric"):
                logging.getLogger(logger).setLevel(logging.ERROR)
            scvi.settings.verbosity = logging.ERROR
            version = scvi.__version__
        else:
            import cellvi
            from cellvi.model import SCVI

            version = cellvi.__version__
    model_name = args.worker_model
    _common.set_threads(args.threads)
    with timer("load_data"):
        adata, batch_key = load_dataset(name, args)
    import scipy.sparse as sp

    res: dict = {
        "tool": tool, "version": version, "dataset": name, "model": model_name,
        "n_cells": adata.n_obs, "density": _density(adata.X),
        "n_genes": adata.n_vars, "batch_key": batch_key, "epochs": args.epochs,
        "seed": args.seed, "threads": args.threads, "torch_threads": torch.get_num_threads(),
        "x_sparse": bool(sp.issparse(adata.X)), "import_s": timer.times["import"],
        "load_data_s": timer.times["load_data"],
    }
    train_idx, val_idx = _common.split_indices(adata.n_obs, TRAIN_SIZE, args.seed)
    res["n_train"], res["n_validation"] = len(train_idx), len(val_idx)

    setup, model_kwargs = {}, MODEL_KWARGS
    if model_name == "linearscvi":
        model_kwargs = LINEAR_KWARGS
    elif model_name == "scanvi":
        setup = {"labels_key": "label", "unlabeled_category": "Unknown"}
        hidden = np.random.default_rng([args.data_seed, 3]).random(adata.n_obs)
        adata.obs["label"] = np.where(hidden < args.scanvi_unlabeled, "Unknown",
                                      adata.obs["cell_type"].astype(str).to_numpy())
        res["n_labelled"] = int((adata.obs["label"] != "Unknown").sum())
    if tool == "scvi-tools":
        scvi.settings.seed = args.seed
        _common.set_threads(args.threads)  # seed_everything leaves threads alone; be explicit
        cls = {"scvi": scvi.model.SCVI, "linearscvi": scvi.model.LinearSCVI,
               "scanvi": scvi.model.SCANVI}[model_name]
        cls.setup_anndata(adata, batch_key=batch_key, **setup)
        model = cls(adata, **model_kwargs)
        from lightning.pytorch.callbacks import Callback

        class EpochClock(Callback):
            """Wall clock at the start of training and at the end of every epoch (after its
            validation pass), like the cumulative ``time`` column of cellvi's history."""

            def __init__(self):
                self.start, self.ends = None, []

            def on_train_epoch_start(self, trainer, pl_module):
                if self.start is None:
                    self.start = time.perf_counter()

            def on_train_epoch_end(self, trainer, pl_module):
                self.ends.append(time.perf_counter())

        clock = EpochClock()

        def train():
            model.train(
                max_epochs=args.epochs, accelerator="gpu" if args.device == "cuda" else "cpu",
                devices=1, batch_size=BATCH_SIZE,
                train_size=TRAIN_SIZE, early_stopping=False, enable_progress_bar=False,
                check_val_every_n_epoch=args.scvi_val_every,
                datasplitter_kwargs={"external_indexing": [train_idx, val_idx]},
                plan_kwargs={"lr": LR, "n_epochs_kl_warmup": N_EPOCHS_KL_WARMUP},
                callbacks=[clock],
            )
    else:
        from cellvi.model import SCANVI, LinearSCVI

        cls = {"scvi": SCVI, "linearscvi": LinearSCVI, "scanvi": SCANVI}[model_name]
        cls.setup_anndata(adata, batch_key=batch_key, **setup)
        model = cls(adata, **model_kwargs)
        # SCANVI's post-training calibration is not training, and scvi-tools has none
        extra = {"calibrate": False} if model_name == "scanvi" else {}

        def train():
            model.train(
                max_epochs=args.epochs, lr=LR, batch_size=BATCH_SIZE, train_size=TRAIN_SIZE,
                seed=args.seed, progress_bar=False, n_epochs_kl_warmup=N_EPOCHS_KL_WARMUP,
                device=args.device, **extra,
            )

    print(f"{prefix} training {args.epochs} epoch(s) on {len(train_idx):,} cells ...",
          flush=True)
    _timed("train", train, args, res, prefix)
    res["peak_rss_train_mb"] = _common.peak_rss_mb()
    if args.device == "cuda":
        res["gpu"] = torch.cuda.get_device_name()
        res["peak_gpu_train_mb"] = torch.cuda.max_memory_allocated() / 2**20
    res["s_per_epoch"] = res["train_s"] / args.epochs
    res["cells_per_s"] = len(train_idx) * args.epochs / res["train_s"]
    res["same_split"] = bool(np.array_equal(np.sort(np.asarray(model.validation_indices)),
                                            val_idx))
    hist = model.history
    if tool == "scvi-tools":
        epoch_s = np.diff(np.r_[clock.start, clock.ends])
    else:
        epoch_s = np.diff(np.r_[0.0, hist["time"].to_numpy(dtype=float)])
    res["epoch_s"] = epoch_s.tolist()
    res["epoch_median_s"] = float(np.median(epoch_s))
    res["steady_cells_per_s"] = len(train_idx) / res["epoch_median_s"]
    res["train_overhead_s"] = res["train_s"] - float(epoch_s.sum())
    if tool == "scvi-tools":
        col = hist.get("elbo_validation")
        # scvi-tools logs the negative ELBO (a positive loss): negate it.
        res["elbo_validation_last"] = (
            None if col is None or not len(col) else -float(col.iloc[-1, 0]))
        res["n_validation_epochs"] = 0 if col is None else int(col.iloc[:, 0].notna().sum())
    else:
        res["elbo_validation_last"] = float(hist["elbo_validation"].iloc[-1])
        res["n_validation_epochs"] = int(hist["elbo_validation"].notna().sum())
    if tool == "cellvi":
        res["training_step"] = model.train_settings.get("training_step")
    print(f"{prefix} trained in {res['train_s']:.2f} s ({res['cells_per_s']:,.0f} cells/s, "
          f"other processes {res['train_others_cores']:.2f} cores)", flush=True)
    res["waited_s"] = _WAITED["s"]
    if args.train_only:
        return res

    torch.manual_seed(args.seed)
    res["elbo_validation_fixed"] = float(model.get_elbo(indices=val_idx, batch_size=BATCH_SIZE))
    if model_name != "scvi":  # the queries are timed for SCVI
        return res
    # Queries with each tool's default arguments, on all cells.
    res["query_calls"] = args.query_calls
    calls, seed = args.query_calls, args.seed
    latent = _timed("latent", lambda: model.get_latent_representation(), args, res, prefix,
                    calls, seed)
    res["latent_shape"] = list(latent.shape)
    del latent
    norm = _timed("normalized", lambda: model.get_normalized_expression(), args, res, prefix,
                  calls, seed)
    res["normalized_shape"] = list(norm.shape)
    del norm
    subset = _marginal_subset(adata.n_obs, args.ll_cells)
    res["marginal_ll_cells"] = len(subset)
    res["n_mc_samples"] = args.n_mc_samples
    ll = _timed("marginal_ll", lambda: model.get_marginal_ll(
        indices=subset, n_mc_samples=args.n_mc_samples), args, res, prefix, calls, seed)
    res["marginal_ll"] = float(ll)  # seeded as in earlier runs: the same estimate
    res["waited_s"] = _WAITED["s"]
    if args.device == "cuda":
        res["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    times = ", ".join(f"{key} {res[f'{key}_first_s']:.3f} / {res[f'{key}_s']:.3f} s"
                      for key, _, _ in QUERIES)
    print(f"{prefix} first call / median of {args.query_calls}: {times}", flush=True)
    return res


def _density(X) -> float:
    import scipy.sparse as sp

    nnz = X.nnz if sp.issparse(X) else int(np.count_nonzero(X))
    return nnz / max(1, X.shape[0] * X.shape[1])


def data_worker(args) -> dict:
    name = args.worker_dataset
    percent = _density_percent(name)
    if percent is not None:
        path = _density_file(args, name)
        start = time.perf_counter()
        params = _density_params(args.density_genes, args.data_seed, args.density_batches,
                                 percent / 100)
        info = make_sim(path, args.density_cells, args.density_genes, args.data_seed,
                        chunk=5_000, n_batches=args.density_batches, params=params)
        info["generate_s"] = time.perf_counter() - start
        return info
    n_cells = args.sim_cells[name]
    path = sim_path(args.cache_dir, n_cells, SIM_GENES, args.data_seed)
    start = time.perf_counter()
    info = make_sim(path, n_cells, SIM_GENES, args.data_seed)
    info["generate_s"] = time.perf_counter() - start
    return info


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default=None,
                   help=f"comma-separated, from {', '.join(DATASETS)} and dens<P> (P %% "
                        "non-zero); default: all of the former, or none with --density-sweep")
    p.add_argument("--density-sweep", default=None,
                   help="comma-separated non-zero shares in %% (e.g. 5,12,27,47): adds one "
                        "simulated dens<P> dataset per share")
    p.add_argument("--density-cells", type=int, default=20_000)
    p.add_argument("--density-genes", type=int, default=2_000)
    p.add_argument("--density-batches", type=int, default=3)
    p.add_argument("--epochs-dens", type=int, default=2, help="epochs on the dens<P> datasets")
    p.add_argument("--models", default="scvi",
                   help=f"comma-separated, from {', '.join(MODELS)}")
    p.add_argument("--scanvi-unlabeled", type=float, default=0.5,
                   help="share of cells whose label SCANVI does not see")
    p.add_argument("--profile-step", action="store_true",
                   help="only time the pieces of one fused SCVI and LinearSCVI step at each "
                        "--density-sweep share (default 5,47), cellvi in this process")
    p.add_argument("--profile-cells", type=int, default=2_000,
                   help="cells of the --profile-step datasets")
    p.add_argument("--profile-batch", type=int, default=128)
    p.add_argument("--profile-steps", type=int, default=50, help="steps timed per model")
    p.add_argument("--repeats", type=int, default=3, help="runs per tool and dataset")
    for name in DATASETS:
        p.add_argument(f"--epochs-{name}", type=int, default=DEFAULT_EPOCHS[name])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cpu (the GPU, if any, hidden) or cuda: both tools train and answer "
                        "queries on the GPU; run with an interpreter that has CUDA torch, "
                        "scvi-tools and cellvi (no reference venv is made)")
    p.add_argument("--only", choices=["cellvi", "scvi-tools", "both"], default="both")
    p.add_argument("--seed", type=int, default=0, help="training seed of the first repeat")
    p.add_argument("--n-mc-samples", type=int, default=100)
    p.add_argument("--ll-cells", type=int, default=1000, help="cells for get_marginal_ll")
    p.add_argument("--query-calls", type=int, default=3,
                   help="calls of each query per run, back to back (first and median reported)")
    p.add_argument("--scvi-val-every", type=int, default=1,
                   help="scvi-tools check_val_every_n_epoch (cellvi validates every epoch)")
    p.add_argument("--max-wait", type=float, default=180,
                   help="max seconds to wait for a quiet machine before starting a run, and "
                        "in total inside one run, before its timed blocks (0: never wait)")
    p.add_argument("--wait-budget", type=float, default=900,
                   help="total seconds the driver may wait between runs; then it stops waiting")
    p.add_argument("--sim100k-cells", type=int, default=DEFAULT_CELLS["sim100k"])
    p.add_argument("--sim1m-cells", type=int, default=DEFAULT_CELLS["sim1m"])
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--cache-dir", default="/tmp/cellvi-bench-data")
    p.add_argument("--kang-data", default=str(_common.KANG_PATH))
    p.add_argument("--tenx-data", default=str(TENX_PATH))
    p.add_argument("--json", default=None, help="also write all results to this JSON file")
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-tool", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-dataset", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-model", default="scvi", help=argparse.SUPPRESS)
    p.add_argument("--epochs", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--train-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.sim_cells = {"sim100k": args.sim100k_cells, "sim1m": args.sim1m_cells}
    return args


def _common_worker_args(args) -> list:
    return [
        "--threads", args.threads, "--device", args.device,
        "--n-mc-samples", args.n_mc_samples, "--ll-cells", args.ll_cells,
        "--query-calls", args.query_calls, "--scvi-val-every", args.scvi_val_every,
        "--sim100k-cells", args.sim100k_cells, "--sim1m-cells", args.sim1m_cells,
        "--data-seed", args.data_seed, "--cache-dir", args.cache_dir,
        "--kang-data", args.kang_data, "--tenx-data", args.tenx_data,
        "--density-cells", args.density_cells, "--density-genes", args.density_genes,
        "--density-batches", args.density_batches, "--scanvi-unlabeled", args.scanvi_unlabeled,
    ]


def machine_info() -> dict:
    info = {"nproc": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform()}
    try:
        cpu = Path("/proc/cpuinfo").read_text()
        info["cpu_model"] = next(
            (line.split(":", 1)[1].strip() for line in cpu.splitlines()
             if line.startswith("model name")), "?")
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
        info["ram_gib"] = round(int(mem) / 2**20, 1)
    except OSError:
        pass
    return info


def source_revision() -> str:
    """The cellvi commit benchmarked, with a note when ``src/`` has uncommitted changes."""
    import subprocess

    def git(*cmd):
        return subprocess.run(["git", *cmd], cwd=_common.REPO_ROOT, capture_output=True,
                              text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "?"
    dirty = git("status", "--porcelain", "--", "src")
    return head + (" + uncommitted changes in src/" if dirty else " (src/ clean)")


# --------------------------------------------------------------------------------------------
# --profile-step: where one fused training step's time goes (cellvi only, in this process)
# --------------------------------------------------------------------------------------------
class _ExclusiveTimer:
    """Wrap functions of a module; accumulate each one's own time (nested wrapped calls are
    charged to themselves, not to their caller)."""

    def __init__(self):
        self.own: dict[str, float] = {}
        self._stack: list[list] = []

    def wrap(self, module, name: str, label: str) -> None:
        fn = getattr(module, name)

        def timed(*a, **k):
            self._stack.append([time.perf_counter(), 0.0])
            try:
                return fn(*a, **k)
            finally:
                start, inner = self._stack.pop()
                total = time.perf_counter() - start
                self.own[label] = self.own.get(label, 0.0) + total - inner
                if self._stack:
                    self._stack[-1][1] += total

        setattr(module, name, timed)


def _median_ms(fn, k: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(k):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def profile_step(args) -> None:
    """Time one fused step of SCVI and LinearSCVI at each density and its pieces.

    Pieces are the step's own functions, timed exclusively (``time.perf_counter``, no profiler
    overhead); SCVI's decoder heads (inline in its step) are timed alone on the same shapes.
    The kernel is split into its dense part (the same call on an all-zero count matrix: the
    softmax and log NB(0) of every entry) and its per-non-zero part. A 1,024^3 sgemm and
    ``torch.exp``/``torch.log`` give this machine's peaks for the roofline.
    """
    import anndata
    import torch

    from cellvi import _native
    from cellvi.model import SCVI, LinearSCVI
    from cellvi.module import _ldvae_step, _vae_step

    _common.set_threads(args.threads)
    _native.tune_allocator()  # as train() does
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    peak = 2 * 1024**3 / _median_ms(lambda: a @ b, 10) / 1e6  # GFLOP/s
    v = torch.rand(1 << 20) + 0.5
    exp_rate = (1 << 20) / _median_ms(lambda: torch.exp(v), 20) / 1e3  # M/s
    log_rate = (1 << 20) / _median_ms(lambda: torch.log(v), 20) / 1e3
    print(f"[profile] {args.threads} thread(s); sgemm 1024^3 {peak:.1f} GFLOP/s; torch.exp "
          f"{exp_rate:.0f} M/s, torch.log {log_rate:.0f} M/s; 1-min load "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    labels = {"encode": "encoders: first layer fwd + heads", "encode_backward":
              "encoders: first layer bwd + heads", "_layers_forward": "hidden layers fwd",
              "_layers_backward": "hidden layers bwd", "_linear_forward": "linear decoder fwd",
              "_linear_backward": "linear decoder bwd",
              "nb_log_prob_rows_softmax_grad": "likelihood kernel"}
    timer = _ExclusiveTimer()
    for name in ("encode", "encode_backward", "_layers_forward", "_layers_backward",
                 "nb_log_prob_rows_softmax_grad"):
        timer.wrap(_vae_step, name, labels[name])
    for name in ("_linear_forward", "_linear_backward", "nb_log_prob_rows_softmax_grad",
                 "encode", "encode_backward"):
        timer.wrap(_ldvae_step, name, labels[name])
    rng = np.random.default_rng(0)
    for pct in [int(p) for p in (args.density_sweep or "5,47").split(",") if p.strip()]:
        path = density_path(args.cache_dir, args.profile_cells, args.density_genes,
                            args.density_batches, pct, args.data_seed)
        if not path.exists():
            make_sim(path, args.profile_cells, args.density_genes, args.data_seed, chunk=5_000,
                     n_batches=args.density_batches, params=_density_params(
                         args.density_genes, args.data_seed, args.density_batches, pct / 100))
        adata = anndata.read_h5ad(path)
        for cls, kwargs, step_mod in ((SCVI, MODEL_KWARGS, _vae_step),
                                      (LinearSCVI, LINEAR_KWARGS, _ldvae_step)):
            print(_profile_model(cls, kwargs, step_mod, adata.copy(), args, timer, peak,
                                 {"exp": exp_rate, "log": log_rate}, rng), flush=True)


def _profile_model(cls, kwargs, step_mod, adata, args, timer, peak, rates, rng) -> str:
    import torch
    from torch import nn

    from cellvi.data import CellData
    from cellvi.distributions._rowsum import nb_log_prob_rows_softmax_grad

    n, k, genes = args.profile_batch, args.profile_steps, adata.n_vars
    cls.setup_anndata(adata, batch_key="batch")
    model = cls(adata, **kwargs)
    data = CellData(adata, model.summary)
    batches = [data.batch(np.sort(rng.choice(adata.n_obs, n, replace=False)), nonzero=True,
                          sparse=True) for _ in range(8)]
    module = model.module.train()
    nnz = float(np.mean([bt["X"].values().numel() for bt in batches])) / n
    calls = iter(range(10**9))

    def step():
        for p in module.parameters():
            p.grad = None
        step_mod.training_step(module, batches[next(calls) % 8], 0.5)

    _median_ms(step, 3)  # warm-up
    timer.own.clear()
    start = time.perf_counter()
    for _ in range(k):
        step()
    step_ms = (time.perf_counter() - start) / k * 1e3
    pieces = {key: t / k * 1e3 for key, t in timer.own.items()}
    lines = [f"\n{cls.__name__} fused step, {100 * _density(adata.X):.1f} % non-zero "
             f"({nnz:.0f} per cell), batch {n}, {genes} genes: {step_ms:.2f} ms "
             f"({n / step_ms * 1e3:,.0f} cells/s), mean of {k}"]
    if cls.__name__ == "SCVI":  # the decoder heads, inline in the step: timed alone
        dec = module.decoder
        h1 = torch.relu(torch.randn(n, dec.px_scale_decoder.weight.shape[1]))
        w, bias = dec.px_scale_decoder.weight, dec.px_scale_decoder.bias
        d = torch.randn(n, genes)
        heads = 2 if module.gene_likelihood == "zinb" else 1
        fwd = _median_ms(lambda: [nn.functional.linear(h1, w, bias) for _ in range(heads)], k)
        bwd = _median_ms(lambda: [(d.t().mm(h1), d.mm(w)) for _ in range(heads)], k)
        flops = 3 * heads * 2 * n * h1.shape[1] * genes
        pieces["decoder heads fwd (timed alone)"] = fwd
        pieces["decoder heads bwd (timed alone)"] = bwd
        lines.append(f"  decoder heads: {flops / (fwd + bwd) / 1e6:.1f} GFLOP/s "
                     f"({100 * flops / (fwd + bwd) / 1e6 / peak:.0f} % of the sgemm peak); at "
                     f"the peak they alone allow {n * peak * 1e9 / flops:,.0f} cells/s")
    x = batches[0]["X"]
    zero = torch.sparse_csr_tensor(torch.zeros(n + 1, dtype=torch.int64),
                                   torch.zeros(0, dtype=torch.int64), torch.zeros(0), (n, genes),
                                   check_invariants=False)
    logits, lib = torch.randn(n, genes), torch.full((n, 1), 7.0)
    theta, weights = torch.rand(genes) + 0.5, torch.full((n,), -1.0 / n)
    zi = torch.randn(n, genes) if module.gene_likelihood == "zinb" else None
    full = _median_ms(lambda: nb_log_prob_rows_softmax_grad(
        x, logits, lib, 1e-8, theta, zi, weights), k)
    dense = _median_ms(lambda: nb_log_prob_rows_softmax_grad(
        zero, logits, lib, 1e-8, theta, zi, weights), k)
    lines.append(f"  likelihood kernel alone: {full:.3f} ms = dense part {dense:.3f} ms "
                 f"({dense * 1e6 / (n * genes):.2f} ns per entry) + non-zero part "
                 f"{full - dense:.3f} ms ({(full - dense) * 1e6 / (nnz * n):.1f} ns per non-zero)")
    pieces["rest (KL terms, small products, glue)"] = step_ms - sum(pieces.values())
    for key, value in sorted(pieces.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {key:40s} {value:7.3f} ms  {100 * value / step_ms:5.1f} %")
    lines.append(_roofline(module, genes, nnz, peak, rates, n / step_ms * 1e3))
    return "\n".join(lines)


def _roofline(module, genes: int, nnz: float, peak: float, rates: dict, measured: float) -> str:
    """The step's work per cell and the cells/s this machine's peaks allow for it.

    Matrix products: every weight matrix that has a gradient after the step. A matrix with a
    genes-sized side inside an encoder is a sparse first layer (forward and weight gradient
    over the ``nnz`` non-zero inputs of a cell: ``4 nnz h`` FLOPs); every other one costs its
    forward, weight gradient and input gradient, ``6 in out`` FLOPs per cell (categorical
    embedding tables are left out). Per-entry work: the softmax's exponential and the
    likelihood's transcendental functions over all ``genes`` entries (ZINB: exp(-pi),
    exp(a), log(1 + r), log(p0); NB: log(1 + r)), and one logarithm per non-zero count. The
    bound is ``1 / (FLOPs / sgemm peak + functions / exp-log rate)``, each peak measured here.
    """
    flops = 0.0
    for name, p in module.named_parameters():
        if p.grad is None or p.dim() != 2 or "cat" in name:
            continue
        sparse_first = genes in p.shape and "encoder" in name and "decoder" not in name
        flops += 4 * nnz * (p.numel() // genes) if sparse_first else 6 * p.numel()
    zinb = module.gene_likelihood == "zinb"
    functions = genes * (1 + (4 if zinb else 1)) + nnz
    rate = 0.5 * (rates["exp"] + rates["log"]) * 1e6  # functions per second
    t_mm, t_fn = flops / (peak * 1e9), functions / rate
    bound = 1.0 / (t_mm + t_fn)
    return (f"  roofline: {flops / 1e6:.2f} MFLOP per cell ({1e6 * t_mm:.1f} us at the sgemm "
            f"peak) + {functions:,.0f} exp/log per cell ({1e6 * t_fn:.1f} us at the measured "
            f"rate): bound {bound:,.0f} cells/s; the step reaches {measured:,.0f} cells/s, "
            f"x{bound / measured:.2f} below the bound")


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker_out:  # inside a worker subprocess
        fn = data_worker if args.worker_tool == "data" else worker
        _common.write_result(args.worker_out, fn(args))
        return
    if args.profile_step:
        profile_step(args)
        return
    if args.device == "cpu":
        _common.ensure_reference_env(__file__, argv)
    else:  # a GPU machine brings its own CUDA torch: use this interpreter as it is
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: this interpreter's torch sees no CUDA GPU.")

    sweep = [f"dens{int(p)}" for p in (args.density_sweep or "").split(",") if p.strip()]
    if args.datasets is None:
        datasets = [] if sweep else list(DATASETS)
    else:
        datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    datasets += [d for d in sweep if d not in datasets]
    unknown = {d for d in datasets if d not in DATASETS and _density_percent(d) is None}
    if unknown:
        raise SystemExit(f"unknown datasets: {sorted(unknown)}; choose from {DATASETS} or "
                         "dens<P> with 0 < P < 100")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models or set(models) - set(MODELS):
        raise SystemExit(f"--models: choose from {MODELS}, got {args.models!r}")
    tools = list(_common.TOOLS) if args.only == "both" else [args.only]
    import scvi

    import cellvi

    info = machine_info()
    info["cellvi_revision"] = source_revision()
    info["memory_at_start"] = _common.fresh_memory_ms_per_mb()
    print(f"[bench_speed] {info}; cellvi {cellvi.__version__}, scvi-tools {scvi.__version__}; "
          f"threads {args.threads}, repeats {args.repeats}", flush=True)

    # simulated data, generated once (in a subprocess) and cached
    data_info = {}
    for name in datasets:
        if name.startswith("sim") or _density_percent(name) is not None:
            path = (_density_file(args, name) if _density_percent(name) is not None
                    else sim_path(args.cache_dir, args.sim_cells[name], SIM_GENES,
                                  args.data_seed))
            if not path.exists():
                print(f"[bench_speed] generating {path} ...", flush=True)
                data_info[name] = _common.run_worker(
                    __file__, ["--worker-tool", "data", "--worker-dataset", name,
                               *_common_worker_args(args)], args.threads)
                print(f"[bench_speed] {data_info[name]}", flush=True)

    all_results: dict[str, dict[str, list[dict]]] = {}
    tables = []
    wait_left = args.wait_budget
    for name, model_name in [(d, m) for d in datasets for m in models]:
        dens = _density_percent(name) is not None
        epochs = args.epochs_dens if dens else getattr(args, f"epochs_{name}")
        ds_tools = ["cellvi"] if name == "sim1m" else tools
        if not ds_tools:
            continue
        repeats = 1 if name == "sim1m" else args.repeats
        results: dict[str, list[dict]] = {t: [] for t in ds_tools}
        for rep in range(repeats):
            order = ds_tools if rep % 2 == 0 else ds_tools[::-1]
            for tool in order:
                max_wait = max(0.0, min(args.max_wait, wait_left))
                if max_wait > 0:
                    q = _common.wait_for_quiet(max_wait_s=max_wait)
                    wait_left -= q["waited_s"]
                    max_wait = max(0.0, min(args.max_wait, wait_left))
                print(f"[bench_speed] {name}/{model_name}: {tool}, repeat {rep + 1}/{repeats}, "
                      f"{epochs} epoch(s); 1-min load {os.getloadavg()[0]:.2f}", flush=True)
                wargs = ["--worker-tool", tool, "--worker-dataset", name, "--epochs", epochs,
                         "--seed", args.seed + rep, "--max-wait", max_wait,
                         "--worker-model", model_name, *_common_worker_args(args)]
                if name == "sim1m":
                    wargs.append("--train-only")
                res = _common.run_worker(__file__, wargs, args.threads,
                                         gpu=args.device == "cuda")
                wait_left -= res.get("waited_s", 0.0)
                print(f"[bench_speed] {name}: {tool} done, process wall "
                      f"{res['process_wall_s']:.1f} s, peak RSS {res['peak_rss_mb']:,.0f} MiB",
                      flush=True)
                results[tool].append(res)
        key = name if model_name == "scvi" else f"{name}/{model_name}"
        all_results[key] = results
        first = next(iter(results.values()))[0]
        steps = sorted({str(r.get("training_step")) for r in results.get("cellvi", [])})
        title = (f"{key}: {first['n_cells']:,} cells x {first['n_genes']:,} genes, "
                 f"{100 * first['density']:.1f} % non-zero, model {model_name}"
                 f"{' (cellvi step: ' + ', '.join(steps) + ')' if steps else ''}, "
                 f"batch_key={first['batch_key']}, {epochs} epoch(s), {first['n_train']:,} "
                 f"train / {first['n_validation']:,} validation cells, {args.threads} threads, "
                 f"{args.device}, "
                 f"{repeats} repeat(s); median [min, max]")
        if name != "sim1m" and model_name == "scvi":
            title += (f"; marginal ll: {first.get('marginal_ll_cells')} cells, "
                      f"n_mc_samples={args.n_mc_samples}")
        tables.append(_common.print_speedup_table(results, METRICS, title=title))

    info["memory_at_end"] = _common.fresh_memory_ms_per_mb()
    print("\n\n==================== summary ====================")
    print(f"machine: {info}")
    print(f"scvi-tools check_val_every_n_epoch={args.scvi_val_every}; "
          "scvi-tools / cellvi > 1 favours cellvi (x faster, x less memory, or throughput "
          "ratio); ELBO / marginal ll rows: (cellvi - scvi-tools) / |scvi-tools|")
    for text in tables:
        print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"machine": info, "args": {k: v for k, v in vars(args).items()},
             "data": data_info, "results": all_results}, indent=1, default=str))
        print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
