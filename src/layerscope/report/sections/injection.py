"""The injection study's section of the report: figures, tables and findings from its saved Results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ...engine import WINDOWS
from ...errors import LayerscopeError
from ...experiments import injection as inj
from ...experiments.base import Result
from .. import Page, SectionRun
from ..commands import size_flags

EXPERIMENT = inj
KEY = "injection"
TITLE = "Injection sweep: where structure, content and surface live"
GROUP_ORDER = ("structure", "content", "surface")


def sweep_command(spec: str, settings: dict[str, Any], out: str) -> str:
    """The CLI command that reproduces a main-job sweep (table, figures) into ``out``."""
    parts = [f"layerscope sweep {spec} --random-pairs {settings['random_pairs']}"]
    if settings.get("named"):
        lo, hi = settings["named"]
        parts.append(f"--named {lo}-{hi}")
    seeds = settings.get("seeds") or [0]
    if list(seeds) != [0]:
        parts.append(f"--seeds {','.join(str(s) for s in seeds)}")
    if settings.get("e_seeds"):
        parts.append(f"--e-seeds {','.join(str(s) for s in settings['e_seeds'])}")
    if settings.get("seed_per_pair"):
        parts.append("--seed-per-pair")
    layers = settings.get("layers")
    if isinstance(layers, str):
        parts.append(f"-l '{layers}'")
    elif layers:
        for entry in layers:
            if isinstance(entry, str):
                parts.append(f"-l '{entry}'")
            else:
                parts.append(f"--combine '{','.join(entry)}'")
    if settings.get("spaces"):
        parts.append("--spaces")
    if settings.get("with_pooled"):
        parts.append("--with-pooled")
    parts.append(f"--windows {','.join(settings['windows'])}")
    if settings.get("steps"):
        parts.append(f"--steps {settings['steps']}")
    if settings.get("guidance") is not None:
        parts.append(f"--guidance {settings['guidance']}")
    if size_flags(settings):
        parts.append(size_flags(settings).strip())
    return " ".join([*parts, f"--out {out}"])


def protocol(settings: dict[str, Any]) -> str:
    """How a sweep's pairs were made, in words."""
    named, e_seeds = settings.get("named"), settings.get("e_seeds")
    prompts = (
        f"partial prompts naming {named[0]}-{named[1]} factors (the same ones in O and E, with different values)"
        if named
        else "full prompts that differ in all six factors"
    )
    seeds = "E on its own seed, so the noise decides what the prompts leave open" if e_seeds else "a shared seed"
    if settings.get("seed_per_pair"):
        seeds += ", new seeds for every pair"
    return f"{prompts}, {seeds}"


def _layer_order(summary: pd.DataFrame) -> list[str]:
    return list(summary.sort_values("layer_index", kind="stable")["layer"].drop_duplicates())


def _windows(frame: pd.DataFrame) -> list[str]:
    """The windows present, in the order all, early, middle, late."""
    present = set(frame["window"])
    return [w for w in WINDOWS if w in present]


def grid_figure(folder: Path, plan: dict[str, Any], pairs: int = 3, window: str = "all"):
    """Layer grid: per pair, O, E and the image injected at each layer in architectural order (from the cell
    images saved in ``folder``; ``plan``: the result's ``record["plan"]``)."""
    from ..figures import image_grid

    rows, labels = [], []
    for p in range(min(pairs, len(plan["pairs"]))):
        seed, e_seed = inj.seed_pairs(plan, p)[0]
        try:
            imgs, names = inj.load_images(folder, p, seed, window, e_seed)
        except (FileNotFoundError, LayerscopeError):  # a cell not finished (or damaged): left out
            continue
        rows.append((f"pair {p}", imgs))
        labels = names
    if not rows:
        return None
    return image_grid(rows, labels, title=f"{plan['model']}: O, E and O<-E injected at each layer ({window} steps)")


def heatmap_figure(summary: pd.DataFrame, labels: pd.DataFrame, model: str, level: str = "group"):
    """Transfer share per layer x factor group (or factor), one panel per step window; labels beside the rows."""
    from ..figures import heatmaps

    s = summary[(summary["level"] == level) & (summary["metric"] == "transfer")]
    if s.empty:
        return None
    layers = _layer_order(summary)
    cols = list(GROUP_ORDER) if level == "group" else list(dict.fromkeys(s["target"]))
    panels = []
    for w in _windows(s):
        piv = s[s["window"] == w].pivot(index="layer", columns="target", values="estimate")
        panels.append((f"{w} steps", piv.reindex(index=layers, columns=cols).to_numpy()))
    notes = None
    lab = labels[labels["window"] == "all"] if "all" in set(labels["window"]) else labels
    if not lab.empty:
        m = dict(zip(lab["layer"], lab["label"]))
        notes = [m.get(layer, "") for layer in layers]
    what = "factor group" if level == "group" else "factor"
    return heatmaps(
        panels,
        layers,
        cols,
        row_notes=notes,
        cbar_label="transfer (share of pairs showing E's value)",
        title=f"{model}: transfer of E's {what} into O, per layer and step window",
    )


def metric_heatmap_figure(summary: pd.DataFrame, labels: pd.DataFrame, model: str):
    """Open-domain metrics: median baseline-subtracted similarity to E per layer x metric, per window."""
    from ..figures import heatmaps

    s = summary[(summary["level"] == "metric") & summary["metric"].str.endswith("_to_E")]
    if s.empty:
        return None
    layers = _layer_order(summary)
    cols = list(dict.fromkeys(s["target"]))
    panels = [
        (
            f"{w} steps",
            s[s["window"] == w]
            .pivot(index="layer", columns="target", values="estimate")
            .reindex(index=layers, columns=cols)
            .to_numpy(),
        )
        for w in _windows(s)
    ]
    lab = labels[labels["window"] == "all"]
    notes = [dict(zip(lab["layer"], lab["label"])).get(x, "") for x in layers] if not lab.empty else None
    vmax = float(np.nanmax([np.nanmax(p) for _, p in panels] + [1e-6]))
    return heatmaps(
        panels,
        layers,
        cols,
        vmax=vmax,
        row_notes=notes,
        cbar_label="max(0, m(C,E) - m(O,E)), median",
        title=f"{model}: similarity of the injected image to E (baseline-subtracted)",
    )


def transfer_table(summary: pd.DataFrame, labels: pd.DataFrame, window: str = "all") -> pd.DataFrame:
    """Per layer: transfer per group with its 95% CI, and the label (one window)."""
    s = summary[(summary["level"] == "group") & (summary["metric"] == "transfer") & (summary["window"] == window)]
    out = pd.DataFrame({"layer": _layer_order(summary)})
    for g in GROUP_ORDER:
        sub = s[s["target"] == g].set_index("layer")
        out[g] = [
            f"{sub.at[x, 'estimate']:.2f} [{sub.at[x, 'ci_low']:.2f}, {sub.at[x, 'ci_high']:.2f}]"
            if x in sub.index and not np.isnan(sub.at[x, "estimate"])
            else "–"
            for x in out["layer"]
        ]
    lab = labels[labels["window"] == window].set_index("layer")["label"]
    out["label"] = [lab.get(x, "") for x in out["layer"]]
    return out


ONSET = 0.5


def onsets(summary: pd.DataFrame, window: str = "all") -> dict[str, str | None]:
    """Per factor group, the first layer in forward order whose transfer reaches ``ONSET`` (None if none does)."""
    s = summary[(summary["level"] == "group") & (summary["metric"] == "transfer") & (summary["window"] == window)]
    s = s.sort_values("layer_index", kind="stable")
    out: dict[str, str | None] = {}
    for g in GROUP_ORDER:
        hit = s[(s["target"] == g) & (s["estimate"] >= ONSET)]
        out[g] = str(hit["layer"].iloc[0]) if len(hit) else None
    return out


def findings(model: str, labels: pd.DataFrame, window: str = "all", summary: pd.DataFrame | None = None) -> str:
    """What the labels show, in a sentence or two, compared with the paper's three-way split (as found).

    With ``summary``, also where each group first transfers (:func:`onsets`): a layer order the labels alone hide
    when one layer carries two groups."""
    lab = labels[labels["window"] == window]
    by = {k: list(lab[lab["label"] == k]["layer"]) for k in inj.LABELS}
    parts = [f"{k}: {', '.join(v)}" for k, v in by.items() if v and k != "inert"]
    n_inert = len(by["inert"])
    found = [g for g in GROUP_ORDER if by[g]]
    missing = [g for g in GROUP_ORDER if not by[g]]
    text = (
        f"{model} ({window} steps): "
        + ("; ".join(parts) if parts else "no layer moves any factor group")
        + f"; {n_inert} inert layer(s). "
    )
    if not missing:
        text += (
            "Every group of the paper's three-way split (structure, content, surface) has at least one layer "
            "specialised in it, as Schaerf (2025) reports for large diffusion models."
        )
    elif found:
        text += (
            f"Only {', '.join(found)} {'has' if len(found) == 1 else 'have'} a specialised layer; no layer "
            f"specialises in {', '.join(missing)}, so this model does not show the paper's three-way split."
        )
    else:
        text += (
            "No layer specialises in one group: this model does not show the paper's three-way split at this window."
        )
    if summary is not None:
        first = onsets(summary, window)
        hits = [f"{g} at {layer}" for g, layer in first.items() if layer]
        if hits:
            text += (
                f" In forward order, each group's transfer first reaches {ONSET}: "
                + ", ".join(hits)
                + "".join(f"; {g} never does" for g, layer in first.items() if not layer)
                + "."
            )
    return text


def figures(result: Result, folder: Path) -> dict[str, Any]:
    """The figures of one sweep (the CLI writes them next to the tables): layer grid and heatmaps."""
    summary, labels, spec = result["summary"], result["labels"], result.record["model"]
    figs = {
        "grid.png": grid_figure(folder, result.record["plan"]),
        "transfer_groups.png": heatmap_figure(summary, labels, spec),
        "transfer_factors.png": heatmap_figure(summary, labels, spec, level="factor"),
        "metrics.png": metric_heatmap_figure(summary, labels, spec),
    }
    return {k: v for k, v in figs.items() if v is not None}


def console(result: Result) -> list[Any]:
    """What the CLI prints after a sweep: the per-layer labels and, with the oracle, the findings per window."""
    labels, spec = result["labels"], result.record["model"]
    cols = [c for c in labels.columns if c.startswith("transfer_")]
    frame = pd.DataFrame(
        {
            "window": labels["window"],
            "layer": labels["layer"],
            **{c.replace("transfer_", ""): [f"{v:.2f}" if v == v else "-" for v in labels[c]] for c in cols},
            "label": labels["label"],
        }
    )
    items: list[Any] = [(f"{spec}: per-layer specialization (transfer of E into O)", frame)]
    if result.record["plan"]["scorer"] == "oracle":
        items += [findings(spec, labels, window=w, summary=result["summary"]) for w in result.record["plan"]["windows"]]
    return items


def render(run: SectionRun, page: Page) -> str:
    out = [
        page.p(
            "Schaerf (2025) generates an original O and an edit E in parallel and puts E's representation at one layer "
            "into O's generation at every step of a window; what moves tells what the layer carries. Here O and E are "
            "Shapes-world prompts (each model's heading says how its pairs were made), and the oracle reads O, E and "
            "every injected image C. "
            "Transfer of a factor = share of pairs in which C shows E's value (pairs where the oracle reads the same "
            "value in O and E are left out). Groups: structure/composition = scale, orientation; content = shape; "
            "surface/colour = object, floor and wall hue (a group's transfer averages its factors per pair). CIs: "
            "percentile bootstrap over pairs, 95%."
        ),
        page.p(
            f"Label rule (fixed in code before any result, layerscope.experiments.injection.label): inert when "
            f"no group's transfer reaches {inj.INERT_BELOW}; otherwise the strongest group when it leads the "
            f"second by at least {inj.MARGIN}; otherwise mixed (several groups move together, including layers "
            f"that move everything)."
        ),
    ]
    for job, result in run.results():
        sub = run.folder / job["folder"]
        summary, labels = result["summary"], result["labels"]
        spec = result.record["model"]
        cmd = sweep_command(spec, job["settings"], f"sweep-{sub.name}")
        out.append(f"<h3>{page.esc(spec)}: {page.esc(protocol(job['settings']))}</h3>")
        s = result.record.get("sanity")
        if s is not None:
            ok = s["no_layer_vs_O"] < 1e-5 and s["every_layer_vs_E"] < 1e-4
            out.append(
                page.p(
                    f"Sanity ({'passed' if ok else 'FAILED'}): the O row of the batched sweep differs from a plain "
                    f"generation of O (in a batch laid out as the sweep's) by at most {s['no_layer_vs_O']:.2g}; "
                    "injecting E at every layer and space from "
                    f"step 0 differs from E by at most {s['every_layer_vs_E']:.2g} (O and E differ by up to "
                    f"{s['O_vs_E']:.2f})."
                )
            )
        out.append(page.finding(findings(spec, labels, summary=summary)))
        g = grid_figure(sub, result.record["plan"])
        if g is not None:
            out.append(
                page.figure(
                    g,
                    f"{spec}: layer grid, pairs 0-2, injection at all steps. Columns: O, E, then "
                    "O with E injected at each layer (architectural order, spaces last).",
                    cmd,
                )
            )
        h = heatmap_figure(summary, labels, spec)
        if h is not None:
            out.append(
                page.figure(
                    h,
                    f"{spec}: transfer share per layer x factor group, one panel per step window "
                    "(labels of the all-steps window on the right).",
                    cmd,
                )
            )
        hf = heatmap_figure(summary, labels, spec, level="factor")
        if hf is not None:
            out.append(page.figure(hf, f"{spec}: transfer share per layer x factor.", cmd))
        out.append(
            page.table(
                transfer_table(summary, labels),
                f"{spec}: transfer per layer (all steps), estimate [95% CI], n = "
                f"{int(summary['n'].max())} pairs per cell at most",
            )
        )
        ci = inj.ci_check(summary)
        if ci["shares_in_range"]:
            out.append(
                page.p(
                    f"Confidence: {ci['shares_in_range']} group transfers lie between {inj.SHARE_RANGE[0]} and "
                    f"{inj.SHARE_RANGE[1]}; the widest 95% CI among them has half-width {ci['max_half_width']:.3f} "
                    f"(at {ci['at']}), {'within' if ci['within'] else 'above'} the target of {inj.CI_HALF_WIDTH}, with "
                    f"{ci['pairs']} pairs."
                )
            )
        for w in [w for w in job["settings"].get("windows", []) if w != "all"]:
            out.append(page.finding(findings(spec, labels, window=w, summary=summary)))
    side = anchors_table(run.results())
    if side is not None:
        out.append(
            page.table(
                side,
                "Stable Diffusion 1.4 anchors beside the same-named layers of the models built in its layout, "
                "all steps, transfer per group [95% CI] and label, per model and pair protocol. The attention entries "
                "are whole transformer blocks (self- and cross-attention and feed-forward), not PnP's self-attention "
                "queries and keys alone.",
            )
        )
    return "".join(out)


def anchors_table(results: list[tuple[dict[str, Any], Any]]) -> pd.DataFrame | None:
    """One row per SD 1.4 anchor layer, one column per (model, protocol) that has it (None when none has)."""
    cols: dict[str, pd.DataFrame] = {}
    for job, result in results:
        a = inj.anchors(result["summary"], result["labels"])
        if len(a):
            cols[f"{result.record['model']} ({'partial' if job['settings'].get('named') else 'full'} prompts)"] = a
    if not cols:
        return None
    first = next(iter(cols.values()))
    out = first[["layer", "SD 1.4 (reported)", "source"]].copy()
    for name, a in cols.items():
        by = a.set_index("layer")
        cells = []
        for layer in out["layer"]:
            if layer not in by.index:
                cells.append("–")
                continue
            row = by.loc[layer]
            parts = [
                f"{g[:4]} {row[g][0]:.2f} [{row[g][1]:.2f}, {row[g][2]:.2f}]"
                for g in GROUP_ORDER
                if isinstance(row.get(g), tuple)
            ]
            cells.append(f"{row['label']}: " + "; ".join(parts))
        out[name] = cells
    return out
