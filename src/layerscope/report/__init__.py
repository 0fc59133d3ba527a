"""The report: one self-contained HTML page rebuilt from saved Results, with no model loaded.

Each experiment has a section module in :mod:`.sections` (listed there, in report order, by real imports) with
``KEY``, ``TITLE``, ``EXPERIMENT`` (the experiment module) and ``render(run, page) -> str``, which reads only what
the main job saved: a :class:`SectionRun` gives it the section's entry of ``run.json`` (settings, notes, timings,
model cards) and the saved :class:`~layerscope.experiments.base.Result` of each job. Sections may also offer
``figures(result)`` (name -> matplotlib Figure) and ``console(result)`` (what the CLI prints), shared with the CLI.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DamagedError
from ..experiments.base import Result
from .html import Page

RUN_FILE = "run.json"
PAGE = "index.html"


@dataclass
class SectionRun:
    """A section's saved part of a main-job folder: its folder and its entry of ``run.json``."""

    key: str
    folder: Path
    record: dict[str, Any]

    @property
    def jobs(self) -> list[dict[str, Any]]:
        """One dict per job in run order: spec, folder, part (``model`` / ``sanity``), note, seconds, card."""
        return list(self.record.get("jobs", []))

    def results(self, part: str | None = "model") -> list[tuple[dict[str, Any], Result]]:
        """(job, Result) of every saved job of ``part`` (None: all), in run order."""
        out = []
        for job in self.jobs:
            sub = self.folder / job["folder"]
            if (part is None or job.get("part", "model") == part) and Result.exists(sub):
                out.append((job, Result.load(sub)))
        return out

    @property
    def settings(self) -> dict[str, Any]:
        """The settings of the section's first job (as saved)."""
        jobs = self.jobs
        return dict(jobs[0].get("settings", {})) if jobs else {}


def read_run(folder: str | Path) -> dict[str, Any]:
    """The main job's record (``run.json``) of a report folder."""
    path = Path(folder) / RUN_FILE
    if not path.exists():
        raise ConfigError(
            f"{folder} is not a layerscope report folder ({RUN_FILE} is missing); create one with `layerscope run`"
        )
    try:
        record = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise DamagedError(f"{path} is not valid JSON ({exc}); rerun `layerscope run` into {folder}") from None
    why = _malformed(record)
    if why:
        raise DamagedError(f"{path} is not a layerscope run record ({why}); rerun `layerscope run` into {folder}")
    return record


def _malformed(record: Any) -> str | None:
    """What is wrong with the shape of a ``run.json`` record (None when the report can read it)."""
    if not isinstance(record, dict):
        return f"it holds a {type(record).__name__}, not an object"
    sections = record.get("sections")
    if not isinstance(sections, dict):
        return "it has no 'sections' object"
    for key, info in sections.items():
        if not isinstance(info, dict) or not isinstance(info.get("jobs", []), list):
            return f"section {key!r} is not an object with a 'jobs' list"
        for job in info.get("jobs", []):
            if not isinstance(job, dict) or not isinstance(job.get("folder"), str):
                return f"a job of section {key!r} has no 'folder'"
    return None


def build_report(folder: str | Path) -> Path:
    """Rebuild ``index.html`` from the Results a previous run saved (no model is loaded)."""
    from .html import build

    return build(Path(folder))


__all__ = ["PAGE", "RUN_FILE", "Page", "SectionRun", "build_report", "read_run"]
