"""The abstractions study's section of the report (probe grid, MI bound, forking entropy), from its saved Results.

The CLI (``layerscope abstractions``) writes this section's :func:`figures` next to the tables and prints its
:func:`console` lines; the main job's page is :func:`render`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ...experiments import abstractions as ab
from ...experiments.base import Result
from .. import Page, SectionRun
from ..commands import layer_flags, size_flags

EXPERIMENT = ab
KEY = "abstractions"
TITLE = "Latent abstractions over diffusion time: linear probes, the MI bound and forking entropy"
READABLE = 0.9


def probes_command(spec: str, settings: dict[str, Any], out: str) -> str:
    """The CLI command that reproduces a job's probe grid (table, figures) into ``out``."""
    steps = f" --steps {settings['steps']}" if settings.get("steps") is not None else ""
    more = layer_flags(settings.get("layers")) + size_flags(settings)
    return f"layerscope abstractions {spec} --n {settings['n']}{steps}{more} --out {out}"


def forks_command(spec: str, settings: dict[str, Any], out: str) -> str:
    """The CLI command that reproduces a job's forking study (table, figure) into ``out``."""
    taus = f" --taus {','.join(str(t) for t in settings['taus'])}" if settings.get("taus") is not None else ""
    steps = f" --steps {settings['steps']}" if settings.get("steps") is not None else ""
    return (
        f"layerscope abstractions {spec} --no-probes --forks {settings['forks']} --fork-prompts "
        f"{settings['fork_prompts']}{taus}{steps}{size_flags(settings)} --out {out}"
    )


def _half_way(table: pd.DataFrame, record: dict[str, Any]) -> dict[str, Any]:
    """The probes' half-way steps per factor (:func:`~layerscope.experiments.abstractions.relative_onsets`), or
    nothing when the probes read the user's labels (other factors than the oracle's, which forking reads)."""
    if record.get("labels") is not None:
        return {}
    return ab.relative_onsets(table, record["chance"], exclude=ab.baseline_of(record))


def forking_figure(table: pd.DataFrame, record: dict[str, Any]) -> Any:
    """Mean fork entropy vs tau per factor with its bootstrap CI (left, bits; dashed: the commitment threshold;
    a marker on the axis at each factor's commitment time) and normalised by log2(values) (right)."""
    import matplotlib.pyplot as plt

    summary = ab.entropy_summary(table)
    commit = ab.commitment_times(summary, record["threshold_bits"])
    fig, (ax, axn) = plt.subplots(1, 2, figsize=(9.0, 3.0))
    for i, (f, sub) in enumerate(summary.groupby("factor", sort=False)):
        colour = f"C{i}"
        ax.plot(sub["tau"], sub["entropy"], "o-", ms=3, color=colour, label=f)
        ax.fill_between(sub["tau"], sub["low"], sub["high"], color=colour, alpha=0.15, lw=0)
        axn.plot(sub["tau"], sub["normalised"], "o-", ms=3, color=colour, label=f)
        if commit.get(f) is not None:
            ax.plot([commit[f]], [-0.08 - 0.07 * i], marker="^", color=colour, ms=6, clip_on=False)
    ax.axhline(record["threshold_bits"], color="k", lw=0.7, ls="--", label=f"{record['threshold_bits']:g} bit")
    ax.set_ylim(bottom=-0.5)
    ax.set_ylabel("fork entropy (bits)", fontsize=8)
    axn.set_ylabel("entropy / log2(values)", fontsize=8)
    axn.set_ylim(-0.02, 1.0)
    for a in (ax, axn):
        a.set_xlabel("fork step tau (0 = noisiest)", fontsize=8)
        a.tick_params(labelsize=7)
    ax.legend(fontsize=6, ncol=2, loc="upper right")
    fig.tight_layout()
    return fig


def commitment_table(
    table: pd.DataFrame,
    record: dict[str, Any],
    probes: pd.DataFrame | None = None,
    probe_record: dict[str, Any] | None = None,
) -> pd.DataFrame:
    """Per factor: commitment tau (absolute and relative criteria), mean entropy at the first and last tau with CI,
    and, when the probe table and its record are given, the probes' half-way step."""
    summary = ab.entropy_summary(table)
    first, last = min(record["taus"]), max(record["taus"])
    absolute = ab.commitment_times(summary, record["threshold_bits"])
    relative = ab.commitment_times(summary, fraction=record["fraction"])
    half = _half_way(probes, probe_record) if probes is not None and probe_record is not None else {}
    rows = []
    for f in absolute:
        at = summary[summary["factor"] == f].set_index("tau")
        row = {
            "factor": f,
            f"committed (<= {record['threshold_bits']:g} bit)": "never" if absolute[f] is None else absolute[f],
            f"committed (<= {record['fraction']:g} x tau {first})": "never" if relative[f] is None else relative[f],
            f"entropy at tau {first} (bits)": f"{at.loc[first, 'entropy']:.2f} [{at.loc[first, 'low']:.2f}, "
            f"{at.loc[first, 'high']:.2f}]",
            f"entropy at tau {last} (bits)": f"{at.loc[last, 'entropy']:.2f}",
            "max (bits)": record["max_bits"][f],
        }
        if half:
            row["probe half-way step"] = half[f]["step"] if half.get(f) else "never"
        rows.append(row)
    return pd.DataFrame(rows)


def _order(times: dict[str, Any]) -> str:
    groups: dict[float, list[str]] = {}
    for f, t in times.items():
        groups.setdefault(np.inf if t is None else t, []).append(f)
    return " < ".join(
        f"{', '.join(v)} ({'never' if not np.isfinite(k) else int(k)})" for k, v in sorted(groups.items())
    )


def forking_sentence(model: str, record: dict[str, Any], probe_steps: dict[str, Any] | None = None) -> str:
    """The order in which the forks commit, compared with the probes' order and with the paper's, as found."""
    commit = record["commitment"]
    t = {f: (np.inf if v is None else v) for f, v in commit.items()}
    text = (
        f"{model}: order of commitment (mean fork entropy at or below {record['threshold_bits']:g} bit from that "
        f"tau on): {_order(commit)}."
    )
    hues = max(t["floor_hue"], t["wall_hue"])
    late = min(t["scale"], t["orientation"])
    mid_before = [f for f in ("object_hue", "shape") if t[f] < late]
    mid_not = [f for f in ("object_hue", "shape") if t[f] >= late]
    if hues < late and not mid_not:
        text += (
            " As Corallo et al. (2024) report, wall/floor hue, object hue and shape commit before scale and orientation"
        )
        text += (
            "."
            if hues <= min(t["object_hue"], t["shape"])
            else ", though not all of the large-extent hues before object hue and shape."
        )
    elif hues < late:
        text += (
            " Partly the paper's order: wall and floor hue commit before scale and orientation"
            + (f", and so does {mid_before[0]}" if mid_before else "")
            + f", but {' and '.join(mid_not)} {'does' if len(mid_not) == 1 else 'do'} not."
        )
    else:
        text += (
            " Not the paper's order (large-extent hues first, scale and orientation last): scale or orientation "
            "commits no later than wall and floor hue."
        )
    if probe_steps:
        p = {f: (np.inf if probe_steps.get(f) is None else probe_steps[f]) for f in commit}
        pairs = [(a, b) for i, a in enumerate(commit) for b in list(commit)[i + 1 :] if t[a] != t[b] and p[a] != p[b]]
        same = sum((t[a] < t[b]) == (p[a] < p[b]) for a, b in pairs)
        text += (
            f" Probe-readable order (half-way steps): {_order(probe_steps)}; of the {len(pairs)} factor pairs "
            f"that both orders separate, {same} are in the same order."
        )
        later = [f for f in commit if np.isfinite(p[f]) and t[f] < p[f]]
        if later:
            text += f" Committed before the probes read it half-way: {', '.join(later)}."
    return text


def curves_figure(table: pd.DataFrame, record: dict[str, Any], metric: str = "accuracy") -> Any:
    """Per factor, the best layer's held-out ``metric`` at each step (solid; accuracy with the best cell's 95%
    bootstrap CI as a band) and the x_t baseline (dashed; the record's ``baseline``)."""
    import matplotlib.pyplot as plt

    baseline = record.get("baseline")

    factors = list(dict.fromkeys(table["factor"]))
    fig, axes = plt.subplots(
        1, len(factors), figsize=(2.3 * len(factors), 2.6), sharey=metric == "accuracy", squeeze=False
    )
    for ax, f in zip(axes[0], factors):
        t = table[(table["factor"] == f) & (table["metric"] == metric)]
        layers = t[t["layer"] != baseline]
        best = layers.groupby("step")["value"].max()
        ax.plot(best.index, best.values, "o-", ms=3, label="best layer")
        if metric == "accuracy" and "accuracy_low" in set(table["metric"]):  # the best cell's 95% bootstrap CI
            top = layers.loc[layers.groupby("step")["value"].idxmax(), ["layer", "step"]]
            ci = table[(table["factor"] == f) & table["metric"].isin(["accuracy_low", "accuracy_high"])]
            ci = ci.pivot_table(index=["layer", "step"], columns="metric", values="value")
            band = ci.reindex(pd.MultiIndex.from_frame(top)).reset_index().sort_values("step")
            ax.fill_between(band["step"], band["accuracy_low"], band["accuracy_high"], alpha=0.25, lw=0)
        base = t[t["layer"] == baseline].sort_values("step")
        if len(base):
            ax.plot(base["step"], base["value"], "s--", ms=3, color="grey", label="x_t (projection)")
        if metric == "accuracy":
            ax.axhline(record["chance"][f], color="k", lw=0.6, ls=":", label="chance")
            ax.set_ylim(0, 1.02)
        else:
            ax.axhline(record["entropy_bits"][f], color="k", lw=0.6, ls=":", label="H(Y)")
        ax.set_title(f, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0, 0].set_ylabel("held-out accuracy" if metric == "accuracy" else "I(Y; Z) >= H(Y) - CE (bits)", fontsize=8)
    axes[0, -1].legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    return fig


def heatmap_figure(table: pd.DataFrame, model: str) -> Any:
    """Held-out accuracy per layer x step, one panel per factor."""
    from ..figures import heatmaps

    t = table[table["metric"] == "accuracy"]
    layers = list(t.sort_values("layer_index", kind="stable")["layer"].drop_duplicates())
    steps = sorted(t["step"].unique())
    panels = [
        (
            f,
            t[t["factor"] == f]
            .pivot(index="layer", columns="step", values="value")
            .reindex(index=layers, columns=steps)
            .to_numpy(),
        )
        for f in dict.fromkeys(t["factor"])
    ]
    return heatmaps(
        panels,
        layers,
        [str(s) for s in steps],
        cbar_label="held-out accuracy",
        title=f"{model}: linear-probe accuracy per layer (rows) x step (columns)",
    )


def onset_table(table: pd.DataFrame, record: dict[str, Any]) -> pd.DataFrame:
    """Per factor: the half-way step (best layer), the first step at READABLE accuracy, the x_t baseline's half-way
    step, and the last step's best accuracy and MI bound next to H(Y) and chance."""
    exclude = ab.baseline_of(record)
    rel = ab.relative_onsets(table, record["chance"], exclude=exclude)
    base = ab.relative_onsets(table[table["layer"].isin(exclude)], record["chance"])
    absolute = ab.readable_onsets(table, READABLE, exclude=exclude)
    last = max(record["steps"])
    rows = []
    for f, hit in rel.items():
        fin = table[(table["factor"] == f) & (table["step"] == last) & ~table["layer"].isin(exclude)]
        ci = record.get("onset_ci", {}).get(f)
        ci_text = (
            "–" if ci is None else ("[" + ", ".join("never" if not np.isfinite(v) else str(int(v)) for v in ci) + "]")
        )
        rows.append(
            {
                "factor": f,
                "half-way step (best layer)": hit["step"] if hit else "never",
                "95% CI": ci_text,
                "at layer": hit["layer"] if hit else "–",
                "x_t half-way step": _step(base.get(f)),
                f"first step >= {READABLE}": _step(absolute.get(f)),
                "best accuracy, last step": fin[fin["metric"] == "accuracy"]["value"].max(),
                "MI bound, last step (bits)": fin[fin["metric"] == "mi_bound"]["value"].max(),
                "H(Y) (bits)": record["entropy_bits"][f],
                "chance": record["chance"][f],
            }
        )
    return pd.DataFrame(rows)


def _step(hit: dict[str, Any] | None) -> Any:
    return hit["step"] if hit else "never"


def order_sentence(model: str, table: pd.DataFrame, record: dict[str, Any]) -> str:
    """The order in which factors become readable (half-way onsets), compared with the paper's, as found
    (``record``: the probe record, for the chance levels and the baseline)."""
    rel = ab.relative_onsets(table, record["chance"], exclude=ab.baseline_of(record))
    steps = {f: (h["step"] if h else np.inf) for f, h in rel.items()}
    groups: dict[float, list[str]] = {}
    for f, s in steps.items():
        groups.setdefault(s, []).append(f)
    order = [
        f"{', '.join(v)} (step {int(k)})" if np.isfinite(k) else f"{', '.join(v)} (never above chance)"
        for k, v in sorted(groups.items())
    ]
    text = (
        f"{model}: order in which the best layer's probe accuracy gets half-way from chance to its maximum: "
        + " < ".join(order)
    )
    if record.get("labels") is not None or not {"floor_hue", "wall_hue", "scale", "orientation"} <= set(steps):
        return text + "."  # the user's own factors: the paper's order is about the Shapes world's
    big = [steps.get("floor_hue", np.inf), steps.get("wall_hue", np.inf)]
    small = min(steps.get("scale", np.inf), steps.get("orientation", np.inf))
    if not np.isfinite(min(big)):
        text += ". Wall and floor hue never rise above chance, so the paper's order cannot be checked here."
    elif max(big) < small:
        text += (
            ". As Corallo et al. (2024) report, the factors of large spatial extent (wall and floor hue) become "
            "readable before scale and orientation."
        )
    elif min(big) < small:
        text += (
            ". Only partly the order Corallo et al. (2024) report: one of wall/floor hue becomes readable before "
            "scale and orientation, the other does not."
        )
    else:
        text += (
            ". This is not the order Corallo et al. (2024) report (large-extent factors first): scale or "
            "orientation becomes readable no later than wall and floor hue."
        )
    return text


def figures(result: Result, folder: Path) -> dict[str, Any]:
    """The figures of one run (the CLI writes them next to the tables): accuracy.png, mi_bound.png and heatmap.png
    for the probe grid, forking.png for forking."""
    spec = result.record["model"]
    figs: dict[str, Any] = {}
    if ab.PROBES in result.tables:
        table, record = result[ab.PROBES], result.record["probes"]
        figs["accuracy.png"] = curves_figure(table, record)
        figs["mi_bound.png"] = curves_figure(table, record, "mi_bound")
        figs["heatmap.png"] = heatmap_figure(table, spec)
    if ab.FORKS in result.tables:
        figs["forking.png"] = forking_figure(result[ab.FORKS], result.record["forking"])
    return figs


def console(result: Result) -> list[Any]:
    """What the CLI prints after a run: when each factor becomes readable and the order sentence (probes), when the
    generation commits to each factor and the forking sentence (forks)."""
    spec = result.record["model"]
    table = result.tables.get(ab.PROBES)
    record = result.record.get("probes")
    items: list[Any] = []
    if table is not None and record is not None:
        items.append((f"{spec}: when each factor becomes linearly readable", onset_table(table, record)))
        items.append(order_sentence(spec, table, record))
    if ab.FORKS in result.tables:
        ftable, frecord = result[ab.FORKS], result.record["forking"]
        items.append(
            (
                f"{spec}: when the generation commits to each factor (forking entropy)",
                commitment_table(ftable, frecord, table, record),
            )
        )
        half = _half_way(table, record) if table is not None and record is not None else {}
        items.append(
            forking_sentence(spec, frecord, {f: (h["step"] if h else None) for f, h in half.items()} if half else None)
        )
    return items


def render(run: SectionRun, page: Page) -> str:
    """The section's page fragment: the method, then per model the probe grid (facts, order sentence, curves,
    heatmap, onset table) and forking (facts, sentence, figure, commitment table), from the saved Results."""
    out = [
        page.p(
            "Corallo et al. (2024) read the latent factors off a diffusion model's internal features with linear probes "
            "over diffusion time and bound the mutual information between factor and features. Here: unconditional "
            "samples of each zoo model (empty prompt, no guidance), every layer's output pooled over space (conditional "
            "branch) at every step, plus the noisy sample x_t itself (a fixed random projection of the whole map) as "
            "the baseline; labels are the oracle's reading of the final image. One multinomial logistic regression per "
            "layer x step x factor, all solved together (layerscope.stats.probes), held-out accuracy on a quarter "
            "of the samples; MI bound = max(0, H(Y) - CE) in bits. Step 0 is the noisiest. Forking entropy: "
            "unconditional starts (as the probes') run to step tau and forked there into continuations with fresh "
            "sampler noise (DDIM with eta=1, DDPM-like; the forks share the initial noise and every step before tau); "
            "the oracle reads each ending, and per factor the plug-in entropy (bits) of its readings across the forks "
            "of one start is averaged over starts (95% bootstrap CI). A factor is committed from the first tau after "
            f"which the mean entropy stays at or below {ab.COMMIT_BITS:g} bit (fixed beforehand: with 8 forks, one "
            "dissenting fork is 0.54 bit); the relative criterion asks for half the tau-0 value. Plug-in entropy over "
            "few forks is biased low and is at most log2(forks)."
        )
    ]
    for job, result in run.results():
        sub = run.folder / job["folder"]
        spec = result.record["model"]
        out.append(f"<h3>{page.esc(spec)}</h3>")
        table, record = result.tables.get(ab.PROBES), result.record.get("probes")
        if table is not None and record is not None:
            out.append(
                _render_probes(spec, table, record, probes_command(spec, job["settings"], f"probes-{sub.name}"), page)
            )
        if ab.FORKS in result.tables:
            out.append(
                _render_forks(
                    spec,
                    result[ab.FORKS],
                    result.record["forking"],
                    table,
                    record,
                    forks_command(spec, job["settings"], f"forks-{sub.name}"),
                    page,
                )
            )
    return "".join(out)


def _render_probes(spec: str, table: pd.DataFrame, record: dict[str, Any], cmd: str, page: Page) -> str:
    """One model's probe grid: the facts, the order sentence, the curves, the heatmap and the onset table."""
    out = []
    conf = ", ".join(f"{k} {v:.2f}" for k, v in record.get("oracle_confidence", {}).items())
    if conf:
        conf = (
            f"; oracle mean confidence on the final images: {conf}; {100 * record['in_distribution']:.0f}% of "
            "them confident on every factor"
        )
    out.append(
        page.p(
            f"{record['samples']} samples, {len(record['steps'])} steps, "
            f"{len(record['layers'])} feature sets{conf}. Probe fit: "
            f"{record['fit_seconds']:.1f} s for the whole grid."
        )
    )
    out.append(page.finding(order_sentence(spec, table, record)))
    out.append(
        page.figure(
            curves_figure(table, record),
            f"{spec}: held-out probe accuracy vs step, best layer per step (solid) and the x_t baseline (dashed).",
            cmd,
        )
    )
    out.append(
        page.figure(
            curves_figure(table, record, "mi_bound"),
            f"{spec}: mutual-information lower bound vs step (bits), best layer per step; dotted: H(Y).",
            cmd,
        )
    )
    out.append(page.figure(heatmap_figure(table, spec), f"{spec}: held-out accuracy per layer x step.", cmd))
    out.append(page.table(onset_table(table, record), f"{spec}: when each factor becomes readable"))
    return "".join(out)


def _render_forks(
    spec: str,
    ftable: pd.DataFrame,
    frecord: dict[str, Any],
    table: pd.DataFrame | None,
    record: dict[str, Any] | None,
    cmd: str,
    page: Page,
) -> str:
    """One model's forking: the facts, the sentence (with the probes' order, when probed), the figure and the
    commitment table."""
    half = _half_way(table, record) if table is not None and record is not None else {}
    out = [
        page.p(
            f"Forking: {frecord['starts']} unconditional starts x {frecord['forks']} forks at each of "
            f"{len(frecord['taus'])} steps ({frecord['generations']} generations, "
            f"{frecord['generate_seconds']:.1f} s, {1000 * frecord['seconds_per_generation']:.0f} ms each)."
        )
    ]
    out.append(
        page.finding(
            forking_sentence(spec, frecord, {f: (h["step"] if h else None) for f, h in half.items()} if half else None)
        )
    )
    out.append(
        page.figure(
            forking_figure(ftable, frecord),
            f"{spec}: mean entropy of the oracle's readings "
            "across forks vs the fork step tau, with 95% bootstrap CIs over starts (left, bits; "
            "dashed: the commitment threshold; triangles: commitment times) and normalised by "
            "log2(number of values) (right).",
            cmd,
        )
    )
    out.append(
        page.table(
            commitment_table(ftable, frecord, table, record),
            f"{spec}: when the generation commits to each factor (forking)"
            + (" and when the probes read it half-way" if half else ""),
        )
    )
    return "".join(out)
