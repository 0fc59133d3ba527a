"""An experiment's output folder: what it holds, who writes it, and the finished cells of an interrupted run.

``run(model, settings, out=folder)`` of every experiment works through a :class:`Workspace`:

- **claimed**: ``<folder>/layerscope.json`` records the experiment, the model spec(s) and the settings; a folder
  that holds another experiment, another model or other settings is refused in one sentence (naming what
  differs), and so is a non-empty folder that is not a layerscope experiment's;
- **locked** for the whole run (:func:`layerscope.folders.lock`): a second run on the same folder is refused with
  "in use by pid N";
- **cells**: each finished unit of work (an injection cell, a property space, a batch of probe samples, a batch of
  fork starts, one model's alignment features) is saved under ``cells/`` as its tables (parquet) and arrays (npz),
  then a marker ``<cell>.json`` holding every file's size and CRC-32, written last and atomically. A rerun takes
  every cell whose marker and files check out and computes only the others; a damaged cell (a truncated parquet,
  a missing npz) is named in a note and recomputed. Cells are computed the same way whether or not a run was
  interrupted, so a resumed run's tables equal an uninterrupted run's;
- **finished**: the Result is saved into the folder (``result.json`` last); a rerun of a finished folder loads it
  and computes nothing. Experiments whose cells are only intermediates drop them once the Result is saved.
"""

from __future__ import annotations

import json
import re
import shutil
import zlib
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import folders
from ..errors import ConfigError, StoreMismatchError
from .base import (
    NPZ_FORMAT,
    RESULT_FILE,
    Result,
    ResultDamagedError,
    load_arrays,
    save_arrays,
    save_table,
    settings_dict,
)

MANIFEST = "layerscope.json"
CELLS = "cells"


@dataclass
class Cell:
    """A finished cell read back: its tables, arrays and record."""

    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)


def _stem(key: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", key)
    return safe if safe == key else f"{safe}-{zlib.crc32(key.encode()):08x}"


def identity(experiment: str, models: list[str], settings: Any) -> dict[str, Any]:
    """What makes two runs the same study: the experiment, its model spec(s) and its settings."""
    return {"experiment": experiment, "models": list(models), "settings": settings_dict(settings)}


def _describe(ident: dict[str, Any]) -> str:
    return f"{ident.get('experiment', '?')} results of {', '.join(ident.get('models') or ['?'])}"


class Workspace:
    """The output folder of one experiment run (see the module docstring). Use as a context manager."""

    def __init__(self, folder: str | Path | None, ident: dict[str, Any], keep_cells: bool = True) -> None:
        self.folder = Path(folder) if folder is not None else None
        self.ident = ident
        self.keep_cells = keep_cells
        self.notes: list[str] = []
        self._stack = ExitStack()

    # claiming ---------------------------------------------------------------------------------------------------
    def __enter__(self) -> Workspace:
        if self.folder is None:  # no output folder: nothing is claimed, saved or resumed
            return self
        folders.check_output(self.folder)
        self._stack.enter_context(folders.lock(self.folder, "output folder"))
        try:
            self._claim()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()

    def _claim(self) -> None:
        assert self.folder is not None
        path = self.folder / MANIFEST
        if path.exists():
            try:
                old = json.loads(path.read_text())
                if not isinstance(old, dict):
                    raise ValueError("not an object")
            except (ValueError, OSError) as exc:
                raise ConfigError(f"{path} is damaged ({exc}); delete the folder or use another one") from None
            if old != self.ident:
                raise StoreMismatchError(f"{self.folder} holds {self._difference(old)}; use a new folder or delete it")
            return
        others = [p.name for p in self.folder.iterdir() if p.name != folders.LOCK_FILE]
        if others:
            raise StoreMismatchError(
                f"{self.folder} is not empty and holds no layerscope study ({MANIFEST} is missing; it has "
                f"{', '.join(sorted(others)[:3])}{', ...' if len(others) > 3 else ''}); use a new or empty folder"
            )
        folders.atomic_write_text(path, json.dumps(self.ident, indent=1))

    def _difference(self, old: dict[str, Any]) -> str:
        new = self.ident
        if old.get("experiment") != new["experiment"] or old.get("models") != new["models"]:
            return f"{_describe(old)}, not {_describe(new)}"
        a, b = old.get("settings") or {}, new["settings"]
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        return f"{_describe(old)} with other settings (differs in: {', '.join(diff) or 'settings'})"

    # the finished result ----------------------------------------------------------------------------------------
    def finished(self) -> Result | None:
        """The saved Result of a finished run of this study, None when there is none (or it is damaged: noted)."""
        if self.folder is None or not Result.exists(self.folder):
            return None
        try:
            return Result.load(self.folder)
        except ResultDamagedError as exc:  # a damaged table or result.json: recomputed from the cells
            self.note(f"the saved result in {self.folder} was damaged ({exc.why}); recomputed it")
            (self.folder / RESULT_FILE).unlink(missing_ok=True)
            return None

    def save(self, result: Result) -> Result:
        """Save the Result (``result.json`` last); drop the cells unless ``keep_cells``."""
        for n in self.notes:
            if n not in result.record.setdefault("notes", []):
                result.record["notes"].append(n)
        if self.folder is None:
            return result
        with folders.disk_errors(self.folder):
            result.save(self.folder)
        if not self.keep_cells:
            shutil.rmtree(self.folder / CELLS, ignore_errors=True)
        return result

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    # cells ------------------------------------------------------------------------------------------------------
    def _paths(self, key: str) -> Path:
        assert self.folder is not None
        return self.folder / CELLS / _stem(key)

    def get(self, key: str) -> Cell | None:
        """The finished cell ``key``, or None when it is missing or damaged (a damaged cell is noted)."""
        return None if self.folder is None else read_cell(self._paths(key), key, self.note)

    def put(
        self,
        key: str,
        tables: dict[str, pd.DataFrame] | None = None,
        arrays: dict[str, np.ndarray] | None = None,
        record: dict[str, Any] | None = None,
    ) -> None:
        """Save a finished cell: its files first, then the marker listing their sizes and checksums."""
        if self.folder is None:
            return
        stem = self._paths(key)
        stem.parent.mkdir(parents=True, exist_ok=True)
        files: dict[str, dict[str, int]] = {}
        for name, table in (tables or {}).items():
            path = stem.with_name(f"{stem.name}.{name}.parquet")
            files[path.name] = save_table(path, table)
        if arrays:
            files[f"{stem.name}.npz"] = save_arrays(stem.with_name(f"{stem.name}.npz"), arrays)
        marker = {"key": key, "files": files, "tables": list(tables or {}), "npz": NPZ_FORMAT, "record": record or {}}
        folders.atomic_write_text(stem.with_name(f"{stem.name}.json"), json.dumps(marker, default=str))


def read_cell(stem: Path, key: str, note: Any = None) -> Cell | None:
    """Read the cell saved at ``stem`` (see :meth:`Workspace.put`); None if it is missing or does not check out."""
    marker = stem.with_name(f"{stem.name}.json")
    if not marker.exists():
        return None

    def damaged(why: str) -> None:
        if note is not None:
            note(f"cell {key!r} is damaged ({why}); recomputing it")
        return None

    try:
        meta = json.loads(marker.read_text())
        files = meta["files"]
    except (ValueError, KeyError, TypeError, OSError) as exc:
        return damaged(f"{marker.name}: {exc}")
    for name, want in files.items():
        why = folders.file_damage(stem.parent / name, want)
        if why:
            return damaged(why)
    cell = Cell(record=meta.get("record") or {})
    try:
        for name in meta.get("tables", []):
            cell.tables[name] = pd.read_parquet(stem.with_name(f"{stem.name}.{name}.parquet"))
        npz = stem.with_name(f"{stem.name}.npz")
        if npz.name in files:
            cell.arrays = load_arrays(npz, int(meta.get("npz", 1)))
    except Exception as exc:  # checksums matched but the file does not parse: written by something else
        return damaged(f"{type(exc).__name__}: {exc}")
    return cell


def open_workspace(
    out: str | Path | None, experiment: str, models: list[str], settings: Any, keep_cells: bool = True
) -> Workspace:
    """The workspace of ``out`` for this study (with ``out=None``, one that keeps nothing)."""
    return Workspace(out, identity(experiment, models, settings), keep_cells=keep_cells)
