"""AUTOZI: cellvi vs scvi-tools 1.4.2 on simulations with a known set of zero-inflated genes.

Each simulation draws cells from a few cell types on a low-dimensional latent space, gives each
gene a mean per cell, and makes a random subset of the genes zero-inflated: an extra zero with
a gene-specific probability (uniform in ``[--pi-low, --pi-high]``). Designs:

``nb``
    Negative binomial counts (gene-specific inverse dispersion), one batch.
``nb-batches``
    The same in three batches with per-gene multiplicative batch effects and different library
    sizes (both tools get ``batch_key="batch"``).
``pln``
    Poisson log-normal counts, as in the AutoZI paper (Clivio et al., 2019, where AutoZI found
    TPR 0.944, FPR 0.032): ``x ~ Poisson(l * exp(eta))`` with a per-entry Normal term in
    ``eta``, so the non-inflated genes are over-dispersed without being negative binomial.
``pln-batches``
    The Poisson log-normal design in three batches.

Both tools train the same model (scvi-tools' AUTOZI defaults: n_hidden 128, n_latent 10, one
layer, dropout 0.1, gene dispersion, Beta(0.5, 0.5) prior, minimal dropout 0.01, one weight
per gene) on the same training cells (cellvi's split for ``seed``, passed to scvi-tools as
``datasplitter_kwargs={"external_indexing": [train, validation]}``), batch size 128, lr 1e-3,
the default number of epochs (``min(round(20000 / n_cells * 400), 400)``) unless ``--epochs``.
Each tool runs in its own subprocess with 2 threads, in alternating order.

Scored per run: the paper's decision rule (a gene is zero-inflated when
``q(delta < 0.5) > 0.5``, ``delta`` the weight of the NB component): true- and
false-positive rates against the simulated truth, the AUROC of ``q(delta < 0.5)``; the
validation ELBO per cell, ``-mean(reconstruction + KL_local) - KL_global / n_train`` on the
same validation cells (cellvi's ``get_elbo``; scvi-tools' ``get_elbo`` minus its
``compute_global_kl_divergence() / n_train``, torch seeded first); training throughput in
cells x epochs per second.

Run with the reference environment::

    .bench-venv/bin/python benchmarks/bench_autozi.py                       # all designs
    .bench-venv/bin/python benchmarks/bench_autozi.py --designs pln --seeds 0 1 2
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

DESIGNS = ("nb", "nb-batches", "pln", "pln-batches")
MODEL_KWARGS = dict(n_hidden=128, n_latent=10, n_layers=1, dropout_rate=0.1, dispersion="gene",
                    alpha_prior=0.5, beta_prior=0.5, minimal_dropout=0.01,
                    zero_inflation="gene")
LR, BATCH_SIZE, TRAIN_SIZE = 1e-3, 128, 0.9


# --------------------------------------------------------------------------------------------
# simulations
# --------------------------------------------------------------------------------------------
def simulate(design: str, seed: int, n_cells: int = 1500, n_genes: int = 300,
             zi_fraction: float = 0.3, pi_low: float = 0.1, pi_high: float = 0.6,
             library: float = 10000.0, theta: float = 4.0, base_sd: float = 1.0):
    """Return ``(adata, is_zi)``: counts with a known set of zero-inflated genes.

    Cells: 5 types, each a Gaussian blob in a 6-dimensional latent space; the log mean of gene
    ``g`` in cell ``n`` is ``b_g + w_g . u_n`` (+ a per-gene batch effect) with
    ``b_g ~ N(0, base_sd^2)``, normalised over genes and multiplied by a log-normal library
    size (median ``library`` counts, shifted per batch). NB designs draw NB counts with inverse
    dispersion ``theta_g ~ LogNormal(log theta, 0.7)``; PLN designs add ``N(0, s_g^2)`` to the
    log mean of every entry (``s_g ~ U(0.3, 0.9)``) and draw Poisson counts. A random
    ``zi_fraction`` of the genes then get extra zeros with probability
    ``pi_g ~ U(pi_low, pi_high)``. The defaults (10,000 counts over 300 genes, theta 4) give
    most genes enough counts for the question to have an answer; ``--library 3000 --theta 2
    --base-sd 1.2`` is a low-count design where neither tool tells NB from ZINB genes well
    (BENCHMARKS.md).
    """
    import anndata
    import pandas as pd
    import scipy.sparse as sp

    if design not in DESIGNS:
        raise ValueError(f"unknown design {design!r}; choose from {DESIGNS}")
    rng = np.random.default_rng(seed)
    n_types, dim = 5, 6
    n_batches = 3 if design.endswith("batches") else 1
    centres = rng.normal(0, 1.5, (n_types, dim))
    types = rng.integers(0, n_types, n_cells)
    u = centres[types] + rng.normal(0, 0.6, (n_cells, dim))
    base = rng.normal(0, base_sd, n_genes)
    weights = rng.normal(0, 0.5, (dim, n_genes))
    log_mean = base + u @ weights  # (cells, genes)
    batches = rng.integers(0, n_batches, n_cells)
    if n_batches > 1:
        batch_fx = rng.normal(0, 0.5, (n_batches, n_genes))
        log_mean = log_mean + batch_fx[batches]
    rho = np.exp(log_mean - log_mean.max(1, keepdims=True))
    rho /= rho.sum(1, keepdims=True)
    lib_centre = np.log(library) + rng.normal(0, 0.3, n_batches)
    library = np.exp(lib_centre[batches] + rng.normal(0, 0.35, n_cells))
    mu = rho * library[:, None]
    if design.startswith("nb"):
        th = np.exp(rng.normal(np.log(theta), 0.7, n_genes))
        counts = rng.poisson(rng.gamma(th, mu / th))
    else:
        s = rng.uniform(0.3, 0.9, n_genes)
        eta = np.log(mu) + rng.normal(0, 1, (n_cells, n_genes)) * s - s**2 / 2
        counts = rng.poisson(np.exp(eta))
    is_zi = np.zeros(n_genes, dtype=bool)
    is_zi[rng.choice(n_genes, int(round(zi_fraction * n_genes)), replace=False)] = True
    pi = np.where(is_zi, rng.uniform(pi_low, pi_high, n_genes), 0.0)
    counts = counts * (rng.random((n_cells, n_genes)) >= pi)
    empty = counts.sum(1) == 0
    counts[empty, int(np.argmax(mu.mean(0)))] = 1
    adata = anndata.AnnData(sp.csr_matrix(counts.astype(np.float32)))
    adata.obs_names = [f"cell{i}" for i in range(n_cells)]
    adata.var_names = [f"gene{j}" for j in range(n_genes)]
    adata.obs["batch"] = pd.Categorical([f"batch{b}" for b in batches])
    adata.obs["cell_type"] = pd.Categorical([f"type{t}" for t in types])
    adata.var["zero_inflated"] = is_zi
    return adata, is_zi


def score(prob_zi: np.ndarray, is_zi: np.ndarray) -> dict:
    """TPR / FPR of ``prob_zi > 0.5`` against the truth, and the AUROC of ``prob_zi``."""
    from sklearn.metrics import roc_auc_score

    called = prob_zi > 0.5
    return {"tpr": float(called[is_zi].mean()), "fpr": float(called[~is_zi].mean()),
            "auroc": float(roc_auc_score(is_zi, prob_zi)), "n_called": int(called.sum())}


# --------------------------------------------------------------------------------------------
# workers
# --------------------------------------------------------------------------------------------
def _prepare(args):
    _common.set_threads(args.threads)
    adata, is_zi = simulate(args.design, args.seed, n_cells=args.n_cells, n_genes=args.n_genes,
                            library=args.library, theta=args.theta, base_sd=args.base_sd)
    train_idx, val_idx = _common.split_indices(adata.n_obs, TRAIN_SIZE, args.seed)
    epochs = args.epochs or int(min(round(20000 / adata.n_obs * 400), 400))
    batch_key = "batch" if args.design.endswith("batches") else None
    return adata, is_zi, train_idx, val_idx, epochs, batch_key


def _eval(fn, seed):
    import torch

    torch.manual_seed(seed)
    return float(fn())


def run_scvi_tools(args) -> dict:
    import logging
    import warnings

    import scvi
    import torch
    from scipy.stats import beta

    warnings.filterwarnings("ignore")
    for name in ("scvi", "lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    adata, is_zi, train_idx, val_idx, epochs, batch_key = _prepare(args)
    scvi.settings.seed = args.seed
    scvi.settings.verbosity = logging.ERROR
    _common.set_threads(args.threads)
    scvi.model.AUTOZI.setup_anndata(adata, batch_key=batch_key)
    model = scvi.model.AUTOZI(adata, **MODEL_KWARGS)
    start = time.perf_counter()
    model.train(max_epochs=epochs, accelerator="cpu", devices=1, batch_size=BATCH_SIZE,
                train_size=TRAIN_SIZE, early_stopping=False, enable_progress_bar=False,
                check_val_every_n_epoch=1,
                datasplitter_kwargs={"external_indexing": [train_idx, val_idx]},
                plan_kwargs={"lr": LR})
    train_s = time.perf_counter() - start
    model.module.eval()
    ab = model.get_alphas_betas()
    prob = beta.cdf(0.5, ab["alpha_posterior"], ab["beta_posterior"])
    with torch.inference_mode():
        kl_global = float(model.module.compute_global_kl_divergence())
    elbo_val = _eval(lambda: model.get_elbo(indices=val_idx, batch_size=BATCH_SIZE), args.seed)
    return _result(args, epochs, train_idx, train_s, prob, is_zi,
                   elbo_val - kl_global / len(train_idx), version=scvi.__version__)


def run_cellvi(args) -> dict:
    import cellvi
    from cellvi.model import AUTOZI

    adata, is_zi, train_idx, val_idx, epochs, batch_key = _prepare(args)
    AUTOZI.setup_anndata(adata, batch_key=batch_key)
    model = AUTOZI(adata, **MODEL_KWARGS)
    start = time.perf_counter()
    model.train(max_epochs=epochs, lr=LR, batch_size=BATCH_SIZE, train_size=TRAIN_SIZE,
                seed=args.seed, progress_bar=False, device="cpu")
    train_s = time.perf_counter() - start
    assert np.array_equal(model.validation_indices, val_idx)
    table = model.get_zero_inflation()
    elbo_val = _eval(lambda: model.get_elbo(indices=val_idx, batch_size=BATCH_SIZE), args.seed)
    return _result(args, epochs, train_idx, train_s, table["prob_zero_inflated"].to_numpy(),
                   is_zi, elbo_val, version=cellvi.__version__,
                   training_step=model.train_settings["training_step"])


def _result(args, epochs, train_idx, train_s, prob, is_zi, elbo_val, **extra) -> dict:
    return {"tool": args.worker_tool, "design": args.design, "seed": args.seed,
            "epochs": epochs, "train_s": train_s,
            "cells_epochs_per_s": len(train_idx) * epochs / train_s,
            "elbo_validation": elbo_val, **score(np.asarray(prob), is_zi), **extra}


WORKERS = {"cellvi": run_cellvi, "scvi-tools": run_scvi_tools}


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--designs", nargs="+", default=list(DESIGNS), choices=DESIGNS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=None, help="default: scvi-tools' heuristic")
    p.add_argument("--n-cells", type=int, default=1500)
    p.add_argument("--n-genes", type=int, default=300)
    p.add_argument("--library", type=float, default=10000.0, help="median library size")
    p.add_argument("--theta", type=float, default=4.0, help="median NB inverse dispersion")
    p.add_argument("--base-sd", type=float, default=1.0, help="sd of the genes' log means")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", choices=["cellvi", "scvi-tools", "both"], default="both")
    p.add_argument("--json", default=None, help="also write all results to this JSON file")
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-tool", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--design", default="nb", help=argparse.SUPPRESS)
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
                with _common.CpuMonitor() as mon:
                    res = _common.run_worker(__file__, [
                        "--worker-tool", tool, "--design", design, "--seed", seed,
                        "--threads", args.threads, "--n-cells", args.n_cells,
                        "--n-genes", args.n_genes, "--library", args.library, "--theta",
                        args.theta, "--base-sd", args.base_sd,
                        *(["--epochs", args.epochs] if args.epochs else [])], args.threads,
                        quiet=True)
                res["others_cores"] = mon.others_cores
                runs.append(res)
                print(f"[bench_autozi] {design} seed {seed} {tool:10s}: TPR {res['tpr']:.3f} "
                      f"FPR {res['fpr']:.3f} AUROC {res['auroc']:.3f} ELBO "
                      f"{res['elbo_validation']:.2f} train {res['train_s']:.1f} s "
                      f"({res['cells_epochs_per_s']:.0f} cells x epochs / s; other load "
                      f"{mon.others_cores:.2f} cores)", flush=True)
    _report(runs, tools)
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))


def _report(runs: list[dict], tools: list[str]) -> None:
    if len(tools) < 2:
        return
    print("\ndesign        seed  TPR c/s       FPR c/s       AUROC c/s     ELBO (c-s)/|s|  "
          "throughput c/s")
    for design in dict.fromkeys(r["design"] for r in runs):
        for seed in dict.fromkeys(r["seed"] for r in runs if r["design"] == design):
            c, s = ({r["tool"]: r for r in runs if r["design"] == design and r["seed"] == seed}
                    [t] for t in ("cellvi", "scvi-tools"))
            rel = 100 * (c["elbo_validation"] - s["elbo_validation"]) / abs(s["elbo_validation"])
            print(f"{design:13s} {seed:4d}  {c['tpr']:.3f}/{s['tpr']:.3f}  "
                  f"{c['fpr']:.3f}/{s['fpr']:.3f}  {c['auroc']:.3f}/{s['auroc']:.3f}  "
                  f"{rel:+8.3f}%       x{c['cells_epochs_per_s'] / s['cells_epochs_per_s']:.2f}")
    ratios = [c["cells_epochs_per_s"] / s["cells_epochs_per_s"]
              for c, s in _pairs(runs)]
    print(f"median throughput ratio x{np.median(ratios):.2f} over {len(ratios)} pairs")


def _pairs(runs):
    keyed = {(r["design"], r["seed"], r["tool"]): r for r in runs}
    for (design, seed, tool), r in keyed.items():
        if tool == "cellvi" and (design, seed, "scvi-tools") in keyed:
            yield r, keyed[(design, seed, "scvi-tools")]


if __name__ == "__main__":
    main()
