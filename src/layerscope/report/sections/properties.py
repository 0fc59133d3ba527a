"""The latent-space property scorecard's section of the report: scorecard, strips, measurements and the sanity
generators, from the saved Results; also the figures and console output the ``layerscope properties`` command
writes and prints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ...experiments import properties as pr
from ...experiments.base import Result
from .. import Page, SectionRun
from ..commands import size_flags

EXPERIMENT = pr
KEY = "properties"
TITLE = "Latent-space properties: density, smoothness, organization, relevance"


def properties_command(spec: str, st: dict[str, Any], out: str) -> str:
    """The CLI command that reproduces a main-job scorecard (tables, figures) into ``out``, from a job's saved
    settings (of the ``generation`` keywords only the image size: the CLI cannot express the others)."""
    cmd = f"layerscope properties {spec} --n {st['n']} --pairs {st['pairs']}"
    if st.get("steps"):
        cmd += f" --steps {st['steps']}"
    if st.get("at") is not None:
        at = st["at"]
        cmd += f" --at {at if isinstance(at, str) else ','.join(str(s) for s in at)}"
    spaces = st.get("spaces") or []
    for s in [spaces] if isinstance(spaces, str) else spaces:
        cmd += f" --space '{s}'"
    if st.get("scorer", "auto") != "auto":
        cmd += f" --scorer {st['scorer']}"
    if isinstance(st.get("concept"), str) and st["concept"] != "auto":
        cmd += f" --concept '{st['concept']}'"
    if st.get("seed"):
        cmd += f" --seed {st['seed']}"
    return cmd + size_flags(st) + f" --out {out}"


def scorecard_figure(scores: pd.DataFrame, title: str = "") -> Figure:
    """Spaces (rows, per model) x properties: the score, with Figure 4's mark beside it."""
    from ..figures import heatmaps

    names, mats = [], []
    for (model, space), g in scores.groupby(["model", "space"], sort=False):
        names.append(f"{model.split(':')[-1]} · {space}")
        by = g.set_index("property")
        mats.append([by.loc[p, "score"] if p in by.index else np.nan for p in pr.PROPERTIES])
    marks = [
        "".join(g.set_index("property").reindex(pr.PROPERTIES)["mark"].fillna("?"))
        for _, g in scores.groupby(["model", "space"], sort=False)
    ]
    return heatmaps(
        [("", np.asarray(mats, dtype=float))],
        names,
        list(pr.PROPERTIES),
        title=title,
        row_notes=marks,
        cbar_label="score (marks: V >= 0.67, ~ >= 0.33, X)",
    )


def strips_figure(strips: dict[str, np.ndarray], columns: list[str], title: str) -> Figure:
    """One row per space: what each perturbation does to one sample (columns: the record's ``strip_columns``)."""
    from ..figures import image_grid

    return image_grid(list(strips.items()), columns, title=title)


def synthesis_sentence(scores: pd.DataFrame) -> str:
    """Whether the GAN/VAE latents hold all four properties and whether any diffusion space does, as measured."""
    full = pr.holds_all(scores)
    latent = full[full["model"].isin(["zoo:vae", "zoo:gan"])]
    diff = full[~full["model"].isin(["zoo:vae", "zoo:gan"])]

    def names(df: pd.DataFrame) -> str:
        return ", ".join(f"{m} {s}" for m, s in zip(df["model"], df["space"])) or "none"

    lat_ok, diff_ok = latent[latent["all_full"]], diff[diff["all_full"]]
    text = (
        f"Spaces with all four properties full (V): {names(lat_ok)} among the GAN/VAE latents "
        f"({len(lat_ok)} of {len(latent)}), {names(diff_ok)} among the diffusion models' spaces "
        f"({len(diff_ok)} of {len(diff)}). "
    )
    if len(latent) and len(lat_ok) == len(latent) and len(diff) and not len(diff_ok):
        text += "Schaerf's picture holds: synthesis in a strict sense in the GAN/VAE, not in any diffusion space."
    elif len(diff_ok):
        text += "Schaerf's picture does not hold here: some diffusion space scores full on all four."
    else:
        weak = latent.sort_values("lowest").iloc[0] if len(latent) else None
        low = (
            ""
            if weak is None
            else (
                f" (lowest GAN/VAE score {weak['lowest']:.2f}, "
                + ", ".join(
                    f"{r.property} {r.score:.2f}"
                    for r in scores[
                        (scores.model == weak.model) & (scores.space == weak.space) & (scores["mark"] != "V")
                    ].itertuples()
                )
                + ")"
            )
        )
        text += (
            "Only half of Schaerf's picture holds: no diffusion space holds all four, but neither do the zoo's "
            f"GAN/VAE latents{low}; the strict/broad contrast is one of degree here, not of kind."
        )
    return text


def figures(result: Result, folder: Path) -> dict[str, Figure]:
    """The figures of one scorecard (the CLI writes them next to the tables): ``scorecard.png``, ``strips.png``."""
    spec = result.record["model"]
    return {
        "scorecard.png": scorecard_figure(result[pr.SCORES], spec),
        "strips.png": strips_figure(result.artifacts[pr.STRIPS], result.record["strip_columns"], spec),
    }


def console(result: Result) -> list[Any]:
    """What the CLI prints after a scorecard: the spaces x properties table with marks and CIs."""
    spec = result.record["model"]
    title = f"{spec}: latent-space properties (V >= {pr.FULL_SCORE}, ~ >= {pr.PARTIAL_SCORE}, X below; 95% CI)"
    return [(title, pr.scorecard(result[pr.SCORES]).drop(columns="model"))]


def sanity_table(results: list[tuple[dict[str, Any], Result]]) -> pd.DataFrame:
    """The sanity generators' scorecard, one row per generator, with what each must show (the job's note)."""
    scores = pd.concat([r[pr.SCORES] for _, r in results], ignore_index=True)
    expected = {r.record["model"]: job.get("note", "") for job, r in results}
    tab = pr.scorecard(scores)
    tab["expected"] = tab["model"].map(expected)
    tab["model"] = tab["model"].str.split(":").str[-1]
    return tab


def render(run: SectionRun, page: Page) -> str:
    """The section: the definitions, the synthesis finding, the scorecard of every model (figure and table), per
    model its strips and measurements, and the sanity generators' table."""
    out = [
        page.p(
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
            "layerscope.experiments.properties and docs/properties.md."
        )
    ]
    results = run.results("model")
    if not results:
        return "".join(out)
    all_scores = pd.concat([r[pr.SCORES] for _, r in results], ignore_index=True)
    out.append(page.finding(synthesis_sentence(all_scores)))
    cmds = [properties_command(r.record["model"], job["settings"], f"properties-{job['folder']}") for job, r in results]
    out.append(
        page.figure(
            scorecard_figure(all_scores, "Latent-space properties per model and space"),
            "The scorecard (Figure 4 as numbers): each space's four scores; marks on the right in "
            "property order (density, smoothness, organization, relevance).",
            "; ".join(cmds),
        )
    )
    out.append(page.table(pr.scorecard(all_scores), "Scores with 95% bootstrap CIs"))
    for (_job, result), cmd in zip(results, cmds):
        record, details = result.record, result[pr.DETAILS]
        spec = record["model"]
        out.append(f"<h3>{page.esc(spec)}</h3>")
        out.append(
            page.p(
                f"{record['n']} base samples, {record['pairs']} interpolation pairs, "
                f"{len(record['spaces'])} spaces, concept: {record['concept']}, scorer: {record['scorer']}"
                + (f", steps perturbed: {record['steps']}" if record.get("steps") else "")
                + "."
            )
        )
        out.append(
            page.figure(
                strips_figure(
                    result.artifacts[pr.STRIPS],
                    record["strip_columns"],
                    f"{spec}: what each perturbation does (one sample)",
                ),
                f"{spec}: per space, the sample, a density draw, the sample moved by 0.1/0.3/1 std, "
                "the interpolation toward another sample, and the concept added.",
                cmd,
            )
        )
        wide = details.pivot(index="space", columns="metric", values="value").reindex(record["spaces"])
        cols = [
            c
            for c in (
                "change@0.1",
                "change@0.3",
                "change@1",
                "in_dist_base",
                "in_dist_resampled",
                "path",
                "rho_distance",
                "concept_base",
                "concept_added",
            )
            if c in wide.columns
        ]
        out.append(page.table(wide[cols].reset_index(), f"{spec}: the measurements behind the scores"))
    controls = run.results("control")
    if controls:
        scores = pd.concat([r[pr.SCORES] for _, r in controls], ignore_index=True)
        out.append(
            page.table(
                pr.scorecard(scores),
                "Controls: untrained copies of the models (same settings and seeds), scores with 95% bootstrap CIs",
            )
        )
    sanity = run.results("sanity")
    if sanity:
        out.append(
            page.table(
                sanity_table(sanity),
                "Sanity generators built to fail (z -> image, pixel distances): "
                "one ignores its latent, one outputs a hash of it, one is linear",
            )
        )
    return "".join(out)
