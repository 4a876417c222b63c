"""Argument checks shared by the dp modules: one error type, one copy of each check.

docs/design.md, "Differential privacy": the dp modules are pure functions of numbers. Their
preconditions are stated in their docstrings and checked here; a violated one raises
:class:`ParameterError`, a :class:`ValueError` that names the argument (``name``), as
dp-accounting and MPyC do. The dp modules know nothing of YAML: only the boundary that
has a YAML path (:func:`mpc_agg.dp.planning.plan_noise`, the config loader) turns a
``ParameterError`` into a :class:`~mpc_agg.errors.ConfigError`.

``bool`` is an ``int`` in Python; every check refuses it where a number is wanted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeGuard

import numpy as np
import numpy.typing as npt


class ParameterError(ValueError):
    """An argument of a dp function is outside its domain.

    ``name`` is the argument (``"epsilon"``, ``"delta2"``, ``"d"``), ``detail`` what is
    wrong with it; the message reads ``"{name} {detail}"``, e.g. ``"delta must be in (0, 1),
    got 1.5"``.
    """

    def __init__(self, name: str, detail: str) -> None:
        self.name = name
        self.detail = detail
        super().__init__(f"{name} {detail}")


def is_integer(value: object) -> TypeGuard[int | np.integer[Any]]:
    """True for a Python or numpy integer that is not a ``bool``."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_real(value: object) -> TypeGuard[int | float | np.integer[Any] | np.floating[Any]]:
    """True for a Python or numpy integer or float that is not a ``bool``."""
    return is_integer(value) or isinstance(value, (float, np.floating))


def positive(name: str, value: object) -> float:
    """``value`` as a float; :class:`ParameterError` unless it is a finite number > 0."""
    if is_real(value):
        v = float(value)
        if math.isfinite(v) and v > 0:
            return v
    raise ParameterError(name, f"must be a positive finite number, got {value!r}")


def probability(name: str, value: object) -> float:
    """``value`` as a float; :class:`ParameterError` unless it lies in the open (0, 1)."""
    if not is_real(value):
        raise ParameterError(name, f"must be a number in (0, 1), got {value!r}")
    v = float(value)
    if not 0.0 < v < 1.0:
        raise ParameterError(name, f"must be in (0, 1), got {value!r}")
    return v


def integer(name: str, value: object, minimum: int) -> int:
    """``value`` as an int; :class:`ParameterError` unless it is an integer ``>= minimum``
    (a float such as ``2.0`` is refused)."""
    if not is_integer(value) or value < minimum:
        raise ParameterError(name, f"must be an integer >= {minimum}, got {value!r}")
    return int(value)


def even_integer(name: str, value: object, minimum: int) -> int:
    """``value`` as an int; :class:`ParameterError` unless it is an even integer
    ``>= minimum``."""
    if not is_integer(value) or value < minimum or value % 2:
        raise ParameterError(name, f"must be an even integer >= {minimum}, got {value!r}")
    return int(value)


def orders(name: str, values: Sequence[float]) -> npt.NDArray[np.float64]:
    """``values`` as a float64 array; :class:`ParameterError` unless it is a non-empty 1-D
    sequence of finite Rényi orders ``> 1``."""
    try:
        a = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        a = np.empty(0)
    if a.ndim != 1 or a.size == 0 or not np.all(np.isfinite(a)) or np.any(a <= 1.0):
        raise ParameterError(name, f"must be a non-empty sequence of orders > 1, got {values!r}")
    return a
