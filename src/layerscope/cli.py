"""Command line: ``layerscope run``, ``report``, ``claims``, ``sweep``, ``layers``, ``zoo list|train|eval``,
``world render``.

The entry point is :func:`main`, which runs :func:`command` (the typer app as a click group, with ``--pair`` taking
two values per use, which typer cannot declare).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

# transformers announces missing optional image backends on import; the CLI keeps its output to what was asked
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import click
import typer
from rich.console import Console
from rich.table import Table

from .errors import LayerscopeError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="layerscope: find where a generative image model keeps its representations.",
)
console = Console()
err = Console(stderr=True)
_ABBREV = {"channel": "c", "token": "tok"}


def _fail(exc: Exception) -> None:
    from rich.markup import escape

    err.print(f"[bold red]error:[/] {escape(str(exc))}")  # brackets in a message ([ray], [0, 1]) are text
    raise typer.Exit(code=2)


@app.callback()
def _main() -> None:
    """Inspect layers and candidate spaces of diffusers pipelines, torch generators and tiny test models."""
    # transformers draws a "Loading weights" bar per model load; the CLI shows its own progress instead
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


@app.command()
def layers(
    model: str = typer.Argument(..., help="model spec: tiny:sd, hf:/path/to/pipeline, torch:pkg.module:factory"),
    pattern: Optional[list[str]] = typer.Option(None, "--select", "-s", help="glob(s), e.g. 'up_blocks.*.resnets.*'"),
    spaces: bool = typer.Option(True, "--spaces/--no-spaces", help="also list the candidate spaces"),
    detail: bool = typer.Option(
        False, "--detail", help="also list the sites below the blocks: attention modules, Q/K/V, heads, maps, ff"
    ),
    height: Optional[int] = typer.Option(None, help="image height for the shapes (default: the model's)"),
    width: Optional[int] = typer.Option(None, help="image width for the shapes (default: the model's)"),
) -> None:
    """Print the canonical layer map: name, kind, stage and per-step output shape."""
    from .loading import load

    try:
        gen = load(model)
        lmap = gen.layer_map(height, width)
        if pattern:
            entries = lmap.select(pattern, detail=detail)
        else:
            entries = [e for e in lmap.all() if (detail or not e.detail) and (spaces or not e.is_space)]
    except LayerscopeError as exc:
        _fail(exc)
        return
    cfg = gen.config(height=height, width=width)
    size = f"{cfg.height}x{cfg.width}" if cfg.height else "n/a"
    below = f", {len(lmap.detail)} sites below the blocks" + ("" if detail else " (--detail)")
    table = Table(title=f"{model} ({gen.family}, {size}) - {len(lmap.layers)} layers, {len(lmap.spaces)} spaces{below}")
    table.add_column("name", overflow="fold", min_width=max(len(e.name) for e in entries))
    for col in ("kind", "stage", "shape per step", "dims", "steps"):
        table.add_column(col, overflow="fold")
    table.add_column("note", overflow="fold")
    for e in entries:
        shape = "x".join(str(s) for s in e.shape) if e.shape else "()"
        dims = ",".join(_ABBREV.get(d, d) for d in e.dims)
        table.add_row(e.name, e.kind, e.stage, shape, dims, "each" if e.per_step else "once", e.note)
    out = console if console.is_terminal else Console(width=max(console.width, 160))
    out.print(table)


zoo_app = typer.Typer(no_args_is_help=True, help="The zoo of small models trained on the Shapes world.")
app.add_typer(zoo_app, name="zoo")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


@zoo_app.command("list")
def zoo_list() -> None:
    """Print every zoo model with parameters, resolution, training steps and measured quality (and the oracle)."""
    from .world import zoo
    from .world.quality import verdicts

    table = Table(title="layerscope zoo (Shapes world)")
    for col in (
        "model",
        "res",
        "params",
        "MB",
        "train steps",
        "train time",
        "prompt agreement (oracle; zoo:ldm: named factors)",
        "in-dist.",
        "FD (floor)",
        "bars",
    ):
        table.add_column(col, overflow="fold")
    for name in zoo.MODELS:
        c = zoo.card(name)
        q = c.get("quality")
        agree = fd = ind = bars = "-"
        if q:
            ag = q.get("named_followed") or q.get("prompt_agreement")  # partial captions: where a factor is named
            if ag:
                agree = " ".join(f"{k.replace('_hue', '')}:{_pct(v)}" for k, v in ag.items())
            ind = _pct(q["in_distribution"])
            fd = f"{q['frechet_distance']:.2f} ({q['frechet_floor']:.2f})"
            v = verdicts(q)
            bars = "all met" if all(v.values()) else "missed: " + ", ".join(k for k, ok in v.items() if not ok)
        minutes = (
            f"{c['train_seconds'] / 60:.0f} min, {c.get('device', '?')} x{c.get('threads', '?')}"
            if c.get("train_seconds")
            else "-"
        )
        params = f"{c['parameters'] / 1e6:.2f}M" if c.get("parameters") else "-"
        table.add_row(
            c["name"],
            str(c.get("resolution", "-")),
            params,
            f"{c['weights_bytes'] / 1e6:.1f}",
            str(c.get("steps") or "-"),
            minutes,
            agree,
            ind,
            fd,
            bars,
        )
    out = console if console.is_terminal else Console(width=max(console.width, 200))
    out.print(table)
    try:
        from .world.oracle import oracle_card

        o = oracle_card()
        accs = " ".join(f"{k.replace('_hue', '')}:{100 * v['accuracy']:.1f}%" for k, v in o["heldout"].items())
        worst = max(v["ece"] for v in o["heldout"].values())
        out.print(f"oracle: held-out accuracy {accs}; max ECE {worst:.4f} ({o['training']['steps']} steps)")
    except FileNotFoundError:
        out.print("oracle: no weights (train with `layerscope zoo train oracle`)")


@zoo_app.command("train")
def zoo_train(
    name: str = typer.Argument(..., help="unet, dit, vae, gan, ldm or oracle"),
    out: Optional[str] = typer.Option(None, help="output folder (default: the package's weights folder)"),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda when available)"),
    steps: Optional[int] = typer.Option(None, help="override the config's number of training steps"),
    resume: bool = typer.Option(
        False, help="diffusion models (unet, dit, ldm): continue the saved model for --steps more steps"
    ),
    lr: Optional[float] = typer.Option(None, help="override the peak learning rate (diffusion models)"),
) -> None:
    """Train one zoo model with its seeded config; the loss log is kept next to the weights."""
    from .world import zoo

    if name not in zoo.TRAINABLE:
        _fail(LayerscopeError(f"no zoo model {name!r}; valid: {', '.join(zoo.TRAINABLE)}"))
    try:
        summary = zoo.train(name, out, device=device, steps=steps, resume=resume, lr=lr)
    except (LayerscopeError, FileNotFoundError) as exc:
        _fail(exc)
        return
    console.print({k: v for k, v in summary.items() if k not in ("config", "history")})


@zoo_app.command("eval")
def zoo_eval(
    name: str = typer.Argument(..., help="unet, dit, vae, gan or ldm"),
    n: int = typer.Option(1000, help="number of samples"),
    folder: Optional[str] = typer.Option(None, help="weights folder (default: the shipped one)"),
    steps: Optional[int] = typer.Option(None, help="denoising steps (diffusion models)"),
    guidance: Optional[float] = typer.Option(None, help="guidance scale (diffusion models)"),
) -> None:
    """Measure a zoo model's quality with the oracle and save it as quality.json next to its weights."""
    from .world import zoo

    kw = {}
    if steps:
        kw["num_inference_steps"] = steps
    if guidance is not None:
        kw["guidance_scale"] = guidance
    try:
        from .loading import load

        model = load(f"zoo:{name}", **({"folder": folder} if folder else {}))
        q = zoo.evaluate(model, name, n=n, folder=folder, **kw)
    except LayerscopeError as exc:
        _fail(exc)
        return
    console.print(q)


world_app = typer.Typer(no_args_is_help=True, help="The Shapes world: render scenes, print their prompts.")
app.add_typer(world_app, name="world")


@world_app.command("render")
def world_render(
    out: str = typer.Argument(..., help="PNG file to write (a grid of the rendered scenes)"),
    n: int = typer.Option(16, help="number of scenes (random combinations)"),
    size: int = typer.Option(64, help="resolution of each scene"),
    seed: int = typer.Option(0, help="seed of the random combinations"),
    split: str = typer.Option("all", help="all, train or test (the held-out tenth)"),
    scale: int = typer.Option(2, help="upscale factor of the saved grid"),
) -> None:
    """Render random scenes to a PNG grid and print each one's factors and prompt."""
    from .image_files import save_png
    from .world import render, sample_factors
    from .world.text import prompts_for

    try:
        f = sample_factors(n, seed, split=split)
        path = save_png(render(f, size), out, nrow=min(8, n), scale=scale)
    except ValueError as exc:
        _fail(exc)
        return
    for i, (row, p) in enumerate(zip(f, prompts_for(f))):
        console.print(f"{i:3d} {row.tolist()} {p}")
    console.print(f"wrote {path}")


def _print_frame(frame, title: str) -> None:
    """Print a DataFrame as a rich table (floats to 2 decimals)."""
    t = Table(title=title)
    for col in frame.columns:
        t.add_column(str(col), overflow="fold")
    for row in frame.itertuples(index=False):
        t.add_row(*[f"{v:.2f}" if isinstance(v, float) else str(v) for v in row])
    console.print(t)


def _list(text: Optional[str]) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _ints(text: str, option: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in _list(text) or [])
    except ValueError:
        raise LayerscopeError(f"{option} must be comma-separated integers, got {text!r}") from None


def _dry_run_option() -> Any:
    return typer.Option(
        False, "--dry-run", help="print the plan (generations, rows per batch, steps, bytes) and generate nothing"
    )


def _budget_option() -> Any:
    return typer.Option(None, help="with --dry-run: a memory budget the plan must fit, e.g. 80GiB (exit 1 if not)")


def _executor_options() -> dict[str, Any]:
    return dict(
        executor=typer.Option("serial", "--executor", help="where the cells run: serial (this process) or ray"),
        ray_address=typer.Option(
            None, "--ray-address", help="with --executor ray: auto or ray://host:port (default: start a local Ray)"
        ),
        workers=typer.Option(None, "--workers", help="with --executor ray: worker actors (default: one per CPU/GPU)"),
        gpus_per_worker=typer.Option(0.0, "--gpus-per-worker", help="with --executor ray: GPUs each worker holds"),
    )


_EXEC = _executor_options()


def _executor(executor: str, ray_address: Optional[str], workers: Optional[int], gpus_per_worker: float) -> Any:
    from .executors import make_executor

    return make_executor(executor, address=ray_address, workers=workers, gpus_per_worker=gpus_per_worker)


def _recipe_option(what: str) -> Any:
    return typer.Option(None, "--recipe", help=f"a literature recipe's layers {what} (`layerscope recipes`)")


def _recipe_layers(recipe: Optional[str], gen: Any, size: dict[str, int]) -> list[str]:
    """The layers recipe ``recipe`` names on the loaded model (checked), or none."""
    from . import recipes

    return recipes.resolve(recipe, gen, **size) if recipe else []


def _show_plans(plans: list[Any], budget: Optional[str]) -> None:
    """Print each plan; with a budget, exit 1 when one does not fit it."""
    from .experiments.plans import parse_bytes, print_plan

    limit = parse_bytes(budget) if budget else None
    for plan in plans:
        print_plan(plan, console, limit)
    if limit is not None and not all(p.fits(limit) for p in plans):
        raise typer.Exit(code=1)


def _finish(section, result, folder: Path) -> None:
    """Write the section's figures next to the Result the run saved in ``folder``, print what the section says."""
    from .report.figures import png_bytes

    figs = section.figures(result, folder) if hasattr(section, "figures") else {}
    for name, fig in figs.items():
        (folder / name).write_bytes(png_bytes(fig))
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}")
    for item in section.console(result) if hasattr(section, "console") else []:
        if isinstance(item, tuple):
            _print_frame(item[1], item[0])
        else:
            console.print(item)
    tables = ", ".join(f"{t}.parquet" for t in result.tables)
    console.print(f"wrote {folder}: {tables}" + (f" and {', '.join(figs)}" if figs else ""))


def _prompts_file(path: str, n: int) -> tuple[str, ...]:
    """The first ``n`` prompts of a file: lines of a text file, or references to the rows of an embeddings file."""
    from .embeds import SUFFIXES, refs

    if not Path(path).is_file():
        raise LayerscopeError(f"the prompts file {path!r} does not exist")
    if path.endswith(SUFFIXES):
        found = refs(path)
    else:
        found = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if len(found) < n:
        raise LayerscopeError(f"{path!r} holds {len(found)} prompts; --n {n} needs at least that many")
    return tuple(found[:n])


def _size_option(which: str) -> Any:
    return typer.Option(None, help=f"image {which} in pixels (default: the model's)")


def _size(height: Optional[int], width: Optional[int]) -> dict[str, int]:
    """The generation keywords of --height / --width (only those given)."""
    return {k: v for k, v in (("height", height), ("width", width)) if v is not None}


def _folder(out: Optional[str], prefix: str, model: str) -> Path:
    """The output folder, checked (an existing file or an unwritable path is refused) before any model is loaded."""
    from .folders import check_output

    return check_output(Path(out or f"{prefix}-{model.replace(':', '_').replace('/', '_')}"))


@app.command()
def recipes() -> None:
    """The literature's layer sets (``--recipe NAME`` on sweep, abstractions, properties)."""
    from .recipes import RECIPES

    table = Table(title="recipes: layers published work names")
    for col in ("recipe", "model", "layers", "found", "source"):
        table.add_column(col, overflow="fold")
    for r in RECIPES.values():
        names = ", ".join(n for n, _, _ in r.layers) or f"skip tensors out of {r.skips_from}"
        table.add_row(r.name, r.model, names, r.found, r.cite)
    console.print(table)


@app.command()
def sweep(
    model: str = typer.Argument(..., help="model spec: zoo:unet, hf:/path/to/pipeline, tiny:sd, ..."),
    pair: Optional[list[str]] = typer.Option(
        None,
        "--pair",
        metavar="ORIGINAL EDIT",
        help="an (original, edit) prompt pair: --pair 'a red cube' 'a blue ball'; repeatable",
    ),
    random_pairs: int = typer.Option(
        0,
        help="Shapes-world models: add N random held-out prompt pairs that differ in every factor; latent "
        "generators (GANs, VAE decoders): N pairs of latents from the seeds (with --seed-per-pair)",
    ),
    pair_seed: int = typer.Option(0, help="seed of the random pairs"),
    named: Optional[str] = typer.Option(
        None, help="random pairs as partial prompts naming MIN-MAX factors (e.g. 2-3; O and E name the same ones)"
    ),
    layers: Optional[list[str]] = typer.Option(
        None, "--layers", "-l", help="glob(s) of layers/spaces, one injected row each (default: every layer)"
    ),
    combine: Optional[list[str]] = typer.Option(
        None, help="a comma-separated set of layers injected together (one row); repeatable"
    ),
    spaces: bool = typer.Option(
        False,
        "--spaces",
        help="with the default layers: also the candidate spaces (noise, text embeddings, skips; not x_t)",
    ),
    with_pooled: bool = typer.Option(
        False,
        "--with-pooled",
        help="inject the pooled text condition (text_pooled: SDXL, SD3, Flux) together with every layer",
    ),
    windows: str = typer.Option("all", help="step windows, comma-separated: all, early, middle, late"),
    seeds: str = typer.Option(
        "0",
        help="seeds, comma-separated (O and E share each seed, unless --e-seeds; a latent generator's E defaults to "
        "seed + 1000)",
    ),
    e_seeds: Optional[str] = typer.Option(None, help="E's seeds, comma-separated, one per --seeds entry"),
    seed_per_pair: bool = typer.Option(False, "--seed-per-pair", help="pair p adds p to every seed (its own noise)"),
    steps: Optional[int] = typer.Option(None, help="denoising steps (default: the model's)"),
    guidance: Optional[float] = typer.Option(None, help="guidance scale (default: the model's)"),
    branches: Optional[str] = typer.Option(None, help="CFG branches E is injected in: uncond,cond (default: both)"),
    scorer: str = typer.Option("auto", help="oracle (Shapes world), images (open-domain metrics) or auto"),
    metrics: Optional[str] = typer.Option(None, help="image metrics: ssim,sift,hist,lbp,clip (default: all)"),
    clip: Optional[str] = typer.Option(None, help="local CLIP checkpoint folder (else $LAYERSCOPE_CLIP)"),
    out: Optional[str] = typer.Option(None, help="output folder (default: sweep-<model>); reruns resume"),
    max_batch: Optional[int] = typer.Option(None, help="rows per generation (default: all layer sets + 2)"),
    recipe: Optional[str] = _recipe_option("injected together as one more layer set"),
    dry_run: bool = _dry_run_option(),
    budget: Optional[str] = _budget_option(),
    height: Optional[int] = _size_option("height"),
    width: Optional[int] = _size_option("width"),
    executor: str = _EXEC["executor"],
    ray_address: Optional[str] = _EXEC["ray_address"],
    workers: Optional[int] = _EXEC["workers"],
    gpus_per_worker: float = _EXEC["gpus_per_worker"],
) -> None:
    """Inject E into O at each layer, score the images, save the table and figures, print the per-layer labels."""
    from .experiments import injection as inj
    from .loading import load
    from .report.sections import injection as section

    try:
        seed_list, e_list = _ints(seeds, "--seeds"), _ints(e_seeds, "--e-seeds") if e_seeds else None
        try:
            lo, _, hi = (named or "").partition("-")
            named_range = (int(lo), int(hi or lo)) if named else None
        except ValueError:
            raise LayerscopeError(f"--named must be MIN-MAX factors, e.g. 2-3; got {named!r}") from None
        sel = list(layers or []) + [tuple(_list(c) or []) for c in combine or []]
        settings = inj.Settings(
            pairs=tuple(tuple(json.loads(p)) for p in pair or []),
            random_pairs=random_pairs,
            pair_seed=pair_seed,
            named=named_range,
            seeds=seed_list,
            e_seeds=e_list,
            seed_per_pair=seed_per_pair,
            layers=sel or None,
            spaces=spaces,
            with_pooled=with_pooled,
            windows=tuple(_list(windows) or []),
            branches=tuple(_list(branches)) if branches else None,
            scorer=scorer,
            metrics=tuple(_list(metrics)) if metrics else None,
            steps=steps,
            guidance=guidance,
            max_batch=max_batch,
            clip_path=clip,
            generation=_size(height, width),
        )
        folder = _folder(out, "sweep", model) if not dry_run else Path(".")
        run_on = _executor(executor, ray_address, workers, gpus_per_worker)
        gen = load(model)
        if recipe:
            rec = tuple(_recipe_layers(recipe, gen, _size(height, width)))
            settings = dataclasses.replace(settings, layers=[*(settings.layers or []), rec])
        if dry_run:
            _show_plans([inj.plan(gen, settings)], budget)
            return
        console.print(
            f"{model}: injection sweep -> {folder}" + (f" ({run_on.name} executor)" if executor != "serial" else "")
        )
        result = inj.run(gen, settings, out=folder, progress=True, executor=run_on)
    except LayerscopeError as exc:
        _fail(exc)
        return
    _finish(section, result, folder)


@app.command()
def abstractions(
    model: str = typer.Argument(..., help="model spec: zoo:unet, zoo:dit, or a diffusers pipeline with --labels"),
    n: int = typer.Option(320, help="number of samples (zoo: unconditional samples labelled by the oracle)"),
    steps: Optional[int] = typer.Option(None, help="denoising steps (default: the model's)"),
    layers: Optional[list[str]] = typer.Option(None, "--layers", "-l", help="glob(s) of layers (default: every layer)"),
    labels: Optional[str] = typer.Option(
        None,
        help="CSV with a 'prompt' column and one column per factor (for "
        "non-zoo models; the prompts are generated, the labels probed)",
    ),
    conditional: bool = typer.Option(
        False, help="zoo: sample held-out prompts instead of unconditionally (probes and forks)"
    ),
    project_layers: bool = typer.Option(
        False,
        "--project-layers",
        help="probe a fixed random projection of each layer's whole map (128 dims) instead of its spatial mean",
    ),
    seed: int = typer.Option(0, help="first seed"),
    out: Optional[str] = typer.Option(None, help="output folder (default: probes-<model>)"),
    probes: bool = typer.Option(True, "--probes/--no-probes", help="run the probe grid (--no-probes: forking only)"),
    forks: int = typer.Option(
        0, help="forking entropy (zoo): continuations per start and fork step (0: no forking; e.g. 8)"
    ),
    fork_prompts: int = typer.Option(12, help="forking: number of starts (unconditional unless --conditional)"),
    taus: Optional[str] = typer.Option(
        None, help="forking: comma-separated fork steps (default: every step but the last)"
    ),
    eta: float = typer.Option(1.0, help="forking: DDIM eta of the stochastic sampler (1: DDPM-like)"),
    recipe: Optional[str] = _recipe_option("probed (with any --layers)"),
    dry_run: bool = _dry_run_option(),
    budget: Optional[str] = _budget_option(),
    height: Optional[int] = _size_option("height"),
    width: Optional[int] = _size_option("width"),
    executor: str = _EXEC["executor"],
    ray_address: Optional[str] = _EXEC["ray_address"],
    workers: Optional[int] = _EXEC["workers"],
    gpus_per_worker: float = _EXEC["gpus_per_worker"],
) -> None:
    """Linear probes on every layer x step (and x_t) for each factor, with the mutual-information bound; with
    --forks, forking entropy: the entropy of the oracle's readings across continuations forked at each step."""
    from .experiments import abstractions as ab
    from .loading import load
    from .report.sections import abstractions as section

    try:
        try:
            fork_taus = tuple(int(t) for t in taus.split(",") if t.strip()) if taus else None
        except ValueError:
            raise LayerscopeError(f"--taus must be comma-separated steps, e.g. 0,2,4; got {taus!r}") from None
        settings = ab.Settings(
            n=n,
            seed=seed,
            steps=steps,
            layers=tuple(layers) if layers else None,
            conditional=conditional,
            project_layers=project_layers,
            probes=probes,
            labels=labels,
            forks=forks,
            fork_prompts=fork_prompts,
            taus=fork_taus,
            eta=eta,
            generation=_size(height, width),
        )
        if labels is not None and not Path(labels).is_file():
            raise LayerscopeError(f"the labels CSV {labels!r} does not exist")
        folder = _folder(out, "probes", model) if not dry_run else Path(".")
        gen = load(model)
        if recipe:
            rec = _recipe_layers(recipe, gen, _size(height, width))
            settings = dataclasses.replace(settings, layers=(*(settings.layers or ()), *rec))
        if dry_run:
            _show_plans([ab.plan(gen, settings)], budget)
            return
        console.print(f"{model}: abstractions -> {folder}")
        run_on = _executor(executor, ray_address, workers, gpus_per_worker)
        result = ab.run(gen, settings, out=folder, progress=True, executor=run_on)
    except LayerscopeError as exc:
        _fail(exc)
        return
    _finish(section, result, folder)


@app.command()
def properties(
    model: str = typer.Argument(..., help="model spec: zoo:unet, zoo:gan, torch:module:factory, hf:/path, ..."),
    space: Optional[list[str]] = typer.Option(
        None,
        "--space",
        "-s",
        help="space(s) or layer glob(s) to score (default: every space the adapter offers); repeatable",
    ),
    n: int = typer.Option(16, help="base samples (the space's distribution is fitted on them)"),
    prompts: Optional[str] = typer.Option(
        None,
        help="the base samples' prompts: a text file (one per line), or for models conditioned on embeddings "
        "(Kandinsky 2.2) a .npy/.safetensors file of N x D embeddings; the first --n are used",
    ),
    pairs: int = typer.Option(8, help="interpolation pairs"),
    steps: Optional[int] = typer.Option(None, help="denoising steps (default: the model's)"),
    at: Optional[str] = typer.Option(
        None,
        help="steps at which per-step spaces are perturbed: a window "
        "(early, middle, late) or a:b (default: every step)",
    ),
    scorer: str = typer.Option("auto", help="auto (oracle for zoo models, pixels otherwise), oracle or pixel"),
    concept: Optional[str] = typer.Option(
        None,
        help="open domain: the concept prompt whose direction is added (default 'a dog'; Shapes world: a red object)",
    ),
    seed: int = typer.Option(0, help="first seed"),
    out: Optional[str] = typer.Option(None, help="output folder (default: properties-<model>)"),
    recipe: Optional[str] = _recipe_option("scored as spaces (with any --space)"),
    dry_run: bool = _dry_run_option(),
    budget: Optional[str] = _budget_option(),
    height: Optional[int] = _size_option("height"),
    width: Optional[int] = _size_option("width"),
    executor: str = _EXEC["executor"],
    ray_address: Optional[str] = _EXEC["ray_address"],
    workers: Optional[int] = _EXEC["workers"],
    gpus_per_worker: float = _EXEC["gpus_per_worker"],
) -> None:
    """Score candidate spaces on density, smoothness, organization and relevance (Schaerf 2025, Figure 4)."""
    from .experiments import properties as pr
    from .loading import load
    from .report.sections import properties as section

    try:
        settings = pr.Settings(
            spaces=tuple(space) if space else None,
            prompts=_prompts_file(prompts, n) if prompts else None,
            n=n,
            pairs=pairs,
            at=at,
            seed=seed,
            scorer=scorer,
            concept=concept or "auto",
            steps=steps,
            generation=_size(height, width),
        )
        folder = _folder(out, "properties", model) if not dry_run else Path(".")
        gen = load(model)
        if recipe:
            rec = _recipe_layers(recipe, gen, _size(height, width))
            settings = dataclasses.replace(settings, spaces=(*(settings.spaces or ()), *rec))
        if dry_run:
            _show_plans([pr.plan(gen, settings)], budget)
            return
        console.print(f"{model}: latent-space property scorecard -> {folder}")
        run_on = _executor(executor, ray_address, workers, gpus_per_worker)
        result = pr.run(gen, settings, out=folder, progress=True, executor=run_on)
    except LayerscopeError as exc:
        _fail(exc)
        return
    _finish(section, result, folder)


@app.command()
def align(
    models: list[str] = typer.Argument(..., help="model specs, e.g. zoo:unet zoo:dit zoo:vae zoo:gan"),
    n: int = typer.Option(64, help="scenes (Shapes world) or prompt/seed rows (open domain)"),
    steps: Optional[int] = typer.Option(None, help="denoising steps (default: the model's)"),
    metric: str = typer.Option(
        "linear_cka,debiased_cka,mutual_knn,cknna", help="comma-separated measures of the descriptive tables"
    ),
    curve_measures: str = typer.Option(
        "debiased_cka,mutual_knn", "--curve-measures", help="comma-separated measures of the verdicts and their curve"
    ),
    k: int = typer.Option(10, help="neighbours of mutual k-NN and CKNNA"),
    layers: Optional[list[str]] = typer.Option(None, "--layers", "-l", help="glob(s) of layers (default: every)"),
    control: str = typer.Option(
        "untrained,render",
        help="comma-separated controls run beside the models (untrained, render; 'none': no controls)",
    ),
    n_boot: int = typer.Option(200, "--n-boot", help="half-samples of the scenes behind each interval"),
    permutations: int = typer.Option(100, help="scene shuffles of the permutation null"),
    seed: int = typer.Option(0, help="first seed of the scenes / rows"),
    out: Optional[str] = typer.Option(None, help="output folder (default: align-<models>)"),
    dry_run: bool = _dry_run_option(),
    budget: Optional[str] = _budget_option(),
    height: Optional[int] = _size_option("height"),
    width: Optional[int] = _size_option("width"),
    executor: str = _EXEC["executor"],
    ray_address: Optional[str] = _EXEC["ray_address"],
    workers: Optional[int] = _EXEC["workers"],
    gpus_per_worker: float = _EXEC["gpus_per_worker"],
) -> None:
    """Representational alignment within and across models (CKA, mutual k-NN), with untrained and render controls,
    verdicts per step and their specification curve."""
    from .experiments import alignment as al
    from .loading import load
    from .report.sections import alignment as section

    try:
        settings = al.Settings(
            n=n,
            seed=seed,
            steps=steps,
            metrics=tuple(_list(metric) or []),
            curve_measures=tuple(_list(curve_measures) or []),
            k=k,
            n_boot=n_boot,
            permutations=permutations,
            controls=() if control.strip() == "none" else tuple(_list(control) or []),
            layers=tuple(layers) if layers else None,
            generation=_size(height, width),
        )
        folder = _folder(out, "align", "+".join(models)) if not dry_run else Path(".")
        gens = [load(m) for m in models]
        if dry_run:
            _show_plans(al.plan(gens, settings), budget)
            return
        console.print(f"{', '.join(models)}: alignment -> {folder}")
        run_on = _executor(executor, ray_address, workers, gpus_per_worker)
        result = al.run(gens, settings, out=folder, progress=True, executor=run_on)
    except LayerscopeError as exc:
        _fail(exc)
        return
    _finish(section, result, folder)


@app.command("run")
def run_main(
    out: str = typer.Option("layerscope-report", help="report folder (tables, images and index.html)"),
    quick: bool = typer.Option(False, "--quick", help="small settings (about a minute): for tests and a first look"),
    only: Optional[str] = typer.Option(None, help="comma-separated section keys to run (default: every one)"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="progress bars"),
) -> None:
    """The main job: run every registered experiment on the zoo and write a self-contained HTML report."""
    from .main_job import run_main_job

    t0 = time.perf_counter()
    try:
        page = run_main_job(out, quick=quick, only=_list(only), progress=progress, log=console.print)
    except LayerscopeError as exc:
        _fail(exc)
        return
    console.print(f"report: {page} ({time.perf_counter() - t0:.0f} s)")


@app.command("report")
def report_cmd(folder: str = typer.Argument(..., help="a folder written by `layerscope run`")) -> None:
    """Rebuild the HTML report from the tables a run saved (no model is loaded)."""
    from .report import build_report

    try:
        page = build_report(folder)
    except LayerscopeError as exc:
        _fail(exc)
        return
    console.print(f"report: {page}")


@app.command("claims")
def claims_cmd(
    folder: str = typer.Argument(..., help="a folder written by `layerscope run`"),
    markdown: Optional[str] = typer.Option(None, "--markdown", help="also write the table as markdown to this file"),
) -> None:
    """Print the claims table of a report folder: each claim's verdict across the analysis choices (no model)."""
    from .report.sections import claims

    try:
        summ, _curve, notes = claims.summary(folder)
    except LayerscopeError as exc:
        _fail(exc)
        return
    for n in notes:
        err.print(f"note: {n}", markup=False)
    table = Table(title=f"claims of {folder}")
    frame = claims.claims_table(summ).drop(columns=["paper", "what was measured"])
    for col in frame.columns:
        table.add_column(str(col), overflow="fold")
    for row in frame.itertuples(index=False):
        table.add_row(*[str(v) for v in row])
    (console if console.is_terminal else Console(width=max(console.width, 200))).print(table)
    if markdown:
        cmd = f"layerscope claims {folder} --markdown {markdown}"
        Path(markdown).write_text(claims.markdown(folder, cmd, summ, notes), encoding="utf-8")
        console.print(f"wrote {markdown}")


_PAIRED = {("sweep", "pair")}


def _pairs_as_json(_ctx: click.Context, value: object) -> list[str]:
    """``--pair O E`` values (tuples) as JSON strings: typer would coerce each tuple to one str otherwise."""
    return [json.dumps([str(x) for x in v]) for v in value or ()]


def command() -> click.Group:
    """The CLI as a click group (typer's, with ``--pair`` taking two values per use)."""
    group = typer.main.get_command(app)
    for name, param in _PAIRED:
        for p in group.commands[name].params:
            if p.name == param:
                p.nargs = 2
                p.process_value = _pairs_as_json  # instance override of typer's coercion for this option only
    return group


def main() -> None:  # pragma: no cover
    sys.exit(command()())
