"""Experiments: pure functions (model, settings) -> tidy table, each with a section in the main job's report.

- :mod:`.injection`: the injection sweep of Schaerf (2025), scored by the oracle or by open-domain image metrics.
"""

from .injection import plan_injection, run_injection, sanity, shapes_pairs, specialize, summarize

__all__ = ["plan_injection", "run_injection", "sanity", "shapes_pairs", "specialize", "summarize"]
