"""The main job (``layerscope run``): every report section's experiment on its main-job models, then the page.

For each section of :data:`layerscope.report.sections.SECTIONS`, the experiment's ``main_job(quick)`` names the
jobs (model spec, settings); each model is loaded once per section, run, and its Result saved under
``<out>/<section>/<model>/``. ``run.json`` records per section the settings, notes, timings and each model's card
(written here, at run time, so the report is rebuilt from files alone). Experiments with cells resume from the
parts they saved: rerunning the same command after an interruption redoes only what is missing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._version import __version__
from .errors import ConfigError
from .experiments.base import settings_dict
from .folders import atomic_write_text, check_output, lock
from .loading import load
from .models.base import Generator


def run_main_job(
    out: str | Path,
    quick: bool = False,
    only: list[str] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Path:
    """Run every section's experiment (or ``only`` these section keys), save the Results, build the HTML page."""
    from .report.sections import SECTIONS

    out = Path(out)
    runnable = [s for s in SECTIONS if getattr(s, "EXPERIMENT", None) is not None]  # a section of no experiment: none
    keys = [s.KEY for s in runnable]
    if only:
        bad = [k for k in only if k not in keys]
        if bad:
            raise ConfigError(f"unknown report section(s) {bad}; valid: {', '.join(keys)}")
    secs = [s for s in runnable if not only or s.KEY in only]
    jobs = {s.KEY: s.EXPERIMENT.main_job(quick) for s in secs}  # settings are built (and checked) before any run
    check_output(out, "report folder")
    with lock(out, "report folder"):
        return _run_sections(out, secs, jobs, quick, progress, log)


def _run_sections(
    out: Path, secs: list[Any], jobs: dict[str, Any], quick: bool, progress: bool, log: Callable[[str], None]
) -> Path:
    from .report import RUN_FILE, build_report

    record: dict[str, Any] = {
        "version": __version__,
        "quick": quick,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "sections": {},
    }
    for sec in secs:
        t0 = time.perf_counter()
        models: dict[str, Generator] = {}
        notes: list[str] = []
        done = []
        for job in jobs[sec.KEY]:
            for spec in job.specs:
                if spec not in models:
                    models[spec] = load(spec)
            loaded = [models[spec] for spec in job.specs]
            folder = out / sec.KEY / job.folder_name()
            log(f"{sec.KEY}: {', '.join(job.specs)}" + (f" ({job.part}: {job.note})" if job.part != "model" else ""))
            t1 = time.perf_counter()
            model = loaded[0] if isinstance(job.spec, str) else loaded
            result = sec.EXPERIMENT.run(model, job.settings, out=folder, progress=progress)  # saved in folder
            for n in result.notes:
                if n not in notes:
                    notes.append(n)
                    log(n)
            done.append(
                {
                    "spec": job.spec,
                    "specs": list(job.specs),
                    "folder": folder.name,
                    "part": job.part,
                    "note": job.note,
                    "settings": settings_dict(job.settings),
                    "seconds": round(time.perf_counter() - t1, 1),
                    "card": loaded[0].card,
                    "cards": [m.card for m in loaded],
                }
            )
        record["sections"][sec.KEY] = {
            "seconds": round(time.perf_counter() - t0, 1),
            "notes": notes,
            "models": [spec for j in done if j["part"] == "model" for spec in j["specs"]],
            "jobs": done,
        }
    atomic_write_text(out / RUN_FILE, json.dumps(record, indent=1, default=str))
    return build_report(out)
