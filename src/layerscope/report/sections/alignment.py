"""The alignment study's section of the report: figures, tables and the Platonic test from its saved Results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ...experiments import alignment as al
from ...experiments.base import Result
from .. import Page, SectionRun
from ..commands import layer_flags, size_flags

EXPERIMENT = al
KEY = "alignment"
TITLE = "Alignment: do models arrange their representations alike? (CKA, mutual k-NN, the Platonic test)"
GROUPS = ("structure", "content", "surface")


def align_command(specs: list[str], settings: dict[str, Any], out: str) -> str:
    """The CLI command that reproduces a main-job alignment run into ``out``."""
    cmd = f"layerscope align {' '.join(specs)} --n {settings['n']}"
    if settings.get("steps"):
        cmd += f" --steps {settings['steps']}"
    cmd += f" --metric {','.join(settings['metrics'])} --k {settings['k']}"
    if settings.get("project") != 256:
        cmd += f" --project {settings['project']}"
    return cmd + layer_flags(settings.get("layers")) + size_flags(settings) + f" --out {out}"


def _short(spec: str) -> str:
    return spec.split(":", 1)[-1]


def world_figure(result: Result, spec: str, reference: str = "factors"):
    """Per layer x step: debiased CKA of the layer's features with a world reference (one model)."""
    from ..figures import heatmaps

    w = result["world"]
    w = w[(w["model"] == spec) & (w["reference"] == reference) & (w["metric"] == al.STAT_METRIC)]
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
    t = t[(t["model"] == spec) & (t["view"] == "layers") & (t["metric"] == al.STAT_METRIC)]
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
    t = t[(t["model"] == spec) & (t["view"] == "steps") & (t["metric"] == al.STAT_METRIC)]
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
    t = t[(t["model_a"] == spec_a) & (t["model_b"] == spec_b) & (t["metric"] == al.STAT_METRIC)]
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


def arrangement_figure(result: Result):
    """Where each factor group's alignment peaks, in normalised depth, per model (95% bootstrap CIs)."""
    import matplotlib.pyplot as plt

    a = result["arrangement"]
    if a.empty:
        return None
    models = list(dict.fromkeys(a["model"]))
    fig, ax = plt.subplots(figsize=(6.5, 0.6 * len(models) + 1.4))
    colours = {"structure": "#1f77b4", "content": "#d62728", "surface": "#2ca02c"}
    for i, spec in enumerate(models):
        for j, g in enumerate(GROUPS):
            r = a[(a["model"] == spec) & (a["group"] == g)]
            if r.empty:
                continue
            r = r.iloc[0]
            y = i + (j - 1) * 0.18
            ax.errorbar(
                r["depth"],
                y,
                xerr=[[r["depth"] - r["depth_low"]], [r["depth_high"] - r["depth"]]],
                fmt="o",
                color=colours[g],
                capsize=3,
                label=g if i == 0 else None,
            )
    ax.set_yticks(range(len(models)))
    ax.set_yticklabels(models, fontsize=8)
    ax.set_xlim(-0.05, 1.05)
    ax.set_xlabel("normalised depth of the peak (0 = first layer, 1 = last)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("Where each factor group is best aligned (debiased CKA with the group's one-hot)", fontsize=9)
    return fig


def _fmt(v: float, lo: float, hi: float) -> str:
    return f"{v:.2f} [{lo:.2f}, {hi:.2f}]" if np.isfinite(v) else "–"


def platonic_table(result: Result) -> pd.DataFrame:
    m = result["matching"]
    if m.empty:
        return m
    return pd.DataFrame(
        {
            "A": m["model_a"],
            "B": m["model_b"],
            "component similarity": [
                _fmt(*r) for r in m[["component_similarity", "similarity_low", "similarity_high"]].to_numpy()
            ],
            "chance": [f"{v:.2f}" for v in m["chance_similarity"]],
            "depth order (Spearman)": [_fmt(*r) for r in m[["depth_order", "order_low", "order_high"]].to_numpy()],
            "components": m["components"],
            "arrangement": m["arrangement"],
            "supports": m["supports"],
        }
    )


def platonic_sentence(result: Result) -> str:
    """The Platonic test stated from the data: per kind of pair, how many pairs support which claim, with CIs."""
    m = result["matching"]
    if m.empty:
        return "One model only: no cross-model comparison, so the Platonic test does not apply."
    iterative = result.record.get("iterative", {})
    rec = result.record
    parts = []
    kinds = {
        "diffusion vs diffusion": lambda a, b: iterative.get(a) and iterative.get(b),
        "diffusion vs GAN/VAE": lambda a, b: bool(iterative.get(a)) != bool(iterative.get(b)),
        "GAN/VAE vs GAN/VAE": lambda a, b: not iterative.get(a) and not iterative.get(b),
    }
    for kind, test in kinds.items():
        sub = m[[bool(test(a, b)) for a, b in zip(m["model_a"], m["model_b"])]]
        if sub.empty:
            continue
        counts = sub["supports"].value_counts()
        sims = ", ".join(
            f"{_short(a)}->{_short(b)} {_fmt(s, lo, hi)} / rho {_fmt(r, rl, rh)}"
            for a, b, s, lo, hi, r, rl, rh in sub[
                [
                    "model_a",
                    "model_b",
                    "component_similarity",
                    "similarity_low",
                    "similarity_high",
                    "depth_order",
                    "order_low",
                    "order_high",
                ]
            ].itertuples(index=False)
        )
        support = "; ".join(f"{k}: {v} of {len(sub)}" for k, v in counts.items())
        parts.append(f"{kind} ({sims}): {support}")
    huh = int((m["supports"] == "Huh et al. (convergence)").sum())
    sch = int((m["supports"] == "Schaerf (alike components, different arrangements)").sum())
    if huh and not sch:
        verdict = "The numbers support Huh et al.'s convergence on these pairs, not Schaerf's different arrangements."
    elif sch and not huh:
        verdict = "The numbers support Schaerf: components alike, arrangements different; not Huh et al.'s convergence."
    elif huh and sch:
        verdict = "The numbers split: some pairs support Huh et al., others Schaerf (see the table)."
    else:
        verdict = (
            "Neither claim is decided on these models: no pair has components alike (CI at or above "
            f"{rec.get('alike', al.ALIKE)}) together with a decided arrangement."
        )
    return (
        f"Platonic test ({rec['rows']} scenes; rule fixed beforehand: components alike when the 95% CI of the "
        f"mean best-match debiased CKA lies at or above {rec.get('alike', al.ALIKE)}, arrangement preserved when "
        f"the CI of the Spearman correlation of matched depths lies at or above {rec.get('preserved', al.PRESERVED)}"
        f", different when it lies below). " + " | ".join(parts) + ". " + verdict
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
    figs["arrangement.png"] = arrangement_figure(result)
    return {k: v for k, v in figs.items() if v is not None}


def console(result: Result) -> list[Any]:
    items: list[Any] = []
    if not result["arrangement"].empty:
        a = result["arrangement"]
        items.append(
            (
                "where each factor group is best aligned (debiased CKA, 95% CIs over scenes)",
                pd.DataFrame(
                    {
                        "model": a["model"],
                        "group": a["group"],
                        "layer": a["layer"],
                        "depth": [_fmt(*r) for r in a[["depth", "depth_low", "depth_high"]].to_numpy()],
                        "step": a["step"],
                        "CKA": [_fmt(*r) for r in a[["value", "value_low", "value_high"]].to_numpy()],
                    }
                ),
            )
        )
    if not result["matching"].empty:
        items.append(("the Platonic test: best-matching components and their depth order", platonic_table(result)))
    items.append(platonic_sentence(result))
    return items


def render(run: SectionRun, page: Page) -> str:
    out = [
        page.p(
            "Huh et al. (2024) argue that models converge to similar representations; Schaerf (2025, section 3.1) "
            "answers that while representational components may appear similar across models, their internal "
            "arrangements remain fundamentally different. Here every zoo model sees the same held-out Shapes scenes "
            "(text models their prompts with the same seeds; the VAE and GAN the scene's one-hot code at their code "
            "layer, so their code layer equals the factors by construction), every layer's features at every step "
            "(conditional branch; a fixed random projection of the whole map) are compared by linear CKA, debiased "
            "CKA, mutual k-NN and CKNNA (Huh et al.'s definitions), within a model, across models and against two "
            "references that are not models: the factors (one-hot) and the oracle's features of the scene's render. "
            "Each layer of a model is matched to its most similar layer of another (debiased CKA, each layer at the step "
            "where it aligns best with the factors); component similarity is the mean of those best matches, "
            "arrangement is the Spearman correlation of the layers' normalised depths with their matches' depths. "
            "Best steps, matches and peaks use debiased CKA (linear CKA of unrelated features is far from 0 when the feature width nears the number of scenes); the VAE's and GAN's code layers (the scene itself) take no part in them. CIs: 95%, from random half-samples of the scenes (no scene twice), re-centred on the estimate."
        )
    ]
    for job, result in run.results():
        sub = run.folder / job["folder"]
        specs = result.record["models"]
        cmd = align_command(specs, job["settings"], f"align-{sub.name}")
        out.append(page.finding(platonic_sentence(result)))
        tab = platonic_table(result)
        if not tab.empty:
            out.append(page.table(tab, "The Platonic test per ordered pair: components and arrangement"))
        fig = arrangement_figure(result)
        if fig is not None:
            out.append(
                page.figure(
                    fig,
                    "Where in normalised depth each factor group's alignment peaks, per model, "
                    "with 95% bootstrap CIs over scenes.",
                    cmd,
                )
            )
        for i, a in enumerate(specs):
            for b in specs[i + 1 :]:
                f = across_figure(result, a, b)
                if f is not None:
                    out.append(
                        page.figure(
                            f,
                            f"{a} vs {b}: debiased CKA of every layer pair, each layer at its best step (and, where both run the "
                            "same steps, at the first, middle and last of them).",
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
        a = result["arrangement"]
        if not a.empty:
            out.append(page.table(console(result)[0][1], "Where each factor group is best aligned"))
    return "".join(out)
