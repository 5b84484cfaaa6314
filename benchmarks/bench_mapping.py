"""Reference mapping (scArches): cellvi vs scvi-tools 1.4.2, same data, same settings, same run.

Two designs:

* **kang**: scVI trained on the control PBMCs of Kang et al. 2018 (the reference, one batch),
  the IFN-beta stimulated PBMCs mapped onto it with ``load_query_data`` (the default freezing)
  and trained as a query. The joint latent (reference cells from the reference model, query
  cells from the query model) is scored for batch mixing with the mean iLISI over the 30
  nearest neighbours (1 = the batches do not mix, 2 = perfectly mixed);
* **cellbench**: SCVI then SCANVI trained on the CEL-seq2 plate of CellBench (labelled with
  its three cell lines), the Drop-seq plate mapped as an unlabelled query, and the query's
  predicted labels scored against the truth (accuracy).

Each tool runs in its own subprocess (``--repeats`` times, alternating), 2 threads, CPU.

    .bench-venv/bin/python benchmarks/bench_mapping.py                # both designs
    .bench-venv/bin/python benchmarks/bench_mapping.py --designs kang --repeats 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

CELLBENCH = _common.REPO_ROOT.parent / "shared" / "data" / "cellbench"


def ilisi(latent: np.ndarray, batches: np.ndarray, k: int = 30) -> float:
    """Mean inverse Simpson's index of the batches among each cell's ``k`` nearest neighbours."""
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=k + 1).fit(latent)
    _, idx = nn.kneighbors(latent)
    neigh = batches[idx[:, 1:]]
    scores = []
    for b in np.unique(batches):
        scores.append((neigh == b).mean(1))
    simpson = np.sum(np.square(scores), axis=0)
    return float(np.mean(1.0 / simpson))


def load_cellbench():
    import anndata
    import pandas as pd

    import cellvi

    parts = []
    for protocol in ("celseq2", "dropseq"):
        a = cellvi.data.read(CELLBENCH / f"sc_{protocol}.count.csv.gz", transpose=True)
        meta = pd.read_csv(CELLBENCH / f"sc_{protocol}.metadata.csv.gz", index_col=0)
        meta.index = meta.index.astype(str)
        cells = a.obs_names.intersection(meta.index)
        meta = meta.loc[cells]
        a = a[cells].copy()
        if "demuxlet_cls" in meta:
            keep = (meta["demuxlet_cls"] == "SNG").to_numpy()
            a, meta = a[keep].copy(), meta[keep]
        a.obs["cell_line"] = meta["cell_line"].astype(str).to_numpy()
        a.obs["protocol"] = protocol
        parts.append(a)
    genes = parts[0].var_names.intersection(parts[1].var_names)
    adata = anndata.concat([p[:, genes] for p in parts], index_unique="-")
    adata = adata[np.asarray(adata.X.sum(1)).ravel() > 0].copy()
    hvg = cellvi.data.highly_variable_genes(adata, n_top_genes=2000, batch_key="protocol")
    adata = adata[:, hvg].copy()
    return adata[np.asarray(adata.X.sum(1)).ravel() > 0].copy()


def worker(args) -> dict:
    _common.set_threads(args.threads)
    import torch

    torch.manual_seed(args.seed)
    tool = args.worker_tool
    if tool == "cellvi":
        import cellvi as lib
    else:
        import logging
        import warnings

        logging.getLogger("scvi").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore")
        import scvi as lib

        lib.settings.seed = args.seed
    quiet = {"enable_progress_bar": False} if tool == "scvi-tools" else {"progress_bar": False}
    out = {"tool": tool, "design": args.worker_design}
    if args.worker_design == "kang":
        adata = _common.load_kang()
        ref = adata[adata.obs["batch"] == "ctrl"].copy()
        query = adata[adata.obs["batch"] == "stim"].copy()
        lib.model.SCVI.setup_anndata(ref, batch_key="batch")
        t = time.perf_counter()
        model = lib.model.SCVI(ref, n_latent=10)
        model.train(max_epochs=args.epochs_ref, **quiet)
        out["reference_train_s"] = time.perf_counter() - t
        z_ref = model.get_latent_representation()
        lib.model.SCVI.prepare_query_anndata(query, model)
        t = time.perf_counter()
        q = lib.model.SCVI.load_query_data(query, model)
        q.train(max_epochs=args.epochs_query, plan_kwargs={"weight_decay": 0.0}, **quiet)
        out["query_train_s"] = time.perf_counter() - t
        z_query = q.get_latent_representation()
        joint = np.vstack([z_ref, z_query])
        batches = np.r_[np.zeros(len(z_ref)), np.ones(len(z_query))]
        out["ilisi"] = ilisi(joint, batches)
    else:
        adata = load_cellbench()
        ref = adata[adata.obs["protocol"] == "celseq2"].copy()
        query = adata[adata.obs["protocol"] == "dropseq"].copy()
        truth = query.obs["cell_line"].to_numpy()
        ref.obs["labels"] = ref.obs["cell_line"]
        query.obs["labels"] = "Unknown"
        lib.model.SCVI.setup_anndata(ref, batch_key="protocol", labels_key="labels")
        t = time.perf_counter()
        vae = lib.model.SCVI(ref, n_latent=10)
        vae.train(max_epochs=args.epochs_ref, **quiet)
        scanvi = lib.model.SCANVI.from_scvi_model(vae, "Unknown", labels_key="labels")
        scanvi.train(max_epochs=20, **quiet)
        out["reference_train_s"] = time.perf_counter() - t
        lib.model.SCANVI.prepare_query_anndata(query, scanvi)
        t = time.perf_counter()
        q = lib.model.SCANVI.load_query_data(query, scanvi)
        q.train(max_epochs=args.epochs_query, plan_kwargs={"weight_decay": 0.0}, **quiet)
        out["query_train_s"] = time.perf_counter() - t
        out["query_accuracy"] = float((np.asarray(q.predict()) == truth).mean())
    return out


METRICS = {
    "kang": [("ilisi", "iLISI of the joint latent (1-2, higher mixes more)", 3, "reldiff"),
             ("reference_train_s", "reference training (s)", 2, "ratio"),
             ("query_train_s", "query training (s)", 2, "ratio")],
    "cellbench": [("query_accuracy", "SCANVI accuracy on the mapped query plate", 3,
                   "reldiff"),
                  ("reference_train_s", "reference training, SCVI + SCANVI (s)", 2, "ratio"),
                  ("query_train_s", "query training (s)", 2, "ratio")],
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--designs", default="kang,cellbench")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs-ref", type=int, default=100)
    p.add_argument("--epochs-query", type=int, default=100)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-tool", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-design", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker_out:
        _common.write_result(args.worker_out, worker(args))
        return 0
    for design in args.designs.split(","):
        results = {tool: [] for tool in _common.TOOLS}
        for r in range(args.repeats):
            order = _common.TOOLS if r % 2 == 0 else _common.TOOLS[::-1]
            for tool in order:
                print(f"[bench_mapping] {design}: {tool}, repeat {r + 1}/{args.repeats}",
                      flush=True)
                results[tool].append(_common.run_worker(
                    __file__, ["--worker-tool", tool, "--worker-design", design,
                               "--threads", args.threads, "--seed", args.seed + r,
                               "--epochs-ref", args.epochs_ref,
                               "--epochs-query", args.epochs_query],
                    args.threads, quiet=True))
        _common.print_comparison(results, METRICS[design],
                                 title=f"{design}: {args.repeats} repeat(s), mean ± sd")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
