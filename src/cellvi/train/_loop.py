"""The training loop: epochs of plan steps over loaders, validation, history; no model here.

:func:`fit` runs a :class:`~cellvi.train.TrainingPlan` (or any object with the same methods)
over a training loader (anything re-iterable that yields minibatches, once per epoch) and an
optional validation loader, and returns the per-epoch history. Each row has, for ``split`` in
``train`` / ``validation``: ``elbo_<split>`` (the per-cell evidence lower bound, negative for
counts), ``reconstruction_loss_<split>``, ``kl_local_<split>`` and ``kl_global_<split>``
(per-cell means, full KL), ``loss_<split>`` (the objective, warm-up weighted), every extra term
the module reports (``classification_loss_train``, ...), the plan's epoch metrics
(``kl_weight``, ``lr``, validation accuracy, ...) and ``time``.

Ctrl-C ends training after the current step (the first Ctrl-C is caught between steps, in the
main thread; a second one interrupts at once): the history keeps every finished epoch and a row
for the interrupted one (its training metrics over the steps done), the module keeps the
parameters of its last step, and ``history.attrs["interrupted"]`` is True. A validation metric
that is NaN or infinite raises ``FloatingPointError``.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Callable, Iterable

import pandas as pd
import torch
from tqdm.auto import tqdm

from cellvi.module._base import LossOutput

__all__ = ["EpochTotals", "SCVI_TOOLS_COLUMNS", "fit"]

#: Columns of the history under the names scvi-tools gives them (the same values), so that code
#: written for scvi-tools' ``model.history[...]`` runs; the ELBO columns are named alike in
#: both (cellvi's hold the ELBO itself, higher is better; scvi-tools' the negative ELBO).
SCVI_TOOLS_COLUMNS = {
    "loss_train": "train_loss_epoch",
    "loss_validation": "validation_loss",
    "classification_loss_train": "train_classification_loss",
    "classification_loss_validation": "validation_classification_loss",
    "accuracy_validation": "validation_accuracy",
    "calibration_error_validation": "validation_calibration_error",
}


class EpochTotals:
    """Per-cell sums of a run of :class:`~cellvi.module.LossOutput`, summarised per split.

    ``n_obs`` is the number of training cells: a global KL term (a scalar per step) enters the
    per-cell ELBO as ``kl_global / n_obs``.
    """

    def __init__(self, n_obs: int):
        self.n_obs = max(int(n_obs), 1)
        self.n = 0
        self.steps = 0
        self.loss = 0.0
        self.kl_global = 0.0
        self.sums: dict[str, float] = {}

    def add(self, out: LossOutput) -> None:
        """Add one minibatch's terms."""
        n = out.reconstruction_loss.shape[0]
        self.n += n
        self.steps += 1
        self.loss += float(out.loss.detach()) * n
        self.kl_global += float(torch.as_tensor(out.kl_global).detach())
        terms = {"reconstruction_loss": out.reconstruction_loss, "kl_local": out.kl_local_sum}
        for name, value in terms.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value.detach().sum())
        for name, value in out.extra.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value.detach()) * n

    def as_tensor(self) -> torch.Tensor:
        """Return the sums as one float64 tensor (to all-reduce across processes)."""
        names = sorted(self.sums)
        return torch.tensor([self.n, self.steps, self.loss, self.kl_global,
                             *(self.sums[k] for k in names)], dtype=torch.float64)

    def load_tensor(self, values: torch.Tensor) -> None:
        """Replace the sums by ``values`` (from :meth:`as_tensor`, reduced)."""
        names = sorted(self.sums)
        v = values.tolist()
        self.n, self.steps, self.loss, self.kl_global = int(v[0]), int(v[1]), v[2], v[3]
        self.sums = dict(zip(names, v[4:]))

    def summary(self, split: str) -> dict[str, float]:
        """Per-cell means: ``elbo_<split>``, ``loss_<split>``, each term ``<term>_<split>``."""
        n = max(self.n, 1)
        out = {f"{k}_{split}": v / n for k, v in self.sums.items()}
        kl_global = self.kl_global / max(self.steps, 1) / self.n_obs  # per cell
        out[f"kl_global_{split}"] = kl_global
        out[f"elbo_{split}"] = -(self.sums["reconstruction_loss"] + self.sums["kl_local"]) / n \
            - kl_global
        out[f"loss_{split}"] = self.loss / n
        return out


def fit(
    plan,
    train_loader: Iterable,
    validation_loader: Iterable | None = None,
    *,
    max_epochs: int,
    n_obs_train: int,
    progress_bar: bool = True,
    check_val_every_n_epoch: int = 1,
    reduce_totals: Callable[[EpochTotals], None] | None = None,
    on_epoch_end: Callable[[dict], None] | None = None,
    after_train_epoch: Callable[[], None] | None = None,
) -> pd.DataFrame:
    """Train ``plan.module`` with ``plan`` for epochs ``plan.epoch .. max_epochs - 1``.

    Parameters
    ----------
    plan
        A set-up training plan (:meth:`~cellvi.train.TrainingPlan.setup` called).
    train_loader, validation_loader
        Re-iterable sources of minibatches (one pass per epoch).
    max_epochs
        The epoch to stop before (a resumed plan starts at ``plan.epoch``).
    n_obs_train
        Number of training cells (for the per-cell share of a global KL term).
    progress_bar
        Show a progress bar.
    check_val_every_n_epoch
        Validate every this many epochs (and after the last one).
    reduce_totals
        Called on each epoch's totals before they are summarised (data-parallel training
        sums them across processes).
    on_epoch_end
        Called with each epoch's row after the plan's own end-of-epoch (checkpoints).
    after_train_epoch
        Called after each epoch's training steps, before its validation (data-parallel
        training averages batch normalisation's statistics there).

    Returns
    -------
    pandas.DataFrame
        One row per epoch, indexed by ``epoch``.
    """
    module = plan.module
    rows: list[dict] = []
    start = time.perf_counter()
    first = plan.epoch
    bar = tqdm(range(first, max_epochs), desc="Training", disable=not progress_bar,
               unit="epoch")
    stop = _StopRequest()
    with stop.on_sigint():
        try:
            for epoch in bar:
                module.train()
                totals = EpochTotals(n_obs_train)
                for batch in train_loader:
                    totals.add(plan.training_step(batch))
                    if stop.requested:
                        break
                if reduce_totals is not None:
                    reduce_totals(totals)
                if after_train_epoch is not None:
                    after_train_epoch()
                row = {"epoch": epoch, **plan.epoch_metrics()}
                if totals.n:
                    row.update(totals.summary("train"))
                if stop.requested:
                    row["time"] = time.perf_counter() - start
                    rows.append(_with_aliases(row))
                    break
                last = epoch == max_epochs - 1
                if validation_loader is not None and (
                        (epoch - first + 1) % check_val_every_n_epoch == 0 or last):
                    row.update(_validate(plan, validation_loader, n_obs_train, reduce_totals))
                    _check_validation(row, epoch)
                row["time"] = time.perf_counter() - start
                rows.append(_with_aliases(row))
                plan.on_epoch_end(row)
                if on_epoch_end is not None:
                    on_epoch_end(row)
                bar.set_postfix(loss=f"{row['loss_train']:.1f}", elbo_val=(
                    f"{row['elbo_validation']:.1f}" if "elbo_validation" in row else "-"))
                if plan.stop:
                    es = plan.early_stopping
                    bar.write(
                        f"Early stopping at epoch {epoch}: {es.monitor} has not improved for "
                        f"{es.patience} epochs (best at epoch {es.best_epoch})."
                    )
                    break
        finally:
            bar.close()
    if stop.requested:
        bar.write(f"Interrupted (Ctrl-C) during epoch {rows[-1]['epoch']}: training stopped "
                  f"after its current step; {len(rows) - 1} complete epoch(s) kept in the "
                  "history, and the parameters of the last step.")
    plan.on_train_end()
    module.eval()
    history = pd.DataFrame(rows)
    history = history.set_index("epoch") if rows else history
    history.attrs["interrupted"] = stop.requested
    return history


def _with_aliases(row: dict) -> dict:
    """Add scvi-tools' names of the row's metrics (:data:`SCVI_TOOLS_COLUMNS`)."""
    for ours, theirs in SCVI_TOOLS_COLUMNS.items():
        if ours in row:
            row[theirs] = row[ours]
    return row


class _StopRequest:
    """A Ctrl-C caught between training steps (in the main thread; a second one is not)."""

    def __init__(self):
        self.requested = False

    @contextlib.contextmanager
    def on_sigint(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.getsignal(signal.SIGINT)

        def handler(signum, frame):
            if self.requested:  # a second Ctrl-C: stop now
                signal.signal(signal.SIGINT, previous)
                raise KeyboardInterrupt
            self.requested = True

        signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


def _check_validation(row: dict, epoch: int) -> None:
    bad = {k: v for k, v in row.items() if k.endswith("_validation")
           and isinstance(v, float) and not math.isfinite(v)}
    if bad:
        raise FloatingPointError(
            f"Validation metrics became {bad} at epoch {epoch}: the model produces NaN or "
            "infinite values. Likely causes: a learning rate too high for this data (try "
            "lr=1e-4), continuous covariates on very different scales (standardise them), or "
            "data that are not counts."
        )


def _validate(plan, loader: Iterable, n_obs_train: int, reduce_totals) -> dict[str, float]:
    module = plan.module
    was_training = module.training
    module.eval()
    totals = EpochTotals(n_obs_train)
    try:
        for batch in loader:
            totals.add(plan.validation_step(batch))
    finally:
        module.train(was_training)
    if reduce_totals is not None:
        reduce_totals(totals)
    return {**totals.summary("validation"), **plan.validation_epoch_metrics()}
