"""Checks of user-given settings, one of each, shared by every room.

Each returns the value in its canonical type or raises :class:`~qrobust.errors.ConfigError` with a message
that names the setting, what it got and what it takes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from qrobust.errors import ConfigError

__all__ = ["check_choice", "check_eps", "check_int", "check_positive"]


def check_eps(eps: Any, norm: str | None, *, allow_none: bool = False, positive: bool = False) -> float | None:
    """ε must be a finite number ≥ 0 (> 0 with ``positive``); at most 1 in L∞ (pixels live in [0, 1]).

    >>> check_eps(8 / 255, "Linf") == 8 / 255
    True
    """
    if eps is None and allow_none:
        return None
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps):
        raise ConfigError(f"eps must be a finite number, got {eps!r}; pass e.g. eps=8/255")
    if eps < 0 or (positive and eps == 0):
        raise ConfigError(
            f"eps must be {'>' if positive else '≥'} 0, got {eps}; ε is a perturbation size on the [0, 1] pixel scale"
        )
    if norm == "Linf" and eps > 1:
        raise ConfigError(
            f"eps={eps} exceeds 1, the whole [0, 1] pixel range; ε is given as a fraction in Python "
            f"(eps=8/255), not on the 0–255 scale (the CLI's --eps 8 is)"
        )
    return float(eps)


def check_int(name: str, value: Any, *, minimum: int = 1) -> int:
    """An integer (not a bool) ≥ ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer ≥ {minimum}, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be ≥ {minimum}, got {value}")
    return int(value)


def check_positive(name: str, value: Any, *, allow_zero: bool = False, maximum: float | None = None) -> float:
    """A finite number > 0 (≥ 0 with ``allow_zero``), optionally ≤ ``maximum``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name} must be {'≥' if allow_zero else '>'} 0, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name} must be ≤ {maximum}, got {value}")
    return float(value)


def check_choice(name: str, value: Any, choices: Iterable[str], *, casefold: bool = False) -> str:
    """``value`` if it is one of ``choices`` (compared case-insensitively, stripped, with ``casefold``).

    >>> check_choice("norm", "Linf", ("Linf", "L2"))
    'Linf'
    """
    choices = tuple(choices)
    v = value.strip().lower() if casefold and isinstance(value, str) else value
    if v not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")
    return v
