r"""Training plans: what one training step does, with which optimizers, and when to stop.

The loop (:func:`cellvi.train.fit`) knows no model: it asks a plan to

* :meth:`~TrainingPlan.setup` itself for a run (build optimizers, choose the step);
* do a :meth:`~TrainingPlan.training_step` per minibatch (loss, gradients, optimizer steps)
  and a :meth:`~TrainingPlan.validation_step` per validation minibatch (the loss terms);
* close each epoch, :meth:`~TrainingPlan.on_epoch_end`: learning-rate schedule, early stopping
  (:attr:`~TrainingPlan.stop`), the epoch's extra metrics;
* give and take its :meth:`~TrainingPlan.state_dict` (optimizers, schedule, early stopping,
  step counters), so that a run can be checkpointed and resumed.

Plans here:

* :class:`TrainingPlan`: the unsupervised ELBO, Adam (``torch.optim``) on every parameter, KL
  warm-up, reduce-on-plateau and early stopping. The step is the module's own fused step when
  it offers one for its configuration (:meth:`cellvi.module.VAE.fused_training_step`), else
  autograd; which one ran is :attr:`~TrainingPlan.step_path`.
* :class:`SemiSupervisedTrainingPlan`: adds a minibatch of labelled cells to every step and the
  classification loss, and reports validation accuracy and calibration.
* :class:`AdversarialTrainingPlan`: a second optimizer trains a classifier to tell categories
  (batches, datasets) apart from the latent, while the model is trained to fool it.

KL warm-up: the weight of the warmed-up KL terms rises linearly from ``min_kl_weight`` to
``max_kl_weight`` over ``n_steps_kl_warmup`` steps or else ``n_epochs_kl_warmup`` epochs.
Modules whose loss has a global term get ``n_obs`` (the number of training cells) so that
:math:`\mathrm{loss} = \frac1n\sum_i(\ldots) + \mathrm{KL}_\mathrm{global} / n_\mathrm{obs}`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from cellvi.module._base import LossOutput

from ._adam import make_adam
from ._loop import SCVI_TOOLS_COLUMNS

Tensors = dict[str, torch.Tensor]

__all__ = [
    "AdversarialTrainingPlan",
    "adversarial_loss",
    "EarlyStopping",
    "SemiSupervisedTrainingPlan",
    "TrainingPlan",
]


def metric_mode(name: str) -> Literal["max", "min"]:
    """``"max"`` for metrics where higher is better (ELBO, accuracy), ``"min"`` for the rest."""
    ours = {v: k for k, v in SCVI_TOOLS_COLUMNS.items()}.get(name, name)
    return "max" if ours.startswith(("elbo", "accuracy")) else "min"


class EarlyStopping:
    """Stop when a monitored metric has not improved by ``min_delta`` for ``patience`` epochs.

    ``mode="max"`` for metrics where higher is better (the ELBO, accuracy), ``"min"`` for
    losses. The module's parameters at the best epoch are kept and restored at the end.
    """

    def __init__(self, monitor: str = "elbo_validation", *, patience: int = 45,
                 min_delta: float = 0.0, mode: Literal["max", "min"] = "max"):
        if patience < 1:
            raise ValueError(f"early_stopping_patience must be >= 1, got {patience}.")
        if mode not in ("max", "min"):
            raise ValueError(f"early_stopping_mode must be 'max' or 'min', got {mode!r}.")
        self.monitor, self.patience, self.min_delta, self.mode = monitor, patience, min_delta, mode
        self.best = -math.inf
        self.best_epoch = -1
        self.best_state: dict[str, torch.Tensor] | None = None
        self.stopped_epoch: int | None = None

    def update(self, epoch: int, value: float, module: nn.Module) -> bool:
        """Record one epoch's value; return True when training should stop."""
        score = value if self.mode == "max" else -value
        if score > self.best + self.min_delta:
            self.best, self.best_epoch = score, epoch
            self.best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
            return False
        if epoch - self.best_epoch >= self.patience:
            self.stopped_epoch = epoch
            return True
        return False

    def state_dict(self) -> dict:
        """Return what resuming needs (the best parameters included)."""
        return {"best": self.best, "best_epoch": self.best_epoch, "best_state": self.best_state,
                "stopped_epoch": self.stopped_epoch}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""
        self.best, self.best_epoch = state["best"], state["best_epoch"]
        self.best_state, self.stopped_epoch = state["best_state"], state["stopped_epoch"]


class TrainingPlan:
    """Unsupervised training: the module's loss, Adam, KL warm-up, schedule, early stopping.

    Parameters
    ----------
    module
        The module; ``module(tensors, kl_weight=...)`` returns ``(inference, generative,
        LossOutput)``.
    lr
        Learning rate.
    weight_decay
        L2 penalty added to the gradients (as ``torch.optim.Adam`` does).
    eps
        Adam's epsilon.
    optimizer
        ``"Adam"`` or ``"AdamW"`` (decoupled weight decay).
    n_epochs_kl_warmup, n_steps_kl_warmup
        Length of the KL warm-up, in epochs or (taking priority) in steps; None for neither.
    max_kl_weight, min_kl_weight
        End and start of the warm-up.
    reduce_lr_on_plateau
        Multiply the learning rate by ``lr_factor`` when ``lr_scheduler_metric`` has not
        improved by ``lr_threshold`` for more than ``lr_patience`` epochs (not below
        ``lr_min``).
    lr_factor, lr_patience, lr_threshold, lr_min, lr_scheduler_metric
        See ``reduce_lr_on_plateau``.
    early_stopping
        Stop when ``early_stopping_monitor`` has not improved for ``early_stopping_patience``
        epochs (by at least ``early_stopping_min_delta``), and keep the best epoch's parameters.
    early_stopping_monitor, early_stopping_patience, early_stopping_min_delta, \
early_stopping_mode
        See ``early_stopping``. The mode (``"max"``: higher is better) follows from the
        monitored metric when None: ``"max"`` for the ELBO and accuracy, ``"min"`` for losses
        and errors (scvi-tools' ``validation_loss``, ``reconstruction_loss_validation``...).
    loss_kwargs
        Extra keyword arguments of the module's loss.
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        lr: float = 1e-3,
        weight_decay: float = 1e-6,
        eps: float = 0.01,
        optimizer: Literal["Adam", "AdamW"] = "Adam",
        n_epochs_kl_warmup: int | None = 400,
        n_steps_kl_warmup: int | None = None,
        max_kl_weight: float = 1.0,
        min_kl_weight: float = 0.0,
        reduce_lr_on_plateau: bool = False,
        lr_factor: float = 0.6,
        lr_patience: int = 30,
        lr_threshold: float = 0.0,
        lr_min: float = 0.0,
        lr_scheduler_metric: str = "elbo_validation",
        early_stopping: bool = False,
        early_stopping_monitor: str = "elbo_validation",
        early_stopping_patience: int = 45,
        early_stopping_min_delta: float = 0.0,
        early_stopping_mode: Literal["max", "min"] | None = None,
        loss_kwargs: dict | None = None,
    ):
        if not (np.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a positive finite number, got {lr}.")
        if weight_decay < 0 or not np.isfinite(weight_decay):
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}.")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}.")
        if optimizer not in ("Adam", "AdamW"):
            raise ValueError(f"optimizer must be 'Adam' or 'AdamW', got {optimizer!r}.")
        for name, value in (("n_epochs_kl_warmup", n_epochs_kl_warmup),
                            ("n_steps_kl_warmup", n_steps_kl_warmup)):
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0 or None, got {value}.")
        if not 0 < lr_factor < 1:
            raise ValueError(f"lr_factor must be in (0, 1), got {lr_factor}.")
        for name, value in (("early_stopping_patience", early_stopping_patience),
                            ("lr_patience", lr_patience)):
            if isinstance(value, bool) or int(value) != value or value < (
                    1 if name == "early_stopping_patience" else 0):
                raise ValueError(f"{name} must be an integer >= "
                                 f"{1 if name == 'early_stopping_patience' else 0}, got {value}.")
        for name, value in (("early_stopping_min_delta", early_stopping_min_delta),
                            ("lr_threshold", lr_threshold), ("lr_min", lr_min),
                            ("max_kl_weight", max_kl_weight), ("min_kl_weight", min_kl_weight)):
            if not (np.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {value}.")
        if early_stopping_mode is None:
            early_stopping_mode = metric_mode(early_stopping_monitor)
        if early_stopping_mode not in ("max", "min"):
            raise ValueError(
                f"early_stopping_mode must be 'max' or 'min', got {early_stopping_mode!r}.")
        self.module = module
        self.lr, self.weight_decay, self.eps, self.optimizer_name = lr, weight_decay, eps, optimizer
        self.n_epochs_kl_warmup, self.n_steps_kl_warmup = n_epochs_kl_warmup, n_steps_kl_warmup
        self.max_kl_weight, self.min_kl_weight = max_kl_weight, min_kl_weight
        self.reduce_lr_on_plateau = reduce_lr_on_plateau
        self.lr_options = dict(factor=lr_factor, patience=lr_patience, threshold=lr_threshold,
                               min_lr=lr_min)
        self.lr_scheduler_metric = lr_scheduler_metric
        self.early_stopping = (EarlyStopping(early_stopping_monitor,
                                             patience=early_stopping_patience,
                                             min_delta=early_stopping_min_delta,
                                             mode=early_stopping_mode)
                               if early_stopping else None)
        self.loss_kwargs = dict(loss_kwargs or {})
        self.epoch = 0
        self.global_step = 0
        self.stop = False
        self.optimizers: list[torch.optim.Optimizer] = []
        self.scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau | None = None
        self.step_path = "not set up"
        self._last_kl_weight = self.kl_weight
        self._fused: Callable | None = None
        self._gradient_hook: Callable[[nn.Module], None] | None = None

    # --------------------------------------------------------------- set-up
    def setup(self, *, device: torch.device, sparse: bool, n_obs_train: int,
              has_validation: bool, gradient_hook: Callable[[nn.Module], None] | None = None
              ) -> None:
        """Prepare a run: optimizers, the step (fused or autograd), what the loss needs.

        ``gradient_hook(module)`` is called after the gradients are set and before the
        optimizer steps (data-parallel training all-reduces them there).
        """
        monitored = [self.lr_scheduler_metric] if self.reduce_lr_on_plateau else []
        if self.early_stopping is not None:
            monitored.append(self.early_stopping.monitor)
        if any(m.endswith("_validation") for m in monitored) and not has_validation:
            raise ValueError(
                "early_stopping and reduce_lr_on_plateau monitor a validation metric: use "
                "train_size < 1 so that there are validation cells."
            )
        self.n_obs_train = int(n_obs_train)
        self._gradient_hook = gradient_hook
        if "n_obs" in inspect.signature(self.module.loss).parameters:
            self.loss_kwargs.setdefault("n_obs", self.n_obs_train)
        if not self.optimizers:
            self.optimizers = self.configure_optimizers()
            if self.reduce_lr_on_plateau:
                self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                    self.optimizers[0], mode=metric_mode(self.lr_scheduler_metric),
                    threshold_mode="abs", **self.lr_options)
        self._fused, reason = self._choose_step(device=device, sparse=sparse)
        self.step_path = "fused" if self._fused is not None else f"autograd ({reason})"

    def _fused_refusal(self) -> str | None:
        """Why this run cannot take a module's fused step whatever the module, or None."""
        if (any(not p.requires_grad for p in self.module.parameters())
                or getattr(self.module, "after_optimizer_step", None) is not None):
            return "some parameters are frozen (reference mapping)"
        if self.loss_kwargs:
            return f"loss options {sorted(self.loss_kwargs)}"
        return None

    def _choose_step(self, *, device, sparse):
        fused = getattr(self.module, "fused_training_step", None)
        if fused is None:
            return None, f"{type(self.module).__name__} has no fused step"
        refusal = self._fused_refusal()
        if refusal:
            return None, refusal
        if type(self).training_step is not TrainingPlan.training_step:
            return None, f"{type(self).__name__} has its own step"
        return fused(device=device, sparse=sparse)

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        """Return an Adam (or AdamW) over ``params`` with the plan's settings.

        Adam is ``torch.optim.Adam(fused=True)``'s update (:func:`cellvi.train._adam.make_adam`:
        the same steps and state, without its 1 s first-use import); AdamW is
        ``torch.optim.AdamW``.
        """
        params = [p for p in params if p.requires_grad]
        if not params:
            raise ValueError("The module has no trainable parameters.")
        if self.optimizer_name == "Adam":
            return make_adam(params, lr=self.lr, eps=self.eps, weight_decay=self.weight_decay)
        return torch.optim.AdamW(params, lr=self.lr, eps=self.eps,
                                 weight_decay=self.weight_decay)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """Return the optimizers, the model's first (the schedule acts on it)."""
        return [self.make_optimizer(self.module.parameters())]

    # --------------------------------------------------------------- steps
    @property
    def kl_weight(self) -> float:
        """The current KL warm-up weight."""
        lo, hi = self.min_kl_weight, self.max_kl_weight
        if self.n_steps_kl_warmup:
            frac = min(1.0, self.global_step / self.n_steps_kl_warmup)
        elif self.n_epochs_kl_warmup:
            frac = min(1.0, self.epoch / self.n_epochs_kl_warmup)
        else:
            frac = 1.0
        return lo + (hi - lo) * frac

    def forward(self, batch: Tensors, kl_weight: float) -> LossOutput:
        """Return the module's loss on ``batch`` (with the plan's loss options)."""
        return self.module(batch, kl_weight=kl_weight, **self.loss_kwargs)[2]

    def _check_finite(self, out: LossOutput) -> None:
        if not torch.isfinite(out.loss):
            raise FloatingPointError(NAN_MESSAGE.format(value=out.loss.item(), epoch=self.epoch,
                                                        step=self.global_step))

    def _apply(self, optimizer: torch.optim.Optimizer, module: nn.Module) -> None:
        if self._gradient_hook is not None:
            self._gradient_hook(module)
        optimizer.step()
        after = getattr(module, "after_optimizer_step", None)
        if after is not None:  # e.g. a query model restoring its reference's rows
            after()

    def training_step(self, batch: Tensors) -> LossOutput:
        """Loss of ``batch``, its gradients, and one optimizer step."""
        optimizer = self.optimizers[0]
        weight = self._last_kl_weight = self.kl_weight
        optimizer.zero_grad(set_to_none=True)
        if self._fused is not None:  # gradients written out by the module's own step
            out = self._fused(self.module, batch, weight)
            self._check_finite(out)
        else:
            out = self.forward(batch, weight)
            self._check_finite(out)
            out.loss.backward()
        self._apply(optimizer, self.module)
        self.global_step += 1
        return out

    @torch.inference_mode()
    def validation_step(self, batch: Tensors) -> LossOutput:
        """Loss terms of a validation minibatch with the full KL (the module in eval mode)."""
        return self.module(batch, kl_weight=1.0, **self.loss_kwargs)[2]

    # --------------------------------------------------------------- epochs
    def epoch_metrics(self) -> dict[str, float]:
        """Metrics of the epoch that only the plan knows (KL weight of its last step, lr)."""
        return {"kl_weight": self._last_kl_weight,
                "lr": self.optimizers[0].param_groups[0]["lr"]}

    def validation_epoch_metrics(self) -> dict[str, float]:
        """Extra validation metrics gathered by :meth:`validation_step` (none here)."""
        return {}

    def on_epoch_end(self, metrics: dict[str, float]) -> None:
        """Step the schedule and early stopping on the epoch's ``metrics``; next epoch.

        An epoch without the monitored metric (no validation that epoch) is skipped.
        """
        if self.scheduler is not None and self.lr_scheduler_metric in metrics:
            self.scheduler.step(_metric(metrics, self.lr_scheduler_metric))
        if self.early_stopping is not None and self.early_stopping.monitor in metrics:
            value = _metric(metrics, self.early_stopping.monitor)
            self.stop = self.early_stopping.update(self.epoch, value, self.module)
        self.epoch += 1

    def on_train_end(self) -> None:
        """Restore the best epoch's parameters when early stopping kept them."""
        if self.early_stopping is not None and self.early_stopping.best_state is not None:
            self.module.load_state_dict(self.early_stopping.best_state)

    # --------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Optimizers, schedule, early stopping and counters, for resuming."""
        return {
            "epoch": self.epoch,
            "global_step": self.global_step,
            "optimizers": [o.state_dict() for o in self.optimizers],
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "early_stopping": (None if self.early_stopping is None
                               else self.early_stopping.state_dict()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (after :meth:`setup` has built the optimizers)."""
        self.epoch, self.global_step = int(state["epoch"]), int(state["global_step"])
        for opt, s in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(s)
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.early_stopping is not None and state["early_stopping"] is not None:
            self.early_stopping.load_state_dict(state["early_stopping"])


def _metric(metrics: dict[str, float], name: str) -> float:
    if name not in metrics:
        raise KeyError(
            f"The monitored metric {name!r} is not computed; metrics: {sorted(metrics)}.")
    value = float(metrics[name])
    if not np.isfinite(value):
        raise FloatingPointError(f"The monitored metric {name} is {value}.")
    return value


NAN_MESSAGE = (
    "The loss became {value} at epoch {epoch}, step {step}. Likely causes: a learning rate too "
    "high for this data (try lr=1e-4), continuous covariates on very different scales (standardise "
    "them), or data that are not counts (pass raw counts, or the layer holding them)."
)


class SemiSupervisedTrainingPlan(TrainingPlan):
    """The ELBO of every minibatch, plus the classification loss on labelled cells.

    Each step draws ``labelled_batch_size`` labelled training cells (with replacement when
    fewer exist) from ``labelled_sampler`` and adds ``classification_ratio`` times the
    classifier's cross-entropy on them. Validation adds ``accuracy_validation`` and
    ``calibration_error_validation`` (expected calibration error, 10 bins) on the labelled
    validation cells, from the module's ``classify``.

    Parameters
    ----------
    module
        A module whose ``forward`` takes ``feed_labels``, ``labelled_tensors`` and
        ``classification_ratio`` (:class:`~cellvi.module.SCANVAE`, :class:`~cellvi.module.VAEC`).
    classification_ratio
        Weight of the classification loss.
    labelled_sampler
        ``sampler(n) -> minibatch`` of ``n`` labelled training cells, or None (no labelled
        cells: the classifier learns through the ELBO only). Set by the model.
    labelled_batch_size
        Cells per labelled minibatch (default: the training batch size).
    **kwargs
        Options of :class:`TrainingPlan`.
    """

    def __init__(self, module: nn.Module, *, classification_ratio: float = 50.0,
                 labelled_sampler: Callable[[int], Tensors] | None = None,
                 labelled_batch_size: int = 128, **kwargs):
        super().__init__(module, **kwargs)
        if classification_ratio < 0:
            raise ValueError(f"classification_ratio must be >= 0, got {classification_ratio}.")
        self.classification_ratio = float(classification_ratio)
        self.labelled_sampler = labelled_sampler
        self.labelled_batch_size = max(int(labelled_batch_size), 2)
        self._val_probs: list[torch.Tensor] = []
        self._val_labels: list[torch.Tensor] = []

    def forward(self, batch: Tensors, kl_weight: float) -> LossOutput:  # noqa: D102
        labelled = None
        if self.module.training and self.labelled_sampler is not None:
            labelled = self.labelled_sampler(self.labelled_batch_size)
        return self.module(batch, kl_weight=kl_weight, feed_labels=True,
                           labelled_tensors=labelled,
                           classification_ratio=self.classification_ratio,
                           **self.loss_kwargs)[2]

    def _choose_step(self, *, device, sparse):
        """Take the module's semi-supervised fused step, given this plan's labelled minibatch.

        The module offers it through ``fused_training_step(..., semi_supervised=True)``
        (:meth:`cellvi.module.SCANVAE.fused_training_step`); the step then computes what
        :meth:`forward` computes: labels fed, ``classification_ratio`` times the cross-entropy
        on a labelled minibatch drawn from ``labelled_sampler`` first (as :meth:`forward`
        draws it).
        """
        fused = getattr(self.module, "fused_training_step", None)
        if fused is None or "semi_supervised" not in inspect.signature(fused).parameters:
            return None, f"{type(self.module).__name__} has no semi-supervised fused step"
        refusal = self._fused_refusal()
        if refusal:
            return None, refusal
        if (type(self).training_step is not TrainingPlan.training_step
                or type(self).forward is not SemiSupervisedTrainingPlan.forward):
            return None, f"{type(self).__name__} has its own step"
        step, reason = fused(device=device, sparse=sparse, semi_supervised=True)
        if step is None:
            return None, reason

        def semi_supervised_step(module: nn.Module, batch: Tensors, kl_weight: float):
            labelled = None
            if module.training and self.labelled_sampler is not None:
                labelled = self.labelled_sampler(self.labelled_batch_size)
            return step(module, batch, kl_weight, feed_labels=True, labelled_tensors=labelled,
                        classification_ratio=self.classification_ratio)

        return semi_supervised_step, ""

    @torch.inference_mode()
    def validation_step(self, batch: Tensors) -> LossOutput:
        """Loss terms with the labels fed; also the class probabilities of labelled cells."""
        from cellvi import keys

        y = batch[keys.LABELS].reshape(-1)
        keep = (y >= 0) & (y < self.module.n_labels)
        if bool(keep.any()):
            # under a forked random state: the metric must not change the training's stream
            devices = [] if batch[keys.X].device.type != "cuda" else [batch[keys.X].device]
            with torch.random.fork_rng(devices=devices):
                p = self.module.classify(batch[keys.X], batch[keys.BATCH])
            self._val_probs.append(p[keep].cpu())
            self._val_labels.append(y[keep].cpu())
        return self.module(batch, kl_weight=1.0, feed_labels=True, **self.loss_kwargs)[2]

    def validation_epoch_metrics(self) -> dict[str, float]:
        """Accuracy and expected calibration error on the labelled validation cells."""
        probs, labels = self._val_probs, self._val_labels
        self._val_probs, self._val_labels = [], []
        if not probs:
            return {}
        p, y = torch.cat(probs), torch.cat(labels)
        return {"accuracy_validation": float((p.argmax(1) == y).float().mean()),
                "calibration_error_validation": expected_calibration_error(p, y)}


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor,
                               n_bins: int = 10) -> float:
    r"""Return the expected calibration error of top-class probabilities (equal-width bins).

    :math:`\sum_b \frac{|B_b|}{n} |\mathrm{acc}(B_b) - \mathrm{conf}(B_b)|` over the bins of
    the top probability.
    """
    conf, pred = probs.max(1)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, n_bins + 1)
    bins = torch.bucketize(conf, edges[1:-1], right=True)
    ece = 0.0
    for b in range(n_bins):
        inside = bins == b
        if bool(inside.any()):
            ece += float(inside.float().mean()) * abs(float(correct[inside].mean())
                                                      - float(conf[inside].mean()))
    return ece


class AdversarialTrainingPlan(TrainingPlan):
    r"""The model's loss plus an adversary on its latent space, with two optimizers.

    A classifier :math:`c` learns to predict a category :math:`s` (batch, dataset) from the
    latent :math:`z` (detached), minimising its cross-entropy with the second optimizer. The
    model is trained on its loss plus ``kappa`` times the fooling term, the cross-entropy of
    :math:`c(\cdot \mid z_i)` against the uniform distribution over the *other* categories,
    :math:`-\frac1n\sum_i \frac1{S-1}\sum_{s \ne s_i} \log c(s \mid z_i)` (as scvi-tools
    does). With ``scale_adversarial_loss="auto"``, ``kappa = 1 - kl_weight``.

    The module gives the adversary's inputs: ``module.adversarial_inputs(batch,
    inference_outputs) -> (z, codes, n_categories)``; its ``forward`` returns the inference
    outputs first.

    Parameters
    ----------
    module
        The module.
    adversarial_classifier
        An ``nn.Module`` mapping ``z`` to logits over the categories, or True to build a
        two-layer classifier (:class:`~cellvi.nn.Classifier`, 32 hidden units), or False to
        train without it.
    scale_adversarial_loss
        ``kappa``, or ``"auto"``.
    adversarial_lr
        Learning rate of the adversary (default: the model's).
    **kwargs
        Options of :class:`TrainingPlan`.
    """

    #: Whether the classifier's own step minimises ``kappa`` times its cross-entropy (as
    #: scvi-tools does for totalVI) rather than the cross-entropy itself.
    scale_classifier_loss: bool = False

    def __init__(self, module: nn.Module, *, adversarial_classifier: bool | nn.Module = True,
                 scale_adversarial_loss: float | Literal["auto"] = "auto",
                 adversarial_lr: float | None = None, **kwargs):
        super().__init__(module, **kwargs)
        self.adversarial_classifier = adversarial_classifier
        self.scale_adversarial_loss = scale_adversarial_loss
        self.adversarial_lr = adversarial_lr
        self.adversary: nn.Module | None = None

    def _choose_step(self, *, device, sparse):
        return None, "the adversarial step has no fused form"

    def _build_adversary(self, n_latent: int, n_categories: int, device) -> nn.Module:
        from cellvi.nn import Classifier

        if isinstance(self.adversarial_classifier, nn.Module):
            return self.adversarial_classifier.to(device)
        return Classifier(n_latent, n_hidden=32, n_labels=n_categories, n_layers=2,
                          logits=True).to(device)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:  # noqa: D102
        optimizers = [self.make_optimizer(self.module.parameters())]
        if self.adversarial_classifier is not False:
            n_latent, n_categories = self.module.adversarial_shape()
            device = next(self.module.parameters()).device
            self.adversary = self._build_adversary(n_latent, n_categories, device)
            opt = self.make_optimizer(self.adversary.parameters())
            if self.adversarial_lr is not None:
                for g in opt.param_groups:
                    g["lr"] = self.adversarial_lr
            optimizers.append(opt)
        return optimizers

    @property
    def kappa(self) -> float:
        """The weight of the fooling term."""
        if self.scale_adversarial_loss == "auto":
            return 1.0 - self.kl_weight
        return float(self.scale_adversarial_loss)

    def training_step(self, batch) -> LossOutput:  # noqa: D102
        model_opt = self.optimizers[0]
        weight = self._last_kl_weight = self.kl_weight
        model_opt.zero_grad(set_to_none=True)
        inference, _, out = self.module(batch, kl_weight=weight, **self.loss_kwargs)
        self._check_finite(out)
        loss = out.loss
        if self.adversary is not None:
            z, codes, _ = self.module.adversarial_inputs(batch, inference)
            kappa = self.kappa
            if kappa > 0:
                fool = adversarial_loss(self.adversary(z), codes, predict_true_class=False)
                loss = loss + kappa * fool
                out.extra["adversarial_fooling"] = fool.detach()
        loss.backward()
        self._apply(model_opt, self.module)
        if self.adversary is not None:
            adv_opt = self.optimizers[1]
            adv_opt.zero_grad(set_to_none=True)
            ce = adversarial_loss(self.adversary(z.detach()), codes, predict_true_class=True)
            (kappa * ce if self.scale_classifier_loss else ce).backward()
            self._apply(adv_opt, self.adversary)
            out.extra["adversarial_loss"] = ce.detach()
        self.global_step += 1
        return out

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        state = super().state_dict()
        state["adversary"] = None if self.adversary is None else self.adversary.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: D102
        super().load_state_dict(state)
        if self.adversary is not None and state.get("adversary") is not None:
            self.adversary.load_state_dict(state["adversary"])


def adversarial_loss(logits: torch.Tensor, codes: torch.Tensor, *,
                     predict_true_class: bool) -> torch.Tensor:
    """Cross-entropy of ``logits`` against the true category, or against all the others.

    ``predict_true_class=False`` is the fooling term: the target puts ``1 / (S - 1)`` on every
    category but the cell's own (with one category there is nothing to hide: 0).
    """
    log_p = torch.log_softmax(logits, dim=-1)
    n = log_p.shape[-1]
    onehot = nn.functional.one_hot(codes.reshape(-1).long(), n).to(log_p.dtype)
    if predict_true_class:
        target = onehot
    else:
        if n < 2:
            return log_p.sum() * 0.0
        target = (1 - onehot) / (n - 1)
    return -(log_p * target).sum(-1).mean()
