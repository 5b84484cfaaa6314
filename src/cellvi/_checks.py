"""Checks of user-given parameters: each ValueError names the parameter and the fix."""

from __future__ import annotations

import numbers

import numpy as np

__all__ = ["check_fraction", "check_int", "check_positive", "check_seed"]


def check_int(name: str, value, *, minimum: int, allow_none: bool = False) -> int | None:
    """Return ``value`` as an int, raising unless it is an integer >= ``minimum``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, float) and value.is_integer():
            raise ValueError(f"{name} must be an integer, got {value!r} (write {int(value)}).")
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")
    return int(value)


def check_positive(name: str, value, *, allow_zero: bool = False) -> float:
    """Return ``value`` as a float, raising unless it is finite and > 0 (>= 0 if allowed)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}.")
    v = float(value)
    if not np.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value!r}.")
    return v


def check_fraction(name: str, value, *, include_one: bool = True) -> float:
    """Return ``value`` as a float, raising unless it is in (0, 1] (or (0, 1))."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}.")
    v = float(value)
    if not (0 < v < 1 or (include_one and v == 1)):
        raise ValueError(f"{name} must be in (0, {'1]' if include_one else '1)'}, got {value!r}.")
    return v


def check_seed(name: str, value) -> int | None:
    """Return ``value`` (None or an integer in [0, 2**63)), raising otherwise."""
    if value is None:
        return None
    seed = check_int(name, value, minimum=0)
    if seed >= 2**63:
        raise ValueError(f"{name} must be below 2**63, got {value}.")
    return seed
