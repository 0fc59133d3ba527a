"""Command line: ``layerscope layers MODEL``, ``zoo list|train|eval``, ``world render`` (experiments add more)."""

from __future__ import annotations

import os
import sys
from typing import Optional

# transformers announces missing optional image backends on import; the CLI keeps its output to what was asked
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import typer
from rich.console import Console
from rich.table import Table

from .errors import LayerscopeError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="layerscope: find where a generative image model keeps its representations.")
console = Console()
err = Console(stderr=True)
_ABBREV = {"channel": "c", "token": "tok"}


def _fail(exc: Exception) -> None:
    err.print(f"[bold red]error:[/] {exc}")
    raise typer.Exit(code=2)


@app.callback()
def _main() -> None:
    """Inspect layers and candidate spaces of diffusers pipelines, torch generators and tiny test models."""


@app.command()
def layers(
    model: str = typer.Argument(..., help="model spec: tiny:sd, hf:/path/to/pipeline, torch:pkg.module:factory"),
    pattern: Optional[list[str]] = typer.Option(None, "--select", "-s", help="glob(s), e.g. 'up_blocks.*.resnets.*'"),
    spaces: bool = typer.Option(True, "--spaces/--no-spaces", help="also list the candidate spaces"),
    height: Optional[int] = typer.Option(None, help="image height for the shapes (default: the model's)"),
    width: Optional[int] = typer.Option(None, help="image width for the shapes (default: the model's)"),
) -> None:
    """Print the canonical layer map: name, kind, stage and per-step output shape."""
    from .specs import load

    try:
        gen = load(model)
        lmap = gen.layer_map(height, width)
        entries = lmap.select(pattern) if pattern else list(lmap.layers) + (list(lmap.spaces) if spaces else [])
    except LayerscopeError as exc:
        _fail(exc)
        return
    cfg = gen.config(height=height, width=width)
    size = f"{cfg.height}x{cfg.width}" if cfg.height else "n/a"
    table = Table(title=f"{model} ({gen.family}, {size}) - {len(lmap.layers)} layers, {len(lmap.spaces)} spaces")
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

    table = Table(title="layerscope zoo (Shapes world, 32x32)")
    for col in ("model", "params", "MB", "train steps", "train time", "prompt agreement (oracle)",
                "in-dist.", "FD (floor)", "bars"):
        table.add_column(col, overflow="fold")
    for name in zoo.MODELS:
        c = zoo.card(name)
        q = c.get("quality")
        agree = fd = ind = bars = "-"
        if q:
            ag = q.get("prompt_agreement")
            if ag:
                agree = " ".join(f"{k.replace('_hue', '')}:{_pct(v)}" for k, v in ag.items())
            ind = _pct(q["in_distribution"])
            fd = f"{q['frechet_distance']:.2f} ({q['frechet_floor']:.2f})"
            v = verdicts(q)
            bars = "all met" if all(v.values()) else "missed: " + ", ".join(k for k, ok in v.items() if not ok)
        minutes = (f"{c['train_seconds'] / 60:.0f} min, {c.get('device', '?')} x{c.get('threads', '?')}"
                   if c.get("train_seconds") else "-")
        params = f"{c['parameters'] / 1e6:.2f}M" if c.get("parameters") else "-"
        table.add_row(c["name"], params, f"{c['weights_bytes'] / 1e6:.1f}", str(c.get("steps") or "-"), minutes,
                      agree, ind, fd, bars)
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
    name: str = typer.Argument(..., help="unet, dit, vae, gan or oracle"),
    out: Optional[str] = typer.Option(None, help="output folder (default: the package's weights folder)"),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda when available)"),
    steps: Optional[int] = typer.Option(None, help="override the config's number of training steps"),
    resume: bool = typer.Option(False, help="diffusion models: continue the saved model for --steps more steps"),
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
    name: str = typer.Argument(..., help="unet, dit, vae or gan"),
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
        q = zoo.evaluate(name, n=n, folder=folder, **kw)
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
    from .images import save_png
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


def main() -> None:  # pragma: no cover
    sys.exit(app())
