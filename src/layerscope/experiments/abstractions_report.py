"""Figures of the probe grid and its section of the main job's report (run on the zoo's diffusion models)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..report import Page, RunContext, Section, model_folders, register, section_record
from . import abstractions as ab

FULL = dict(models=("zoo:unet", "zoo:dit"), n=320, steps=10)
QUICK = dict(models=("zoo:unet", "zoo:dit"), n=64, steps=4)
RECORD = "probes.json"
READABLE = 0.9


def probes_command(spec: str, settings: dict[str, Any], out: str) -> str:
    return f"layerscope abstractions {spec} --n {settings['n']} --steps {settings['steps']} --out {out}"


def save(folder: Path, table: pd.DataFrame, record: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    table.to_parquet(folder / ab.TABLE, index=False)
    (folder / RECORD).write_text(json.dumps(record, indent=1))


def load(folder: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    return pd.read_parquet(folder / ab.TABLE), json.loads((folder / RECORD).read_text())


def curves_figure(table: pd.DataFrame, record: dict[str, Any], metric: str = "accuracy"):
    """Per factor, the best layer's held-out ``metric`` at each step (solid) and the x_t baseline (dashed)."""
    import matplotlib.pyplot as plt

    factors = list(dict.fromkeys(table["factor"]))
    fig, axes = plt.subplots(1, len(factors), figsize=(2.3 * len(factors), 2.6), sharey=metric == "accuracy",
                             squeeze=False)
    for ax, f in zip(axes[0], factors):
        t = table[(table["factor"] == f) & (table["metric"] == metric)]
        layers = t[t["layer"] != ab.BASELINE]
        best = layers.groupby("step")["value"].max()
        ax.plot(best.index, best.values, "o-", ms=3, label="best layer")
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
        rows.append({"factor": f, "half-way step (best layer)": hit["step"] if hit else "never",
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
    from ..specs import load as load_model

    st = QUICK if ctx.quick else FULL
    info: dict[str, Any] = {"settings": {k: list(v) if isinstance(v, tuple) else v for k, v in st.items()},
                            "per_model": {}}
    for spec in st["models"]:
        model = load_model(spec)
        ctx.log(f"probe grid on {spec}: {st['n']} unconditional samples x {st['steps']} steps")
        table, record = ab.run_probes(model, n=st["n"], progress=ctx.progress, num_inference_steps=st["steps"])
        folder = ctx.folder / spec.replace(":", "_")
        save(folder, table, record)
        ctx.models.append(spec)
        info["per_model"][spec] = {"folder": folder.name, "fit_seconds": record["fit_seconds"]}
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
        "layer x step x factor, all solved together (layerscope.experiments.probes), held-out accuracy on a quarter "
        "of the samples; MI bound = max(0, H(Y) - CE) in bits. Step 0 is the noisiest."),
        page.note("Forking entropy (the third measure of the issue) is not implemented yet: this section shows "
                  "linear readability and the MI bound only.")]
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
    return "".join(out)


@register
def _section() -> Section:
    return Section("abstractions", "Latent abstractions over diffusion time: linear probes and the MI bound",
                   _run, _render)
