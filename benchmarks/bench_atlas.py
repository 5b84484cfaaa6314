"""Atlas scale: out-of-core memory and throughput, and data-parallel ELBO parity.

Three measurements (cellvi only: scvi-tools has no out-of-core loader of its own):

* ``epoch``: one training epoch of SCVI on a simulated N x 2,000 sparse backed ``.h5ad``
  (about 6 % non-zero, written chunk by chunk, never densified or held whole), then the latent
  of every cell written to an ``.h5ad``; the process's own peak resident memory (``VmHWM``),
  the set-up's streaming pass, the epoch and the write, timed;
* ``throughput``: on the same kind of file with ``--cells`` cells, one epoch in memory and one
  out of core, in fresh processes: cells per second and their ratio;
* ``ddp``: the validation ELBO after the same epochs of one process and of two processes
  (``torchrun``, gloo on 127.0.0.1) on the Kang data, and their relative difference.

    .bench-venv/bin/python benchmarks/bench_atlas.py epoch --cells 10000000
    .bench-venv/bin/python benchmarks/bench_atlas.py throughput --cells 1000000
    .bench-venv/bin/python benchmarks/bench_atlas.py ddp --epochs 100
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402


def write_simulated(path: Path, n_cells: int, n_genes: int = 2000, density: float = 0.06,
                    chunk: int = 50_000, seed: int = 0) -> Path:
    """Write an ``n_cells x n_genes`` CSR ``.h5ad`` chunk by chunk (NB-like counts, 2 batches)."""
    import anndata
    import h5py
    import pandas as pd

    if path.exists():
        return path
    rng = np.random.default_rng(seed)
    gene_p = rng.gamma(0.6, 1.0, n_genes)
    gene_p /= gene_p.sum()
    tmp = path.with_name(path.name + ".tmp")
    obs = pd.DataFrame({"batch": pd.Categorical(np.where(np.arange(n_cells) % 2, "b1", "b0"))},
                       index=pd.Index([f"c{i}" for i in range(n_cells)], dtype=str))
    anndata.AnnData(obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)])
                    ).write_h5ad(tmp)
    per_cell = int(density * n_genes)
    with h5py.File(tmp, "r+") as f:
        if "X" in f:
            del f["X"]
        g = f.create_group("X")
        g.attrs["encoding-type"] = "csr_matrix"
        g.attrs["encoding-version"] = "0.1.0"
        g.attrs["shape"] = (n_cells, n_genes)
        cap = n_cells * per_cell
        data = g.create_dataset("data", shape=(0,), maxshape=(cap,), dtype=np.float32,
                                chunks=(1 << 20,))
        indices = g.create_dataset("indices", shape=(0,), maxshape=(cap,), dtype=np.int32,
                                   chunks=(1 << 20,))
        indptr = np.zeros(n_cells + 1, dtype=np.int64)
        nnz = 0
        for start in range(0, n_cells, chunk):
            n = min(chunk, n_cells - start)
            cols = np.sort(rng.random((n, n_genes)).argpartition(per_cell, axis=1)[:, :per_cell]
                           , axis=1)
            lam = gene_p[cols] * rng.lognormal(np.log(3000), 0.3, (n, 1)) / density
            vals = (rng.poisson(rng.gamma(3.0, lam / 3.0)) + 1).astype(np.float32)
            k = n * per_cell
            data.resize((nnz + k,))
            indices.resize((nnz + k,))
            data[nnz:nnz + k] = vals.ravel()
            indices[nnz:nnz + k] = cols.ravel().astype(np.int32)
            indptr[start + 1:start + n + 1] = nnz + per_cell * np.arange(1, n + 1)
            nnz += k
        g.create_dataset("indptr", data=indptr)
    os.replace(tmp, path)
    return path


def _vmhwm_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker_epoch(path: str, out_dir: str, mode: str) -> dict:
    import anndata
    import torch

    import cellvi

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    adata = (anndata.read_h5ad(path, backed="r") if mode == "disk"
             else anndata.read_h5ad(path))
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    cellvi.model.SCVI.setup_anndata(adata, batch_key="batch")
    setup = time.perf_counter() - t0
    model = cellvi.model.SCVI(adata)
    t0 = time.perf_counter()
    model.train(max_epochs=1, progress_bar=False, seed=0, n_epochs_kl_warmup=None)
    train = time.perf_counter() - t0
    result = {"mode": mode, "cells": adata.n_obs, "load_s": load, "setup_s": setup,
              "train_s": train,
              "train_cells_per_s": len(model.train_indices) / train,
              "elbo_validation": float(model.history["elbo_validation"].iloc[-1])}
    if out_dir:
        t0 = time.perf_counter()
        model.write_latent_representation(Path(out_dir) / f"latent-{mode}.h5ad")
        result["write_latent_s"] = time.perf_counter() - t0
    result["peak_rss_mb"] = _vmhwm_mb()
    return result


def _run_worker(args: list[str]) -> dict:
    env = _common.thread_env(2)
    proc = subprocess.run([sys.executable, __file__, "worker", *args], capture_output=True,
                          text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ddp(epochs: int) -> dict:
    script = Path(__file__).with_name("_ddp_kang.py")
    out = {}
    for nproc in (1, 2):
        env = {**_common.thread_env(1), "CELLVI_EPOCHS": str(epochs)}
        if nproc == 1:
            cmd = [sys.executable, str(script)]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                   "--master_addr=127.0.0.1", "--master_port=29517", str(script)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-3000:])
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1]
        out[nproc] = {**json.loads(line), "wall_s": time.perf_counter() - t0}
    a, b = out[1]["elbo_validation"], out[2]["elbo_validation"]
    out["relative_difference"] = abs(b - a) / abs(a)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["epoch", "throughput", "ddp", "worker"])
    p.add_argument("--cells", type=int, default=1_000_000)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--cache-dir", default="/tmp/cellvi-bench-data")
    p.add_argument("worker_args", nargs="*")
    args = p.parse_args(argv)
    if args.what == "worker":
        path, out_dir, mode = args.worker_args
        print(json.dumps(worker_epoch(path, out_dir, mode)))
        return 0
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    if args.what == "ddp":
        print(json.dumps(ddp(args.epochs), indent=1))
        return 0
    path = cache / f"atlas-{args.cells}.h5ad"
    t0 = time.perf_counter()
    write_simulated(path, args.cells)
    print(f"[bench_atlas] {path}: {path.stat().st_size / 2**30:.2f} GiB "
          f"(written in {time.perf_counter() - t0:.0f} s if new)", flush=True)
    if args.what == "epoch":
        print(json.dumps(_run_worker([str(path), str(cache), "disk"]), indent=1))
    else:
        results = [_run_worker([str(path), "", mode]) for mode in ("memory", "disk")]
        for r in results:
            print(json.dumps(r))
        print(f"out-of-core / in-memory throughput: "
              f"x{results[1]['train_cells_per_s'] / results[0]['train_cells_per_s']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
