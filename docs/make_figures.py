"""Make the README's pictures (docs/img/*.png) from the packaged PBMC data.

    .venv/bin/python docs/make_figures.py [--out docs/img] [--trials 12]

Trains scVI and LDVAE on ``cellvi.data.pbmc_ifnb()`` (2,000 PBMCs, control and IFN-beta
stimulated), then draws: the training curves, the latent space coloured by condition and by a
marker-based cell type, a volcano of stimulated vs control, the LDVAE loadings, integration
scores of scVI's latent against a PCA of the log-normalised counts, and the trials of a small
:mod:`cellvi.tune` study. Seeded: the same machine redraws the same pictures. About 5 minutes
on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

import cellvi  # noqa: E402

#: Marker genes of PBMC populations (those among the packaged genes), for labels that do not
#: come from any embedding: each cell gets the population whose markers it expresses most.
MARKERS = {
    "CD14 mono": ["CD14", "LYZ", "S100A8"],
    "FCGR3A mono": ["FCGR3A", "MS4A7"],
    "B": ["MS4A1", "CD79A"],
    "CD4 T": ["IL7R", "CCR7"],
    "CD8 T": ["CD8A"],
    "NK": ["NKG7", "GNLY"],
    "DC": ["FCER1A"],
    "Mk": ["PPBP"],
}


def marker_labels(adata) -> np.ndarray:
    """Return each cell's population: the highest mean z-scored log expression of its markers."""
    x = cellvi.metrics.log_normalize(adata.X)
    genes = list(adata.var_names)
    z = (x - x.mean(0)) / np.maximum(x.std(0), 1e-8)
    scores = np.stack([z[:, [genes.index(g) for g in gs]].mean(1) for gs in MARKERS.values()], 1)
    return np.array(list(MARKERS))[scores.argmax(1)]


def save(fig, path: Path, dpi: int = 80) -> None:
    """Write ``fig`` as a PNG and close it."""
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    print(f"  {path} ({path.stat().st_size // 1024} kB)", flush=True)


def main() -> None:
    """Train the models on the packaged data and draw every picture."""
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=str(Path(__file__).parent / "img"))
    p.add_argument("--trials", type=int, default=12)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    warnings.simplefilter("ignore")
    cellvi.settings.num_threads = 1  # tiny networks: a second thread only contends
    t0 = time.perf_counter()

    adata = cellvi.data.pbmc_ifnb()
    adata.obs["condition"] = adata.obs["batch"]
    adata.obs["cell type (markers)"] = pd.Categorical(marker_labels(adata))
    adata.obs["ISG15, log counts"] = np.log1p(adata[:, "ISG15"].X.toarray().ravel())
    cellvi.model.SCVI.setup_anndata(adata, batch_key="batch")
    model = cellvi.model.SCVI(adata)
    model.train(300, progress_bar=False, early_stopping=True, seed=0)
    adata.obsm["X_scvi"] = model.get_latent_representation()
    print(f"scVI: {len(model.history)} epochs, kept {model.train_settings['kept_epoch']}",
          flush=True)

    save(cellvi.pl.training_curves(model, figsize=(11, 2.8)), out / "training_curves.png")
    save(cellvi.pl.latent(adata, color=["condition", "cell type (markers)",
                                        "ISG15, log counts"], point_size=4,
                          figsize=(13, 3.4)), out / "latent.png")
    de = model.differential_expression(groupby="batch", group1="stim", group2="ctrl")
    save(cellvi.pl.volcano(de, n_labels=10, figsize=(5.2, 4.0)), out / "volcano.png")

    linear = cellvi.model.LinearSCVI(adata, n_latent=8)
    linear.train(150, progress_bar=False, seed=0)
    save(cellvi.pl.loadings(linear, n_genes=4), out / "loadings.png")

    pre = cellvi.metrics.pca(cellvi.metrics.log_normalize(adata.X), 10)
    table = pd.DataFrame({
        name: cellvi.metrics.score_embedding(emb, batch=adata.obs["batch"].to_numpy(),
                                             labels=adata.obs["cell type (markers)"].to_numpy())
        for name, emb in (("PCA of log counts", pre), ("scVI latent", adata.obsm["X_scvi"]))
    }).T
    print(table.round(3).to_string(), flush=True)
    title = "batch mixing (first three) and cell-type conservation (the rest)"
    save(cellvi.pl.scores(table, title=title), out / "metrics.png")

    with tempfile.TemporaryDirectory() as tmp:
        result = cellvi.tune.run_study(cellvi.model.SCVI, adata, n_trials=args.trials,
                                       max_epochs=60, output_dir=tmp, seed=0)
        print(result, flush=True)
        save(cellvi.pl.tuning_history(result), out / "tuning.png")
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
