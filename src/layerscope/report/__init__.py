"""The main job's report: experiments register a section once and ``layerscope run`` / ``layerscope report`` use it.

A :class:`Section` has two halves, kept apart so a report can be rebuilt without any model:

- ``run(ctx)`` computes and saves tables (parquet) and images under ``ctx.folder`` (``<report>/<key>/``);
- ``render(folder, page)`` reads only what ``run`` saved and returns the section's HTML (figures drawn from the
  saved tables, each with the CLI command that reproduces it).

The one registration point is :func:`register` (a decorator on a function returning the :class:`Section`), called
by the modules listed in :data:`SECTION_MODULES`; a new experiment adds its module there.
"""

from __future__ import annotations

import importlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._version import __version__
from ..errors import ConfigError

#: modules that register report sections, in report order
SECTION_MODULES = ("layerscope.experiments.injection_report", "layerscope.experiments.abstractions_report",
                   "layerscope.experiments.properties_report")
RUN_FILE = "run.json"
PAGE = "index.html"


@dataclass
class RunContext:
    """What a section's ``run`` gets: its own folder, the mode, and where to say things."""

    folder: Path
    quick: bool = False
    progress: bool = True
    notes: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    log: Callable[[str], None] = print

    def note(self, text: str) -> None:
        """A notice shown in the report (e.g. a metric skipped) and on the console."""
        self.notes.append(text)
        self.log(text)


@dataclass
class Section:
    key: str
    title: str
    run: Callable[[RunContext], dict[str, Any] | None]
    render: Callable[[Path, "Page"], str]
    summary: str = ""


_SECTIONS: dict[str, Section] = {}


def register(factory: Callable[[], Section]) -> Callable[[], Section]:
    """Register the section a factory returns (the one registration point of the report)."""
    section = factory()
    _SECTIONS[section.key] = section
    return factory


def sections() -> list[Section]:
    """Registered sections in :data:`SECTION_MODULES` order."""
    for mod in SECTION_MODULES:
        importlib.import_module(mod)
    return list(_SECTIONS.values())


def run_all(out: str | Path, quick: bool = False, only: list[str] | None = None, progress: bool = True,
            log: Callable[[str], None] = print) -> Path:
    """Run every registered experiment (or ``only`` these keys), save their tables, build the HTML; the page path."""
    out = Path(out)
    secs = sections()
    keys = [s.key for s in secs]
    if only:
        bad = [k for k in only if k not in keys]
        if bad:
            raise ConfigError(f"unknown report section(s) {bad}; valid: {', '.join(keys)}")
        secs = [s for s in secs if s.key in only]
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"version": __version__, "quick": quick, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                              "sections": {}}
    for s in secs:
        ctx = RunContext(out / s.key, quick=quick, progress=progress, log=log)
        ctx.folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        info = s.run(ctx) or {}
        record["sections"][s.key] = {"seconds": round(time.perf_counter() - t0, 1), "notes": ctx.notes,
                                     "models": ctx.models, **info}
    (out / RUN_FILE).write_text(json.dumps(record, indent=1, default=str))
    from .html import build

    return build(out)


def section_record(folder: Path) -> dict[str, Any]:
    """What a section's ``run`` returned (settings, per-model notes), read back by its ``render`` from run.json."""
    return json.loads((folder.parent / RUN_FILE).read_text())["sections"].get(folder.name, {})


def model_folders(folder: Path, record: dict[str, Any], marker: str) -> list[Path]:
    """A section's per-model subfolders holding ``marker``, in the order the run went through the models."""
    order = [v["folder"] for v in record.get("per_model", {}).values()]
    subs = [p for p in folder.iterdir() if (p / marker).exists()]
    return sorted(subs, key=lambda p: (order.index(p.name) if p.name in order else len(order), p.name))


def build_report(folder: str | Path) -> Path:
    """Rebuild ``index.html`` from the tables a previous run saved (no model is loaded)."""
    from .html import build

    return build(Path(folder))


from .html import Page  # noqa: E402  (Page is part of the section interface)

__all__ = ["Page", "RunContext", "Section", "build_report", "model_folders", "register", "run_all", "section_record",
           "sections"]
