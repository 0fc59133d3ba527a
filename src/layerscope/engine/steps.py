"""Step selections: which denoising steps (0-based calls of the denoiser) a capture or intervention covers."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import ConfigError

StepSel = None | int | slice | range | Sequence[int] | str

WINDOWS = ("all", "early", "middle", "late")


def window(name: str, num_steps: int) -> tuple[int, ...]:
    """Named step windows: all steps, or the early / middle / late third of ``num_steps``."""
    if name not in WINDOWS:
        raise ConfigError(f"unknown step window {name!r}; valid windows: {', '.join(WINDOWS)}")
    if name == "all":
        return tuple(range(num_steps))
    parts = np.array_split(np.arange(num_steps), 3)
    return tuple(int(i) for i in parts[WINDOWS.index(name) - 1])


def resolve_steps(sel: StepSel, num_steps: int) -> tuple[int, ...]:
    """Turn a step selection into sorted step indices in ``[0, num_steps)``; errors name the valid range."""
    if sel is None:
        return tuple(range(num_steps))
    if isinstance(sel, str):
        if ":" in sel:  # "a:b" slice syntax from the CLI
            a, _, b = sel.partition(":")
            sel = slice(int(a) if a else None, int(b) if b else None)
        else:
            return window(sel, num_steps)
    if isinstance(sel, slice):
        out = tuple(range(num_steps)[sel])
    elif isinstance(sel, int):
        out = (sel,)
    else:
        out = tuple(sorted({int(s) for s in sel}))
    bad = [s for s in out if not 0 <= s < num_steps]
    if bad:
        raise ConfigError(f"steps {bad} are outside this run's {num_steps} steps (valid: 0..{num_steps - 1})")
    if not out:
        raise ConfigError(f"the step selection {sel!r} selects no step of {num_steps}")
    return out
