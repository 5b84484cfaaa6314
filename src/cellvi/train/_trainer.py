"""Training loop: Adam, KL warm-up, validation, early stopping, learning-rate schedule."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from cellvi.data._loader import CellData, DeviceCellData, iterate, place_data, sparse_batches
from cellvi.module import LossOutput, _vae_step

from ._adam import Adam, ReduceLROnPlateau

Batch = dict[str, torch.Tensor]
#: ``step(module, batch, kl_weight) -> LossOutput``; the default runs ``module(batch, ...)``.
StepFn = Callable[[nn.Module, Batch, float], LossOutput]


@dataclass
class TrainConfig:
    """Settings of one training run (the arguments of ``model.train``)."""

    max_epochs: int
    lr: float = 1e-3
    batch_size: int = 128
    early_stopping: bool = False
    early_stopping_patience: int = 45
    n_epochs_kl_warmup: int | None = 400
    n_steps_kl_warmup: int | None = None
    weight_decay: float = 1e-6
    eps: float = 0.01
    reduce_lr_on_plateau: bool = False
    lr_factor: float = 0.6
    lr_patience: int = 30
    seed: int | None = None
    progress_bar: bool = True
    data_placement: Literal["auto", "device", "host"] = "auto"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` is the GPU when there is one, else the CPU."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was asked for but no CUDA GPU is available.")
    return torch.device(device)


def kl_weight(config: TrainConfig, epoch: int, step: int) -> float:
    """Warm-up weight of the KL term: linear from 0 to 1 over steps, or else over epochs."""
    if config.n_steps_kl_warmup:
        return min(1.0, step / config.n_steps_kl_warmup)
    if config.n_epochs_kl_warmup:
        return min(1.0, epoch / config.n_epochs_kl_warmup)
    return 1.0


def make_adam(module: nn.Module, config: TrainConfig, device: torch.device) -> Adam:
    """Build Adam over the trainable parameters of ``module`` (on ``device``)."""
    return Adam(module.parameters(), lr=config.lr, eps=config.eps,
                weight_decay=config.weight_decay)


def default_step(module: nn.Module, batch: Batch, weight: float) -> LossOutput:
    """Forward a minibatch through ``module`` and return its loss."""
    return module(batch, kl_weight=weight)[2]


NAN_MESSAGE = (
    "The loss became {value} at epoch {epoch}, step {step}. Likely causes: a learning rate too "
    "high for this data (try lr=1e-4), continuous covariates on very different scales (standardise "
    "them), or data that are not counts (pass raw counts, or the layer holding them)."
)


def train_module(
    module: nn.Module,
    data: CellData,
    train_indices: np.ndarray,
    validation_indices: np.ndarray,
    config: TrainConfig,
    *,
    device: torch.device,
    step_fn: StepFn = default_step,
) -> pd.DataFrame:
    """Train ``module`` in place and return the per-epoch history.

    The history has one row per epoch with ``elbo_train`` / ``elbo_validation`` (the per-cell
    evidence lower bound, negative for counts), ``reconstruction_loss_*`` and ``kl_local_*``
    (per-cell means, full KL), ``loss_train`` (the warm-up weighted objective), ``kl_weight``,
    ``lr`` and ``time``. Minibatches come from ``data`` or from its copy on ``device``, as
    ``config.data_placement`` says (:func:`cellvi.data.place_data`).
    """
    data = place_data(data, config.data_placement, device)
    if config.seed is not None:
        torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    module.to(device)
    optimizer = make_adam(module, config, device)
    scheduler = None
    if config.reduce_lr_on_plateau:
        scheduler = ReduceLROnPlateau(
            optimizer, factor=config.lr_factor, patience=config.lr_patience
        )
    has_validation = len(validation_indices) > 0
    if (config.early_stopping or config.reduce_lr_on_plateau) and not has_validation:
        raise ValueError(
            "early_stopping and reduce_lr_on_plateau monitor the validation ELBO: use "
            "train_size < 1 so that there are validation cells."
        )
    sparse = sparse_batches(module, device)  # counts as sparse CSR tensors
    # scVI on the CPU: the same loss and gradients, written out instead of an autograd graph
    written_out = (step_fn is default_step and sparse and device.type == "cpu"
                   and _vae_step.supports(module))
    rows: list[dict] = []
    best, best_epoch, best_state = math.inf, -1, None
    step = 0
    start = time.perf_counter()
    bar = tqdm(range(config.max_epochs), desc="Training", disable=not config.progress_bar,
               unit="epoch")
    for epoch in bar:
        module.train()
        totals = _Totals()
        weight = kl_weight(config, epoch, step)
        for batch in iterate(data, train_indices, batch_size=config.batch_size, shuffle=True,
                             rng=rng, drop_last_below=3, device=device, sparse=sparse):
            if config.n_steps_kl_warmup:
                weight = kl_weight(config, epoch, step)
            if written_out:
                optimizer.zero_grad()
                out = _vae_step.training_step(module, batch, weight)  # sets the gradients
            else:
                out = step_fn(module, batch, weight)
            if not torch.isfinite(out.loss):
                raise FloatingPointError(
                    NAN_MESSAGE.format(value=out.loss.item(), epoch=epoch, step=step)
                )
            if not written_out:
                optimizer.zero_grad()
                out.loss.backward()
            optimizer.step()
            totals.add(out)
            step += 1
        row = {"epoch": epoch, "kl_weight": weight, "lr": optimizer.lr}
        row.update(totals.summary("train"))
        if has_validation:
            row.update(evaluate(module, data, validation_indices, batch_size=max(
                config.batch_size, 1024), device=device, step_fn=step_fn).summary("validation"))
        row["time"] = time.perf_counter() - start
        rows.append(row)
        bar.set_postfix(loss=f"{row['loss_train']:.1f}", elbo_val=(
            f"{row['elbo_validation']:.1f}" if has_validation else "-"))

        if has_validation:
            monitored = -row["elbo_validation"]
            if scheduler is not None:
                scheduler.step(monitored)
            if config.early_stopping:
                if monitored < best:
                    best, best_epoch = monitored, epoch
                    best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
                elif epoch - best_epoch >= config.early_stopping_patience:
                    bar.write(
                        f"Early stopping at epoch {epoch}: the validation ELBO has not improved "
                        f"for {config.early_stopping_patience} epochs (best at epoch {best_epoch})."
                    )
                    break
    bar.close()
    if best_state is not None:
        module.load_state_dict(best_state)
    module.eval()
    return pd.DataFrame(rows).set_index("epoch")


class _Totals:
    """Accumulates per-cell sums of the loss terms over an epoch."""

    def __init__(self):
        self.n = 0
        self.loss = 0.0
        self.sums: dict[str, float] = {}

    def add(self, out: LossOutput) -> None:
        n = out.reconstruction_loss.shape[0]
        self.n += n
        self.loss += float(out.loss.detach()) * n
        terms = {"reconstruction_loss": out.reconstruction_loss, "kl_local": out.kl_local_sum}
        for name, value in terms.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value.detach().sum())
        for name, value in out.extra.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value.detach()) * n

    def summary(self, split: str) -> dict[str, float]:
        n = max(self.n, 1)
        out = {f"{k}_{split}": v / n for k, v in self.sums.items()}
        out[f"elbo_{split}"] = -(self.sums["reconstruction_loss"] + self.sums["kl_local"]) / n
        out[f"loss_{split}"] = self.loss / n
        return out


@torch.inference_mode()
def evaluate(
    module: nn.Module,
    data: CellData | DeviceCellData,
    indices: np.ndarray,
    *,
    batch_size: int,
    device: torch.device,
    step_fn: StepFn = default_step,
) -> _Totals:
    """Loss terms of ``indices`` with the full KL, in evaluation mode."""
    was_training = module.training
    module.eval()
    totals = _Totals()
    sparse = sparse_batches(module, device)
    for batch in iterate(data, indices, batch_size=batch_size, device=device, sparse=sparse,
                         transpose=False):
        totals.add(step_fn(module, batch, 1.0))
    module.train(was_training)
    return totals
