"""scVI on the Kang IFN-beta data: cellvi vs scvi-tools 1.4.2, same settings, same split.

Each tool trains in its own subprocess (so wall time and peak memory are per tool) with:
2,000 most variable genes, ``obs["batch"]`` (ctrl / stim) as batch key, n_hidden 128,
n_latent 10, 1 layer, dropout 0.1, ZINB likelihood, gene dispersion, batch size 128, Adam
lr 1e-3 (weight decay 1e-6, eps 0.01), 90% train / 10% validation, KL warm-up over 400
epochs, no early stopping.

Sign convention: everything printed is the ELBO itself, a lower bound on log p(x) per cell
(negative for counts; higher is better), with the full KL weight (the warm-up weight applies to
the training loss only). scvi-tools 1.4.2 logs the *negative* ELBO in
``model.history["elbo_validation"]`` (``mean(reconstruction_loss + kl_local) + kl_global / n``,
a positive number), so it is negated here; its ``model.get_elbo()`` already returns the ELBO
(``-compute_elbo``, "higher is better"). cellvi's history columns and ``get_elbo`` are the ELBO.

The validation cells are the same for both tools: the split cellvi makes for ``seed`` (see
``_common.split_indices``) is passed to scvi-tools as ``datasplitter_kwargs={"external_indexing":
[train, validation]}``, and each worker also scores its trained model with ``get_elbo`` on those
fixed cells (torch seeded first, since the ELBO uses one posterior sample per cell).

Run with the reference environment (``bash benchmarks/setup_reference.sh``)::

    .bench-venv/bin/python benchmarks/bench_elbo.py            # both tools, 100 epochs
    .bench-venv/bin/python benchmarks/bench_elbo.py --only scvi-tools --epochs 10
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

# the settings both tools get, identical in every benchmark
MODEL_KWARGS = _common.MODEL_KWARGS
LR, BATCH_SIZE, TRAIN_SIZE = _common.LR, _common.BATCH_SIZE, _common.TRAIN_SIZE
N_EPOCHS_KL_WARMUP = _common.N_EPOCHS_KL_WARMUP

METRICS = [
    ("elbo_validation_last", "validation ELBO / cell, last epoch (history)", 2, "reldiff"),
    ("elbo_validation_fixed", "validation ELBO / cell, get_elbo(fixed val cells)", 2, "reldiff"),
    ("elbo_train_fixed", "train ELBO / cell, get_elbo(train cells)", 2, "reldiff"),
    ("elbo_train_last", "train ELBO / cell, last epoch (history, in training mode)", 2,
     "reldiff"),
    ("train_s", "train wall time (s)", 1, "ratio"),
    ("train_s", "train wall time, best of repeats (s)", 1, "ratio", "min"),
    ("s_per_epoch", "time per epoch (s)", 3, "ratio"),
    ("import_s", "import time (s)", 2, "ratio"),
    ("peak_rss_mb", "peak RSS of the process (MiB)", 0, "ratio"),
]


# --------------------------------------------------------------------------------------------
# workers (run in a fresh subprocess each)
# --------------------------------------------------------------------------------------------
def _prepare(args, timer: _common.Timer):
    _common.set_threads(args.threads)
    with timer("load_data"):
        adata = _common.load_kang(args.data, n_top_genes=args.n_top_genes)
    train_idx, val_idx = _common.split_indices(adata.n_obs, TRAIN_SIZE, args.seed)
    return adata, train_idx, val_idx


def _eval_elbo(get_elbo, indices, seed: int) -> float:
    import torch

    torch.manual_seed(seed)
    return float(get_elbo(indices))


def run_scvi_tools(args) -> dict:
    import logging
    import warnings

    timer = _common.Timer()
    with timer("import"):
        import scvi
        import torch  # noqa: F401
    warnings.filterwarnings("ignore")
    for name in ("scvi", "lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    adata, train_idx, val_idx = _prepare(args, timer)
    scvi.settings.seed = args.seed
    scvi.settings.verbosity = logging.ERROR
    _common.set_threads(args.threads)  # seed_everything leaves threads alone; be explicit
    scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
    model = scvi.model.SCVI(adata, **MODEL_KWARGS)
    with timer("train"):
        model.train(
            max_epochs=args.epochs, accelerator="cpu", devices=1, batch_size=BATCH_SIZE,
            train_size=TRAIN_SIZE, early_stopping=False, enable_progress_bar=False,
            check_val_every_n_epoch=1,  # scvi-tools skips validation otherwise
            datasplitter_kwargs={"external_indexing": [train_idx, val_idx]},
            plan_kwargs={"lr": LR, "n_epochs_kl_warmup": N_EPOCHS_KL_WARMUP},
        )
    model.module.eval()
    used_val = np.sort(np.asarray(model.validation_indices))
    hist = model.history
    # scvi-tools logs the negative ELBO (a positive loss): negate to get the ELBO.
    elbo_val = -hist["elbo_validation"].iloc[:, 0].to_numpy(dtype=float)
    elbo_train = -hist["elbo_train"].iloc[:, 0].to_numpy(dtype=float)

    def get_elbo(idx):
        return model.get_elbo(indices=idx, batch_size=BATCH_SIZE)  # already the ELBO

    return _result(args, timer, elbo_val, elbo_train, used_val, val_idx,
                   _eval_elbo(get_elbo, val_idx, args.seed),
                   _eval_elbo(get_elbo, train_idx, args.seed),
                   version=scvi.__version__, n_genes=adata.n_vars)


def run_cellvi(args) -> dict:
    timer = _common.Timer()
    with timer("import"):
        import torch  # noqa: F401

        import cellvi
        from cellvi.model import SCVI
    adata, train_idx, val_idx = _prepare(args, timer)
    SCVI.setup_anndata(adata, batch_key="batch")
    model = SCVI(adata, **MODEL_KWARGS)
    with timer("train"):
        model.train(
            max_epochs=args.epochs, lr=LR, batch_size=BATCH_SIZE, train_size=TRAIN_SIZE,
            seed=args.seed, progress_bar=False, n_epochs_kl_warmup=N_EPOCHS_KL_WARMUP,
            device="cpu",
        )
    used_val = np.sort(np.asarray(model.validation_indices))
    hist = model.history
    elbo_val = hist["elbo_validation"].to_numpy(dtype=float)  # already the ELBO
    elbo_train = hist["elbo_train"].to_numpy(dtype=float)

    def get_elbo(idx):
        return model.get_elbo(indices=idx, batch_size=BATCH_SIZE)

    return _result(args, timer, elbo_val, elbo_train, used_val, val_idx,
                   _eval_elbo(get_elbo, val_idx, args.seed),
                   _eval_elbo(get_elbo, train_idx, args.seed),
                   version=cellvi.__version__, n_genes=adata.n_vars)


def _result(args, timer, elbo_val, elbo_train, used_val, val_idx, fixed_val, fixed_train,
            **extra) -> dict:
    same_split = bool(np.array_equal(used_val, val_idx))
    if not same_split:
        print(f"WARNING: {args.worker_tool} validated on other cells than the fixed split; "
              "compare the get_elbo(fixed val cells) row only with care", file=sys.stderr)
    return {
        "tool": args.worker_tool, "seed": args.seed, "epochs": args.epochs,
        "threads": args.threads, "n_validation": int(len(val_idx)), "same_split": same_split,
        "elbo_validation_last": float(elbo_val[-1]), "elbo_train_last": float(elbo_train[-1]),
        "elbo_validation_fixed": fixed_val, "elbo_train_fixed": fixed_train,
        "elbo_validation_history": elbo_val.tolist(), "elbo_train_history": elbo_train.tolist(),
        "train_s": timer.times["train"], "s_per_epoch": timer.times["train"] / args.epochs,
        "import_s": timer.times["import"], "load_data_s": timer.times["load_data"],
        **extra,
    }


WORKERS = {"cellvi": run_cellvi, "scvi-tools": run_scvi_tools}


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--repeats", type=int, default=1, help="seeds seed, seed+1, ...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-top-genes", type=int, default=2000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", choices=["cellvi", "scvi-tools", "both"], default="both")
    p.add_argument("--data", default=str(_common.KANG_PATH), help="Kang IFN-beta folder")
    p.add_argument("--json", default=None, help="also write all results to this JSON file")
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-tool", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker_out:  # inside a worker subprocess
        _common.write_result(args.worker_out, WORKERS[args.worker_tool](args))
        return
    tools = list(_common.TOOLS) if args.only == "both" else [args.only]
    results: dict[str, list[dict]] = {t: [] for t in tools}
    for rep in range(args.repeats):
        seed = args.seed + rep
        for tool in tools:
            print(f"[bench_elbo] {tool}: seed {seed}, {args.epochs} epochs, "
                  f"{args.threads} threads ...", flush=True)
            worker_args = [
                "--worker-tool", tool, "--epochs", args.epochs, "--seed", seed,
                "--n-top-genes", args.n_top_genes, "--threads", args.threads,
                "--data", args.data,
            ]
            res = _common.run_worker(__file__, worker_args, args.threads)
            print(f"[bench_elbo] {tool}: validation ELBO {res['elbo_validation_last']:.2f} "
                  f"(fixed cells {res['elbo_validation_fixed']:.2f}), train "
                  f"{res['train_s']:.1f} s", flush=True)
            results[tool].append(res)
    first = next(iter(results.values()))[0]
    _common.print_comparison(
        results, METRICS,
        title=(f"scVI on Kang IFN-beta: {first['n_genes']} genes, {args.epochs} epochs, "
               f"{args.threads} threads, {args.repeats} repeat(s), "
               f"{first['n_validation']} validation cells; ELBO = lower bound on log p(x) "
               "per cell (higher is better)"),
    )
    for tool, runs in results.items():
        if not all(r["same_split"] for r in runs):
            print(f"note: {tool} did not use the fixed validation cells in its history")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
        print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
