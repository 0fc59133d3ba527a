"""Command line: ``layerscope layers MODEL`` (more commands arrive with the experiments)."""

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


def main() -> None:  # pragma: no cover
    sys.exit(app())
