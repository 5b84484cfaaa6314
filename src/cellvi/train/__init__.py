"""Training: plans (what a step does) and the loop that runs them (which knows no model)."""

from ._device import resolve_device
from ._loop import EpochTotals, fit
from ._plan import (
    AdversarialTrainingPlan,
    EarlyStopping,
    SemiSupervisedTrainingPlan,
    TrainingPlan,
    adversarial_loss,
    expected_calibration_error,
)

__all__ = [
    "AdversarialTrainingPlan",
    "EarlyStopping",
    "EpochTotals",
    "SemiSupervisedTrainingPlan",
    "TrainingPlan",
    "adversarial_loss",
    "expected_calibration_error",
    "fit",
    "resolve_device",
]
