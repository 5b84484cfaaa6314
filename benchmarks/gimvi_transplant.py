"""Train scvi-tools 1.4.2's GIMVI from cellvi's initial weights (does a shortfall follow the draw?).

Builds one ``bench_gimvi`` design, draws cellvi's GIMVI weights with ``cellvi.settings.seed =
INIT_SEED``, copies them into scvi-tools' modules (cellvi's layers keep their weights as
``(in, out)``; its fused mean / variance heads are split), trains scvi-tools with its own
``scvi.settings.seed = TRAIN_SEED`` (its own minibatches, dropout, noise and discriminator), one
thread, and prints the median Spearman over the held-out genes (BENCHMARKS.md, gimVI).

Run::

    .bench-venv/bin/python benchmarks/gimvi_transplant.py sim-clusters DATA INIT TRAIN  # seeds
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_gimvi as B  # noqa: E402


def cellvi_initial_weights(seq, spatial, seed: int) -> dict[str, torch.Tensor]:
    """Return the state dict of a fresh cellvi GIMVI drawn with ``seed``."""
    import cellvi
    from cellvi.model import GIMVI

    GIMVI.setup_anndata(seq)
    GIMVI.setup_anndata(spatial)
    cellvi.settings.seed = seed
    return GIMVI(seq, spatial).module.state_dict()


def scvi_state(c: dict[str, torch.Tensor], s: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Write cellvi's JVAE weights ``c`` into scvi-tools' JVAE state dict ``s`` (two datasets)."""
    s = dict(s)

    def lin(dst, src):  # cellvi's CovariateLinear keeps its weight as (in, out)
        s[dst + ".weight"] = c[src + ".weight"].t().clone()
        s[dst + ".bias"] = c[src + ".bias"].clone()

    def bn(dst, src):
        for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            s[f"{dst}.{k}"] = c[f"{src}.{k}"].clone()

    def split(dst, src, n):  # cellvi's fused mean and variance heads
        w, b = c[src + ".weight"], c[src + ".bias"]
        s[dst + "mean_encoder.weight"], s[dst + "var_encoder.weight"] = w[:n].clone(), w[n:].clone()
        s[dst + "mean_encoder.bias"], s[dst + "var_encoder.bias"] = b[:n].clone(), b[n:].clone()

    for d in (0, 1):
        lin(f"z_encoder.encoders.{d}.fc_layers.Layer 0.0", f"encoder_heads.{d}.linears.0")
        bn(f"z_encoder.encoders.{d}.fc_layers.Layer 0.1", f"encoder_heads.{d}.posts.0.0")
    lin("z_encoder.encoder_shared.fc_layers.Layer 0.0", "encoder_shared.linears.0")
    bn("z_encoder.encoder_shared.fc_layers.Layer 0.1", "encoder_shared.posts.0.0")
    split("z_encoder.", "z_mean_var", c["z_mean_var.weight"].shape[0] // 2)
    lin("l_encoders.0.encoder.fc_layers.Layer 0.0", "l_encoders.0.encoder.linears.0")
    bn("l_encoders.0.encoder.fc_layers.Layer 0.1", "l_encoders.0.encoder.posts.0.0")
    split("l_encoders.0.", "l_encoders.0.mean_var", 1)
    for k in ("weight", "bias"):
        s["decoder.px_scale_decoder.0." + k] = c["px_scale_decoder." + k].clone()
        s["decoder.px_dropout_decoder." + k] = c["px_dropout_decoder." + k].clone()
    s["px_r"] = c["px_r"].clone()
    return s


def main(argv: list[str]) -> None:
    design, data_seed, init_seed, train_seed = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    torch.set_num_threads(1)
    seq, spatial, held, measured = B.make_design(design, data_seed, 0)
    c = cellvi_initial_weights(seq, spatial, init_seed)
    warnings.filterwarnings("ignore")
    import scvi
    from scvi.external import GIMVI

    for name in ("scvi", "lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    scvi.settings.seed = train_seed
    torch.set_num_threads(1)
    seq2, spatial2 = seq.copy(), spatial.copy()
    for a in (seq2, spatial2):
        a.uns.pop("_cellvi_setup", None)
    GIMVI.setup_anndata(seq2)
    GIMVI.setup_anndata(spatial2)
    model = GIMVI(seq2, spatial2)
    model.module.load_state_dict(scvi_state(c, model.module.state_dict()))
    start = time.perf_counter()
    model.train(max_epochs=200, kappa=B.KAPPA, batch_size=B.BATCH_SIZE, train_size=B.TRAIN_SIZE,
                accelerator="cpu", devices=1, enable_progress_bar=False)
    _, imputed = model.get_imputed_values(normalized=False)
    score = B._score(imputed, seq.var_names, held, measured)["spearman"]
    print(f"{design} data seed {data_seed}: scvi-tools from cellvi's seed-{init_seed} weights, "
          f"scvi-tools seed {train_seed}: spearman {score:.3f} "
          f"({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
