"""Differential expression on simulated designs: does "FDR 5 %" mean 5 %? cellvi vs scvi-tools.

Each design is simulated with known DE genes (``cellvi.de._simulate.simulate_de``: gamma-Poisson
counts, two groups, 10 % DE genes, batch effects and within-group programmes); each tool trains
its own SCVI (the same defaults: n_latent 10, n_hidden 128, ZINB, 400 epochs at 3,000 cells,
batch size 128, 90 % train) in its own subprocess, then calls

    model.differential_expression(groupby="group", group1="B", group2="A", mode="change",
                                  delta=0.25, batch_correction=<design>, fdr_target=...)

with its defaults otherwise. For each target FDR (0.05, 0.1) the table gives the observed false
discovery proportion of the genes called (``is_de_fdr_<target>``; the truth is the simulation's
DE set), the power (the fraction of DE genes called) and the AUROC of ``proba_de`` against the
truth. cellvi's default is ``effect="group"``; the ``cellvi (cell)`` rows are its random-cell
test (``effect="cell"``, scvi-tools' statistic) on the same fitted model.

Designs (``--designs``; ``all`` for every one):

    issue       3,000 cells, 1,000 genes, balanced, two batches (log2 sd 0.25), 3,000 counts/cell,
                three within-group programmes (log2 loadings sd 0.3)
    homogeneous as issue without the within-group programmes
    sparse      as issue with 800 counts per cell
    dense       as issue with 15,000 counts per cell
    nobatch     as issue with one batch
    unbalanced  200 vs 2,000 cells
    small       |log2 FC| in [0.4, 0.8]
    confounded  batch follows the group (85 % / 15 %), batch log2 sd 0.5, batch_correction=True
    onesided    every DE gene up in B (the unchanged genes' normalised expression shifts down)

Run with the reference environment (``bash benchmarks/setup_reference.sh``)::

    .bench-venv/bin/python benchmarks/bench_de.py                       # issue, unbalanced
    .bench-venv/bin/python benchmarks/bench_de.py --designs all --seeds 0 1 2
    .bench-venv/bin/python benchmarks/bench_de.py --only cellvi --ensemble 3
    .bench-venv/bin/python benchmarks/bench_de.py --designs all --keep runs/ [--reuse]

``--keep DIR`` saves every fitted model; ``--reuse`` then loads them instead of training, so
that a change to the DE can be measured again on the same fitted models (both tools) in
minutes rather than hours.
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

TARGETS = (0.05, 0.1)
DESIGNS = {
    "issue": {},
    "homogeneous": {"n_programs": 0},
    "sparse": {"library_mean": 800.0},
    "dense": {"library_mean": 15000.0},
    "nobatch": {"n_batches": 1, "batch_sd": 0.0},
    "unbalanced": {"n_cells": 2200, "n_group1": 200},
    "small": {"lfc_range": (0.4, 0.8)},
    "confounded": {"batch_confounding": 0.7, "batch_sd": 0.5},
    "onesided": {"frac_up": 1.0},
}
BATCH_CORRECTION = {"confounded"}
DEFAULT_DESIGNS = ("issue", "unbalanced")


def simulate(design: str, seed: int):
    from cellvi.de._simulate import simulate_de

    return simulate_de(seed=seed, **DESIGNS[design])


def _scores(truth: np.ndarray, calls: dict, proba: np.ndarray) -> dict:
    from sklearn.metrics import roc_auc_score

    out = {"auroc": float(roc_auc_score(truth, proba))}
    for t, called in calls.items():
        called = np.asarray(called, dtype=bool)
        n = int(called.sum())
        out[f"n_{t}"] = n
        out[f"fdp_{t}"] = float((called & ~truth).sum() / max(n, 1))
        out[f"power_{t}"] = float((called & truth).sum() / truth.sum())
    return out


# --------------------------------------------------------------------------------------------
# workers
# --------------------------------------------------------------------------------------------
def run_cellvi(args) -> dict:
    import torch

    from cellvi.de import differential_expression, fdr_de_prediction
    from cellvi.model import SCVI

    _common.set_threads(args.threads)
    adata, truth = simulate(args.design, args.seed)
    is_de = truth["is_de"].to_numpy()
    SCVI.setup_anndata(adata, batch_key="batch")
    folder = Path(args.keep) / f"{args.design}_seed{args.seed}" if args.keep else None
    models, train_s = [], 0.0
    for k in range(args.ensemble):
        saved = folder / f"cellvi{k}" if folder else None
        if args.reuse and saved is not None and saved.exists():
            models.append(SCVI.load(saved, adata=adata))
            train_s += json.loads((saved / "train_s.json").read_text())
            continue
        m = SCVI(adata)
        start = time.perf_counter()
        m.train(max_epochs=args.epochs, seed=args.seed + 1000 * k, progress_bar=False)
        elapsed = time.perf_counter() - start
        train_s += elapsed
        models.append(m)
        if saved is not None:
            m.save(saved, overwrite=True)
            (saved / "train_s.json").write_text(json.dumps(elapsed))
    if folder is not None:
        truth.to_csv(folder / "truth.csv")
    bc = args.design in BATCH_CORRECTION
    common = dict(groupby="group", group1="B", group2="A", mode="change", delta=0.25,
                  batch_correction=bc, fdr_target=TARGETS[0], seed=args.seed, silent=True)
    result = {"tool": "cellvi", "design": args.design, "seed": args.seed, "train_s": train_s}
    variants = {"cellvi": dict(), "cellvi (cell)": dict(effect="cell")}
    if args.ensemble > 1:
        variants = {"cellvi": dict(ensemble=models[1:]),
                    "cellvi (1 model)": dict(),
                    "cellvi (cell)": dict(effect="cell")}
    for name, kw in variants.items():
        torch.manual_seed(args.seed)
        start = time.perf_counter()
        res = differential_expression(models[0], **common, **kw)
        de_s = time.perf_counter() - start
        res = res.loc[truth.index]
        p = res["proba_de"].to_numpy()
        calls = {t: fdr_de_prediction(p, t) for t in TARGETS}
        result[name] = {**_scores(is_de, calls, p), "de_s": de_s}
    return result


def run_scvi_tools(args) -> dict:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("scvi").setLevel(logging.ERROR)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    import scvi
    from scvi.model.base._de_core import _fdr_de_prediction

    _common.set_threads(args.threads)
    scvi.settings.seed = args.seed
    adata, truth = simulate(args.design, args.seed)
    is_de = truth["is_de"].to_numpy()
    scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
    saved = (Path(args.keep) / f"{args.design}_seed{args.seed}" / "scvi-tools"
             if args.keep else None)
    if args.reuse and saved is not None and saved.exists():
        m = scvi.model.SCVI.load(str(saved), adata=adata)
        train_s = json.loads((saved / "train_s.json").read_text())
    else:
        m = scvi.model.SCVI(adata)
        start = time.perf_counter()
        m.train(max_epochs=args.epochs, enable_progress_bar=False)
        train_s = time.perf_counter() - start
        if saved is not None:
            m.save(str(saved), overwrite=True)
            (saved / "train_s.json").write_text(json.dumps(train_s))
    bc = args.design in BATCH_CORRECTION
    result = {"tool": "scvi-tools", "design": args.design, "seed": args.seed,
              "train_s": train_s}
    start = time.perf_counter()
    res = m.differential_expression(groupby="group", group1="B", group2="A", mode="change",
                                    delta=0.25, batch_correction=bc, fdr_target=TARGETS[0],
                                    silent=True)
    de_s = time.perf_counter() - start
    res = res.loc[truth.index]
    calls = {t: _fdr_de_prediction(res["proba_de"], t).to_numpy() for t in TARGETS}
    result["scvi-tools"] = {**_scores(is_de, calls, res["proba_de"].to_numpy()), "de_s": de_s}
    return result


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------
def _table(results: list[dict]) -> str:
    rows = []
    header = ["design", "seeds", "method", "target", "FDP", "power", "AUROC", "called"]
    by = {}
    for r in results:
        for name, v in r.items():
            if isinstance(v, dict):
                by.setdefault((r["design"], name), []).append(v)
    designs = list(dict.fromkeys(r["design"] for r in results))
    order = ["cellvi", "cellvi (1 model)", "cellvi (cell)", "scvi-tools"]
    for design in designs:
        for name in order:
            vals = by.get((design, name))
            if not vals:
                continue
            for t in TARGETS:
                fdp = np.mean([v[f"fdp_{t}"] for v in vals])
                power = np.mean([v[f"power_{t}"] for v in vals])
                auroc = np.mean([v["auroc"] for v in vals])
                called = np.mean([v[f"n_{t}"] for v in vals])
                rows.append([design, str(len(vals)), name, f"{t:g}", f"{fdp:.3f}",
                             f"{power:.3f}", f"{auroc:.3f}", f"{called:.0f}"])
    # means over designs
    for name in order:
        for t in TARGETS:
            vals = [v for (d, n), vs in by.items() if n == name for v in vs]
            if not vals:
                continue
            rows.append(["mean", str(len(vals)), name, f"{t:g}",
                         f"{np.mean([v[f'fdp_{t}'] for v in vals]):.3f}",
                         f"{np.mean([v[f'power_{t}'] for v in vals]):.3f}",
                         f"{np.mean([v['auroc'] for v in vals]):.3f}",
                         f"{np.mean([v[f'n_{t}'] for v in vals]):.0f}"])
    widths = [max(len(x[i]) for x in [header, *rows]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    out = [line, "  ".join(h.ljust(w) for h, w in zip(header, widths)), line]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    out.append(line)
    return "\n".join(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--designs", nargs="+", default=list(DEFAULT_DESIGNS),
                        help=f"designs to run, or 'all' ({', '.join(DESIGNS)})")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--only", choices=_common.TOOLS)
    parser.add_argument("--epochs", type=int, default=None,
                        help="training epochs (default: each tool's, 400 at 3,000 cells)")
    parser.add_argument("--ensemble", type=int, default=1,
                        help="cellvi: fit this many models (seeds) and pool them")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--keep", default=None,
                        help="save each tool's fitted models in this folder")
    parser.add_argument("--reuse", action="store_true",
                        help="load the models saved by an earlier --keep run instead of "
                             "training (the DE is computed again; train times are the saved)")
    parser.add_argument("--json", default=None, help="write every worker's result here")
    parser.add_argument("--worker-out")
    parser.add_argument("--tool")
    parser.add_argument("--design", default="issue")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.worker_out:
        result = (run_cellvi if args.tool == "cellvi" else run_scvi_tools)(args)
        _common.write_result(args.worker_out, result)
        return
    _common.ensure_reference_env(__file__, sys.argv[1:] if argv is None else argv)
    designs = list(DESIGNS) if args.designs == ["all"] else args.designs
    unknown = [d for d in designs if d not in DESIGNS]
    if unknown:
        parser.error(f"unknown designs {unknown}; choose from {list(DESIGNS)} or 'all'")
    tools = [args.only] if args.only else list(_common.TOOLS)
    results = []
    start = time.perf_counter()
    for design in designs:
        for seed in args.seeds:
            for tool in tools:
                extra = ["--tool", tool, "--design", design, "--seed", seed,
                         "--threads", args.threads, "--ensemble", args.ensemble]
                if args.epochs is not None:
                    extra += ["--epochs", args.epochs]
                if args.keep:
                    extra += ["--keep", args.keep]
                if args.reuse:
                    extra += ["--reuse"]
                r = _common.run_worker(__file__, extra, args.threads, quiet=True)
                results.append(r)
                fdps = {k: round(v["fdp_0.05"], 3) for k, v in r.items() if isinstance(v, dict)}
                print(f"[bench] {design} seed {seed} {tool}: train {r['train_s']:.0f} s, "
                      f"FDP at 0.05 {fdps}", flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"\nDifferential expression, change mode, delta 0.25 ({len(args.seeds)} seed(s), "
          f"{time.perf_counter() - start:.0f} s in all)")
    print(_table(results))


if __name__ == "__main__":
    main()
