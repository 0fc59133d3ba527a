"""Figures of the probe grid and its section of the main job's report (run on the zoo's diffusion models)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..report import Page, RunContext, Section, model_folders, register, section_record
from . import abstractions as ab

# forking: fork_prompts unconditional starts x forks continuations at every tau (DDIM eta=1), same steps as the probes
FULL = dict(models=("zoo:unet", "zoo:dit"), n=320, steps=10, fork_prompts=12, forks=8, taus=tuple(range(9)))
QUICK = dict(models=("zoo:unet", "zoo:dit"), n=64, steps=4, fork_prompts=3, forks=4, taus=(0, 1, 2))
RECORD = "probes.json"
FORK_RECORD = "forks.json"
READABLE = 0.9


def probes_command(spec: str, settings: dict[str, Any], out: str) -> str:
    return f"layerscope abstractions {spec} --n {settings['n']} --steps {settings['steps']} --out {out}"


def forks_command(spec: str, settings: dict[str, Any], out: str) -> str:
    taus = ",".join(str(t) for t in settings["taus"])
    return (f"layerscope abstractions {spec} --no-probes --forks {settings['forks']} --fork-prompts "
            f"{settings['fork_prompts']} --taus {taus} --steps {settings['steps']} --out {out}")


def save(folder: Path, table: pd.DataFrame, record: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    table.to_parquet(folder / ab.TABLE, index=False)
    (folder / RECORD).write_text(json.dumps(record, indent=1))


def load(folder: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    return pd.read_parquet(folder / ab.TABLE), json.loads((folder / RECORD).read_text())


def save_forks(folder: Path, table: pd.DataFrame, record: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    table.to_parquet(folder / ab.FORK_TABLE, index=False)
    (folder / FORK_RECORD).write_text(json.dumps(record, indent=1))


def load_forks(folder: Path) -> tuple[pd.DataFrame, dict[str, Any]] | None:
    if not (folder / ab.FORK_TABLE).exists():
        return None
    return pd.read_parquet(folder / ab.FORK_TABLE), json.loads((folder / FORK_RECORD).read_text())


def forking_figure(table: pd.DataFrame, record: dict[str, Any]):
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


def commitment_table(table: pd.DataFrame, record: dict[str, Any], probes: pd.DataFrame | None = None,
                     chance: dict[str, float] | None = None) -> pd.DataFrame:
    """Per factor: commitment tau (absolute and relative criteria), mean entropy at the first and last tau with CI,
    and, when the probe table is given, the probes' half-way step."""
    summary = ab.entropy_summary(table)
    first, last = min(record["taus"]), max(record["taus"])
    absolute = ab.commitment_times(summary, record["threshold_bits"])
    relative = ab.commitment_times(summary, fraction=record["fraction"])
    half = ab.relative_onsets(probes, chance) if probes is not None and chance is not None else {}
    rows = []
    for f in absolute:
        at = summary[summary["factor"] == f].set_index("tau")
        row = {"factor": f,
               f"committed (<= {record['threshold_bits']:g} bit)": "never" if absolute[f] is None else absolute[f],
               f"committed (<= {record['fraction']:g} x tau {first})": "never" if relative[f] is None else relative[f],
               f"entropy at tau {first} (bits)": f"{at.loc[first, 'entropy']:.2f} [{at.loc[first, 'low']:.2f}, "
                                                 f"{at.loc[first, 'high']:.2f}]",
               f"entropy at tau {last} (bits)": f"{at.loc[last, 'entropy']:.2f}",
               "max (bits)": record["max_bits"][f]}
        if half:
            row["probe half-way step"] = half[f]["step"] if half.get(f) else "never"
        rows.append(row)
    return pd.DataFrame(rows)


def _order(times: dict[str, Any]) -> str:
    groups: dict[float, list[str]] = {}
    for f, t in times.items():
        groups.setdefault(np.inf if t is None else t, []).append(f)
    return " < ".join(f"{', '.join(v)} ({'never' if not np.isfinite(k) else int(k)})" for k, v in sorted(groups.items()))


def forking_sentence(model: str, record: dict[str, Any], probe_steps: dict[str, Any] | None = None) -> str:
    """The order in which the forks commit, compared with the probes' order and with the paper's, as found."""
    commit = record["commitment"]
    t = {f: (np.inf if v is None else v) for f, v in commit.items()}
    text = (f"{model}: order of commitment (mean fork entropy at or below {record['threshold_bits']:g} bit from that "
            f"tau on): {_order(commit)}.")
    hues = max(t["floor_hue"], t["wall_hue"])
    late = min(t["scale"], t["orientation"])
    mid_before = [f for f in ("object_hue", "shape") if t[f] < late]
    mid_not = [f for f in ("object_hue", "shape") if t[f] >= late]
    if hues < late and not mid_not:
        text += (" As Corallo et al. (2024) report, wall/floor hue, object hue and shape commit before scale and "
                 "orientation")
        text += "." if hues <= min(t["object_hue"], t["shape"]) else \
            ", though not all of the large-extent hues before object hue and shape."
    elif hues < late:
        text += (" Partly the paper's order: wall and floor hue commit before scale and orientation"
                 + (f", and so does {mid_before[0]}" if mid_before else "")
                 + f", but {' and '.join(mid_not)} {'does' if len(mid_not) == 1 else 'do'} not.")
    else:
        text += (" Not the paper's order (large-extent hues first, scale and orientation last): scale or orientation "
                 "commits no later than wall and floor hue.")
    if probe_steps:
        p = {f: (np.inf if probe_steps.get(f) is None else probe_steps[f]) for f in commit}
        pairs = [(a, b) for i, a in enumerate(commit) for b in list(commit)[i + 1:]
                 if t[a] != t[b] and p[a] != p[b]]
        same = sum((t[a] < t[b]) == (p[a] < p[b]) for a, b in pairs)
        text += (f" Probe-readable order (half-way steps): {_order(probe_steps)}; of the {len(pairs)} factor pairs "
                 f"that both orders separate, {same} are in the same order.")
        later = [f for f in commit if np.isfinite(p[f]) and t[f] < p[f]]
        if later:
            text += f" Committed before the probes read it half-way: {', '.join(later)}."
    return text


def curves_figure(table: pd.DataFrame, record: dict[str, Any], metric: str = "accuracy"):
    """Per factor, the best layer's held-out ``metric`` at each step (solid; accuracy with the best cell's 95%
    bootstrap CI as a band) and the x_t baseline (dashed)."""
    import matplotlib.pyplot as plt

    factors = list(dict.fromkeys(table["factor"]))
    fig, axes = plt.subplots(1, len(factors), figsize=(2.3 * len(factors), 2.6), sharey=metric == "accuracy",
                             squeeze=False)
    for ax, f in zip(axes[0], factors):
        t = table[(table["factor"] == f) & (table["metric"] == metric)]
        layers = t[t["layer"] != ab.BASELINE]
        best = layers.groupby("step")["value"].max()
        ax.plot(best.index, best.values, "o-", ms=3, label="best layer")
        if metric == "accuracy" and "accuracy_low" in set(table["metric"]):  # the best cell's 95% bootstrap CI
            top = layers.loc[layers.groupby("step")["value"].idxmax(), ["layer", "step"]]
            ci = table[(table["factor"] == f) & table["metric"].isin(["accuracy_low", "accuracy_high"])]
            ci = ci.pivot_table(index=["layer", "step"], columns="metric", values="value")
            band = ci.reindex(pd.MultiIndex.from_frame(top)).reset_index().sort_values("step")
            ax.fill_between(band["step"], band["accuracy_low"], band["accuracy_high"], alpha=0.25, lw=0)
        base = t[t["layer"] == ab.BASELINE].sort_values("step")
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


def heatmap_figure(table: pd.DataFrame, model: str):
    """Held-out accuracy per layer x step, one panel per factor."""
    from ..report.figures import heatmaps

    t = table[table["metric"] == "accuracy"]
    layers = list(t.sort_values("layer_index", kind="stable")["layer"].drop_duplicates())
    steps = sorted(t["step"].unique())
    panels = [(f, t[t["factor"] == f].pivot(index="layer", columns="step", values="value")
               .reindex(index=layers, columns=steps).to_numpy()) for f in dict.fromkeys(t["factor"])]
    return heatmaps(panels, layers, [str(s) for s in steps], cbar_label="held-out accuracy",
                    title=f"{model}: linear-probe accuracy per layer (rows) x step (columns)")


def onset_table(table: pd.DataFrame, record: dict[str, Any]) -> pd.DataFrame:
    """Per factor: the half-way step (best layer), the first step at READABLE accuracy, the x_t baseline's half-way
    step, and the last step's best accuracy and MI bound next to H(Y) and chance."""
    rel = ab.relative_onsets(table, record["chance"])
    base = ab.relative_onsets(table[table["layer"] == ab.BASELINE], record["chance"], exclude=())
    absolute = ab.readable_onsets(table, READABLE)
    last = max(record["steps"])
    rows = []
    for f, hit in rel.items():
        fin = table[(table["factor"] == f) & (table["step"] == last) & (table["layer"] != ab.BASELINE)]
        ci = record.get("onset_ci", {}).get(f)
        ci_text = "–" if ci is None else (
            "[" + ", ".join("never" if not np.isfinite(v) else str(int(v)) for v in ci) + "]")
        rows.append({"factor": f, "half-way step (best layer)": hit["step"] if hit else "never",
                     "95% CI": ci_text,
                     "at layer": hit["layer"] if hit else "–",
                     "x_t half-way step": base[f]["step"] if base.get(f) else "never",
                     f"first step >= {READABLE}": absolute[f]["step"] if absolute.get(f) else "never",
                     "best accuracy, last step": fin[fin["metric"] == "accuracy"]["value"].max(),
                     "MI bound, last step (bits)": fin[fin["metric"] == "mi_bound"]["value"].max(),
                     "H(Y) (bits)": record["entropy_bits"][f], "chance": record["chance"][f]})
    return pd.DataFrame(rows)


def order_sentence(model: str, table: pd.DataFrame, chance: dict[str, float]) -> str:
    """The order in which factors become readable (half-way onsets), compared with the paper's, as found."""
    rel = ab.relative_onsets(table, chance)
    steps = {f: (h["step"] if h else np.inf) for f, h in rel.items()}
    groups: dict[float, list[str]] = {}
    for f, s in steps.items():
        groups.setdefault(s, []).append(f)
    order = [f"{', '.join(v)} (step {int(k)})" if np.isfinite(k) else f"{', '.join(v)} (never above chance)"
             for k, v in sorted(groups.items())]
    text = (f"{model}: order in which the best layer's probe accuracy gets half-way from chance to its maximum: "
            + " < ".join(order))
    big = [steps.get("floor_hue", np.inf), steps.get("wall_hue", np.inf)]
    small = min(steps.get("scale", np.inf), steps.get("orientation", np.inf))
    if not np.isfinite(min(big)):
        text += ". Wall and floor hue never rise above chance, so the paper's order cannot be checked here."
    elif max(big) < small:
        text += (". As Corallo et al. (2024) report, the factors of large spatial extent (wall and floor hue) become "
                 "readable before scale and orientation.")
    elif min(big) < small:
        text += (". Only partly the order Corallo et al. (2024) report: one of wall/floor hue becomes readable before "
                 "scale and orientation, the other does not.")
    else:
        text += (". This is not the order Corallo et al. (2024) report (large-extent factors first): scale or "
                 "orientation becomes readable no later than wall and floor hue.")
    return text


def _run(ctx: RunContext) -> dict[str, Any]:
    from ..loading import load as load_model

    st = QUICK if ctx.quick else FULL
    info: dict[str, Any] = {"settings": {k: list(v) if isinstance(v, tuple) else v for k, v in st.items()},
                            "per_model": {}}
    for spec in st["models"]:
        model = load_model(spec)
        ctx.log(f"probe grid on {spec}: {st['n']} unconditional samples x {st['steps']} steps")
        table, record = ab.run_probes(model, n=st["n"], progress=ctx.progress, num_inference_steps=st["steps"])
        folder = ctx.folder / spec.replace(":", "_")
        save(folder, table, record)
        ctx.log(f"forking on {spec}: {st['fork_prompts']} unconditional starts x {st['forks']} forks x "
                f"{len(st['taus'])} steps")
        t0 = time.perf_counter()
        ftable, frecord = ab.run_forking(model, st["fork_prompts"], st["forks"], st["taus"], progress=ctx.progress,
                                         num_inference_steps=st["steps"])
        save_forks(folder, ftable, frecord)
        ctx.models.append(spec)
        info["per_model"][spec] = {"folder": folder.name, "fit_seconds": record["fit_seconds"],
                                   "fork_seconds": time.perf_counter() - t0}
    return info


def _render(folder: Path, page: Page) -> str:
    record_all = section_record(folder)
    settings = record_all.get("settings", FULL)
    out = [page.p(
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
        "few forks is biased low and is at most log2(forks).")]
    subs = model_folders(folder, record_all, ab.TABLE)
    for sub in subs:
        table, record = load(sub)
        spec = str(table["model"].iloc[0])
        cmd = probes_command(spec, settings, f"probes-{sub.name}")
        out.append(f"<h3>{page.esc(spec)}</h3>")
        conf = ", ".join(f"{k} {v:.2f}" for k, v in record["oracle_confidence"].items())
        out.append(page.p(f"{record['samples']} samples, {len(record['steps'])} steps, "
                          f"{len(record['layers'])} feature sets; oracle mean confidence on the final images: {conf}; "
                          f"{100 * record['in_distribution']:.0f}% of them confident on every factor. Probe fit: "
                          f"{record['fit_seconds']:.1f} s for the whole grid."))
        out.append(page.finding(order_sentence(spec, table, record["chance"])))
        out.append(page.figure(curves_figure(table, record), f"{spec}: held-out probe accuracy vs step, best layer "
                               "per step (solid) and the x_t baseline (dashed).", cmd))
        out.append(page.figure(curves_figure(table, record, "mi_bound"), f"{spec}: mutual-information lower bound "
                               "vs step (bits), best layer per step; dotted: H(Y).", cmd))
        out.append(page.figure(heatmap_figure(table, spec), f"{spec}: held-out accuracy per layer x step.", cmd))
        out.append(page.table(onset_table(table, record), f"{spec}: when each factor becomes readable"))
        forks = load_forks(sub)
        if forks is None:
            continue
        ftable, frecord = forks
        fcmd = forks_command(spec, settings if "forks" in settings else FULL, f"forks-{sub.name}")
        half = ab.relative_onsets(table, record["chance"])
        out.append(page.p(
            f"Forking: {frecord['starts']} unconditional starts x {frecord['forks']} forks at each of "
            f"{len(frecord['taus'])} steps ({frecord['generations']} generations, "
            f"{frecord['generate_seconds']:.1f} s, {1000 * frecord['seconds_per_generation']:.0f} ms each)."))
        out.append(page.finding(forking_sentence(spec, frecord, {f: (h["step"] if h else None)
                                                                  for f, h in half.items()})))
        out.append(page.figure(forking_figure(ftable, frecord), f"{spec}: mean entropy of the oracle's readings "
                               "across forks vs the fork step tau, with 95% bootstrap CIs over starts (left, bits; "
                               "dashed: the commitment threshold; triangles: commitment times) and normalised by "
                               "log2(number of values) (right).", fcmd))
        out.append(page.table(commitment_table(ftable, frecord, table, record["chance"]),
                              f"{spec}: when the generation commits to each factor (forking) and when the probes "
                              "read it half-way"))
    return "".join(out)


@register
def _section() -> Section:
    return Section("abstractions", "Latent abstractions over diffusion time: linear probes, the MI bound and "
                   "forking entropy",
                   _run, _render)
