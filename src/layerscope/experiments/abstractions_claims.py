"""The abstractions study's claim (Corallo et al. 2024) and its specification curve, from a saved Result.

Corallo et al. (2024) find that the factors of large spatial extent (wall and floor hue; with shape and object hue in
their list) emerge earlier in diffusion time than scale and orientation. The experiment reads this twice: when linear
probes on the layers' features can read each factor (:func:`~layerscope.experiments.abstractions.relative_onsets`,
half-way from chance to the top) and when the generation commits to it (forking entropy at or below
:data:`~layerscope.experiments.abstractions.COMMIT_BITS`). This module re-derives the order from the saved probe and
fork tables at every combination of the choices below, fixed in code before any result was looked at.

Choices (the shipped one first):

- ``method`` / ``readout`` / ``criterion`` / ``level`` (:data:`CRITERIA`): the probes' held-out ``accuracy``
  reaching a ``relative`` share of the way from chance to its top (0.25, 0.5, 0.75) or an ``absolute`` accuracy
  (0.8, 0.9, 0.95), the probes' MI bound reaching a ``relative`` share of its top, the forks' mean entropy staying
  at or below ``bits`` (0.25, 0.5, 1.0) or a ``fraction`` of its first value (0.25, 0.5, 0.75);
- ``early`` (:data:`EARLY_SETS`): which factors must come first: the ``background`` (wall and floor hue, the largest
  extent) or the paper's list (``corallo``: shape, wall, floor and object hue); the late ones are scale and
  orientation (:data:`LATE`).

Probe kinds: the main job fits one kind (pooled features); a result with several would add them as a choice.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from . import abstractions as ab

#: (method, readout, criterion, level) of every way to time a factor, fixed before any result was looked at; the
#: shipped one first (forking, as the section's forking sentence decides the order)
CRITERIA: tuple[tuple[str, str, str, float], ...] = (
    ("forks", "entropy", "bits", ab.COMMIT_BITS),
    ("forks", "entropy", "bits", 0.25),
    ("forks", "entropy", "bits", 1.0),
    ("forks", "entropy", "fraction", ab.COMMIT_FRACTION),
    ("forks", "entropy", "fraction", 0.25),
    ("forks", "entropy", "fraction", 0.75),
    ("probe", "accuracy", "relative", 0.5),
    ("probe", "accuracy", "relative", 0.25),
    ("probe", "accuracy", "relative", 0.75),
    ("probe", "accuracy", "absolute", 0.9),
    ("probe", "accuracy", "absolute", 0.8),
    ("probe", "accuracy", "absolute", 0.95),
    ("probe", "mi_bound", "relative", 0.5),
    ("probe", "mi_bound", "relative", 0.25),
    ("probe", "mi_bound", "relative", 0.75),
)
EARLY_SETS: dict[str, tuple[str, ...]] = {
    "corallo": ("shape", "wall_hue", "floor_hue", "object_hue"),
    "background": ("wall_hue", "floor_hue"),
}
LATE = ("scale", "orientation")
SHIPPED: dict[str, dict[str, str]] = {
    "abstractions.extent_order": {
        "method": "forks", "readout": "entropy", "criterion": "bits", "level": "0.5", "early": "corallo",
    },
}  # fmt: skip

CLAIMS: dict[str, dict[str, Any]] = {
    "abstractions.extent_order": {
        "text": "Factors of large spatial extent (wall and floor hue; shape and object hue in the paper's list) "
        "emerge and commit earlier in diffusion time than scale and orientation.",
        "paper": "Corallo et al. 2024, Sec. 5",
        "measured": "probe onsets and forking-entropy commitment per factor; statistic: steps by which the first of "
        "scale/orientation follows the last early factor",
        "shipped": SHIPPED["abstractions.extent_order"],
    },
}
