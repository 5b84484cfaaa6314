r"""Optuna studies over a model's options: seeded, pruned per epoch, resumable, best model saved.

A trial builds ``model_cls(adata, **options)``, trains it for up to ``max_epochs`` on a fixed
train / validation / test split of the cells (drawn once from the study's ``seed``), and scores
it. Every trial uses the same seed for the split, the initial weights and the minibatch order,
so trials differ by their options only.

*Pruning.* Each epoch's validation metric (``elbo_validation`` by default) is reported to the
trial from the training plan's end-of-epoch (the model's plan class, subclassed for the run on
the model instance: no core change); when Optuna's pruner says so, training stops there and
the trial is marked pruned. Pruning applies to a single objective read from the history.

*Resuming.* The study lives in its storage (an SQLite file in ``output_dir`` by default, or
any RDB URL shared by many machines). Calling :func:`run_study` again with the same
``study_name`` and storage continues it: it runs the trials still missing to reach
``n_trials`` (complete or pruned), a trial left running by a killed process is retried (with
its parameters) once its heartbeat is stale, and the sampler draws each trial's parameters
from a generator seeded by the study seed and the trial's number, so a resumed study proposes
what the uninterrupted one would have.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from ._space import Distribution, resolve_space

__all__ = ["TuneResult", "run_study"]

BEST_MODEL_DIR = "best_model"
_STORAGES: dict[str, Any] = {}
STUDY_FILE = "study.db"


def _optuna():
    try:
        import optuna
    except ImportError:
        raise ImportError("cellvi.tune needs Optuna: pip install 'cellvi[tune]'.") from None
    return optuna


# --------------------------------------------------------------------------- objectives
@dataclass(frozen=True)
class _Objective:
    name: str
    direction: Literal["maximize", "minimize"]
    kind: Literal["history", "integration", "callable"]
    fn: Callable | None = None


def _direction_of(name: str) -> Literal["maximize", "minimize"]:
    from cellvi.train._plan import metric_mode

    return "maximize" if metric_mode(name) == "max" else "minimize"


def _objectives(objectives, directions) -> list[_Objective]:
    from cellvi.metrics import BATCH_METRICS, LABEL_METRICS

    items = [objectives] if isinstance(objectives, str) or callable(objectives) else list(
        objectives)
    if not items:
        raise ValueError("objectives is empty: give at least one (e.g. 'elbo_validation').")
    if directions is not None:
        directions = [directions] if isinstance(directions, str) else list(directions)
        if len(directions) != len(items):
            raise ValueError(f"directions has {len(directions)} entries for {len(items)} "
                             "objectives; give one per objective.")
        bad = [d for d in directions if d not in ("maximize", "minimize")]
        if bad:
            raise ValueError(f"directions must be 'maximize' or 'minimize', got {bad}.")
    out = []
    for i, item in enumerate(items):
        given = None if directions is None else directions[i]
        if callable(item):
            if given is None:
                raise ValueError(f"The objective {getattr(item, '__name__', item)!r} is a "
                                 "function: say whether to maximize or minimize it with "
                                 "directions=[...].")
            out.append(_Objective(getattr(item, "__name__", f"objective_{i}"), given,
                                  "callable", item))
        elif item in BATCH_METRICS or item in LABEL_METRICS:
            out.append(_Objective(item, given or "maximize", "integration"))
        elif isinstance(item, str) and (item.endswith("_validation")
                                        or item.startswith("validation_")):
            out.append(_Objective(item, given or _direction_of(item), "history"))
        else:
            raise ValueError(
                f"Unknown objective {item!r}: a validation metric of the history "
                "('elbo_validation', 'reconstruction_loss_validation', 'validation_loss', "
                f"...), an integration score ({list(BATCH_METRICS + LABEL_METRICS)}), or a "
                "function of the trained model with its direction.")
    names = [o.name for o in out]
    if len(set(names)) != len(names):
        raise ValueError(f"objectives repeat a name: {names}.")
    return out


# --------------------------------------------------------------------------- result
@dataclass
class TuneResult:
    """What :func:`run_study` found.

    Attributes
    ----------
    study
        The Optuna study (its storage holds every trial).
    objectives
        The objectives' names, in order.
    directions
        ``"maximize"`` / ``"minimize"`` per objective.
    trials
        One row per trial: number, state, values, parameters, epochs trained, ``elbo_test``
        (the held-out test cells' ELBO), ``baseline`` (the defaults' trial).
    best_params
        The best trial's parameters (single objective), or None.
    best_value
        Its objective value, or None.
    baseline_value
        The defaults' trial's objective value (single objective), or None.
    best_model_path
        Where the best trial's model was saved (single objective), or None.
    pareto_trials
        The trial numbers on the Pareto front (several objectives).
    """

    study: Any
    objectives: list[str]
    directions: list[str]
    trials: pd.DataFrame
    best_params: dict[str, Any] | None = None
    best_value: float | None = None
    baseline_value: float | None = None
    best_model_path: Path | None = None
    pareto_trials: list[int] = field(default_factory=list)

    def load_best_model(self, model_cls, adata=None):
        """Load the saved best model (``model_cls.load(best_model_path, adata=adata)``)."""
        if self.best_model_path is None or not Path(self.best_model_path).exists():
            raise FileNotFoundError("No best model was saved (save='none', several "
                                    "objectives, or no complete trial).")
        return model_cls.load(self.best_model_path, adata=adata)

    def __repr__(self) -> str:
        states = self.trials["state"].value_counts().to_dict() if len(self.trials) else {}
        lines = [f"cellvi.tune study {self.study.study_name!r}: {len(self.trials)} trials "
                 f"{states}; objectives {dict(zip(self.objectives, self.directions))}"]
        if self.best_value is not None:
            lines.append(f"  best value {self.best_value:.4f} with {self.best_params}")
        if self.baseline_value is not None:
            lines.append(f"  defaults' value {self.baseline_value:.4f}")
        if self.pareto_trials:
            lines.append(f"  Pareto front: trials {self.pareto_trials}")
        if self.best_model_path is not None:
            lines.append(f"  best model saved in {self.best_model_path}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- helpers
def _fingerprint(adatas) -> str:
    h = hashlib.sha256()
    for a in adatas:
        h.update(f"{a.n_obs}x{a.n_vars}".encode())
        h.update("\0".join(map(str, a.obs_names[:1000])).encode())
        h.update("\0".join(map(str, a.var_names[:1000])).encode())
    return h.hexdigest()[:16]


def _split(n: int, train_size: float, validation_size: float, seed: int):
    if not (0 < train_size < 1 and 0 < validation_size < 1
            and train_size + validation_size <= 1 + 1e-12):
        raise ValueError(f"train_size and validation_size must be in (0, 1) with a sum <= 1, "
                         f"got {train_size} and {validation_size}.")
    order = np.random.default_rng(seed).permutation(n)
    n_train = int(np.ceil(train_size * n))
    n_val = min(int(np.floor(validation_size * n)), n - n_train)
    if n_val < 1 or n_train < 2:
        raise ValueError(f"{n} cells give {n_train} training and {n_val} validation cells; "
                         "the study needs at least 2 and 1: use more cells or larger sizes.")
    return (np.sort(order[:n_train]), np.sort(order[n_train:n_train + n_val]),
            np.sort(order[n_train + n_val:]))


@contextlib.contextmanager
def _seeded(seed: int):
    """Run with ``cellvi.settings.seed = seed`` for this call only."""
    from cellvi import _settings

    snap = dataclasses.replace(_settings.current())
    object.__setattr__(snap, "seed", int(seed))
    token = _settings._active.set(snap)
    try:
        yield
    finally:
        _settings._active.reset(token)


def _reporting_plan(base: type, trial, monitor: str | None, prune: bool) -> type:
    """Return a subclass of the model's plan that reports ``monitor`` to ``trial`` every epoch."""
    optuna = _optuna()

    class Reporting(base):
        def on_epoch_end(self, metrics):
            super().on_epoch_end(metrics)
            if monitor is None or monitor not in metrics:
                return
            epoch = self.epoch - 1
            value = float(metrics[monitor])
            trial.report(value, epoch)
            if prune and trial.should_prune():
                trial.set_user_attr("pruned_at_epoch", epoch)
                raise optuna.TrialPruned(f"pruned at epoch {epoch} ({monitor} = {value:.4g})")

    Reporting.__name__ = Reporting.__qualname__ = base.__name__
    Reporting.__module__ = base.__module__
    return Reporting


def _trial_seeded_sampler(make: Callable[[int], Any], seed: int):
    """Return a sampler that draws trial ``n``'s parameters from ``make(seed mixed with n)``."""
    optuna = _optuna()

    class TrialSeeded(optuna.samplers.BaseSampler):
        def __init__(self):
            self._number, self._sampler = None, None

        def _for(self, trial):
            if trial.number != self._number:
                mixed = int.from_bytes(hashlib.sha256(f"{seed}:{trial.number}".encode())
                                       .digest()[:4], "little")
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    self._number, self._sampler = trial.number, make(mixed)
            return self._sampler

        def infer_relative_search_space(self, study, trial):
            return self._for(trial).infer_relative_search_space(study, trial)

        def sample_relative(self, study, trial, search_space):
            return self._for(trial).sample_relative(study, trial, search_space)

        def sample_independent(self, study, trial, param_name, param_distribution):
            return self._for(trial).sample_independent(study, trial, param_name,
                                                       param_distribution)

        def before_trial(self, study, trial):
            self._for(trial).before_trial(study, trial)

        def after_trial(self, study, trial, state, values):
            self._for(trial).after_trial(study, trial, state, values)

        def reseed_rng(self):  # the seed is the trial number's
            pass

    return TrialSeeded()


def _sampler(kind: str, seed: int, n_trials: int):
    optuna = _optuna()
    if kind == "tpe":
        startup = max(4, min(10, n_trials // 4))

        def make(s):
            return optuna.samplers.TPESampler(seed=s, n_startup_trials=startup,
                                              multivariate=True, constant_liar=True)
    elif kind == "random":
        def make(s):
            return optuna.samplers.RandomSampler(seed=s)
    else:
        raise ValueError(f"sampler must be 'tpe' or 'random', got {kind!r}.")
    return _trial_seeded_sampler(make, seed)


def _pruner(kind: str, max_epochs: int, warmup: int):
    optuna = _optuna()
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=warmup)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, warmup),
                                              max_resource=max_epochs)
    if kind == "none":
        return optuna.pruners.NopPruner()
    raise ValueError(f"pruner must be 'median', 'hyperband' or 'none', got {kind!r}.")


def _storage(storage, output_dir: Path):
    optuna = _optuna()
    if storage is None:
        output_dir.mkdir(parents=True, exist_ok=True)
        storage = f"sqlite:///{(output_dir / STUDY_FILE).resolve()}"
    if isinstance(storage, str):
        from optuna.storages import RDBStorage, RetryFailedTrialCallback

        cached = _STORAGES.get(storage)
        sqlite_file = storage[len("sqlite:///"):] if storage.startswith("sqlite:///") else None
        if cached is not None and (sqlite_file is None or Path(sqlite_file).exists()):
            return cached  # setting up an RDB storage takes seconds: once per process
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # heartbeats are marked experimental
            made = RDBStorage(storage, heartbeat_interval=30, grace_period=90,
                              failed_trial_callback=RetryFailedTrialCallback(max_retry=2))
        _STORAGES[storage] = made
        return made
    if isinstance(storage, optuna.storages.BaseStorage):
        return storage
    raise TypeError(f"storage must be None, an RDB URL (sqlite:///file.db, "
                    f"postgresql://...) or an Optuna storage, got {type(storage).__name__}.")


def _default_values(model, model_d: Mapping[str, Distribution],
                    train_d: Mapping[str, Distribution]) -> tuple[dict, list[str]]:
    """Return the default value of each searched option (those inside the space)."""
    values, outside = {}, []
    config = getattr(model.module, "config", None)
    plan_defaults = {}
    for cls in reversed(model._plan_cls.__mro__):
        if "__init__" in cls.__dict__:
            for n, p in inspect.signature(cls.__init__).parameters.items():
                if p.kind is p.KEYWORD_ONLY and p.default is not p.empty:
                    plan_defaults[n] = p.default
    for fn in (type(model).train,):
        for n, p in inspect.signature(fn).parameters.items():
            if p.default is not p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD,
                                                       p.KEYWORD_ONLY):
                plan_defaults[n] = p.default
    plan_defaults.update(model._plan_defaults())
    for name, dist in model_d.items():
        if name in model.init_kwargs:
            v = model.init_kwargs[name]
        elif config is not None and hasattr(config, name):
            v = getattr(config, name)
        else:
            outside.append(name)
            continue
        (values.__setitem__(name, v) if v in dist else outside.append(name))
    for name, dist in train_d.items():
        v = plan_defaults.get(name)
        (values.__setitem__(name, v) if name in plan_defaults and v in dist
         else outside.append(name))
    return values, outside


def _history_value(model, name: str) -> float:
    h = model.history
    if name not in h:
        raise KeyError(f"The objective {name!r} is not in the model's history (columns: "
                       f"{sorted(h.columns)}).")
    kept = model.train_settings.get("kept_epoch")
    column = h[name].dropna()
    if kept is not None and kept in column.index:
        return float(column.loc[kept])
    return float(column.iloc[-1])


def _latent_of(model, cells: np.ndarray) -> np.ndarray:
    return np.asarray(model.get_latent_representation(indices=cells))


# --------------------------------------------------------------------------- the study
def run_study(
    model_cls,
    adata,
    *,
    n_trials: int = 20,
    search_space: Mapping[str, Any] | None = None,
    objectives: str | Callable | Sequence[str | Callable] = "elbo_validation",
    directions: Sequence[Literal["maximize", "minimize"]] | None = None,
    max_epochs: int = 100,
    train_size: float = 0.8,
    validation_size: float = 0.1,
    model_kwargs: Mapping[str, Any] | None = None,
    train_kwargs: Mapping[str, Any] | None = None,
    study_name: str | None = None,
    storage: str | Any | None = None,
    output_dir: str | os.PathLike = "cellvi-tune",
    seed: int = 0,
    sampler: Literal["tpe", "random"] = "tpe",
    pruner: Literal["median", "hyperband", "none"] = "median",
    pruning_warmup_epochs: int = 10,
    baseline: Literal["defaults", "none"] = "defaults",
    save: Literal["best", "none"] = "best",
    batch_key: str | None = None,
    labels_key: str | None = None,
    max_scored_cells: int = 5000,
    timeout: float | None = None,
    progress_bar: bool = False,
) -> TuneResult:
    r"""Search a model's options with Optuna; resumable, seeded, with per-epoch pruning.

    Each trial trains ``model_cls`` with options drawn from ``search_space`` on a fixed split
    of the cells: ``train_size`` train, ``validation_size`` validation (the objective and the
    pruning read these), the rest held out as test cells, on which each trial's ELBO is
    recorded (``elbo_test`` in :attr:`TuneResult.trials`) so that the chosen options can be
    judged on data the search never saw.

    Parameters
    ----------
    model_cls
        The model class (``cellvi.model.SCVI``, ``LinearSCVI``, ``SCANVI``, ``TOTALVI``,
        ``AUTOZI``, ...).
    adata
        The AnnData set up for ``model_cls`` (or a tuple of them for a model built from
        several, such as ``GIMVI``: passed positionally).
    n_trials
        Trials the study should hold in the end (complete or pruned): a resumed study runs
        only the missing ones.
    search_space
        Option names to distributions (:func:`cellvi.tune.choice`, :func:`uniform`,
        :func:`loguniform`, :func:`integer`; a list is a choice, a plain value fixed), flat or
        as ``{"model_params": ..., "train_params": ...}``; default
        :func:`cellvi.tune.default_search_space`.
    objectives
        One or several of: a validation metric of the history (``"elbo_validation"``,
        maximised; ``"reconstruction_loss_validation"``, ``"validation_loss"``, minimised;
        its value at the kept epoch with early stopping, else the last); an integration score
        of the validation cells' latent (``"ilisi"``, ``"entropy_batch_mixing"``,
        ``"silhouette_batch"``, ``"knn_purity"``, ``"clisi"``, ``"silhouette_label"``,
        ``"nmi"``, ``"ari"``, ``"graph_connectivity"``; maximised); or a function
        ``f(model) -> float`` with its direction. Several objectives make a multi-objective
        study (its Pareto front in :attr:`TuneResult.pareto_trials`).
    directions
        ``"maximize"`` / ``"minimize"`` per objective (default: from each name).
    max_epochs
        Epochs per trial (pruning may stop a trial earlier; early stopping too, if set in
        ``train_kwargs``).
    train_size, validation_size
        Shares of the cells for training and validation; the rest are test cells.
    model_kwargs, train_kwargs
        Options of every trial's model and ``train``, not searched.
    study_name
        Name of the study in its storage (default ``"<ModelClass>"``). The same name and
        storage continue the study.
    storage
        None: the SQLite file ``output_dir/study.db``; an RDB URL (``"sqlite:///x.db"``,
        ``"postgresql://user@host/db"``) shared by the machines that run the same study; or an
        Optuna storage object.
    output_dir
        Folder of the default study file and of the best model (``output_dir/best_model``).
    seed
        Seeds the split, every trial's weights and minibatches, and the sampler.
    sampler
        ``"tpe"`` (Optuna's tree-structured Parzen estimator, multivariate, after
        ``max(4, min(10, n_trials // 4))`` random trials) or ``"random"``.
    pruner
        ``"median"`` (stop a trial whose metric is below the median of earlier trials' at the
        same epoch, after 4 trials and ``pruning_warmup_epochs`` epochs), ``"hyperband"`` or
        ``"none"``. Only a single history objective is pruned.
    pruning_warmup_epochs
        Epochs before a trial can be pruned.
    baseline
        ``"defaults"``: the first trial uses the model's default value of every searched
        option (those the space contains), so the study compares against the defaults.
    save
        ``"best"``: save the best trial's model to ``output_dir/best_model`` whenever a trial
        becomes the study's best (single objective); ``"none"``.
    batch_key, labels_key
        ``obs`` columns for the integration objectives (default: the model's batch and
        labels).
    max_scored_cells
        Integration objectives use at most this many validation cells (a seeded subsample).
    timeout
        Stop starting new trials after this many seconds.
    progress_bar
        Show each trial's training progress bar.

    Returns
    -------
    TuneResult
        The study, its trials, the best options, the defaults' value, the saved model.

    Raises
    ------
    ImportError
        Optuna is not installed (``pip install 'cellvi[tune]'``).
    ValueError
        An option not of the model, an unknown objective, or a study of that name created
        on other data or with other settings.
    """
    optuna = _optuna()
    from cellvi._checks import check_int, check_seed

    n_trials = check_int("n_trials", n_trials, minimum=1)
    max_epochs = check_int("max_epochs", max_epochs, minimum=1)
    seed = check_seed("seed", seed)
    if seed is None:
        raise ValueError("seed must be an integer: a study is always seeded.")
    pruning_warmup_epochs = check_int("pruning_warmup_epochs", pruning_warmup_epochs, minimum=0)
    max_scored_cells = check_int("max_scored_cells", max_scored_cells, minimum=10)
    for name, value, allowed in (("baseline", baseline, ("defaults", "none")),
                                 ("save", save, ("best", "none"))):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}.")
    adatas = list(adata) if isinstance(adata, list | tuple) else [adata]
    model_d, train_d, model_fixed, train_fixed = resolve_space(model_cls, search_space)
    model_kwargs = {**model_fixed, **dict(model_kwargs or {})}
    train_kwargs = {**train_fixed, **dict(train_kwargs or {})}
    clash = sorted((set(model_d) | set(train_d)) & (set(model_kwargs) | set(train_kwargs)))
    if clash:
        raise ValueError(f"{clash} are both searched and fixed (model_kwargs / train_kwargs); "
                         "drop them from one.")
    objs = _objectives(objectives, directions)
    output_dir = Path(output_dir)
    study_name = study_name or model_cls.__name__
    split_ok = "datasplitter_kwargs" in inspect.signature(model_cls.train).parameters or any(
        p.kind is p.VAR_KEYWORD for p in inspect.signature(model_cls.train).parameters.values())
    multi_data = len(adatas) > 1
    split = None
    if not multi_data and split_ok:
        split = _split(adatas[0].n_obs, train_size, validation_size, seed)

    # a model with the defaults: checks the options now, gives the baseline's values
    with _seeded(seed):
        probe = model_cls(*adatas, **model_kwargs)
    defaults, outside = _default_values(probe, model_d, train_d)
    summary = getattr(probe, "summary", None)
    batch_key = batch_key or getattr(summary, "batch_key", None)
    labels_key = labels_key or getattr(summary, "labels_key", None)
    del probe
    for o in objs:
        if o.kind == "integration" and multi_data:
            raise ValueError(f"The integration objective {o.name!r} needs a model of one "
                             "AnnData; use a history objective or a function.")

    prune = (pruner != "none" and len(objs) == 1 and objs[0].kind == "history")
    monitor = objs[0].name if prune else None
    stored = _storage(storage, output_dir)
    settings_record = {
        "model_class": model_cls.__name__, "data": _fingerprint(adatas), "seed": seed,
        "train_size": train_size, "validation_size": validation_size,
        "max_epochs": max_epochs, "objectives": [o.name for o in objs],
        "directions": [o.direction for o in objs],
        "search_space": {k: repr(v) for k, v in {**model_d, **train_d}.items()},
        "model_kwargs": {k: repr(v) for k, v in model_kwargs.items()},
        "train_kwargs": {k: repr(v) for k, v in train_kwargs.items()},
    }
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=optuna.exceptions.ExperimentalWarning)
        study = optuna.create_study(
            study_name=study_name, storage=stored, load_if_exists=True,
            directions=[o.direction for o in objs],
            sampler=_sampler(sampler, seed, n_trials),
            pruner=_pruner(pruner, max_epochs, pruning_warmup_epochs))
    previous = study.user_attrs.get("cellvi")
    if previous is None:
        study.set_user_attr("cellvi", settings_record)
    elif previous != settings_record:
        diff = sorted(k for k in settings_record if previous.get(k) != settings_record[k])
        raise ValueError(
            f"The study {study_name!r} in this storage was created with other settings "
            f"({diff}: {[previous.get(k) for k in diff]} there, "
            f"{[settings_record[k] for k in diff]} now). Continue it with the same data and "
            "settings, or start another one with a new study_name.")

    counted = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    if baseline == "defaults" and not any(t.user_attrs.get("baseline")
                                          for t in study.get_trials(deepcopy=False)):
        study.enqueue_trial(defaults, user_attrs={"baseline": True,
                                                  "baseline_outside": outside})

    def objective(trial):
        started = time.perf_counter()
        model_params = {n: d.suggest(trial, n) for n, d in model_d.items()}
        train_params = {n: d.suggest(trial, n) for n, d in train_d.items()}
        with _seeded(seed):
            model = model_cls(*adatas, **model_kwargs, **model_params)
            model._plan_cls = _reporting_plan(type(model)._plan_cls, trial, monitor, prune)
            options = {**train_kwargs, **train_params}
            if split is not None:
                options["datasplitter_kwargs"] = {"external_indexing": list(split)}
            else:
                options.setdefault("train_size", train_size)
            try:
                model.train(max_epochs, seed=seed, progress_bar=progress_bar, **options)
            except FloatingPointError as err:  # diverged: a result of these options
                trial.set_user_attr("diverged", str(err).splitlines()[0])
                raise optuna.TrialPruned(f"diverged: {err}") from None
            finally:
                model.__dict__.pop("_plan_cls", None)
            if model.train_settings.get("interrupted"):  # Ctrl-C: stop the study (resumable)
                raise KeyboardInterrupt(f"trial {trial.number} interrupted; run the same "
                                        "study again to continue it")
            trial.set_user_attr("epochs", int(len(model.history)))
            trial.set_user_attr("kept_epoch", model.train_settings.get("kept_epoch"))
            if split is not None and len(split[2]) and hasattr(model, "get_elbo"):
                trial.set_user_attr("elbo_test", float(model.get_elbo(indices=split[2])))
            values = []
            for o in objs:
                if o.kind == "history":
                    values.append(_history_value(model, o.name))
                elif o.kind == "callable":
                    values.append(float(o.fn(model)))
                else:
                    values.append(_integration_value(model, o.name, split, batch_key,
                                                     labels_key, max_scored_cells, seed))
        bad = [o.name for o, v in zip(objs, values) if not math.isfinite(v)]
        if bad:
            trial.set_user_attr("diverged", f"{bad} not finite")
            raise optuna.TrialPruned(f"objective(s) {bad} are not finite")
        trial.set_user_attr("seconds", time.perf_counter() - started)
        if save == "best" and len(objs) == 1:
            _save_if_best(study, trial, values[0], objs[0].direction, model, output_dir)
        return values[0] if len(objs) == 1 else values

    done = len(study.get_trials(deepcopy=False, states=counted))
    remaining = n_trials - done
    if remaining > 0:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=optuna.exceptions.ExperimentalWarning)
            study.optimize(
                objective, n_trials=remaining, timeout=timeout,
                callbacks=[optuna.study.MaxTrialsCallback(n_trials, states=counted)])
    return _result(study, objs, output_dir, save)


def _integration_value(model, name, split, batch_key, labels_key, max_cells, seed) -> float:
    from cellvi.metrics import score_embedding

    cells = split[1] if split is not None else np.asarray(model.validation_indices)
    if len(cells) > max_cells:
        cells = np.sort(np.random.default_rng(seed).choice(cells, max_cells, replace=False))
    obs = model.adata.obs.iloc[cells]

    def column(key, what):
        if key is None:
            return None
        if key not in obs:
            raise KeyError(f"{what} {key!r} is not a column of adata.obs.")
        return obs[key].to_numpy()

    scores = score_embedding(_latent_of(model, cells), batch=column(batch_key, "batch_key"),
                             labels=column(labels_key, "labels_key"), metrics=[name],
                             seed=seed)
    return scores[name]


def _save_if_best(study, trial, value: float, direction: str, model, output_dir: Path) -> None:
    optuna = _optuna()
    complete = [t for t in study.get_trials(deepcopy=False,
                                            states=(optuna.trial.TrialState.COMPLETE,))
                if t.number != trial.number and t.values]
    better = (lambda a, b: a > b) if direction == "maximize" else (lambda a, b: a < b)
    if all(better(value, t.values[0]) for t in complete):
        path = output_dir / BEST_MODEL_DIR
        model.save(path, overwrite=True)
        trial.set_user_attr("model_path", str(path))
        study.set_user_attr("best_model_trial", trial.number)


def _result(study, objs, output_dir: Path, save: str) -> TuneResult:
    optuna = _optuna()
    rows = []
    for t in study.get_trials(deepcopy=False):
        row = {"number": t.number, "state": t.state.name}
        for i, o in enumerate(objs):
            row[o.name] = t.values[i] if t.values else np.nan
        row.update({f"params_{k}": v for k, v in t.params.items()})
        for k in ("epochs", "kept_epoch", "elbo_test", "pruned_at_epoch", "diverged",
                  "seconds"):
            row[k] = t.user_attrs.get(k)
        row["baseline"] = bool(t.user_attrs.get("baseline", False))
        rows.append(row)
    trials = pd.DataFrame(rows)
    result = TuneResult(study=study, objectives=[o.name for o in objs],
                        directions=[o.direction for o in objs], trials=trials)
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(objs) == 1 and complete:
        best = study.best_trial
        result.best_params, result.best_value = dict(best.params), float(best.value)
        path = output_dir / BEST_MODEL_DIR
        if save == "best" and study.user_attrs.get("best_model_trial") == best.number \
                and path.exists():
            result.best_model_path = path
        base = [t for t in complete if t.user_attrs.get("baseline")]
        if base:
            result.baseline_value = float(base[0].value)
    elif complete:
        result.pareto_trials = sorted(t.number for t in study.best_trials)
    return result
