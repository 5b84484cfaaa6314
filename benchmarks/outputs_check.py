"""Outputs of every model for fixed seeds, saved before a change and compared after it.

For each case (a model class, its options and data), the script trains for a few epochs with a
fixed seed on simulated counts and records the history, the latent representation, the ELBO,
the normalised expression of a few cells and (for the semi-supervised models) the predicted
probabilities. ``--save`` writes them to an ``.npz``; ``--compare`` trains again and prints,
per case and quantity, the largest absolute difference from the saved file (0 means equal to
the last bit).

    python benchmarks/outputs_check.py --save /tmp/before.npz     # on the old code
    python benchmarks/outputs_check.py --compare /tmp/before.npz  # on the new code
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import simulate  # noqa: E402

import cellvi  # noqa: E402

CASES = {
    "scvi_default": ("SCVI", {}, {}),
    "scvi_nb_genebatch_modelled": (
        "SCVI", {"gene_likelihood": "nb", "dispersion": "gene-batch",
                 "use_observed_lib_size": False}, {}),
    "scvi_covariates_2layers": (
        "SCVI", {"n_layers": 2, "encode_covariates": True}, {"covariates": True}),
    "scvi_poisson_ln": ("SCVI", {"gene_likelihood": "poisson", "latent_distribution": "ln"}, {}),
    "scvi_genecell_layernorm": (
        "SCVI", {"dispersion": "gene-cell", "use_layer_norm": "both", "use_batch_norm": "none"},
        {}),
    "linear_scvi": ("LinearSCVI", {}, {}),
    "scanvi": ("SCANVI", {}, {"labels": True}),
    "vaec": ("VAECModel", {}, {"labels": True}),
}


def make_data(covariates: bool = False, labels: bool = False):
    adata = simulate(400, 60, 3, 2, seed=7)
    if covariates:
        rng = np.random.default_rng(0)
        adata.obs["donor"] = [f"d{i}" for i in rng.integers(0, 3, adata.n_obs)]
        adata.obs["pct"] = rng.normal(size=adata.n_obs)
    if labels:
        lab = adata.obs["cell_type"].astype(str).to_numpy().copy()
        lab[np.random.default_rng(1).random(adata.n_obs) < 0.5] = "Unknown"
        adata.obs["labels"] = lab
    return adata


def run_case(name: str) -> dict[str, np.ndarray]:
    cls_name, options, data = CASES[name]
    adata = make_data(**data)
    cls = getattr(cellvi.model, cls_name)
    setup = {"batch_key": "batch"}
    if data.get("covariates"):
        setup.update(categorical_covariate_keys=["donor"], continuous_covariate_keys=["pct"])
    if data.get("labels"):
        setup.update(labels_key="labels", unlabeled_category="Unknown")
    cls.setup_anndata(adata, **setup)
    cellvi.settings.seed = 0
    model = cls(adata, **options)
    model.train(max_epochs=4, seed=3, progress_bar=False)
    hist = model.history
    cols = [c for c in ("elbo_train", "elbo_validation", "reconstruction_loss_train",
                        "kl_local_train", "loss_train") if c in hist]
    torch.manual_seed(5)
    out = {
        "history": hist[cols].to_numpy(dtype=np.float64),
        "latent": model.get_latent_representation(),
        "normalized": model.get_normalized_expression(indices=np.arange(20), return_numpy=True),
    }
    torch.manual_seed(6)
    out["elbo"] = np.array([model.get_elbo()])
    if hasattr(model, "predict"):
        out["proba"] = model.predict(soft=True).to_numpy()
    return out


def main() -> int:
    """Save or compare the outputs."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--save", type=Path)
    group.add_argument("--compare", type=Path)
    ap.add_argument("--cases", nargs="*", default=list(CASES))
    args = ap.parse_args()
    torch.set_num_threads(1)
    results = {f"{c}/{k}": v for c in args.cases for k, v in run_case(c).items()}
    if args.save:
        np.savez(args.save, **results)
        print(f"saved {len(results)} arrays to {args.save}")
        return 0
    before = np.load(args.compare)
    worst = 0.0
    for key, value in results.items():
        if key not in before:
            print(f"{key:45s} new")
            continue
        ref = before[key]
        if ref.shape != value.shape:
            print(f"{key:45s} shape {ref.shape} -> {value.shape}")
            worst = np.inf
            continue
        diff = float(np.max(np.abs(ref - value))) if ref.size else 0.0
        rel = diff / max(float(np.max(np.abs(ref))), 1e-30)
        worst = max(worst, rel)
        print(f"{key:45s} max |diff| {diff:.3g} (relative {rel:.2g})")
    print(f"largest relative difference: {worst:.3g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
