"""The alignment experiment's claims and their specification curve (the shared schema of
:mod:`layerscope.stats.speccurve`), from a saved Result's ``matching`` table: one row per claim, ordered pair (models,
or their untrained copies as the control) and specification.

``alignment.components_alike`` supports when components are alike (above every null and the permutation test),
contradicts when unalike; ``alignment.arrangements_different`` supports when the arrangement is unrelated,
contradicts when it is preserved or reversed (a monotone remapping keeps the order), undecided otherwise (degenerate
included). The rules and choices are in :mod:`.alignment_analysis`.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from ..stats.speccurve import spec_string
from .alignment_analysis import COORDINATES, ORDER_THRESHOLDS, SHIPPED, arrangement_outcome, shipped_step

__all__ = ["CLAIMS", "claims_curve"]

_SHIPPED_BASE = {k: SHIPPED[k] for k in ("features", "measure", "step")}
CLAIMS = {
    "alignment.components_alike": {
        "text": "Representational components of different generative models are alike",
        "paper": "Schaerf 2025, sec. 3.1 (after Huh et al. 2024)",
        "measured": "mean best-match similarity of A's layers in B, above the render and untrained-copy nulls",
        "shipped": _SHIPPED_BASE,
    },
    "alignment.arrangements_different": {
        "text": "Their internal arrangements differ (matched layers keep no order)",
        "paper": "Schaerf 2025, sec. 3.1",
        "measured": "Spearman correlation of matched layers' coordinates (unrelated vs preserved/reversed)",
        "shipped": {
            **_SHIPPED_BASE,
            "coordinate": SHIPPED["coordinate"],
            "order_threshold": SHIPPED["order_threshold"],
        },
    },
}


def claims_curve(result: Any) -> pd.DataFrame:
    """The specification curve of the alignment claims from a saved Result's ``matching`` table (the shared schema
    of :mod:`layerscope.stats.speccurve`): one row per claim, pair (models, or their untrained copies as the
    control), and specification; the last step of the study is written ``step=last``. A Result without those
    columns (another version's) gives an empty curve."""
    m = result["matching"] if "matching" in result.tables else pd.DataFrame()
    cols = ["claim", "subject", "control", "spec", "verdict", "statistic", "value", "ci_low", "ci_high"]
    need = {"components", "control_a", "excess", "step", *(f"order_{c}" for c in COORDINATES)}
    if m.empty or not need <= set(m.columns):
        return pd.DataFrame(columns=cols)
    m = m[m["components"].notna()]
    last = shipped_step(list(dict.fromkeys(m["step"])))
    rows = []
    for r in m.itertuples(index=False):
        control = "" if r.control_a == "" else r.control_a
        a = r.model_a if control == "" else result.record.get("controls", {}).get(r.model_a, {}).get("of", r.model_a)
        b = r.model_b if control == "" else result.record.get("controls", {}).get(r.model_b, {}).get("of", r.model_b)
        subject = f"{a} -> {b}"
        base = {"features": r.features, "measure": r.measure, "step": "last" if r.step == last else r.step}
        verdict = {"alike": "supports", "unalike": "contradicts"}.get(r.components, "undecided")
        rows.append(
            (
                "alignment.components_alike",
                subject,
                control,
                spec_string(base),
                verdict,
                "excess over the strongest null",
                r.excess,
                r.excess_low,
                r.excess_high,
            )
        )
        for coord in COORDINATES:
            rho, lo, hi = (
                getattr(r, f"order_{coord}"),
                getattr(r, f"order_{coord}_low"),
                getattr(r, f"order_{coord}_high"),
            )
            for t in ORDER_THRESHOLDS:
                out = arrangement_outcome(rho, lo, hi, t)
                verdict = (
                    "supports"
                    if out == "unrelated"
                    else "contradicts"
                    if out in ("preserved", "reversed")
                    else "undecided"
                )
                spec = spec_string({**base, "coordinate": coord, "order_threshold": t})
                rows.append(
                    (
                        "alignment.arrangements_different",
                        subject,
                        control,
                        spec,
                        verdict,
                        f"spearman ({coord})",
                        rho,
                        lo,
                        hi,
                    )
                )
    return pd.DataFrame(rows, columns=cols)
