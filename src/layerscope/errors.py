"""Errors raised by layerscope: each says in one sentence what was wrong and what is valid."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class LayerscopeError(Exception):
    """Base class of every error layerscope raises on purpose."""


class SpecError(LayerscopeError, ValueError):
    """A model spec could not be resolved (bad scheme, missing folder, unsupported pipeline)."""


class LayerNameError(LayerscopeError, KeyError):
    """A layer or space name (or glob) matched nothing in the model's layer map."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class ShapeError(LayerscopeError, ValueError):
    """An intervention source does not fit the activation it should replace or be added to."""


class BudgetError(LayerscopeError, MemoryError):
    """A capture would exceed the allowed byte budget."""


class StoreMismatchError(LayerscopeError, ValueError):
    """An existing activation store belongs to a different experiment."""


class ConfigError(LayerscopeError, ValueError):
    """An argument of a capture, intervention or sweep is invalid."""


class GenerationError(LayerscopeError, ValueError):
    """A generator returned something that is not a batch of images: the wrong shape, or NaN / infinite values."""


class DamagedError(LayerscopeError, ValueError):
    """Saved files (a Result, a report record, a store's chunks) are missing, truncated, changed or unreadable."""


def close_matches(name: str, valid: Iterable[str], n: int = 5) -> list[str]:
    """Return up to ``n`` valid names closest to ``name`` (for 'did you mean' messages)."""
    valid = list(valid)
    found = difflib.get_close_matches(name, valid, n=n, cutoff=0.5)
    if not found:
        # fall back on names sharing the longest dotted prefix
        parts = name.split(".")
        for k in range(len(parts), 0, -1):
            prefix = ".".join(parts[:k])
            found = [v for v in valid if v.startswith(prefix)][:n]
            if found:
                break
    return found or valid[:n]
