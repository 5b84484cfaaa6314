"""Module options as one frozen dataclass per module: the single place they are declared.

A module class names its options class in ``Config``; building the module builds the config
first (``VAE(20, n_batch=2)`` is ``VAE(VAEConfig(n_input=20, n_batch=2))``), validates it and
keeps it as ``module.config``. Subclasses extend the options by subclassing the config
(``SCANVAEConfig(VAEConfig)`` adds the classifier's options), so no option is listed twice, and
the signature of the module class (what ``help()`` and editors show) is derived from its config.
Decisions that depend on the options (whether a fused training step applies, what a model
saves) read the frozen config, never loose attributes.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Iterable
from typing import Any, ClassVar

import numpy as np
from torch import nn

__all__ = [
    "ConfiguredModule", "ModuleConfig", "check_choice", "config_signature", "plain_values",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModuleConfig:
    """Base of the module option classes (frozen, keyword-only dataclasses)."""

    def replace(self, **changes: Any) -> ModuleConfig:
        """Return a copy with some options changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def names(cls) -> list[str]:
        """Return the option names, in declaration order."""
        return [f.name for f in dataclasses.fields(cls)]

    def as_dict(self) -> dict[str, Any]:
        """Return the options as a dict (values as given, not copied)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def plain_values(config: ModuleConfig, **kinds) -> None:
    """Store the named sequence options of a frozen ``config`` as tuples of Python values.

    ``kinds`` maps an option to a conversion (``int``, ``float``) or None (keep the values, for
    integers that must stay exact). Arrays and lists become hashable tuples that compare with
    ``==`` and save as JSON lists.
    """
    for name, kind in kinds.items():
        value = getattr(config, name)
        if value is None:
            continue
        flat = np.asarray(value).ravel().tolist()
        object.__setattr__(config, name, tuple(kind(v) for v in flat) if kind else tuple(flat))


def check_choice(name: str, value: object, choices: Iterable) -> None:
    """Raise a ``ValueError`` naming the valid values unless ``value`` is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}.")


def check_library_prior(config) -> None:
    """Raise unless a config with a modelled library size has its per-batch prior."""
    if not config.observed_library and (config.library_log_means is None
                                        or config.library_log_vars is None):
        raise ValueError(
            "use_observed_lib_size=False needs library_log_means and library_log_vars "
            "(the per-batch prior of the log library size)."
        )


def config_signature(config_cls: type[ModuleConfig], *, skip: Iterable[str] = (),
                     first: Iterable[inspect.Parameter] = ()) -> inspect.Signature:
    """Return a signature: ``first``, then the options of ``config_cls`` but ``skip``."""
    skip = set(skip)
    params = list(first)
    for f in dataclasses.fields(config_cls):
        if f.name in skip:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = inspect.Parameter.empty
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=f.type))
    return inspect.Signature(params)


class ConfiguredModule(nn.Module):
    """An ``nn.Module`` built from a :class:`ModuleConfig`: ``M(config)`` or ``M(**options)``.

    The first positional argument may also be the first option (``VAE(20, n_batch=2)``), as in
    the seeds' signatures. ``module.config`` holds the validated options.
    """

    Config: ClassVar[type[ModuleConfig]] = ModuleConfig

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.__signature__ = config_signature(cls.Config)

    def __init__(self, *args: Any, **options: Any):
        super().__init__()
        self.config = self.make_config(*args, **options)

    @classmethod
    def make_config(cls, *args: Any, **options: Any) -> ModuleConfig:
        """Build (and validate) the options of ``cls`` from a config or from keywords."""
        if args and isinstance(args[0], ModuleConfig):
            if len(args) > 1:
                raise TypeError(f"{cls.__name__} takes a config or options, not both.")
            config = args[0]
            if not isinstance(config, cls.Config):
                raise TypeError(
                    f"{cls.__name__} needs a {cls.Config.__name__}, got {type(config).__name__}."
                )
            return config.replace(**options) if options else config
        names = cls.Config.names()
        if len(args) > 1:
            raise TypeError(
                f"{cls.__name__} takes at most one positional argument ({names[0]}); pass the "
                "other options by name."
            )
        if args:
            if names[0] in options:
                raise TypeError(f"{cls.__name__} got {names[0]} twice.")
            options[names[0]] = args[0]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise TypeError(
                f"{cls.__name__} has no option {', '.join(map(repr, unknown))}; its options "
                f"are {names}."
            )
        return cls.Config(**options)
