"""TOTALVI: cellvi vs scvi-tools 1.4.2 on CITE-seq data, same settings, same split.

Designs:

``sim``
    Simulated CITE-seq with known foreground and background (:func:`simulate_citeseq`): cell
    types with marker genes and marker proteins, a per-protein background that varies between
    droplets and batches, a per-batch capture efficiency, and a quarter of the cells of the
    second batch given their own batch ``"hidden"`` with every protein set to zero. Each seed
    changes the data and the design: 12 or 30 proteins, weak or strong batch effects, one
    protein missing from the first batch or none.
``pbmc``
    ``../shared/data/pbmc_citeseq``: the 10k (14 proteins) and 5k (29 proteins) PBMC subsets,
    200 cells each, as two batches on the union panel (the 10k batch lacks 15 proteins) and
    their common genes (the 4,000 with the most counts).
``pbmc_hide``
    ``pbmc`` with half of the 14 proteins both panels measured (chosen by ``seed``) set to zero
    in every cell of the 10k batch: the model treats them as missing there, and their
    imputation for the 10k cells (``transform_batch`` the 5k batch) is scored against the
    hidden counts.
``cd8``
    ``../shared/data/cd8_citeseq``: 1,774 CD8-sorted cells, 5 proteins, the 4,000 genes with
    the most counts (read with :func:`cellvi.data.read_citeseq_csv`).
``speed``
    A larger simulation (``--speed-cells`` x 4,000 genes x 30 proteins, two batches), a fixed
    number of epochs: training throughput, query times and peak memory.

Both tools train scvi-tools' TOTALVI defaults (n_latent 20, n_hidden 256, 2 encoder layers,
one decoder layer, dropout 0.2, NB genes, lr 4e-3, batch size 256, early stopping and lr
reduction on the validation ELBO, KL warm-up over 0.75 * n_cells optimizer steps, the
adversarial classifier when a protein is missing from a batch, the empirical background prior
above 10 proteins) on the same training cells: cellvi's split for ``seed`` is given to
scvi-tools as ``external_indexing=[train, validation]``. ``--empirical-prior true`` forces the
empirical prior on (the no-NaN check of issue 20). Each tool runs in its own subprocess with 2
threads, the order alternating between runs.

Scored per run: the validation ELBO per cell (each tool's ``get_elbo`` on the same validation
cells, torch seeded first; the ELBO includes the background regularisers both tools add), the
history's best and last validation ELBO and whether any epoch was NaN; on ``sim``, the AUROC of
the foreground probability against the simulated truth (median over proteins, measured
cells); on ``sim`` and ``pbmc_hide``, the Pearson correlation of log(1 + imputed protein) with
the hidden counts (median over the hidden proteins; imputed with ``transform_batch`` the
second batch, or the 5k batch, 5 samples; the default is the foreground,
:math:`(1 - \\pi)\\alpha\\beta`, and the score is repeated with
``include_protein_background=True``, the expected counts the hidden truth is drawn from); on the
latent space the batch mixing (entropy of the batch among 30 neighbours, 1 = perfect) and the type
separation (15-nearest-neighbour accuracy, half the cells predicting the other half); the
training throughput (cells x epochs / s) and the time of three queries (latent, normalised
expression, foreground probability; best of two calls, each tool's default batch size); the
peak resident memory of the worker (``VmHWM``).

Run with the reference environment::

    .bench-venv/bin/python benchmarks/bench_totalvi.py                        # all designs
    .bench-venv/bin/python benchmarks/bench_totalvi.py --designs sim --seeds 0 1 2 3
    .bench-venv/bin/python benchmarks/bench_totalvi.py --designs pbmc_hide --seeds 0 1 2 3
    .bench-venv/bin/python benchmarks/bench_totalvi.py --designs pbmc cd8 \
        --seeds 0 1 2 3 4 --empirical-prior true
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

DESIGNS = ("sim", "pbmc", "pbmc_hide", "cd8", "speed")
KEY = "protein_expression"
SHARED = _common.REPO_ROOT.parent / "shared" / "data"
TRAIN_SIZE = 0.9
N_TOP_GENES = 4000

METRICS = [
    ("elbo_validation", "validation ELBO / cell (get_elbo, same cells)", 2, "reldiff"),
    ("elbo_best", "best validation ELBO in the history", 2, "reldiff"),
    ("auroc", "foreground AUROC (median over proteins)", 4, "reldiff"),
    ("impute_pearson", "imputed vs hidden proteins, Pearson (median)", 4, "reldiff"),
    ("impute_pearson_total", "the same, background included", 4, "reldiff"),
    ("batch_entropy", "latent batch mixing (entropy, 30 NN)", 4, "reldiff"),
    ("type_accuracy", "latent type separation (15-NN accuracy)", 4, "reldiff"),
    ("epochs", "epochs trained", 0, ""),
    ("cells_epochs_per_s", "training throughput (cells x epochs / s)", 0, "rate"),
    ("latent_s", "get_latent_representation (s)", 3, "time"),
    ("normalized_s", "get_normalized_expression (s)", 3, "time"),
    ("foreground_s", "get_protein_foreground_probability (s)", 3, "time"),
    ("peak_rss_mb", "peak RSS of the worker (MiB)", 0, "mem"),
]


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
def simulate_citeseq(seed: int, n_cells: int = 3000, n_genes: int = 1000,
                     n_proteins: int | None = None, batch_effect: float | None = None,
                     hide: float = 0.25, missing: bool | None = None):
    """Return an AnnData of CITE-seq counts with the truth in ``obsm``/``obs``.

    Two batches, 6 cell types (each a mix of two sub-states); genes: NB counts with type
    marker genes, a per-gene batch factor (log-normal, sd ``batch_effect``) and log-normal
    libraries. Proteins: protein ``t`` is on in a random subset of the types (90% of the cells
    of those types, 3% of the others); the background of a cell is
    ``b_t * e_{t,s} * d_n`` (protein level, batch efficiency, droplet ambient level), the
    foreground ``(1 + f_t) * background * u_{nt}`` with ``f_t`` log-normal around 12 and
    ``u`` a cell-level variation; NB counts with a protein-specific dispersion. Defaults of
    the design that follow ``seed``: 12 or 30 proteins, batch effect 0.3 or 0.8, one protein
    missing from the first batch or none. A fraction ``hide`` of the second batch's cells gets
    the batch ``"hidden"`` and zero proteins (``obs["hidden"]``; the counts before hiding are
    in ``obsm["protein_truth"]``, the foreground indicator in ``obsm["foreground"]``).
    """
    import anndata
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(1000 + seed)
    n_proteins = n_proteins or (12, 30)[seed % 2]
    batch_effect = batch_effect if batch_effect is not None else (0.3, 0.8)[(seed // 2) % 2]
    missing = missing if missing is not None else bool((seed // 4) % 2)
    n_types, n_batches = 6, 2
    types = rng.integers(0, n_types, n_cells)
    sub = rng.integers(0, 2, n_cells)
    batches = rng.integers(0, n_batches, n_cells)
    base = rng.gamma(0.6, 1.0, n_genes) + 0.02
    type_fc = np.exp(rng.normal(0, 1.0, (n_types, n_genes))
                     * (rng.random((n_types, n_genes)) < 0.25))
    sub_fc = np.exp(rng.normal(0, 0.5, (n_types, 2, n_genes))
                    * (rng.random((n_types, 2, n_genes)) < 0.1))
    batch_fc = np.exp(rng.normal(0, batch_effect, (n_batches, n_genes)))
    mean = base * type_fc[types] * sub_fc[types, sub] * batch_fc[batches]
    mean /= mean.sum(1, keepdims=True)
    library = rng.lognormal(np.log(2500) + rng.normal(0, 0.2, n_batches)[batches], 0.4)
    mu = mean * library[:, None]
    theta = np.exp(rng.normal(np.log(4), 0.5, n_genes))
    x = rng.poisson(rng.gamma(theta, mu / theta)).astype(np.float32)
    x[x.sum(1) == 0, 0] = 1
    on = rng.random((n_types, n_proteins)) < 0.35
    on[rng.integers(n_types, size=n_proteins), np.arange(n_proteins)] = True
    fg = on[types] & (rng.random((n_cells, n_proteins)) < 0.9)
    fg |= ~on[types] & (rng.random((n_cells, n_proteins)) < 0.03)
    level = rng.lognormal(np.log(15), 0.9, n_proteins)
    efficiency = rng.lognormal(0, 0.3, (n_batches, n_proteins))
    droplet = rng.lognormal(0, 0.3, n_cells)
    back = level * efficiency[batches] * droplet[:, None]
    fold = 1 + rng.lognormal(np.log(12), 0.6, n_proteins)
    rate = np.where(fg, back * fold * rng.lognormal(0, 0.3, (n_cells, n_proteins)), back)
    phi = rng.uniform(4, 20, n_proteins)
    y = rng.poisson(rng.gamma(phi, rate / phi)).astype(np.float32)
    if missing:
        y[batches == 0, 0] = 0
    hidden = (batches == 1) & (rng.random(n_cells) < 2 * hide)
    truth = y.copy()
    y[hidden] = 0
    names = [f"b{b}" for b in batches]
    adata = anndata.AnnData(sp.csr_matrix(x))
    adata.obs_names = [f"cell{i}" for i in range(n_cells)]
    adata.var_names = [f"gene{j}" for j in range(n_genes)]
    adata.obs["batch"] = pd.Categorical(np.where(hidden, "hidden", names))
    adata.obs["source_batch"] = pd.Categorical(names)
    adata.obs["cell_type"] = pd.Categorical([f"type{t}" for t in types])
    adata.obs["hidden"] = hidden
    adata.obsm[KEY] = y
    adata.obsm["protein_truth"] = truth
    adata.obsm["foreground"] = fg
    adata.uns["protein_names"] = np.array([f"prot{t}" for t in range(n_proteins)])
    adata.uns["impute_batch"] = "b1"
    return adata


def _top_genes(adata, n: int):
    totals = np.asarray(adata.X.sum(0)).ravel()
    keep = np.sort(np.argsort(-totals)[: min(n, adata.n_vars)])
    return adata[:, keep].copy()


def load_pbmc():
    """The two PBMC subsets on their common genes and the union of their panels."""
    import anndata
    import pandas as pd
    import scipy.sparse as sp

    parts = []
    for name in ("pbmc_10k_protein_v3", "pbmc_5k_protein_v3"):
        a = anndata.read_h5ad(SHARED / "pbmc_citeseq" / f"{name}.h5ad")
        a.obsm[KEY] = pd.DataFrame(a.obsm[KEY], index=a.obs_names,
                                   columns=[str(p) for p in a.uns["protein_names"]])
        del a.uns["protein_names"]
        a.obs["batch"] = name
        parts.append(a)
    genes = parts[0].var_names.intersection(parts[1].var_names)
    union = sorted(set(parts[0].obsm[KEY].columns) | set(parts[1].obsm[KEY].columns))
    for a in parts:
        a.obsm[KEY] = a.obsm[KEY].reindex(columns=union, fill_value=0)
    adata = anndata.concat([a[:, genes] for a in parts], index_unique="-")
    adata.X = sp.csr_matrix(np.asarray(adata.X, dtype=np.float32))
    adata.obsm[KEY] = adata.obsm[KEY].to_numpy(dtype=np.float32)
    adata.uns["protein_names"] = np.array(union)
    return _top_genes(adata, N_TOP_GENES)


def hide_shared_proteins(adata, seed: int, batch: str = "pbmc_10k_protein_v3",
                         into: str = "pbmc_5k_protein_v3"):
    """Zero, in every cell of ``batch``, half of the proteins measured in both batches.

    The hidden proteins (chosen by ``seed``) are then missing from ``batch`` for the model;
    ``obs["hidden"]`` marks the cells of ``batch``, ``obsm["protein_truth"]`` keeps the
    counts before hiding, ``uns["hidden_proteins"]`` the hidden columns and
    ``uns["impute_batch"]`` the batch to impute them as (``into``).
    """
    y = np.asarray(adata.obsm[KEY]).copy()
    cells = (adata.obs["batch"] == batch).to_numpy()
    shared = np.flatnonzero((y[cells] > 0).any(0) & (y[~cells] > 0).any(0))
    rng = np.random.default_rng(2000 + seed)
    hide = np.sort(rng.choice(shared, size=len(shared) // 2, replace=False))
    adata.obsm["protein_truth"] = y.copy()
    y[np.ix_(cells, hide)] = 0
    adata.obsm[KEY] = y
    adata.obs["hidden"] = cells
    adata.uns["hidden_proteins"] = hide
    adata.uns["impute_batch"] = into
    return adata


def load_cd8():
    """The CD8 CITE-seq cells (cellvi's CSV reader; both tools get the same matrix)."""
    from cellvi.data import read_citeseq_csv

    folder = SHARED / "cd8_citeseq"
    adata = read_citeseq_csv(folder / "GSE100866_CD8_merged-RNA_umi.csv.gz",
                             folder / "GSE100866_CD8_merged-ADT_umi.csv.gz")
    adata = _top_genes(adata, N_TOP_GENES)
    return adata[np.asarray(adata.X.sum(1)).ravel() > 0].copy()


def load(args):
    if args.design == "sim":
        return simulate_citeseq(args.seed, n_cells=args.sim_cells, n_genes=args.sim_genes)
    if args.design == "speed":
        return simulate_citeseq(args.seed, n_cells=args.speed_cells, n_genes=4000,
                                n_proteins=30, hide=0.0, missing=False)
    if args.design == "pbmc":
        return load_pbmc()
    if args.design == "pbmc_hide":
        return hide_shared_proteins(load_pbmc(), args.seed)
    return load_cd8()


# --------------------------------------------------------------------------------------------
# scores
# --------------------------------------------------------------------------------------------
def score_latent(z: np.ndarray, adata) -> dict:
    from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors

    out = {}
    batch = adata.obs["batch"].astype(str).to_numpy() if "batch" in adata.obs else np.zeros(1)
    cats = np.unique(batch)
    if len(cats) > 1:
        idx = NearestNeighbors(n_neighbors=31).fit(z).kneighbors(z, return_distance=False)[:, 1:]
        counts = np.stack([(batch[idx] == c).mean(1) for c in cats], 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            ent = -np.where(counts > 0, counts * np.log(counts), 0).sum(1) / np.log(len(cats))
        out["batch_entropy"] = float(ent.mean())
    if "cell_type" in adata.obs:
        types = adata.obs["cell_type"].to_numpy()
        knn = KNeighborsClassifier(15).fit(z[::2], types[::2])
        out["type_accuracy"] = float(knn.score(z[1::2], types[1::2]))
    return out


def score_proteins(adata, foreground_prob: np.ndarray, imputed: np.ndarray | None,
                   imputed_total: np.ndarray | None = None) -> dict:
    from sklearn.metrics import roc_auc_score

    out = {}
    if "foreground" in adata.obsm:
        y = np.asarray(adata.obsm[KEY])
        batch = adata.obs["batch"].astype(str).to_numpy()
        fg = adata.obsm["foreground"]
        aucs = []
        for t in range(fg.shape[1]):
            # the cells of the batches that measured the protein
            measured = np.isin(batch, [b for b in np.unique(batch) if y[batch == b, t].any()])
            truth = fg[measured, t]
            if 0 < truth.mean() < 1:
                aucs.append(roc_auc_score(truth, foreground_prob[measured, t]))
        out["auroc"] = float(np.median(aucs))
    if imputed is not None:
        hidden = adata.obs["hidden"].to_numpy()
        truth = np.asarray(adata.obsm["protein_truth"])[hidden]
        columns = adata.uns.get("hidden_proteins", np.arange(truth.shape[1]))
        columns = [t for t in columns if truth[:, t].std() > 0]
        for key, value in (("impute_pearson", imputed), ("impute_pearson_total", imputed_total)):
            if value is not None:
                cors = [np.corrcoef(np.log1p(value[:, t]), np.log1p(truth[:, t]))[0, 1]
                        for t in columns]
                out[key] = float(np.nanmedian(cors))
    return out


def _best_of(fn, n: int = 2) -> float:
    best = np.inf
    for _ in range(n):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


# --------------------------------------------------------------------------------------------
# workers
# --------------------------------------------------------------------------------------------
def _settings(args, adata):
    train_idx, val_idx = _common.split_indices(adata.n_obs, TRAIN_SIZE, args.seed)
    epochs = args.epochs or int(min(round(20000 / adata.n_obs * 400), 400))
    if args.design == "speed":
        epochs = args.speed_epochs
    emp = {"auto": None, "true": True, "false": False}[args.empirical_prior]
    return train_idx, val_idx, epochs, emp


def _after_training(args, adata, model, val_idx, elbo_history, elbo_fn) -> dict:
    import torch

    hidden = adata.obs["hidden"].to_numpy() if "hidden" in adata.obs else None
    torch.manual_seed(args.seed)
    res = {"elbo_validation": float(elbo_fn(val_idx)),
           "elbo_best": float(np.nanmax(elbo_history)), "elbo_last": float(elbo_history[-1]),
           "any_nan": bool(not np.isfinite(elbo_history).all()),
           "epochs": len(elbo_history)}
    timings = {
        "latent_s": lambda: model.get_latent_representation(),
        "normalized_s": lambda: model.get_normalized_expression(),
        "foreground_s": lambda: model.get_protein_foreground_probability(),
    }
    for key, fn in timings.items():
        res[key] = _best_of(fn)
    if args.design == "speed":
        return res
    torch.manual_seed(args.seed)
    z = model.get_latent_representation()
    res["latent_finite"] = bool(np.isfinite(z).all())
    if not res["latent_finite"]:
        return res
    res.update(score_latent(z, adata))
    torch.manual_seed(args.seed)
    prob = np.asarray(model.get_protein_foreground_probability(n_samples=5, return_numpy=True))
    imputed = imputed_total = None
    if hidden is not None and hidden.any():
        impute = dict(indices=np.flatnonzero(hidden), transform_batch=adata.uns["impute_batch"],
                      n_samples=5, return_numpy=True)
        torch.manual_seed(args.seed)
        _, imputed = model.get_normalized_expression(**impute)
        torch.manual_seed(args.seed)
        _, imputed_total = model.get_normalized_expression(**impute,
                                                           include_protein_background=True)
    res.update(score_proteins(adata, prob, imputed, imputed_total))
    return res


def run_scvi_tools(args) -> dict:
    import logging
    import warnings

    import scvi
    import torch

    warnings.filterwarnings("ignore")
    for name in ("scvi", "lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    _common.set_threads(args.threads)
    adata = load(args)
    train_idx, val_idx, epochs, emp = _settings(args, adata)
    scvi.settings.seed = args.seed
    scvi.settings.verbosity = logging.ERROR
    _common.set_threads(args.threads)
    scvi.model.TOTALVI.setup_anndata(adata, protein_expression_obsm_key=KEY, batch_key="batch"
                                     if "batch" in adata.obs else None)
    model = scvi.model.TOTALVI(adata, empirical_protein_background_prior=emp)
    extra = {} if args.design != "speed" else dict(early_stopping=False,
                                                   reduce_lr_on_plateau=False)
    start = time.perf_counter()
    model.train(max_epochs=epochs, accelerator="cpu", devices=1, enable_progress_bar=False,
                check_val_every_n_epoch=1, external_indexing=[train_idx, val_idx], **extra)
    train_s = time.perf_counter() - start
    model.module.eval()
    hist = -model.history["elbo_validation"].iloc[:, 0].to_numpy(dtype=float)
    res = _after_training(args, adata, model, val_idx, hist,
                          lambda idx: model.get_elbo(indices=idx))
    res.update(version=scvi.__version__)
    torch.set_num_threads(args.threads)
    return _result(args, adata, train_idx, train_s, res)


def run_cellvi(args) -> dict:
    import cellvi
    from cellvi.model import TOTALVI

    _common.set_threads(args.threads)
    adata = load(args)
    train_idx, val_idx, epochs, emp = _settings(args, adata)
    TOTALVI.setup_anndata(adata, protein_expression_obsm_key=KEY,
                          batch_key="batch" if "batch" in adata.obs else None)
    model = TOTALVI(adata, empirical_protein_background_prior=emp)
    extra = {} if args.design != "speed" else dict(early_stopping=False,
                                                   reduce_lr_on_plateau=False)
    start = time.perf_counter()
    model.train(max_epochs=epochs, train_size=TRAIN_SIZE, seed=args.seed, progress_bar=False,
                device="cpu", **extra)
    train_s = time.perf_counter() - start
    assert np.array_equal(model.validation_indices, val_idx)
    hist = model.history["elbo_validation"].to_numpy(dtype=float)
    res = _after_training(args, adata, model, val_idx, hist,
                          lambda idx: model.get_elbo(indices=idx))
    res.update(version=cellvi.__version__, training_step=model.train_settings["training_step"])
    return _result(args, adata, train_idx, train_s, res)


def _result(args, adata, train_idx, train_s, res) -> dict:
    return {"tool": args.worker_tool, "design": args.design, "seed": args.seed,
            "n_cells": adata.n_obs, "n_genes": adata.n_vars,
            "n_proteins": int(np.asarray(adata.obsm[KEY]).shape[1]), "train_s": train_s,
            "cells_epochs_per_s": len(train_idx) * res["epochs"] / train_s, **res}


WORKERS = {"cellvi": run_cellvi, "scvi-tools": run_scvi_tools}


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--designs", nargs="+", default=list(DESIGNS), choices=DESIGNS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=None,
                   help="max epochs (default: scvi-tools' heuristic, at most 400)")
    p.add_argument("--sim-cells", type=int, default=3000)
    p.add_argument("--sim-genes", type=int, default=1000)
    p.add_argument("--speed-cells", type=int, default=20000)
    p.add_argument("--speed-epochs", type=int, default=3)
    p.add_argument("--empirical-prior", choices=["auto", "true", "false"], default="auto")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", choices=["cellvi", "scvi-tools", "both"], default="both")
    p.add_argument("--wait-quiet", action="store_true",
                   help="wait for a quiet machine before each run (see _common.wait_for_quiet)")
    p.add_argument("--json", default=None, help="also write all results to this JSON file")
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-tool", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--design", default="sim", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker_out:
        _common.write_result(args.worker_out, WORKERS[args.worker_tool](args))
        return
    tools = list(_common.TOOLS) if args.only == "both" else [args.only]
    runs = []
    i = 0
    for design in args.designs:
        for seed in args.seeds:
            order = tools if i % 2 == 0 else tools[::-1]  # alternate who goes first
            i += 1
            for tool in order:
                load = _common.wait_for_quiet() if args.wait_quiet else {}
                worker = ["--worker-tool", tool, "--design", design, "--seed", seed,
                          "--threads", args.threads, "--sim-cells", args.sim_cells,
                          "--sim-genes", args.sim_genes, "--speed-cells", args.speed_cells,
                          "--speed-epochs", args.speed_epochs,
                          "--empirical-prior", args.empirical_prior,
                          *(["--epochs", args.epochs] if args.epochs else [])]
                with _common.CpuMonitor() as mon:
                    res = _common.run_worker(__file__, worker, args.threads, quiet=True)
                res["others_cores"] = mon.others_cores
                res["loadavg_start"] = load.get("loadavg1", mon.loadavg_start)
                runs.append(res)
                print(f"[bench_totalvi] {design} seed {seed} {tool:10s}: ELBO "
                      f"{res['elbo_validation']:.2f} (best {res['elbo_best']:.2f}, NaN "
                      f"{res['any_nan']}), {res['epochs']} epochs, "
                      f"{res['cells_epochs_per_s']:.0f} cells x epochs / s, AUROC "
                      f"{res.get('auroc', float('nan')):.3f}, imputation "
                      f"{res.get('impute_pearson', float('nan')):.3f}, other load "
                      f"{mon.others_cores:.2f} cores", flush=True)
    for design in args.designs:
        sub = {t: [r for r in runs if r["tool"] == t and r["design"] == design] for t in tools}
        first = next(r for t in tools for r in sub[t])
        _common.print_speedup_table(
            sub, METRICS,
            title=(f"TOTALVI, {design}: {first['n_cells']} cells x {first['n_genes']} genes x "
                   f"{first['n_proteins']} proteins, seeds {args.seeds}, {args.threads} threads; "
                   "median [min, max]"))
        nan = {t: sum(r["any_nan"] or not r.get("latent_finite", True) for r in sub[t])
               for t in tools}
        print(f"runs with a NaN: {nan} of {len(args.seeds)} each")
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
