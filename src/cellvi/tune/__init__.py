"""Hyperparameter search over a model's options with Optuna (the ``tune`` extra).

:func:`run_study` runs a seeded, resumable Optuna study (an SQLite file by default, any RDB URL
for many machines) whose trials are pruned from each epoch's validation ELBO and scored by the
validation ELBO, integration scores, or both (a multi-objective study); the best model is saved.
Search spaces are plain objects (:func:`choice`, :func:`uniform`, :func:`loguniform`,
:func:`integer`), with a default per model class (:func:`default_search_space`). Optuna is only
imported when a study runs: ``pip install 'cellvi[tune]'``.
"""

from ._space import (
    Choice,
    Float,
    Integer,
    choice,
    default_search_space,
    integer,
    loguniform,
    uniform,
)
from ._study import TuneResult, run_study

__all__ = [
    "Choice",
    "Float",
    "Integer",
    "TuneResult",
    "choice",
    "default_search_space",
    "integer",
    "loguniform",
    "run_study",
    "uniform",
]
