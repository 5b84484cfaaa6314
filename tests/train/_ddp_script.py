"""Trained by tests/train/test_distributed.py: one process alone, or two under torchrun."""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from conftest import simulate  # noqa: E402

import cellvi  # noqa: E402

torch.set_num_threads(1)
out = sys.argv[1]
mode = sys.argv[2]
adata = simulate(1200, 60, 3, 2, seed=41)
cellvi.model.SCVI.setup_anndata(adata, batch_key="batch")
model = cellvi.model.SCVI(adata, n_latent=4, n_hidden=32)
if mode == "early":
    model.train(max_epochs=60, seed=0, progress_bar=False, early_stopping=True,
                early_stopping_patience=2, lr=5e-2)
else:
    model.train(max_epochs=12, seed=0, progress_bar=False, lr=5e-3)
z = model.get_latent_representation()
rank = int(os.environ.get("RANK", "0"))
result = {
    "rank": rank, "world": int(os.environ.get("WORLD_SIZE", "1")),
    "elbo_validation": model.history["elbo_validation"].tolist(),
    "kept_epoch": model.train_settings.get("kept_epoch"),
    "step": model.train_settings["training_step"],
    "latent_first_rows": z[:5].tolist(), "latent_shape": list(z.shape),
    "latent_single": model._latent(None, None, True, 5000, None, False)[:5].tolist(),
    "params_sum": float(sum(p.detach().double().sum() for p in model.module.parameters())),
}
with open(f"{out}.{rank}.json", "w") as fh:
    json.dump(result, fh)
