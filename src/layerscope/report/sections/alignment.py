"""The alignment study's section of the report: figures, tables and the calibrated verdicts from its saved Results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ...experiments import alignment as al
from ...experiments import alignment_analysis as an
from ...experiments import alignment_claims as ac
from ...experiments.base import Result
from .. import Page, SectionRun
from ..commands import layer_flags, size_flags

EXPERIMENT = al
KEY = "alignment"
TITLE = "Alignment: do models arrange their representations alike? (CKA, mutual k-NN, controls, verdicts per step)"
GROUPS = an.GROUPS
STAT_METRIC = an.STAT_METRIC


def align_command(specs: list[str], settings: dict[str, Any], out: str) -> str:
    """The CLI command that reproduces a main-job alignment run into ``out``."""
    cmd = f"layerscope align {' '.join(specs)} --n {settings['n']}"
    if settings.get("steps"):
        cmd += f" --steps {settings['steps']}"
    cmd += f" --metric {','.join(settings['metrics'])} --k {settings['k']}"
    if tuple(settings.get("controls", al.CONTROLS)) != al.CONTROLS:
        cmd += f" --control {','.join(settings['controls']) or 'none'}"
    return cmd + layer_flags(settings.get("layers")) + size_flags(settings) + f" --out {out}"


def _short(spec: str) -> str:
    return spec.split(":", 1)[-1]


def world_figure(result: Result, spec: str, reference: str = "factors"):
    """Per layer x step: debiased CKA of the layer's features with a world reference (one model)."""
    from ..figures import heatmaps

    w = result["world"]
    w = w[(w["model"] == spec) & (w["reference"] == reference) & (w["metric"] == STAT_METRIC)]
    if w.empty:
        return None
    layers = list(w.sort_values("layer_index", kind="stable")["layer"].drop_duplicates())
    piv = w.pivot(index="layer", columns="step", values="value").reindex(index=layers)
    return heatmaps(
        [(spec, piv.to_numpy())],
        layers,
        [str(c) for c in piv.columns],
        cbar_label="debiased CKA",
        title=f"{spec}: alignment of each layer with the scene's {reference} over steps (0 = noisiest)",
    )


def within_figure(result: Result, spec: str):
    """Layer x layer debiased CKA of one model at its last step."""
    from ..figures import heatmaps

    t = result["within"]
    t = t[(t["model"] == spec) & (t["view"] == "layers") & (t["metric"] == STAT_METRIC)]
    if t.empty:
        return None
    last = int(t["step_a"].max())
    t = t[t["step_a"] == last]
    layers = list(dict.fromkeys(t["layer_a"]))
    piv = t.pivot(index="layer_a", columns="layer_b", values="value").reindex(index=layers, columns=layers)
    return heatmaps(
        [(f"step {last}", piv.to_numpy())],
        layers,
        layers,
        cbar_label="debiased CKA",
        title=f"{spec}: layer x layer similarity (last step)",
    )


def steps_figure(result: Result, spec: str):
    """Step x step debiased CKA of one model, averaged over its layers (how much each step's representation
    resembles another's); None for single-pass models."""
    from ..figures import heatmaps

    t = result["within"]
    t = t[(t["model"] == spec) & (t["view"] == "steps") & (t["metric"] == STAT_METRIC)]
    if t.empty:
        return None
    mean = t.groupby(["step_a", "step_b"])["value"].mean().unstack()
    steps = [str(s) for s in mean.index]
    return heatmaps(
        [("mean over layers", mean.to_numpy())],
        steps,
        steps,
        cbar_label="debiased CKA",
        title=f"{spec}: step x step similarity, averaged over layers (0 = noisiest)",
    )


def across_figure(result: Result, spec_a: str, spec_b: str):
    """Layer x layer debiased CKA between two models: each layer at its best step, and, where both models run the
    same steps, at the first, middle and last of them (matched diffusion time)."""
    from ..figures import heatmaps

    t = result["across"]
    t = t[(t["model_a"] == spec_a) & (t["model_b"] == spec_b) & (t["metric"] == STAT_METRIC)]
    if t.empty:
        return None
    la, lb = list(dict.fromkeys(t["layer_a"])), list(dict.fromkeys(t["layer_b"]))
    matched = sorted(s for s in set(t["step"]) if s >= 0)
    shown = [-1] + sorted({matched[0], matched[len(matched) // 2], matched[-1]}) if matched else [-1]
    panels = []
    for step in shown:
        piv = t[t["step"] == step].pivot(index="layer_a", columns="layer_b", values="value")
        panels.append(("best steps" if step == -1 else f"step {step}", piv.reindex(index=la, columns=lb).to_numpy()))
    return heatmaps(
        panels,
        la,
        lb,
        cbar_label="debiased CKA",
        title=f"{spec_a} (rows) vs {spec_b} (columns): layers at their best steps"
        + (" and at matched steps" if matched else ""),
    )


def _levels(m: pd.DataFrame) -> list[str]:
    levels = list(dict.fromkeys(m["step"]))
    return sorted((lv for lv in levels if lv != "best"), key=int) + (["best"] if "best" in levels else [])


def _shipped(m: pd.DataFrame) -> pd.DataFrame:
    """The matching rows of the shipped specification (:data:`SHIPPED`: last step, whole maps, debiased CKA)."""
    step = an.shipped_step(_levels(m))
    return m[(m["step"] == step) & (m["features"] == an.SHIPPED["features"]) & (m["measure"] == an.SHIPPED["measure"])]


def _model_pairs(m: pd.DataFrame, control: str = "") -> pd.DataFrame:
    """The calibrated rows of pairs of models (control ""), or of their untrained copies (``"untrained"``)."""
    if m.empty or "components" not in m:
        return m.iloc[0:0]
    return m[m["components"].notna() & (m["control_a"] == control) & (m["control_b"] == control)]


OUTCOME_COLOURS = {
    "alike": "#2ca02c",
    "unalike": "#d62728",
    "preserved": "#1f77b4",
    "reversed": "#9467bd",
    "unrelated": "#ff7f0e",
    "undecided": "#dddddd",
    "degenerate": "#888888",
}


def outcomes_figure(result: Result, features: str = "full", measure: str = STAT_METRIC):
    """Per ordered pair of models and step (matched by noise level; ``best``: each layer at its best step): the
    components' outcome and the arrangement's on each coordinate, as coloured cells (the verdicts over the steps)."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    m = _model_pairs(result["matching"])
    if m.empty:
        return None
    m = m[(m["features"] == features) & (m["measure"] == measure)]
    levels = _levels(m)
    pairs = list(dict.fromkeys(zip(m["model_a"], m["model_b"])))
    cols = [("components", "components"), *((f"arrangement_{c}", f"arrangement ({c})") for c in an.COORDINATES)]
    fig, axes = plt.subplots(1, len(cols), figsize=(3.2 * len(cols) + 1.5, 0.28 * len(pairs) + 1.6), sharey=True)
    for ax, (col, title) in zip(axes, cols):
        for i, (a, b) in enumerate(pairs):
            for j, lv in enumerate(levels):
                r = m[(m["model_a"] == a) & (m["model_b"] == b) & (m["step"] == lv)]
                out = r[col].iloc[0] if len(r) else "undecided"
                ax.add_patch(plt.Rectangle((j, i), 1, 1, color=OUTCOME_COLOURS.get(out, "#ffffff")))
        ax.set_xlim(0, len(levels))
        ax.set_ylim(len(pairs), 0)
        ax.set_xticks(np.arange(len(levels)) + 0.5)
        ax.set_xticklabels(levels, fontsize=7)
        ax.set_xlabel("step (0 = noisiest)", fontsize=8)
        ax.set_title(title, fontsize=9)
    axes[0].set_yticks(np.arange(len(pairs)) + 0.5)
    axes[0].set_yticklabels([f"{_short(a)} -> {_short(b)}" for a, b in pairs], fontsize=7)
    fig.legend(
        handles=[Patch(color=c, label=k) for k, c in OUTCOME_COLOURS.items()],
        loc="lower center",
        ncol=len(OUTCOME_COLOURS),
        fontsize=7,
        frameon=False,
    )
    fig.suptitle(
        f"Verdicts per step ({measure}, {features} maps; threshold {an.SHIPPED['order_threshold']})", fontsize=9
    )
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    return fig


def peaks_figure(result: Result):
    """Where each factor group's alignment peaks in each model (and its untrained copy) at the shipped step, on both
    coordinates, with the subsamples' 95% range."""
    import matplotlib.pyplot as plt

    p = result["peaks"] if "peaks" in result.tables else pd.DataFrame()
    if p.empty:
        return None
    p = p[p["step"] == an.shipped_step(_levels(p))]
    models = list(dict.fromkeys(p["model"]))
    colours = {"structure": "#1f77b4", "content": "#d62728", "surface": "#2ca02c"}
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.45 * len(models) + 1.6), sharey=True)
    for ax, coord, label in (
        (axes[0], "depth", "depth of the peak (0 = first layer, 1 = last)"),
        (axes[1], "image_distance", "distance from the image of the peak (log2 of the downsampling)"),
    ):
        for i, spec in enumerate(models):
            for j, g in enumerate(GROUPS):
                r = p[(p["model"] == spec) & (p["group"] == g)]
                if r.empty:
                    continue
                r = r.iloc[0]
                ax.errorbar(
                    r[coord],
                    i + (j - 1) * 0.2,
                    xerr=[[max(0.0, r[coord] - r[f"{coord}_low"])], [max(0.0, r[f"{coord}_high"] - r[coord])]],
                    fmt="o",
                    color=colours[g],
                    capsize=3,
                    label=g if i == 0 else None,
                )
        ax.set_xlabel(label, fontsize=8)
    axes[0].set_yticks(range(len(models)))
    axes[0].set_yticklabels(models, fontsize=8)
    axes[0].invert_yaxis()
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(
        "Where each factor group is best aligned (debiased CKA with the group's one-hot; last step)", fontsize=9
    )
    fig.tight_layout()
    return fig


def _fmt(v: float, lo: float, hi: float) -> str:
    return f"{v:.2f} [{lo:.2f}, {hi:.2f}]" if np.isfinite(v) else "–"


def platonic_table(result: Result, control: str = "") -> pd.DataFrame:
    """Per ordered pair at the shipped specification: similarity, its nulls and the excess over the strongest,
    the permutation p-value, the orders on both coordinates and the outcomes."""
    m = _shipped(_model_pairs(result["matching"], control))
    if m.empty:
        return pd.DataFrame()
    out = {
        "A": m["model_a"],
        "B": m["model_b"],
        "similarity": [_fmt(*r) for r in m[["similarity", "similarity_low", "similarity_high"]].to_numpy()],
        "nulls": m["nulls"],
        "excess over strongest null": [_fmt(*r) for r in m[["excess", "excess_low", "excess_high"]].to_numpy()],
        "perm. p": [f"{v:.3f}" for v in m["perm_p"]],
        "components": m["components"],
    }
    for c in an.COORDINATES:
        out[f"order ({c})"] = [_fmt(*r) for r in m[[f"order_{c}", f"order_{c}_low", f"order_{c}_high"]].to_numpy()]
        out[f"arrangement ({c})"] = m[f"arrangement_{c}"]
    return pd.DataFrame(out)


def curve_summary(result: Result) -> pd.DataFrame:
    """Per claim and pair: the shares of specifications that support / contradict it, for the models and for
    their untrained copies."""
    c = ac.claims_curve(result)
    if c.empty:
        return pd.DataFrame()
    c = c.assign(control=c["control"].replace("", "model"))
    share = c.groupby(["claim", "subject", "control"])["verdict"].value_counts(normalize=True).unstack(fill_value=0.0)
    for v in ("supports", "contradicts", "undecided"):
        if v not in share:
            share[v] = 0.0
    share["specs"] = c.groupby(["claim", "subject", "control"]).size()
    return share[["supports", "contradicts", "undecided", "specs"]].reset_index()


def platonic_sentence(result: Result) -> str:
    """The verdicts stated from the data: the share of specifications supporting each claim, models vs their
    untrained copies, and the shipped specification's outcomes."""
    m = result["matching"]
    if m.empty or "components" not in m:
        return "One model only: no cross-model comparison, so the Platonic test does not apply."
    summary = curve_summary(result)
    if summary.empty:
        return "No pair of models with calibrated nulls: the verdicts need the controls (--control untrained,render)."
    parts = []
    for claim, meta in ac.CLAIMS.items():
        sub = summary[summary["claim"] == claim]
        model, ctrl = sub[sub["control"] == "model"], sub[sub["control"] == "untrained"]
        line = (
            f"{meta['text']}: supported by {model['supports'].mean():.0%} and contradicted by "
            f"{model['contradicts'].mean():.0%} of the specifications, averaged over {len(model)} pairs"
        )
        if not ctrl.empty:
            line += f" (untrained copies: {ctrl['supports'].mean():.0%} / {ctrl['contradicts'].mean():.0%})"
        parts.append(line)
    rec = result.record
    return (
        f"{rec['rows']} scenes; every rule fixed in code before the run (docs/alignment.md). "
        + "; ".join(parts)
        + ". Components count as alike only above every null (the render as a model, untrained copies) with a "
        "permutation p below 0.05; arrangements are preserved, reversed, unrelated, undecided or degenerate."
    )


def figures(result: Result, folder: Path) -> dict[str, Any]:
    """The figures of one alignment run (the CLI writes them next to the tables)."""
    figs: dict[str, Any] = {}
    specs = result.record["models"]
    for spec in specs:
        figs[f"world_{_short(spec)}.png"] = world_figure(result, spec)
        figs[f"within_{_short(spec)}.png"] = within_figure(result, spec)
        figs[f"steps_{_short(spec)}.png"] = steps_figure(result, spec)
    for i, a in enumerate(specs):
        for b in specs[i + 1 :]:
            figs[f"across_{_short(a)}_{_short(b)}.png"] = across_figure(result, a, b)
    figs["verdicts_per_step.png"] = outcomes_figure(result)
    figs["peaks.png"] = peaks_figure(result)
    return {k: v for k, v in figs.items() if v is not None}


def _peaks_table(result: Result) -> pd.DataFrame:
    p = result["peaks"] if "peaks" in result.tables else pd.DataFrame()
    if p.empty:
        return p
    p = p[p["step"] == an.shipped_step(_levels(p))]
    return pd.DataFrame(
        {
            "model": p["model"],
            "group": p["group"],
            "layer": p["layer"],
            "depth": [_fmt(*r) for r in p[["depth", "depth_low", "depth_high"]].to_numpy()],
            "image distance": [
                _fmt(*r) for r in p[["image_distance", "image_distance_low", "image_distance_high"]].to_numpy()
            ],
            "CKA": [_fmt(*r) for r in p[["value", "value_low", "value_high"]].to_numpy()],
        }
    )


def _peak_order_table(result: Result) -> pd.DataFrame:
    o = result["peak_order"] if "peak_order" in result.tables else pd.DataFrame()
    if o.empty:
        return o
    o = o[o["step"] == an.shipped_step(_levels(o))]
    return o[["model_a", "model_b", "control", "coordinate", "order_a", "order_b", "agreement"]]


def console(result: Result) -> list[Any]:
    items: list[Any] = []
    peaks = _peaks_table(result)
    if not peaks.empty:
        items.append(("where each factor group is best aligned at the last step (95% subsampling intervals)", peaks))
    tab = platonic_table(result)
    if not tab.empty:
        items.append(("the calibrated test per ordered pair (last step, whole maps, debiased CKA)", tab))
    summary = curve_summary(result)
    if not summary.empty:
        items.append(("share of specifications per verdict (models and their untrained copies)", summary))
    items.append(platonic_sentence(result))
    return items


def render(run: SectionRun, page: Page) -> str:
    out = [
        page.p(
            "Huh et al. (2024) argue that models converge to similar representations; Schaerf (2025, section 3.1) "
            "answers that while representational components may appear similar across models, their internal "
            "arrangements remain fundamentally different. Every zoo model sees the same held-out Shapes scenes (text "
            "models their prompts with the same seeds; the VAE and GAN the scene's one-hot at their code layer), and "
            "so do its controls: an untrained copy of each model and the scene's render as a one-layer model. Every "
            "measure is computed from the exact Gram matrix of each layer's whole map (or of its position mean) at "
            "every step. Component similarity of A -> B is the mean over A's layers (exact copies merged) of the "
            "best match in B; it counts as alike only when it exceeds every null (render -> B, untrained A -> B, "
            "A -> untrained B) with a 95% interval above 0 and a permutation p below 0.05. The arrangement is the "
            "Spearman correlation of matched layers' positions along two coordinates: depth (input -> output) and "
            "distance from the image (from the layer map's shapes, the same orientation in every model). Verdicts "
            "are given per step, matched by noise level across diffusion models, and over a specification curve of "
            "steps, measures, features, coordinates and thresholds; intervals come from half-samples of the scenes "
            "with the whole statistic recomputed (basic intervals; coverage checked by simulation in the tests)."
        )
    ]
    for job, result in run.results():
        sub = run.folder / job["folder"]
        specs = result.record["models"]
        cmd = align_command(specs, job["settings"], f"align-{sub.name}")
        out.append(page.finding(platonic_sentence(result)))
        summary = curve_summary(result)
        if not summary.empty:
            out.append(
                page.table(
                    summary, "Share of specifications per verdict, per claim and pair (models, untrained copies)"
                )
            )
        for control, caption in (("", "models"), ("untrained", "their untrained copies (the control)")):
            tab = platonic_table(result, control)
            if not tab.empty:
                out.append(
                    page.table(
                        tab, f"The calibrated test per ordered pair of {caption}: last step, whole maps, debiased CKA"
                    )
                )
        fig = outcomes_figure(result)
        if fig is not None:
            out.append(
                page.figure(fig, "Verdicts per step for every ordered pair of models (debiased CKA, whole maps).", cmd)
            )
        fig = peaks_figure(result)
        if fig is not None:
            out.append(
                page.figure(fig, "Where each factor group's alignment peaks, per model and untrained copy.", cmd)
            )
        po = _peak_order_table(result)
        if not po.empty:
            out.append(
                page.table(
                    po,
                    "The order of the factor groups' peaks inside each model, compared per pair (agreement: share of the three group pairs in the same order)",
                )
            )
        cf = result["crossfit"] if "crossfit" in result.tables else pd.DataFrame()
        if not cf.empty:
            out.append(
                page.table(
                    cf,
                    "Selection bias of the best steps: component similarity on one half of the scenes with each "
                    "layer's best step chosen on that half (in-sample) or on the other (cross-fitted), mean over splits",
                    floats="{:.3f}",
                )
            )
        dups = result.record.get("duplicates", {})
        if dups:
            out.append(
                page.note(
                    "Layers merged as exact copies of an earlier layer (equal whole maps at every step): "
                    + "; ".join(f"{spec}: {', '.join(f'{k} = {v}' for k, v in d.items())}" for spec, d in dups.items())
                )
            )
        for i, a in enumerate(specs):
            for b in specs[i + 1 :]:
                f = across_figure(result, a, b)
                if f is not None:
                    out.append(
                        page.figure(
                            f,
                            f"{a} vs {b}: debiased CKA of every layer pair, each layer at its best step, and at the first, "
                            "middle and last step matched by noise level.",
                            cmd,
                        )
                    )
        for spec in specs:
            out.append(f"<h3>{page.esc(spec)}</h3>")
            for f, cap in (
                (
                    world_figure(result, spec),
                    "alignment of each layer with the scene's factors (debiased CKA) over the steps",
                ),
                (within_figure(result, spec), "layer x layer debiased CKA at the last step"),
                (steps_figure(result, spec), "step x step debiased CKA, averaged over the layers"),
            ):
                if f is not None:
                    out.append(page.figure(f, f"{spec}: {cap}.", cmd))
        peaks = _peaks_table(result)
        if not peaks.empty:
            out.append(page.table(peaks, "Where each factor group is best aligned (last step)"))
    return "".join(out)
