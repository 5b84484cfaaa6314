"""gimVI: cellvi vs scvi-tools 1.4.2, imputation of held-out spatial genes and training speed.

Each run builds one design, hides a fifth of the spatial side's genes, trains both tools with
the same settings (scvi-tools' GIMVI defaults: ZINB + modelled library for the sequencing side,
NB + observed library for the spatial side, n_latent 10, kappa 5, batch size 128, 90 % train,
Adam lr 1e-3, KL warm-up over 400 epochs) and scores the imputation as the gimVI paper does:
the median over the held-out genes of the Spearman correlation, across the spatial cells,
between the imputed values (``get_imputed_values(normalized=False)``, the expected counts) and
the measured counts. Each tool runs in its own subprocess, in alternating order, with the same
thread count.

Designs (``--designs``):

* ``sim-clusters``, ``sim-continuous``, ``sim-batches``, ``sim-unbalanced``: simulations with a
  shared latent space (:func:`simulate`): the sequencing side measures every gene, the spatial
  side a subset with its own per-gene capture efficiency, smaller libraries and less
  overdispersion; clusters, a continuous trajectory, two batches on each side, or cell-type
  proportions that differ between the sides (one type absent from the spatial side).
* ``osmfish``, ``starmap``: the real spatial sets split by cells: a random half plays the
  sequencing side with all genes, the other half the spatial side with a fifth of the genes
  hidden (fold ``k`` of five of a fixed random order of the genes).

Also printed: a baseline that needs no model (each held-out gene's mean fraction on the
sequencing side times the spatial cell's library size: Spearman with the library size), and
the training throughput (cells per second: every step takes one minibatch of each side), also
per second of the worker's CPU time (what the training costs when other work shares the cores;
meaningful with ``--threads 1``).

Run::

    .bench-venv/bin/python benchmarks/bench_gimvi.py                    # every design
    .bench-venv/bin/python benchmarks/bench_gimvi.py --designs osmfish --folds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

DATA = _common.REPO_ROOT.parent / "shared" / "data"
OSMFISH = DATA / "osmfish" / "smfish.h5ad"
STARMAP = DATA / "starmap" / "mpfc-starmap.loom"
SIM_DESIGNS = ("sim-clusters", "sim-continuous", "sim-batches", "sim-unbalanced")
DESIGNS = (*SIM_DESIGNS, "osmfish", "starmap")
BATCH_SIZE, TRAIN_SIZE, KAPPA = 128, 0.9, 5


# --------------------------------------------------------------------------------------------
# designs
# --------------------------------------------------------------------------------------------
def simulate(design: str, seed: int, n_seq: int = 1500, n_spatial: int = 1200,
             n_genes: int = 400, n_spatial_genes: int = 60, n_latent: int = 6):
    """Two datasets with a shared latent space; return ``(adata_seq, adata_spatial)``.

    ``z`` (``n_latent`` dims) comes from cluster centres plus noise (``"sim-clusters"``,
    ``"sim-batches"``, ``"sim-unbalanced"``) or from a smooth curve (``"sim-continuous"``);
    the expression is ``softmax(z W + b)`` over all genes. Sequencing: every gene, library
    ~ LogNormal(log 3000, 0.4), NB with theta 3 and 10 % extra zeros. Spatial: a random subset
    of genes, each with a capture efficiency ~ LogNormal(0, 0.5), library ~ LogNormal(log 250,
    0.4) over those genes, NB with theta 20. ``"sim-batches"``: two batches per side, each
    with a per-gene log-normal factor (sd 0.3). ``"sim-unbalanced"``: type proportions
    differ between the sides, and one type has no spatial cells.
    """
    import anndata
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(1000 + seed)
    n_types = 6
    w = rng.normal(0, 1.0, (n_latent, n_genes)) * (rng.random((n_latent, n_genes)) < 0.5)
    b = rng.normal(0, 1.0, n_genes)
    centres = rng.normal(0, 1.6, (n_types, n_latent))

    def latent(n, props):
        if design == "sim-continuous":
            t = rng.random(n)
            basis = np.stack([np.sin(np.pi * (k + 1) * t) for k in range(n_latent)], 1)
            return 1.8 * basis + rng.normal(0, 0.3, (n, n_latent)), (t * n_types).astype(int)
        types = rng.choice(n_types, n, p=props)
        return centres[types] + rng.normal(0, 0.5, (n, n_latent)), types

    uniform = np.full(n_types, 1 / n_types)
    seq_props = uniform
    sp_props = uniform
    if design == "sim-unbalanced":
        seq_props = rng.dirichlet(np.full(n_types, 2.0))
        sp_props = rng.dirichlet(np.full(n_types, 2.0))
        sp_props[0] = 0
        sp_props /= sp_props.sum()
    n_batch = 2 if design == "sim-batches" else 1
    spatial_genes = np.sort(rng.choice(n_genes, n_spatial_genes, replace=False))
    efficiency = rng.lognormal(0, 0.5, n_spatial_genes)

    def counts(n, props, genes, lib_mean, theta, zero_frac, gene_factor):
        z, types = latent(n, props)
        batch = rng.integers(0, n_batch, n)
        logits = z @ w + b
        p = np.exp(logits - logits.max(1, keepdims=True))[:, genes] * gene_factor
        batch_fc = rng.lognormal(0, 0.3, (n_batch, len(genes))) if n_batch > 1 else \
            np.ones((1, len(genes)))
        p = p * batch_fc[batch]
        p /= p.sum(1, keepdims=True)
        lib = rng.lognormal(np.log(lib_mean), 0.4, n)
        mu = p * lib[:, None]
        x = rng.poisson(rng.gamma(theta, mu / theta))
        if zero_frac:
            x[rng.random(x.shape) < zero_frac] = 0
        x[x.sum(1) == 0, 0] = 1
        return x.astype(np.float32), types, batch

    xs, ts, bs = counts(n_seq, seq_props, np.arange(n_genes), 3000, 3.0, 0.1, 1.0)
    xf, tf, bf = counts(n_spatial, sp_props, spatial_genes, 250, 20.0, 0.0, efficiency)
    names = np.array([f"gene{j}" for j in range(n_genes)])
    seq = anndata.AnnData(sp.csr_matrix(xs), obs=pd.DataFrame(index=[f"s{i}" for i in
                                                                     range(n_seq)]))
    seq.var_names = names
    spatial = anndata.AnnData(sp.csr_matrix(xf), obs=pd.DataFrame(index=[f"f{i}" for i in
                                                                         range(n_spatial)]))
    spatial.var_names = names[spatial_genes]
    for a, types, batch in ((seq, ts, bs), (spatial, tf, bf)):
        a.obs["cell_type"] = pd.Categorical([f"type{t}" for t in types])
        a.obs["batch"] = pd.Categorical([f"b{v}" for v in batch])
    return seq, spatial


def split_real(adata, seed: int):
    """Split a spatial set's cells in two random halves: ``(sequencing side, spatial side)``."""
    perm = np.random.default_rng(seed).permutation(adata.n_obs)
    half = adata.n_obs // 2
    return adata[np.sort(perm[:half])].copy(), adata[np.sort(perm[half:])].copy()


def make_design(design: str, seed: int, fold: int):
    """Return ``(adata_seq, adata_spatial_train, held_out_genes, measured)`` for one run.

    ``measured`` is the ``(spatial cells, held-out genes)`` dense matrix of counts hidden from
    the model; the held-out genes are fold ``fold`` of five of a random order (fixed by
    ``seed``) of the spatial side's genes.
    """
    from cellvi.data import read_osmfish, read_starmap

    if design in SIM_DESIGNS:
        seq, spatial = simulate(design, seed)
    elif design == "osmfish":
        seq, spatial = split_real(read_osmfish(OSMFISH), seed)
    elif design == "starmap":
        seq, spatial = split_real(read_starmap(STARMAP), seed)
    else:
        raise ValueError(f"unknown design {design!r}; use one of {DESIGNS}")
    genes = np.asarray(spatial.var_names)
    order = np.random.default_rng(seed + 7).permutation(len(genes))
    held = np.sort(order[fold::5])
    held_genes = list(genes[held])
    kept = [g for g in genes if g not in set(held_genes)]
    measured = spatial[:, held_genes].X
    measured = measured.toarray() if hasattr(measured, "toarray") else np.asarray(measured)
    spatial_train = spatial[:, kept].copy()
    # cells that lost all their counts with the hidden genes have no observed library
    keep_cells = np.asarray(spatial_train.X.sum(1)).reshape(-1) > 0
    seq_cells = np.asarray(seq.X.sum(1)).reshape(-1) > 0
    return (seq[seq_cells].copy(), spatial_train[keep_cells].copy(), held_genes,
            measured[keep_cells])


def median_spearman(imputed: np.ndarray, measured: np.ndarray) -> float:
    """Median over genes (columns) of the Spearman correlation across cells (NaN as 0)."""
    from scipy.stats import spearmanr

    rhos = []
    for j in range(measured.shape[1]):
        if np.ptp(measured[:, j]) == 0 or np.ptp(imputed[:, j]) == 0:
            rhos.append(0.0)
            continue
        rhos.append(float(spearmanr(imputed[:, j], measured[:, j])[0]))
    return float(np.median(rhos))


def baseline(seq, spatial_train, held_genes, measured) -> float:
    """Mean-expression baseline: the seq side's mean fraction of the gene times the library."""
    x = seq.X.toarray() if hasattr(seq.X, "toarray") else np.asarray(seq.X)
    frac = (x / x.sum(1, keepdims=True)).mean(0)
    pos = [list(seq.var_names).index(g) for g in held_genes]
    lib = np.asarray(spatial_train.X.sum(1)).reshape(-1, 1)
    return median_spearman(lib * frac[pos][None, :], measured)


# --------------------------------------------------------------------------------------------
# workers
# --------------------------------------------------------------------------------------------
def _score(imputed_spatial: np.ndarray, var_names, held_genes, measured) -> dict:
    pos = [list(var_names).index(g) for g in held_genes]
    return {"spearman": median_spearman(imputed_spatial[:, pos], measured)}


def run_scvi_tools(args) -> dict:
    import logging
    import warnings

    timer = _common.Timer()
    with timer("import"):
        import scvi
        from scvi.external import GIMVI
    warnings.filterwarnings("ignore")
    for name in ("scvi", "lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    _common.set_threads(args.threads)
    seq, spatial, held, measured = make_design(args.design, args.seed, args.fold)
    scvi.settings.seed = args.model_seed
    scvi.settings.verbosity = logging.ERROR
    _common.set_threads(args.threads)
    GIMVI.setup_anndata(seq)
    GIMVI.setup_anndata(spatial)
    model = GIMVI(seq, spatial)
    cpu = time.process_time()
    with timer("train"):
        model.train(max_epochs=args.epochs, kappa=KAPPA, batch_size=BATCH_SIZE,
                    train_size=TRAIN_SIZE, accelerator="cpu", devices=1,
                    enable_progress_bar=False)
    timer.times["train_cpu"] = time.process_time() - cpu
    _, imputed = model.get_imputed_values(normalized=False)
    return _result(args, timer, seq, spatial, _score(imputed, seq.var_names, held, measured),
                   baseline(seq, spatial, held, measured), scvi.__version__)


def run_cellvi(args) -> dict:
    timer = _common.Timer()
    with timer("import"):
        import torch  # noqa: F401

        import cellvi
        from cellvi.model import GIMVI
    _common.set_threads(args.threads)
    seq, spatial, held, measured = make_design(args.design, args.seed, args.fold)
    cellvi.settings.seed = args.model_seed
    GIMVI.setup_anndata(seq)
    GIMVI.setup_anndata(spatial)
    model = GIMVI(seq, spatial, **json.loads(args.options))
    cpu = time.process_time()
    with timer("train"):
        model.train(max_epochs=args.epochs, kappa=KAPPA, batch_size=BATCH_SIZE,
                    train_size=TRAIN_SIZE, seed=args.model_seed, progress_bar=False,
                    device="cpu",
                    check_val_every_n_epoch=args.epochs)
    timer.times["train_cpu"] = time.process_time() - cpu
    _, imputed = model.get_imputed_values(normalized=False)
    return _result(args, timer, seq, spatial,
                   _score(imputed, model.var_names, held, measured),
                   baseline(seq, spatial, held, measured), cellvi.__version__)


def _result(args, timer, seq, spatial, score, base, version) -> dict:
    n_train = [int(np.ceil(TRAIN_SIZE * a.n_obs)) for a in (seq, spatial)]
    steps = max(-(-n // BATCH_SIZE) for n in n_train) * args.epochs
    return {
        "tool": args.worker_tool, "design": args.design, "seed": args.seed, "fold": args.fold,
        "model_seed": args.model_seed,
        "epochs": args.epochs, "threads": args.threads, "version": version,
        "n_seq": seq.n_obs, "n_spatial": spatial.n_obs, "genes_seq": seq.n_vars,
        "genes_spatial": spatial.n_vars, **score, "baseline": base,
        "train_s": timer.times["train"], "import_s": timer.times["import"],
        "cells_per_s": steps * 2 * BATCH_SIZE / timer.times["train"],
        # per second of the process's CPU time: the work, whatever else shares the cores
        # (with one thread; more threads add their waiting)
        "cells_per_cpu_s": steps * 2 * BATCH_SIZE / timer.times["train_cpu"],
    }


WORKERS = {"cellvi": run_cellvi, "scvi-tools": run_scvi_tools}


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--designs", nargs="+", default=list(DESIGNS), choices=DESIGNS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--folds", nargs="+", type=int, default=[0])
    p.add_argument("--model-seeds", nargs="+", type=int, default=None,
                   help="seeds of the models (default: the data seed)")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", choices=["cellvi", "scvi-tools", "both"], default="both")
    p.add_argument("--options", default="{}", help="cellvi GIMVI options, as JSON")
    p.add_argument("--json", default=None, help="also write all results to this JSON file")
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-tool", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--design", default=None, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--fold", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--model-seed", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


METRICS = [
    ("spearman", "median Spearman, held-out genes", 3, "reldiff"),
    ("baseline", "  mean-expression baseline", 3, ""),
    ("cells_per_s", "training throughput (cells/s)", 0, "rate"),
    ("cells_per_cpu_s", "  per CPU second (cells/s)", 0, "rate"),
    ("train_s", "train time (s)", 1, "time"),
]


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker_out:
        _common.write_result(args.worker_out, WORKERS[args.worker_tool](args))
        return
    if args.only != "cellvi":
        _common.ensure_reference_env(__file__, sys.argv[1:] if argv is None else argv)
    tools = list(_common.TOOLS) if args.only == "both" else [args.only]
    everything: dict[str, list[dict]] = {t: [] for t in tools}
    by_design: dict[str, dict[str, list[dict]]] = {}
    runs = [(d, s, f, m) for d in args.designs for s in args.seeds
            for f in (args.folds if d in ("osmfish", "starmap") else [0])
            for m in (args.model_seeds if args.model_seeds is not None else [s])]
    start = time.perf_counter()
    for i, (design, seed, fold, model_seed) in enumerate(runs):
        order = tools if i % 2 == 0 else tools[::-1]
        for tool in order:
            load = _common.others_busy_cores(1.0)
            print(f"[bench_gimvi] {tool}: {design} seed {seed} fold {fold} model seed "
                  f"{model_seed}, {args.epochs} "
                  f"epochs, {args.threads} threads (others busy: {load:.1f} cores) ...",
                  flush=True)
            res = _common.run_worker(__file__, [
                "--worker-tool", tool, "--design", design, "--seed", seed, "--fold", fold,
                "--model-seed", model_seed,
                "--epochs", args.epochs, "--threads", args.threads, "--options", args.options,
            ], args.threads, quiet=True)
            res["others_cores"] = load
            print(f"    spearman {res['spearman']:.3f} (baseline {res['baseline']:.3f}), "
                  f"{res['cells_per_s']:.0f} cells/s", flush=True)
            everything[tool].append(res)
            by_design.setdefault(design, {t: [] for t in tools})[tool].append(res)
    for design, results in by_design.items():
        _common.print_speedup_table(results, METRICS, title=f"{design} (median [min, max] over "
                                    f"{len(results[tools[0]])} run(s))")
    _common.print_speedup_table(everything, METRICS, title="all runs")
    print(f"[bench_gimvi] {len(runs)} run(s) in {time.perf_counter() - start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(everything, indent=1))


if __name__ == "__main__":
    main()
