"""Figures of the latent-space property scorecard and its section of the main job's report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..report import Page, RunContext, Section, model_folders, register, section_record
from . import properties as pr

# zoo:unet: every space it offers; zoo:dit: its spaces and every transformer block; GAN/VAE: the latent
_DIFFUSION = dict(n=16, pairs=8, steps=10)
_LATENT = dict(n=64, pairs=16)
FULL = dict(models={"zoo:unet": dict(_DIFFUSION), "zoo:dit": dict(_DIFFUSION, spaces=["*"]),
                    "zoo:vae": dict(_LATENT), "zoo:gan": dict(_LATENT)},
            sanity=dict(n=32, pairs=8))
QUICK = dict(models={"zoo:unet": dict(n=8, pairs=4, steps=4, spaces=["noise", "text_embeds", "h_space"]),
                     "zoo:vae": dict(n=32, pairs=8), "zoo:gan": dict(n=32, pairs=8)},
             sanity=dict(n=16, pairs=4))
SANITY_SPEC = "torch:layerscope.experiments.properties:{}"


def properties_command(spec: str, st: dict[str, Any], out: str) -> str:
    cmd = f"layerscope properties {spec} --n {st['n']} --pairs {st['pairs']}"
    if st.get("steps"):
        cmd += f" --steps {st['steps']}"
    for s in st.get("spaces") or []:
        cmd += f" --space '{s}'"
    return cmd + f" --out {out}"


def load(folder: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    return (pd.read_parquet(folder / pr.SCORES), pd.read_parquet(folder / pr.DETAILS),
            json.loads((folder / "properties.json").read_text()))


def scorecard_figure(scores: pd.DataFrame, title: str = ""):
    """Spaces (rows, per model) x properties: the score, with Figure 4's mark beside it."""
    from ..report.figures import heatmaps

    names, mats = [], []
    for (model, space), g in scores.groupby(["model", "space"], sort=False):
        names.append(f"{model.split(':')[-1]} · {space}")
        by = g.set_index("property")
        mats.append([by.loc[p, "score"] if p in by.index else np.nan for p in pr.PROPERTIES])
    marks = ["".join(g.set_index("property").reindex(pr.PROPERTIES)["mark"].fillna("?"))
             for _, g in scores.groupby(["model", "space"], sort=False)]
    return heatmaps([("", np.asarray(mats, dtype=float))], names, list(pr.PROPERTIES), title=title,
                    row_notes=marks, cbar_label="score (marks: V >= 0.67, ~ >= 0.33, X)")


def strips_figure(strips: dict[str, np.ndarray], columns: list[str], title: str):
    from ..report.figures import image_grid

    return image_grid(list(strips.items()), columns, title=title)


def synthesis_sentence(scores: pd.DataFrame) -> str:
    """Whether the GAN/VAE latents hold all four properties and whether any diffusion space does, as measured."""
    full = pr.holds_all(scores)
    latent = full[full["model"].isin(["zoo:vae", "zoo:gan"])]
    diff = full[~full["model"].isin(["zoo:vae", "zoo:gan"])]

    def names(df: pd.DataFrame) -> str:
        return ", ".join(f"{m} {s}" for m, s in zip(df["model"], df["space"])) or "none"

    lat_ok, diff_ok = latent[latent["all_full"]], diff[diff["all_full"]]
    text = (f"Spaces with all four properties full (V): {names(lat_ok)} among the GAN/VAE latents "
            f"({len(lat_ok)} of {len(latent)}), {names(diff_ok)} among the diffusion models' spaces "
            f"({len(diff_ok)} of {len(diff)}). ")
    if len(latent) and len(lat_ok) == len(latent) and len(diff) and not len(diff_ok):
        text += "Schaerf's picture holds: synthesis in a strict sense in the GAN/VAE, not in any diffusion space."
    elif len(diff_ok):
        text += "Schaerf's picture does not hold here: some diffusion space scores full on all four."
    else:
        weak = latent.sort_values("lowest").iloc[0] if len(latent) else None
        low = "" if weak is None else (
            f" (lowest GAN/VAE score {weak['lowest']:.2f}, "
            + ", ".join(f"{r.property} {r.score:.2f}" for r in scores[
                (scores.model == weak.model) & (scores.space == weak.space) & (scores["mark"] != "V")].itertuples())
            + ")")
        text += ("Only half of Schaerf's picture holds: no diffusion space holds all four, but neither do the zoo's "
                 f"GAN/VAE latents{low}; the strict/broad contrast is one of degree here, not of kind.")
    return text


def _run(ctx: RunContext) -> dict[str, Any]:
    from ..loading import load as load_model

    st = QUICK if ctx.quick else FULL
    info: dict[str, Any] = {"settings": st, "per_model": {}}
    for spec, s in st["models"].items():
        model = load_model(spec)
        kw = {"num_inference_steps": s["steps"]} if s.get("steps") else {}
        ctx.log(f"property scorecard of {spec}: n={s['n']}, {s['pairs']} interpolation pairs")
        scores, details, strips, record = pr.run_properties(model, s.get("spaces"), n=s["n"], pairs=s["pairs"],
                                                            progress=ctx.progress, **kw)
        folder = ctx.folder / spec.replace(":", "_")
        pr.save(folder, scores, details, strips, record)
        ctx.models.append(spec)
        info["per_model"][spec] = {"folder": folder.name, "spaces": len(record["spaces"])}
    sanity = []
    for name, expect in pr.SANITY.items():
        scores, *_ = pr.run_properties(SANITY_SPEC.format(name), n=st["sanity"]["n"], pairs=st["sanity"]["pairs"])
        scores["expected"] = expect
        sanity.append(scores)
    pd.concat(sanity).to_parquet(ctx.folder / "sanity.parquet", index=False)
    return info


def _render(folder: Path, page: Page) -> str:
    record_all = section_record(folder)
    settings = record_all.get("settings", FULL)
    out = [page.p(
        "Schaerf (2025) asks whether a model has one latent space that is dense (any point of its distribution "
        "decodes to an in-distribution image), smooth (a small move gives a similar image), organized (distances "
        "mirror perceived similarity; points in between are mixtures of the endpoints) and relevant (a change in "
        "the space notably changes the output), and judges diffusion models' candidate spaces by eye (her Figure "
        "4). Here each property is a number in [0, 1] with a 95% bootstrap CI, for every space of the zoo's models. "
        "Every perturbation is in units of the space's own spread (per-element std over the base samples, per "
        "step; per-step spaces are perturbed at every step, text spaces on the conditional branch only), everything "
        "else held fixed, and images are compared through the oracle's features. density = share of images "
        "in-distribution (oracle confident on every factor) after replacing the space by a draw of its "
        "per-element Gaussian, relative to the model's own samples; smoothness = 1 - the image change at 0.1 and "
        "0.3 std, relative to the distance between two different samples; organization = mean of the share of "
        "factors that move monotonically from one endpoint to the other along a linear interpolation and the "
        "Spearman correlation of distances in the space with image distances; relevance = mean of the image "
        "change at 1 std (x sqrt 2) and the gain toward a red object when the space's 'red object' direction is "
        "added. Marks as in Figure 4: V >= 0.67, ~ >= 0.33, X below. Definitions: "
        "layerscope.experiments.properties and docs/properties.md.")]
    subs = model_folders(folder, record_all, pr.SCORES)
    if not subs:
        return "".join(out)
    loaded = {sub: load(sub) for sub in subs}
    all_scores = pd.concat([v[0] for v in loaded.values()], ignore_index=True)
    out.append(page.finding(synthesis_sentence(all_scores)))
    cmds = [properties_command(str(v[0]["model"].iloc[0]), settings["models"].get(str(v[0]["model"].iloc[0]), {}),
                               f"properties-{sub.name}") for sub, v in loaded.items()]
    out.append(page.figure(scorecard_figure(all_scores, "Latent-space properties per model and space"),
                           "The scorecard (Figure 4 as numbers): each space's four scores; marks on the right in "
                           "property order (density, smoothness, organization, relevance).", "; ".join(cmds)))
    out.append(page.table(pr.scorecard(all_scores), "Scores with 95% bootstrap CIs"))
    for (sub, (scores, details, record)), cmd in zip(loaded.items(), cmds):
        spec = record["model"]
        out.append(f"<h3>{page.esc(spec)}</h3>")
        out.append(page.p(f"{record['n']} base samples, {record['pairs']} interpolation pairs, "
                          f"{len(record['spaces'])} spaces, concept: {record['concept']}, scorer: {record['scorer']}"
                          + (f", steps perturbed: {record['steps']}" if record.get("steps") else "") + "."))
        strips = pr.load_strips(sub)
        out.append(page.figure(strips_figure(strips, record["strip_columns"], f"{spec}: what each perturbation "
                                             "does (one sample)"),
                               f"{spec}: per space, the sample, a density draw, the sample moved by 0.1/0.3/1 std, "
                               "the interpolation toward another sample, and the concept added.", cmd))
        wide = details.pivot(index="space", columns="metric", values="value").reindex(record["spaces"])
        cols = [c for c in ("change@0.1", "change@0.3", "change@1", "in_dist_base", "in_dist_resampled", "path",
                            "rho_distance", "concept_base", "concept_added") if c in wide.columns]
        out.append(page.table(wide[cols].reset_index(), f"{spec}: the measurements behind the scores"))
    sanity_file = folder / "sanity.parquet"
    if sanity_file.exists():
        sanity = pd.read_parquet(sanity_file)
        tab = pr.scorecard(sanity)
        tab["expected"] = sanity.groupby("model", sort=False)["expected"].first().to_numpy()
        tab["model"] = tab["model"].str.split(":").str[-1]
        out.append(page.table(tab, "Sanity generators built to fail (z -> image, pixel distances): one ignores its "
                                   "latent, one outputs a hash of it, one is linear"))
    return "".join(out)


@register
def _section() -> Section:
    return Section("properties", "Latent-space properties: density, smoothness, organization, relevance",
                   _run, _render)
