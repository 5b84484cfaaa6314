r"""Search spaces: what a study varies, as plain objects (no Optuna needed to write one).

A search space maps option names to a distribution: :func:`choice`, :func:`uniform`,
:func:`loguniform`, :func:`integer` (a plain list is a choice, a plain value is fixed). Names are
options of the model class (``n_latent``, ``dropout_rate``... including its module's config
options) or of its ``train`` and training plan (``lr``, ``batch_size``, ``weight_decay``...);
either flat, or as scvi-tools' ``{"model_params": {...}, "train_params": {...}}``.
:func:`default_search_space` gives each model class's default.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Choice",
    "Float",
    "Integer",
    "choice",
    "default_search_space",
    "integer",
    "loguniform",
    "uniform",
]


@dataclass(frozen=True)
class Choice:
    """One of ``values`` (categorical: no order is assumed)."""

    values: tuple

    def __post_init__(self):
        if not self.values:
            raise ValueError("choice() needs at least one value.")
        for v in self.values:
            if not (v is None or isinstance(v, bool | int | float | str)):
                raise ValueError(f"choice() values must be None, bool, int, float or str (they "
                                 f"are stored in the study), got {v!r}.")

    def suggest(self, trial, name: str):
        """Draw the value for ``trial`` (an Optuna trial)."""
        return trial.suggest_categorical(name, list(self.values))

    def __contains__(self, value) -> bool:
        return value in self.values


@dataclass(frozen=True)
class Float:
    """A number in ``[low, high]``, on a log scale with ``log``, on a grid of ``step``."""

    low: float
    high: float
    log: bool = False
    step: float | None = None

    def __post_init__(self):
        if not (math.isfinite(self.low) and math.isfinite(self.high) and self.low <= self.high):
            raise ValueError(f"A float range needs finite low <= high, got [{self.low}, "
                             f"{self.high}].")
        if self.log and self.low <= 0:
            raise ValueError(f"loguniform() needs low > 0, got {self.low}.")
        if self.log and self.step is not None:
            raise ValueError("A log-scale range cannot have a step.")

    def suggest(self, trial, name: str):
        """Draw the value for ``trial``."""
        return trial.suggest_float(name, self.low, self.high, log=self.log, step=self.step)

    def __contains__(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if not self.low <= value <= self.high:
            return False
        if self.step is None:
            return True
        k = (value - self.low) / self.step
        return abs(k - round(k)) < 1e-9


@dataclass(frozen=True)
class Integer:
    """An integer in ``[low, high]`` (both included), on a log scale with ``log``."""

    low: int
    high: int
    log: bool = False
    step: int = 1

    def __post_init__(self):
        if self.low > self.high:
            raise ValueError(f"integer() needs low <= high, got [{self.low}, {self.high}].")
        if self.log and self.low < 1:
            raise ValueError(f"A log-scale integer range needs low >= 1, got {self.low}.")

    def suggest(self, trial, name: str):
        """Draw the value for ``trial``."""
        return trial.suggest_int(name, self.low, self.high, log=self.log, step=self.step)

    def __contains__(self, value) -> bool:
        return (isinstance(value, int) and not isinstance(value, bool)
                and self.low <= value <= self.high and (value - self.low) % self.step == 0)


def choice(values: Sequence) -> Choice:
    """Return a categorical distribution over ``values`` (ray.tune's ``choice``)."""
    return Choice(tuple(values))


def uniform(low: float, high: float, *, step: float | None = None) -> Float:
    """Return a uniform distribution on ``[low, high]`` (on a grid of ``step`` if given)."""
    return Float(float(low), float(high), step=None if step is None else float(step))


def loguniform(low: float, high: float) -> Float:
    """Return a log-uniform distribution on ``[low, high]`` (``low > 0``): for rates."""
    return Float(float(low), float(high), log=True)


def integer(low: int, high: int, *, log: bool = False, step: int = 1) -> Integer:
    """Return a uniform distribution over the integers ``low .. high``, both included."""
    return Integer(int(low), int(high), log=log, step=int(step))


Distribution = Choice | Float | Integer

#: The defaults, by model class name: model options, then ``train`` / plan options.
_VAE_FAMILY = {
    "n_hidden": choice([64, 128, 256]),
    "n_latent": choice([5, 10, 20, 30]),
    "n_layers": integer(1, 3),
    "dropout_rate": uniform(0.0, 0.3, step=0.05),
    "dispersion": choice(["gene", "gene-batch"]),
    "gene_likelihood": choice(["zinb", "nb"]),
    "lr": loguniform(1e-4, 1e-2),
}
DEFAULT_SPACES: dict[str, dict[str, Distribution]] = {
    "SCVI": dict(_VAE_FAMILY),
    "LinearSCVI": dict(_VAE_FAMILY),
    "SCANVI": dict(_VAE_FAMILY),
    "VAECModel": dict(_VAE_FAMILY),
    "AUTOZI": {k: v for k, v in _VAE_FAMILY.items() if k != "gene_likelihood"},
    "TOTALVI": {
        "n_hidden": choice([128, 256]),
        "n_latent": choice([10, 20, 30]),
        "n_layers_encoder": integer(1, 3),
        "dropout_rate_encoder": uniform(0.0, 0.3, step=0.05),
        "gene_likelihood": choice(["nb", "zinb"]),
        "lr": loguniform(5e-4, 1e-2),
    },
    "GIMVI": {
        "n_latent": choice([5, 10, 20]),
        "dim_hidden_encoder": choice([32, 64, 128]),
        "n_layers_encoder_individual": integer(1, 2),
        "dropout_rate_encoder": uniform(0.0, 0.3, step=0.05),
        "lr": loguniform(1e-4, 1e-2),
    },
}


def _mro_names(model_cls) -> list[str]:
    return [c.__name__ for c in getattr(model_cls, "__mro__", [model_cls])]


def default_search_space(model_cls) -> dict[str, Distribution]:
    """Return the default search space of a model class.

    For ``SCVI``, ``LinearSCVI``, ``SCANVI`` and ``VAECModel``: ``n_hidden`` in {64, 128,
    256}, ``n_latent`` in {5, 10, 20, 30}, ``n_layers`` in 1..3, ``dropout_rate`` in 0..0.3
    (steps of 0.05), ``dispersion`` in {gene, gene-batch}, ``gene_likelihood`` in {zinb, nb},
    ``lr`` log-uniform in [1e-4, 1e-2]: each default is inside, so the defaults are one point
    of the space. ``AUTOZI``: the same without ``gene_likelihood``. ``TOTALVI`` and ``GIMVI``:
    their own encoder options, latent size and ``lr``. A subclass gets its parent's space; any
    other class the VAE family's options it takes.
    """
    for name in _mro_names(model_cls):
        if name in DEFAULT_SPACES:
            return dict(DEFAULT_SPACES[name])
    allowed = model_options(model_cls) | train_options(model_cls)
    space = {k: v for k, v in _VAE_FAMILY.items() if k in allowed}
    if not space:
        raise ValueError(f"No default search space for {model_cls.__name__}: pass "
                         "search_space={...} with its options.")
    return space


# --------------------------------------------------------------------------- option names
def model_options(model_cls) -> set[str]:
    """Names of the options of ``model_cls(...)``: its signature and its module's config."""
    from cellvi.model._base import DATA_OPTIONS

    names = set()
    for p in list(inspect.signature(model_cls).parameters.values())[1:]:
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and not p.name.startswith("adata"):
            names.add(p.name)
    module_cls = getattr(model_cls, "_module_cls", None)
    config = getattr(module_cls, "Config", None)
    if config is not None and dataclasses.is_dataclass(config):
        names |= {f.name for f in dataclasses.fields(config)} - set(DATA_OPTIONS)
    return names


def train_options(model_cls) -> set[str]:
    """Names of the options of ``model.train(...)``: its own and its training plan's."""
    from cellvi.model._base import BaseModel

    names = set()
    for fn in (model_cls.train, BaseModel.train):
        for p in list(inspect.signature(fn).parameters.values())[1:]:
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                names.add(p.name)
    for cls in getattr(model_cls, "_plan_cls", object).__mro__:
        if "__init__" in cls.__dict__:
            names |= {n for n, p in inspect.signature(cls.__init__).parameters.items()
                      if p.kind is p.KEYWORD_ONLY}
    return names


#: ``train`` options a study sets itself.
RESERVED = frozenset({"max_epochs", "seed", "progress_bar", "datasplitter_kwargs", "train_size",
                      "validation_size", "checkpoint_path", "resume", "plan_kwargs",
                      "enable_progress_bar", "shuffle_set_split"})


def as_distribution(name: str, value) -> Distribution | None:
    """Return the distribution of ``value``; None for a fixed value."""
    if isinstance(value, Choice | Float | Integer):
        return value
    if isinstance(value, list | tuple):
        return choice(value)
    if hasattr(value, "suggest") and callable(value.suggest):
        raise ValueError(f"search_space[{name!r}] is not a cellvi.tune distribution; use "
                         "cellvi.tune.choice / uniform / loguniform / integer.")
    return None


def resolve_space(model_cls, search_space: Mapping[str, Any] | None
                  ) -> tuple[dict[str, Distribution], dict[str, Distribution],
                             dict[str, Any], dict[str, Any]]:
    """Split a search space into model and train distributions and fixed options.

    Returns ``(model distributions, train distributions, fixed model options, fixed train
    options)``, every name checked against the model class.
    """
    if search_space is None:
        search_space = default_search_space(model_cls)
    if not isinstance(search_space, Mapping):
        raise TypeError(f"search_space must be a dict of option names, got "
                        f"{type(search_space).__name__}.")
    flat: dict[str, tuple[str | None, Any]] = {}
    for key, value in search_space.items():
        if key in ("model_params", "model_args", "train_params", "train_args"):
            where = "model" if key.startswith("model") else "train"
            if not isinstance(value, Mapping):
                raise TypeError(f"search_space[{key!r}] must be a dict of options.")
            for k, v in value.items():
                flat[k] = (where, v)
        else:
            flat[key] = (None, value)
    m_opts, t_opts = model_options(model_cls), train_options(model_cls)
    model_d, train_d, model_fixed, train_fixed = {}, {}, {}, {}
    for name, (where, value) in flat.items():
        if name in RESERVED:
            raise ValueError(f"search_space[{name!r}]: the study sets {name} itself; pass it "
                             "to run_study instead (max_epochs=, seed=, train_size=...).")
        if where is None:
            where = "model" if name in m_opts else "train" if name in t_opts else None
        valid = m_opts if where == "model" else t_opts
        if where is None or name not in valid:
            raise ValueError(
                f"search_space[{name!r}] is not an option of {model_cls.__name__} nor of its "
                f"train(): model options {sorted(m_opts)}; train options {sorted(t_opts)}.")
        dist = as_distribution(name, value)
        target = ((model_d if where == "model" else train_d) if dist is not None
                  else (model_fixed if where == "model" else train_fixed))
        target[name] = dist if dist is not None else value
    if not model_d and not train_d:
        raise ValueError("search_space has no distribution: nothing to search.")
    return model_d, train_d, model_fixed, train_fixed
