"""Statistics: bootstrap CIs (:mod:`.bootstrap`), entropies and the MI bound (:mod:`.entropy`), and the batched
linear-probe solver (:mod:`.probes`). Leaf utilities: they import nothing of models, the engine or experiments."""

from .bootstrap import bootstrap_ci, mean_ci, median_ci, percentile_interval, resample_weights
from .entropy import entropy_bits, mi_lower_bound, plugin_entropy
from .probes import ProbeGrid, fit_probe_grid

__all__ = [
    "ProbeGrid",
    "bootstrap_ci",
    "entropy_bits",
    "fit_probe_grid",
    "mean_ci",
    "median_ci",
    "mi_lower_bound",
    "percentile_interval",
    "plugin_entropy",
    "resample_weights",
]
