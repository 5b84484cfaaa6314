"""Training: the loop, KL warm-up, early stopping and device handling."""

from ._trainer import TrainConfig, evaluate, kl_weight, resolve_device, train_module

__all__ = ["TrainConfig", "evaluate", "kl_weight", "resolve_device", "train_module"]
