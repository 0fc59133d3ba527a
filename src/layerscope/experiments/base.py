"""The one shape of every experiment: frozen settings -> ``run(model, settings, out=None, progress=None) -> Result``.

An experiment module declares

- ``NAME``: its key (folder and report-section name);
- ``Settings``: a frozen dataclass of everything that defines a run (validated by ``run`` before any generation);
- ``run(model, settings, out=None, progress=None) -> Result``: the caller passes a loaded model (experiments never
  load one); ``out`` is a folder for per-cell parts where the experiment has cells, so an interrupted run resumes;
- ``main_job(quick) -> list[Job]``: what ``layerscope run`` runs for it on the embedded default.

A :class:`Result` holds tidy tables (DataFrames), a record (JSON-able dict: settings, notes, timings, derived
numbers) and artifacts (named bundles of arrays, e.g. images), with one persistence convention: ``save(dir)`` writes
``<table>.parquet``, ``<artifact>.npz`` and last ``result.json`` (which marks the result complete); ``load(dir)``
reads them back. Report sections and CLI commands consume Results only.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import folders
from .._version import __version__
from ..errors import ConfigError, DamagedError

RESULT_FILE = "result.json"
#: open-domain prompts, cycled, for experiments given none (properties' base samples, alignment's rows)
OPEN_PROMPTS = (
    "a photo of a cat",
    "a house by a lake",
    "a bowl of fruit on a table",
    "a city street at night",
    "a portrait of an old man",
    "a red car in a field",
    "a mountain landscape",
    "a bird on a branch",
)


NPZ_FORMAT = 2  # npz member names percent-escape "%", "." and "/"; format 1 wrote "." as "__" (not reversible)


def _escape(key: str) -> str:
    return key.replace("%", "%25").replace(".", "%2E").replace("/", "%2F")


def _unescape(key: str, fmt: int = NPZ_FORMAT) -> str:
    if fmt < 2:
        return key.replace("__", ".")
    return key.replace("%2F", "/").replace("%2E", ".").replace("%25", "%")


def save_arrays(path: str | Path, arrays: Mapping[str, Any]) -> dict[str, int]:
    """Write ``arrays`` (key -> array; any key) as one compressed npz, atomically; return its file record."""

    def write(tmp: Path) -> None:
        with tmp.open("wb") as fh:
            np.savez_compressed(fh, **{_escape(k): np.asarray(v) for k, v in arrays.items()})

    folders.atomic_write(path, write)
    return folders.file_record(path)


def save_table(path: str | Path, table: pd.DataFrame) -> dict[str, int]:
    """Write ``table`` as parquet, atomically; return its file record."""
    folders.atomic_write(path, lambda tmp: table.to_parquet(tmp, index=False))
    return folders.file_record(path)


def load_arrays(path: str | Path, fmt: int = NPZ_FORMAT) -> dict[str, np.ndarray]:
    """Read what :func:`save_arrays` wrote (``fmt``: the npz format of the writer, 1 for older files)."""
    with np.load(path, allow_pickle=False) as z:
        return {_unescape(k, fmt): z[k] for k in z.files}


@dataclass
class Result:
    """What an experiment returns: ``tables`` (name -> DataFrame), ``record`` (a JSON-able dict) and ``artifacts``
    (name -> {key: array}), for one model."""

    experiment: str
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    def __getitem__(self, name: str) -> pd.DataFrame:
        if name not in self.tables:
            raise KeyError(f"this {self.experiment} result has no table {name!r}; it has: {', '.join(self.tables)}")
        return self.tables[name]

    @property
    def notes(self) -> list[str]:
        """Notices the run raised (e.g. a metric skipped), also kept in the record."""
        return list(self.record.get("notes", []))

    def save(self, folder: str | Path) -> Path:
        """Write every table as ``<name>.parquet``, every artifact as ``<name>.npz`` (each atomically), then
        ``result.json`` with every file's size and checksum: a folder with ``result.json`` holds a whole result."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        files: dict[str, dict[str, int]] = {}
        for name, table in self.tables.items():
            files[f"{name}.parquet"] = save_table(folder / f"{name}.parquet", table)
        for name, arrays in self.artifacts.items():
            files[f"{name}.npz"] = save_arrays(folder / f"{name}.npz", arrays)
        meta = {
            "experiment": self.experiment,
            "layerscope": __version__,
            "tables": list(self.tables),
            "artifacts": list(self.artifacts),
            "npz": NPZ_FORMAT,
            "files": files,
            "record": self.record,
        }
        folders.atomic_write_text(folder / RESULT_FILE, json.dumps(meta, indent=1, default=_json_default))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> Result:
        """Read a result :meth:`save` wrote (no model is loaded); a missing, truncated, changed or unreadable file
        raises :class:`~layerscope.errors.DamagedError` naming it."""
        folder = Path(folder)
        path = folder / RESULT_FILE
        if not path.exists():
            raise ConfigError(f"{folder} holds no saved result ({RESULT_FILE} is missing)")

        try:
            meta = json.loads(path.read_text())
            if not isinstance(meta, dict) or not {"experiment", "tables", "artifacts", "record"} <= set(meta):
                raise ValueError("it lacks the experiment, tables, artifacts or record")
        except (ValueError, UnicodeDecodeError) as exc:
            raise ResultDamagedError(folder, f"{RESULT_FILE} cannot be read ({exc})") from None
        for name, want in (meta.get("files") or {}).items():  # results saved before file records: none
            why = folders.file_damage(folder / name, want)
            if why:
                raise ResultDamagedError(folder, why)
        try:
            tables = {name: pd.read_parquet(folder / f"{name}.parquet") for name in meta["tables"]}
            fmt = int(meta.get("npz", 1))
            artifacts = {name: load_arrays(folder / f"{name}.npz", fmt) for name in meta["artifacts"]}
        except Exception as exc:  # no file record (an older result) or a file that does not parse
            raise ResultDamagedError(folder, f"a file cannot be read ({type(exc).__name__}: {exc})") from None
        return cls(meta["experiment"], tables, meta["record"], artifacts)

    @staticmethod
    def exists(folder: str | Path) -> bool:
        return (Path(folder) / RESULT_FILE).exists()


class ResultDamagedError(DamagedError):
    """A saved Result's files are missing, truncated, changed or unreadable (``why`` says which and how)."""

    def __init__(self, folder: Path, why: str) -> None:
        super().__init__(
            f"the saved result in {folder} is damaged: {why}; rerun the study into that folder (or delete it) "
            "to recompute it"
        )
        self.folder, self.why = folder, why


def _json_default(v: Any) -> Any:
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, (np.ndarray,)):
        return v.tolist()
    if isinstance(v, (set, frozenset, tuple)):
        return list(v)
    return str(v)


@dataclass(frozen=True)
class Job:
    """One run of the main job: a model spec (or a tuple of specs, for experiments that take several models), the
    settings, the folder name, and its part in the study (``model``; ``control`` for a model's control, e.g. its
    untrained copy; or ``sanity`` for a generator built to fail, with ``note`` saying what it must show)."""

    spec: str | tuple[str, ...]
    settings: Any
    folder: str = ""
    part: str = "model"
    note: str = ""

    @property
    def specs(self) -> tuple[str, ...]:
        return (self.spec,) if isinstance(self.spec, str) else tuple(self.spec)

    def folder_name(self) -> str:
        return self.folder or "+".join(self.specs).replace(":", "_").replace("/", "_")


def settings_dict(settings: Any) -> dict[str, Any]:
    """A settings dataclass (or a dict) as a JSON-able dict (tuples as lists)."""
    data = dataclasses.asdict(settings) if dataclasses.is_dataclass(settings) else dict(settings)
    return json.loads(json.dumps(data, default=_json_default))


def generation_kwargs(
    steps: int | None = None, guidance: float | None = None, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Keyword arguments for ``model.generate`` from a settings object's generation fields (None: the model's)."""
    kw: dict[str, Any] = dict(extra or {})
    if steps is not None:
        kw["num_inference_steps"] = steps
    if guidance is not None:
        kw["guidance_scale"] = guidance
    return kw
