"""Measure cellvi.tune on real data: a 20-trial study against the defaults, on held-out cells.

Not collected by pytest (slow: minutes per dataset). Run from the project root:

    .venv/bin/python tests/tune/bench_tune_real.py [kang|tenx|both] [--trials 20]

For each dataset: a study of SCVI over the default search space (the defaults are trial 0),
``max_epochs`` per trial, cells split 80/10/10 (train / validation / test) from seed 0, median
pruning on the validation ELBO; then the study is resumed once (5 more trials) to check that it
continues where it stopped. Prints the validation and test ELBO of the defaults and of the best
trial, and writes them as JSON next to the study (``/tmp/cellvi-tune-bench/<name>/``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
import warnings
from pathlib import Path

import numpy as np

import cellvi

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
OUT = Path("/tmp/cellvi-tune-bench")


def load(name: str):
    if name == "kang":
        adata = cellvi.data.kang_ifnb(SHARED / "kang_ifnb", n_top_genes=2000)
        cellvi.model.SCVI.setup_anndata(adata, batch_key="batch")
        return adata, 100
    adata = cellvi.data.read_h5ad(SHARED / "tenx_10k_subset.h5ad")
    adata.var_names_make_unique()
    adata = adata[np.asarray(adata.X.sum(1)).ravel() > 0].copy()  # first 1,000 genes: a few
    # cells have no counts in them
    cellvi.model.SCVI.setup_anndata(adata)
    return adata, 40


def run(name: str, n_trials: int) -> dict:
    adata, epochs = load(name)
    out = OUT / name
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    first = cellvi.tune.run_study(cellvi.model.SCVI, adata, n_trials=n_trials, max_epochs=epochs,
                                  output_dir=out, seed=0)
    t1 = time.perf_counter()
    resumed = cellvi.tune.run_study(cellvi.model.SCVI, adata, n_trials=n_trials + 5,
                                    max_epochs=epochs, output_dir=out, seed=0)
    t2 = time.perf_counter()
    trials = resumed.trials
    base = trials[trials.baseline].iloc[0]
    best_n = int(first.study.best_trial.number)
    best = trials[trials.number == best_n].iloc[0]
    record = {
        "dataset": name, "cells": adata.n_obs, "genes": adata.n_vars, "max_epochs": epochs,
        "n_trials": n_trials, "states": first.trials.state.value_counts().to_dict(),
        "defaults_elbo_validation": float(base.elbo_validation),
        "defaults_elbo_test": float(base.elbo_test),
        "best_trial": best_n, "best_params": first.best_params,
        "best_elbo_validation": float(best.elbo_validation),
        "best_elbo_test": float(best.elbo_test),
        "seconds_first": t1 - t0, "seconds_resume": t2 - t1,
        "resumed_trials": int(len(trials)), "resumed_kept_first": bool(
            (trials.head(len(first.trials))[["number", "state"]].values
             == first.trials[["number", "state"]].values).all()),
        "resumed_best_value": resumed.best_value,
    }
    (out / "bench.json").write_text(json.dumps(record, indent=1, default=str))
    print(json.dumps(record, indent=1, default=str), flush=True)
    print(trials[["number", "state", "elbo_validation", "elbo_test", "epochs"]
                 + [c for c in trials if c.startswith("params_")]].to_string(), flush=True)
    return record


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    # one thread: on a shared 2-core machine, torch's second thread spins against the other
    # processes (measured: 0.43 s an epoch of Kang with one thread, 8.7 s with two)
    cellvi.settings.num_threads = 1
    p = argparse.ArgumentParser()
    p.add_argument("which", nargs="?", default="both", choices=["kang", "tenx", "both"])
    p.add_argument("--trials", type=int, default=20)
    a = p.parse_args()
    for name in (["kang", "tenx"] if a.which == "both" else [a.which]):
        run(name, a.trials)
