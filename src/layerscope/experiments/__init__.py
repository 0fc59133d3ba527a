"""Experiments: each module is ``Settings -> run(model, settings, out=None, progress=None) -> Result`` with a
``main_job(quick)`` (the shape: :mod:`.base`), and a render-only section in :mod:`layerscope.report.sections`.

- :mod:`.injection`: the injection sweep of Schaerf (2025), scored by the oracle or by open-domain image metrics;
- :mod:`.abstractions`: linear probes over diffusion time and forking entropy (Corallo et al. 2024);
- :mod:`.properties`: density, smoothness, organization and relevance of candidate spaces (Schaerf 2025, Fig. 4).
"""

from .base import Job, Result

__all__ = ["Job", "Result"]
