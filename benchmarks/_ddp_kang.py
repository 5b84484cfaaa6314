"""One SCVI run on Kang for bench_atlas.py ddp: alone, or as one of the processes of torchrun."""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

import cellvi  # noqa: E402

torch.set_num_threads(1)
adata = _common.load_kang()
cellvi.model.SCVI.setup_anndata(adata, batch_key="batch")
model = cellvi.model.SCVI(adata)
model.train(max_epochs=int(os.environ.get("CELLVI_EPOCHS", "100")), seed=0, progress_bar=False)
if int(os.environ.get("RANK", "0")) == 0:
    print(json.dumps({"processes": int(os.environ.get("WORLD_SIZE", "1")),
                      "elbo_validation": float(model.history["elbo_validation"].iloc[-1]),
                      "training_step": model.train_settings["training_step"]}))
