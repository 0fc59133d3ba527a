"""Checks of the numbers and names a user passes (seeds, counts, scales), each failing in one sentence.

Every experiment's settings and every generation go through these before any work, so an odd number is refused
instead of silently becoming another one (a seed of -1 aliasing 2**64 - 1, ``--steps 0`` becoming the default,
``--guidance nan`` switching guidance off)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any

from .errors import ConfigError

#: seeds are stored as int64 in every table, so the accepted range is the non-negative int64 range (torch.Generator
#: takes [-2**63, 2**64) but folds negative seeds onto large ones: -1 and 2**64 - 1 draw the same noise)
SEED_MAX = 2**63 - 1
#: the most denoising steps a setting may ask for (diffusers' schedulers train on 1000 timesteps)
MAX_STEPS = 1000


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_seed(seed: Any, what: str = "seed") -> int:
    """``seed`` as an int if it is an integer in [0, 2**63); otherwise a ConfigError in one sentence."""
    if not _is_int(seed):
        raise ConfigError(f"a {what} must be an integer in [0, 2**63), got {seed!r}")
    value = int(seed)
    if not 0 <= value <= SEED_MAX:
        raise ConfigError(f"a {what} must be an integer in [0, 2**63) (seeds are stored as int64), got {value}")
    return value


def check_seeds(seeds: Iterable[Any], what: str = "seed") -> list[int]:
    return [check_seed(s, what) for s in seeds]


def check_int(value: Any, name: str, minimum: int = 1, maximum: int | None = None, optional: bool = False) -> Any:
    """An integer setting in [minimum, maximum] (None passes when ``optional``)."""
    if value is None and optional:
        return None
    if not _is_int(value):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"in [{minimum}, {maximum}]" if maximum is not None else f"at least {minimum}"
        raise ConfigError(f"{name} must be {bound}, got {value}")
    return int(value)


def check_float(
    value: Any,
    name: str,
    minimum: float | None = None,
    maximum: float | None = None,
    optional: bool = False,
) -> Any:
    """A finite number setting in [minimum, maximum] (None passes when ``optional``)."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(float(value)):
        raise ConfigError(f"{name} must be a finite number, got {value}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        lo = "-inf" if minimum is None else f"{minimum:g}"
        hi = "inf" if maximum is None else f"{maximum:g}"
        raise ConfigError(f"{name} must be in [{lo}, {hi}], got {value}")
    return float(value)


def check_names(values: Sequence[str] | None, name: str, valid: Sequence[str]) -> None:
    """Every entry of ``values`` must be one of ``valid``."""
    bad = [v for v in values or () if v not in valid]
    if bad:
        raise ConfigError(f"unknown {name} {', '.join(map(repr, bad))}; valid: {', '.join(valid)}")
