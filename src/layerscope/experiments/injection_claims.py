"""The injection study's claims (Schaerf 2025, Fig. 5) and their specification curve, from a saved Result.

Schaerf (2025) reports that in every diffusion model one or more layers compose the image's *structure*, one or more
its *content* and one or more its *surface* details and colours, and that where they sit differs by architecture:
Stable Diffusion 1.4 has its content layers after its surface layers, most other models have content first. The
injection experiment decides these with one analysis choice (:func:`layerscope.experiments.injection.label`, both
thresholds 0.2, the transfer share, every pair, all steps). This module re-derives the verdicts from the saved
per-pair table at every combination of the choices below, which were fixed in code before any result was looked at.

Choices (the shipped one first in each; a spec names every choice that applies):

- ``inert``: a layer is inert when no group's share reaches this (:data:`INERT_LEVELS`);
- ``margin``: a layer is specialised when its strongest group leads the second by this (:data:`MARGIN_LEVELS`);
- ``measure``: the group score per pair, ``transfer`` (C shows E's value) or ``moved`` (1 - keep: C no longer shows
  O's value, whatever it shows) (:data:`MEASURES`); image-scored sweeps have the one measure of
  :func:`~layerscope.experiments.injection.specialize` (``closed``: the share of the O-to-E gap closed);
- ``pairs``: every pair, or one of two disjoint halves of the pairs (a seeded random split) (:data:`PAIR_SUBSETS`);
- ``window``: each step window the sweep holds; ``protocol``: how the pairs were made (``full`` prompts differing in
  every factor, or ``partial`` prompts), a property of the Result, so a model swept under both protocols has both in
  its curve; ``scorer``: the sweep's scorer (``oracle`` or ``images``), likewise;
- ``sets`` (roles claim): whether the candidate spaces swept beside the layers (noise, text embeddings, skips) count
  as layers (``layers+spaces``, as the section's findings count them) or not (``layers``);
- ``position`` (order claim): a role's place in forward order is its ``first`` labelled layer or the ``median`` of
  its labelled layers (spaces have no forward place and take no part).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from . import injection as inj

#: the choices' levels, fixed before any result was looked at (the shipped level first)
INERT_LEVELS = (inj.INERT_BELOW, 0.1, 0.3)
MARGIN_LEVELS = (inj.MARGIN, 0.1, 0.3)
MEASURES = ("transfer", "moved")
PAIR_SUBSETS = ("all", "half1", "half2")
SUBSET_SEED = 0  # the split of the pairs into two halves
SETS = ("layers+spaces", "layers")
POSITIONS = ("first", "median")
#: the shipped specification of each claim (choice -> level); a result without a choice's level has no shipped row
SHIPPED: dict[str, dict[str, str]] = {
    "injection.roles_split": {
        "inert": "0.2", "margin": "0.2", "measure": "transfer", "pairs": "all", "window": "all",
        "protocol": "full", "sets": "layers+spaces",
    },
    "injection.roles_order": {
        "inert": "0.2", "margin": "0.2", "measure": "transfer", "pairs": "all", "window": "all",
        "protocol": "full", "position": "first",
    },
}  # fmt: skip
#: the bootstrap of the shipped specification's statistic (pairs resampled)
N_BOOT, BOOT_SEED = 200, 0
ROLES = ("structure", "content", "surface")

CLAIMS: dict[str, dict[str, Any]] = {
    "injection.roles_split": {
        "text": "The layers of a diffusion model split into roles: at least one layer carries the structure, one the "
        "content and one the surface (colours) of the image.",
        "paper": "Schaerf 2025, Sec. 4 and Fig. 5",
        "measured": "injection sweep: per layer, the share of pairs whose factor groups move from E into O; "
        "statistic: roles (of 3) with at least one specialised layer",
        "shipped": SHIPPED["injection.roles_split"],
    },
    "injection.roles_order": {
        "text": "Where the roles sit depends on the architecture: in Stable Diffusion 1.4's layout the content layers "
        "come after the surface layers, in most other models content comes first.",
        "paper": "Schaerf 2025, Sec. 4",
        "measured": "injection sweep labels: forward position (normalised depth) of the content layers minus that "
        "of the surface layers, against the order reported for the model's layout",
        "shipped": SHIPPED["injection.roles_order"],
    },
}
