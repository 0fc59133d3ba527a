"""Specification curves: a claim's verdict across every reasonable analysis choice, and one verdict of verdicts.

A curve is a DataFrame with one row per (claim, subject, control, specification) and the columns of
:data:`COLUMNS`. Leaf utility: it imports nothing of layerscope but its errors.
"""

from __future__ import annotations

#: the rule of :func:`summarize`, fixed before any result was looked at
MAJORITY = 0.8  # a verdict holds when at least this share of the specifications give it
CONTROL_WITHIN = 0.2  # a control whose share of support is within this of the model's gets a note
