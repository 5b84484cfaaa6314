"""Small input files for the CLI tests, and a trained SCANVI run (helpers, not fixtures)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cellvi.cli import main

FAST = ["--epochs", "2", "--quiet"]


def _sim(n_cells, n_genes, n_batches, seed):
    from conftest import simulate

    return simulate(n_cells, n_genes, 3, n_batches, seed=seed)


def labelled(adata, share=0.3, seed=0):
    """Copy ``cell_type`` into ``label`` with a share of the cells 'Unknown'."""
    labels = adata.obs["cell_type"].astype(str).to_numpy().copy()
    labels[np.random.default_rng(seed).random(adata.n_obs) < share] = "Unknown"
    adata.obs["label"] = pd.Categorical(labels)
    return adata


def make_files(root: Path) -> dict[str, Path]:
    """Write small inputs: counts with labels, a query, CITE-seq, sequencing + spatial."""
    adata = labelled(_sim(200, 50, 2, seed=1))
    adata.write_h5ad(root / "sim.h5ad")
    # a query: a new batch, its genes in another order plus one the reference lacks
    query = _sim(200, 50, 3, seed=2)
    query = query[query.obs["batch"] == "batch2"].copy()
    query.obs["label"] = pd.Categorical(["Unknown"] * query.n_obs)
    extra = query[:, ::-1].copy()
    extra.var_names = [*extra.var_names[:-1], "geneX"]
    extra.write_h5ad(root / "query.h5ad")
    # CITE-seq: proteins in obsm, higher on one cell type each
    cite = _sim(200, 50, 2, seed=3)
    rng = np.random.default_rng(3)
    types = cite.obs["cell_type"].cat.codes.to_numpy()
    rate = rng.lognormal(np.log(8), 0.4, (200, 6))
    rate[np.arange(200), types] *= 12
    cite.obsm["protein_expression"] = rng.poisson(rate).astype(np.float32)
    cite.uns["protein_names"] = np.array([f"p{j}" for j in range(6)])
    cite.write_h5ad(root / "cite.h5ad")
    # gimVI: sequencing data and a spatial set measuring 15 of its genes
    seq = _sim(160, 40, 1, seed=4)
    spatial = _sim(120, 40, 1, seed=5)[:, 10:25].copy()
    spatial.obs["section"] = pd.Categorical(rng.choice(["a", "b"], spatial.n_obs))
    spatial = spatial[np.asarray(spatial.X.sum(1)).ravel() > 0].copy()
    seq.write_h5ad(root / "seq.h5ad")
    spatial.write_h5ad(root / "spatial.h5ad")
    return {"sim": root / "sim.h5ad", "query": root / "query.h5ad", "cite": root / "cite.h5ad",
            "seq": root / "seq.h5ad", "spatial": root / "spatial.h5ad"}


def make_scanvi_run(files: dict[str, Path], out: Path) -> Path:
    """Train a SCANVI run folder (batches, labels with unlabelled cells) for 2 epochs."""
    code = main(["train", str(files["sim"]), "--model", "scanvi", "--out", str(out),
                 "--batch-key", "batch", "--labels-key", "label", *FAST])
    assert code == 0
    return out
