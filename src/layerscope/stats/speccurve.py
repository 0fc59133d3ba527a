"""Specification curves: a claim's verdict across every reasonable analysis choice, and one verdict of verdicts.

A curve (:func:`check_curve`) is a DataFrame with one row per (claim, subject, control, specification) and the
columns of :data:`COLUMNS`:

- ``claim``: ``"<experiment>.<short_name>"``; ``subject``: what the verdict is about (a model spec, or
  ``"zoo:unet -> zoo:dit"`` for a pair); ``control``: ``""`` for the model itself, else the control's label (the
  same analysis applied to the control's results);
- ``spec``: the specification as ``"name=value; name=value"``, names sorted (:func:`spec_string`);
- ``verdict``: ``supports``, ``contradicts`` or ``undecided`` (of the claim's statement);
- ``statistic``: the name of the number that decided it; ``value``, ``ci_low``, ``ci_high`` (NaN allowed).

:func:`summarize` turns a curve into one row per (claim, subject) by the rule documented there. Leaf utility: it
imports numpy, pandas and layerscope's errors only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from ..errors import ConfigError

#: the rule of :func:`summarize`, fixed before any result was looked at
MAJORITY = 0.8  # a verdict holds when at least this share of the specifications give it
CONTROL_WITHIN = 0.2  # a control whose share of support is within this of the model's gets a note
COLUMNS = ("claim", "subject", "control", "spec", "verdict", "statistic", "value", "ci_low", "ci_high")
VERDICTS = ("supports", "contradicts", "undecided")
KEY = ["claim", "subject", "control", "spec"]


def spec_string(choices: Mapping[str, Any]) -> str:
    """``{"b": 2, "a": 0.5}`` -> ``"a=0.5; b=2"`` (names sorted, values as short strings: floats with ``:g``)."""
    return "; ".join(f"{k}={_short(choices[k])}" for k in sorted(choices))


def _short(v: Any) -> str:
    if isinstance(v, (float, np.floating)):
        return f"{float(v):g}"
    return str(v)


def parse_spec(spec: str) -> dict[str, str]:
    """The choices of a spec string (:func:`spec_string`'s inverse, values as strings)."""
    out: dict[str, str] = {}
    for part in str(spec).split(";"):
        part = part.strip()
        if part:
            name, _, value = part.partition("=")
            out[name.strip()] = value.strip()
    return out


def matches(spec: str, choices: Mapping[str, Any]) -> bool:
    """Whether ``spec`` sets every choice of ``choices`` to its value (other choices free)."""
    have = parse_spec(spec)
    return all(have.get(k) == _short(v) for k, v in choices.items())


def empty_curve() -> pd.DataFrame:
    """A curve with no rows (the schema's columns and dtypes)."""
    return pd.DataFrame({c: pd.Series(dtype=float if c in ("value", "ci_low", "ci_high") else object) for c in COLUMNS})


def curve_from_rows(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """A curve from one dict per row (the schema's columns; none: :func:`empty_curve`), numbers as floats."""
    if not rows:
        return empty_curve()
    df = pd.DataFrame.from_records(rows, columns=list(COLUMNS))
    return df.astype({c: float for c in ("value", "ci_low", "ci_high")})


def check_curve(df: Any) -> pd.DataFrame:
    """``df`` if it is a specification curve (the schema above), else a ConfigError saying in one sentence what is
    wrong. Extra columns are allowed; ``value`` / ``ci_low`` / ``ci_high`` must be numbers (NaN allowed)."""
    if not isinstance(df, pd.DataFrame):
        raise ConfigError(f"a specification curve is a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ConfigError(f"the specification curve lacks the column(s) {missing}; a curve has {list(COLUMNS)}")
    for col in ("claim", "subject", "control", "spec", "verdict", "statistic"):
        bad = df[~df[col].map(lambda v: isinstance(v, str))]
        if len(bad):
            raise ConfigError(
                f"column {col!r} of the specification curve must hold strings ('' for none), got "
                f"{bad[col].iloc[0]!r} in row {bad.index[0]}"
            )
    bad_claim = df[~df["claim"].str.fullmatch(r"[A-Za-z_][\w]*\.[\w]+")]
    if len(bad_claim):
        raise ConfigError(
            f"claim {bad_claim['claim'].iloc[0]!r} is not '<experiment>.<short_name>' (e.g. 'injection.roles_split')"
        )
    bad_verdict = df[~df["verdict"].isin(VERDICTS)]
    if len(bad_verdict):
        raise ConfigError(
            f"verdict {bad_verdict['verdict'].iloc[0]!r} is not one of {', '.join(VERDICTS)} "
            f"(claim {bad_verdict['claim'].iloc[0]!r})"
        )
    for col in ("value", "ci_low", "ci_high"):
        if not (pd.api.types.is_numeric_dtype(df[col]) and not pd.api.types.is_bool_dtype(df[col])):
            raise ConfigError(f"column {col!r} of the specification curve must be numbers (NaN allowed)")
    dup = df[df.duplicated(KEY, keep=False)]
    if len(dup):
        r = dup.iloc[0]
        raise ConfigError(
            f"the specification curve has {len(dup)} rows for one (claim, subject, control, spec): "
            f"{r['claim']!r}, {r['subject']!r}, {r['control']!r}, {r['spec']!r}; give each specification once"
        )
    return df


def _shares(verdicts: pd.Series) -> dict[str, float]:
    n = len(verdicts)
    return {v: (float((verdicts == v).sum()) / n if n else np.nan) for v in VERDICTS}


def _depends(rows: pd.DataFrame) -> tuple[str, str]:
    """The choice whose levels explain the verdicts best, and each level's verdict, or ``("", "")``.

    A choice explains them when, within each of its (two or more) levels, one verdict has at least MAJORITY of the
    specifications, and those verdicts differ between levels; the best is the one whose levels are most consistent
    (the mean within-level share, weighted by the levels' sizes), then the one with fewer levels, then by name."""
    specs = rows["spec"].map(parse_spec)
    names = sorted({k for s in specs for k in s})
    best: tuple[float, int, str, str] | None = None
    for name in names:
        levels = specs.map(lambda s, n=name: s.get(n, "–"))
        if levels.nunique() < 2:
            continue
        tops: list[tuple[str, str, float]] = []
        for level, sub in rows.groupby(levels, sort=False):
            share = sub["verdict"].value_counts(normalize=True)
            tops.append((str(level), str(share.index[0]), float(share.iloc[0])))
        if min(t[2] for t in tops) < MAJORITY or len({t[1] for t in tops}) < 2:
            continue
        sizes = levels.value_counts()
        weighted = sum(share * sizes[level] for level, _, share in tops)
        text = "; ".join(f"{name}={level}: {v} ({share:.0%})" for level, v, share in tops)
        cand = (-weighted / len(rows), levels.nunique(), name, text)
        if best is None or cand < best:
            best = cand
    return ("", "") if best is None else (best[2], best[3])


def summarize(curve: pd.DataFrame, meta: Mapping[str, Mapping[str, Any]] | None = None) -> pd.DataFrame:
    """One row per (claim, subject) of ``curve`` (subjects with rows for the model itself), the verdict of verdicts.

    Columns: claim, subject, text, paper, measured (from ``meta``: claim -> its ``CLAIMS`` entry), n_specs, the
    shares of the model's specifications that ``supports`` / ``contradicts`` / are ``undecided``, per control its
    share of support (``supports (<label>)``, and all of them in ``controls``), the ``verdict``, ``depends_on`` and
    ``by_level`` (the deciding choice and each level's verdict), the shipped specification's ``statistic``,
    ``value``, ``ci_low``, ``ci_high``, ``shipped_spec`` and ``shipped_verdict`` (a claim's ``meta`` entry may name its
    shipped choices under ``"shipped"``: a dict choice -> level; the first matching row of the model is shipped), and
    ``control_note``.

    The rule (fixed in code, :data:`MAJORITY` = 0.8, :data:`CONTROL_WITHIN` = 0.2):

    - ``supported`` when at least 80% of the model's specifications support the claim;
    - ``contradicted`` when at least 80% contradict it;
    - ``depends on <choice>`` when, within each level of one choice, at least 80% of the specifications give one
      verdict and those verdicts differ between the levels (the choice that explains the verdicts best,
      :func:`_depends`; ``by_level`` says what each level gives);
    - ``undecided`` otherwise.

    ``control_note``: each control whose share of supporting specifications is within 0.2 of the model's, when the
    model's share is at least 0.2 (a verdict the control also gets, e.g. an untrained copy, is not a finding about
    what the model learnt; two shares near 0 say nothing of the kind).
    """
    check_curve(curve)
    meta = meta or {}
    labels = sorted({c for c in curve["control"] if c})
    recs = []
    for (claim, subject), rows in curve.groupby(["claim", "subject"], sort=False):
        model = rows[rows["control"] == ""]
        if model.empty:
            continue
        info = meta.get(claim, {})
        shares = _shares(model["verdict"])
        rec: dict[str, Any] = {
            "claim": claim,
            "subject": subject,
            "text": info.get("text", ""),
            "paper": info.get("paper", ""),
            "measured": info.get("measured", ""),
            "n_specs": int(len(model)),
            **shares,
        }
        ctrl, notes = [], []
        for label in labels:
            sub = rows[rows["control"] == label]
            share = _shares(sub["verdict"])["supports"] if len(sub) else np.nan
            rec[f"supports ({label})"] = share
            if len(sub):
                ctrl.append(f"{label}: {share:.2f} of {len(sub)}")
                if shares["supports"] >= CONTROL_WITHIN and abs(share - shares["supports"]) <= CONTROL_WITHIN:
                    notes.append(
                        f"the control '{label}' supports it about as often as the model ({share:.2f} vs "
                        f"{shares['supports']:.2f} of the specifications), so the verdict does not tell them apart"
                    )
        rec["controls"] = "; ".join(ctrl)
        if shares["supports"] >= MAJORITY:
            verdict, dep, by = "supported", "", ""
        elif shares["contradicts"] >= MAJORITY:
            verdict, dep, by = "contradicted", "", ""
        else:
            dep, by = _depends(model)
            verdict = f"depends on {dep}" if dep else "undecided"
        rec.update(verdict=verdict, depends_on=dep, by_level=by)
        shipped = info.get("shipped")
        hit = model[model["spec"].map(lambda s: matches(s, shipped))] if shipped else model.iloc[:0]
        first = hit.iloc[0] if len(hit) else None
        rec.update(
            statistic="" if first is None else first["statistic"],
            value=np.nan if first is None else float(first["value"]),
            ci_low=np.nan if first is None else float(first["ci_low"]),
            ci_high=np.nan if first is None else float(first["ci_high"]),
            shipped_spec="" if first is None else first["spec"],
            shipped_verdict="" if first is None else first["verdict"],
            control_note="; ".join(notes),
        )
        recs.append(rec)
    cols = [
        "claim", "subject", "text", "paper", "measured", "n_specs", *VERDICTS,
        *[f"supports ({lab})" for lab in labels], "controls", "verdict", "depends_on", "by_level",
        "statistic", "value", "ci_low", "ci_high", "shipped_spec", "shipped_verdict", "control_note",
    ]  # fmt: skip
    return pd.DataFrame.from_records(recs, columns=cols)


__all__ = [
    "COLUMNS",
    "CONTROL_WITHIN",
    "MAJORITY",
    "VERDICTS",
    "check_curve",
    "curve_from_rows",
    "empty_curve",
    "matches",
    "parse_spec",
    "spec_string",
    "summarize",
]
