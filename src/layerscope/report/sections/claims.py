"""The claims table: every claim of the papers the experiments decide, its verdict across the analysis choices, at
the top of the report page, generated from the other sections' saved Results (never typed by hand).

This section has no experiment of its own (``EXPERIMENT = None``: the main job runs nothing for it). Its ``render``
gets a :class:`~layerscope.report.SectionRun` of the whole report folder (``folder``: the report folder, ``record``:
all of ``run.json``) and reads each experiment section's folder through a SectionRun of its own. Per section it asks
the experiment's claims module (:data:`CLAIM_MODULES`; a lazy ``getattr`` of ``CLAIMS`` and ``claims_curve``, so a
module without them is skipped) for the specification curve of every saved job, and summarises them with
:func:`layerscope.stats.speccurve.summarize`.

Jobs and controls: a job of a model gives the model's rows; a job of a control (:func:`_control_of`: a model card
with a ``control`` record, as :mod:`layerscope.controls` writes, or a job of part ``control``) gives rows labelled
with the control's kind for the model it stands beside; a ``sanity`` job (a generator built to fail, e.g. properties'
sanity generators) gives control rows, labelled ``sanity: <name>``, for every subject of the same claim in its
section. ``layerscope claims DIR`` prints the same table and writes it as
markdown (:func:`markdown`).
"""

from __future__ import annotations

import importlib
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ...stats.speccurve import KEY as CURVE_KEY
from ...stats.speccurve import VERDICTS, check_curve, empty_curve, summarize
from .. import Page, SectionRun, read_run

KEY = "claims"
TITLE = "Claims: the papers' claims as measured, across the analysis choices"
EXPERIMENT = None  # reads the other sections' Results; the main job runs nothing for it
#: section key -> the module holding that experiment's ``CLAIMS`` and ``claims_curve(result)``
CLAIM_MODULES = {
    "injection": "layerscope.experiments.injection_claims",
    "abstractions": "layerscope.experiments.abstractions_claims",
    "properties": "layerscope.experiments.properties_claims",
    "alignment": "layerscope.experiments.alignment_claims",
}
COLOURS = {"supports": "#2e7d32", "undecided": "#b0b0b0", "contradicts": "#c62828"}


def _claims_api(key: str) -> tuple[dict[str, dict[str, Any]], Callable[..., pd.DataFrame] | None]:
    """The ``CLAIMS`` and ``claims_curve`` of a section's claims module (empty / None when it has none; an
    ImportError is raised: a claims module that does not import is said on the page, not skipped)."""
    name = CLAIM_MODULES.get(key)
    if name is None:
        return {}, None
    module = importlib.import_module(name)
    return dict(getattr(module, "CLAIMS", {}) or {}), getattr(module, "claims_curve", None)


def _control_of(job: dict[str, Any]) -> tuple[str, str]:
    """(control label, subject) of a job that ran a control, ``("", "")`` for a model: a model card with a
    ``control`` record (:mod:`layerscope.controls`: ``kind``, ``of``), or a job of part ``control`` (its ``control``
    field, else its note, else its spec; its ``subject`` field, where it names one)."""
    ctl = (job.get("card") or {}).get("control")
    if isinstance(ctl, dict) and ctl.get("of"):
        return str(ctl.get("kind") or "control"), str(ctl["of"])
    if job.get("part") == "control":
        return str(job.get("control") or job.get("note") or job.get("spec", "control")), str(job.get("subject") or "")
    return "", ""


def collect(folder: str | Path, record: dict[str, Any] | None = None) -> tuple[pd.DataFrame, dict[str, Any], list[str]]:
    """Every saved job's specification curve in a report folder: (curve, claims metadata, notes).

    ``notes``: a sentence per job whose curve could not be derived from its saved Result (the page says so instead of
    failing)."""
    folder = Path(folder)
    record = read_run(folder) if record is None else record
    curves, meta, notes = [], {}, []
    for key, info in record.get("sections", {}).items():
        try:
            claims, fn = _claims_api(key)
        except ImportError as exc:
            notes.append(f"{key}: its claims module does not import ({type(exc).__name__}: {exc})")
            continue
        if fn is None or not (folder / key).exists():
            continue
        meta.update(claims)
        run = SectionRun(key, folder / key, info)
        mine, sanity = [], []
        for job, result in run.results(part=None):
            part = job.get("part", "model")
            try:
                curve = check_curve(fn(result))
            except Exception as exc:  # a Result this version cannot read claims from: said on the page
                notes.append(f"{key}/{job['folder']}: no claims derived ({type(exc).__name__}: {exc})")
                continue
            control, subject = _control_of(job)
            if part == "sanity":
                sanity.append(curve.assign(control=f"sanity: {str(job.get('spec', '')).split(':')[-1]}"))
            elif control:
                mine.append(curve.assign(control=control, **({"subject": subject} if subject else {})))
            else:
                mine.append(curve)
        model_rows = pd.concat(mine, ignore_index=True) if mine else empty_curve()
        for s in sanity:  # a sanity generator: a control of every subject of its claim in this section
            for claim, rows in s.groupby("claim", sort=False):
                subjects = model_rows[(model_rows["claim"] == claim) & (model_rows["control"] == "")]["subject"]
                for subject in dict.fromkeys(subjects):
                    curves.append(rows.assign(subject=subject))
        curves.append(model_rows)
    curve = (
        pd.concat([c for c in curves if len(c)], ignore_index=True) if any(len(c) for c in curves) else empty_curve()
    )
    dup = curve.duplicated(CURVE_KEY)
    if dup.any():  # two jobs gave the same (claim, subject, control, spec): e.g. one model run twice in a section
        notes.append(f"{int(dup.sum())} specification rows given by two jobs each are counted once")
        curve = curve[~dup].reset_index(drop=True)
    return check_curve(curve), meta, notes


def summary(folder: str | Path, record: dict[str, Any] | None = None) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """(summary per claim x subject, the curve, notes) of a report folder."""
    curve, meta, notes = collect(folder, record)
    return summarize(curve, meta), curve, notes


def _num(v: Any, fmt: str = "{:.2f}") -> str:
    return "–" if v is None or not np.isfinite(v) else fmt.format(float(v))


def claims_table(summ: pd.DataFrame) -> pd.DataFrame:
    """The claims table shown on the page and written by ``layerscope claims``: one row per claim x subject."""
    rows = []
    for r in summ.to_dict(orient="records"):
        stat = ""
        if r["statistic"]:
            ci = f" [{_num(r['ci_low'])}, {_num(r['ci_high'])}]" if np.isfinite(r["ci_low"]) else ""
            stat = f"{r['statistic']}: {_num(r['value'])}{ci} ({r['shipped_verdict']})"
        note = "; ".join(x for x in (r["by_level"], r["control_note"]) if x)
        rows.append(
            {
                "claim": r["claim"],
                "paper": r["paper"],
                "subject": r["subject"],
                "what was measured": r["measured"],
                "specs": int(r["n_specs"]),
                "shipped specification: statistic [95% CI] (its verdict)": stat or "–",
                "controls (share supporting)": r["controls"] or "none run",
                "share supporting": _num(r["supports"]),
                "verdict": r["verdict"],
                "why": note,
            }
        )
    return pd.DataFrame(rows)


def figure(curve: pd.DataFrame, claim: str, meta: dict[str, Any] | None = None) -> Any:
    """One claim: per subject (and each of its controls, beside it), the share of specifications per verdict."""
    import matplotlib.pyplot as plt

    rows = curve[curve["claim"] == claim]
    bars: list[tuple[str, dict[str, float], int]] = []
    for subject, sub in rows.groupby("subject", sort=False):
        for control in ["", *sorted({c for c in sub["control"] if c})]:
            part = sub[sub["control"] == control]
            if len(part):
                shares = part["verdict"].value_counts(normalize=True)
                name = str(subject) if not control else f"{subject} · control {control}"
                bars.append((name, {v: float(shares.get(v, 0.0)) for v in VERDICTS}, len(part)))
    fig, ax = plt.subplots(figsize=(8.0, 0.45 * len(bars) + 1.4), layout="constrained")
    y = np.arange(len(bars))[::-1]
    left = np.zeros(len(bars))
    for v in ("supports", "undecided", "contradicts"):
        w = np.array([b[1][v] for b in bars])
        ax.barh(y, w, left=left, color=COLOURS[v], label=v, height=0.7)
        left += w
    ax.set_yticks(y)
    ax.set_yticklabels([f"{b[0]} ({b[2]} specs)" for b in bars], fontsize=7)
    ax.set_xlim(0, 1)
    ax.axvline(0.8, color="k", lw=0.6, ls="--")
    ax.set_xlabel("share of specifications (dashed: 0.8, the verdict rule)", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    text = (meta or {}).get(claim, {}).get("text", "")
    ax.set_title("\n".join([claim, *textwrap.wrap(text, 110)]), fontsize=8)
    fig.legend(fontsize=7, ncol=3, loc="outside lower center")
    return fig


def render(run: SectionRun, page: Page) -> str:
    """The claims section: the rule, the claims table, one figure per claim and the claims' statements."""
    summ, curve, notes = summary(run.folder, run.record)
    if summ.empty and not notes:
        return ""
    cmd = f"layerscope claims {run.folder}"
    out = [
        page.p(
            "Each claim of the papers that an experiment decides is re-derived from the saved tables at every "
            "combination of the analysis choices fixed in code (thresholds, cut-offs, tolerances, windows, subsets "
            "of pairs; the pair protocols where a model was swept under both): its specification curve. Verdict "
            "rule (layerscope.stats.speccurve.summarize): supported when at least 80% of the specifications support "
            "the claim, contradicted when at least 80% contradict it, 'depends on <choice>' when the verdict is "
            "constant (80%) within each level of one choice but differs between its levels, undecided otherwise. "
            "A control that supports a claim about as often as its model (within 0.2) is named beside it. The "
            "statistic is that of the shipped specification (the experiment's own choice), with its 95% interval."
        )
    ]
    out += [page.note(n) for n in notes]
    if summ.empty:
        return "".join(out)
    out.append(page.table(claims_table(summ), "Claims table (generated from the saved Results)"))
    meta = {r["claim"]: {"text": r["text"]} for r in summ.to_dict(orient="records")}
    for claim in dict.fromkeys(summ["claim"]):
        text = meta[claim]["text"]
        out.append(
            page.figure(
                figure(curve, claim, meta),
                f"{claim}: {text} Share of the specifications supporting, undecided on and contradicting the claim, "
                "per model (controls beside their model, where run).",
                cmd,
            )
        )
    statements = summ.drop_duplicates("claim")[["claim", "paper", "text", "measured"]]
    out.append(page.table(statements.rename(columns={"text": "claim, in one sentence"}), "The claims"))
    return "".join(out)


def markdown(folder: str | Path, command: str, summ: pd.DataFrame | None = None, notes: list[str] | None = None) -> str:
    """The claims of a report folder as markdown (docs/claims.md): the command and date that generated it, the
    rule, the claims table and the claims' statements (``summ``, ``notes``: :func:`summary`'s, when already made)."""
    if summ is None:
        summ, _curve, notes = summary(folder)
    notes = notes or []
    lines = [
        "# Claims, as measured",
        "",
        f"Generated by `{command}` on {time.strftime('%Y-%m-%d')} from the saved Results of the report folder "
        f"(run {read_run(folder).get('started', '?')}); do not edit the numbers by hand: rerun the command.",
        "",
        "Verdict rule (`layerscope.stats.speccurve.summarize`): **supported** when at least 80% of the "
        "specifications support the claim, **contradicted** when at least 80% contradict it, **depends on "
        "`<choice>`** when the verdict is constant (80%) within each level of one choice but differs between "
        "its levels, **undecided** otherwise. The statistic is the shipped specification's, with its 95% interval.",
        "",
    ]
    lines += [f"> {n}" for n in notes] + ([""] if notes else [])
    lines += [_md_table(claims_table(summ)), ""] if len(summ) else ["No claims could be derived.", ""]
    if len(summ):
        lines += ["## The claims", ""]
        for r in summ.drop_duplicates("claim").to_dict(orient="records"):
            lines.append(f"- `{r['claim']}` ({r['paper']}): {r['text']} Measured: {r['measured']}.")
        lines.append("")
    return "\n".join(lines)


def _md_table(df: pd.DataFrame) -> str:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    head = "| " + " | ".join(cell(c) for c in df.columns) + " |"
    sep = "| " + " | ".join("---" for _ in df.columns) + " |"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *body])
