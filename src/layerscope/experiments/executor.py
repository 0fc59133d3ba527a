"""Where an experiment's cells are computed: the seam every experiment runs its cells through.

An experiment cuts its work into independent cells (an injection cell is one pair x seed x window) and hands them to
:func:`run_cells` as :class:`Task` s: a key, a module-level function ``fn(model, *args) -> Part`` and its
arguments. Finished cells come back from the workspace; the others go to the executor, and the **driver alone**
writes each part into the workspace as it arrives, whatever the completion order. The parts are returned in task
order, so a table built from them is the same whichever executor ran them.

- :class:`SerialExecutor` (the default) computes the cells one after another with the driver's own models.
- :class:`layerscope.executors.RayExecutor` (``pip install -e ".[ray]"``) starts ``workers`` Ray actors; each loads a model by its spec
  once (``ls.load(spec, **kwargs)``, the same call that loaded the driver's) and keeps it for every cell it is given.
  A worker that dies mid-cell (killed, out of memory, a lost node) is replaced and its cell runs again on another
  worker; nothing finished is recomputed and nothing is written twice. A cell that fails with an error of its own
  (bad input: the same error on any worker) fails the run with that error, without retries.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pandas as pd

from ..progress import ProgressArg, progress_callback

if TYPE_CHECKING:  # pragma: no cover
    from ..models.base import Generator
    from .workspace import Workspace


@dataclass
class Part:
    """What one cell produces: tables, arrays and a JSON-able record (the same shape a workspace cell holds)."""

    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Task:
    """One cell: ``fn(model, *args)`` computes it on the model loaded from ``model`` (a spec)."""

    key: str
    model: str
    fn: Callable[..., Part]
    args: tuple[Any, ...] = ()


class Executor(Protocol):
    """Computes tasks and yields ``(index, part)`` in completion order."""

    name: str

    def run(self, tasks: Sequence[Task], models: dict[str, "Generator"]) -> Iterator[tuple[int, Part]]: ...


class SerialExecutor:
    """Every cell in this process, in task order, on the driver's models (today's behaviour)."""

    name = "serial"

    def run(self, tasks: Sequence[Task], models: dict[str, "Generator"]) -> Iterator[tuple[int, Part]]:
        for i, t in enumerate(tasks):
            yield i, t.fn(models[t.model], *t.args)


def run_cells(
    ws: "Workspace",
    models: dict[str, "Generator"],
    tasks: Sequence[Task],
    executor: "Executor | None" = None,
    progress: ProgressArg = None,
    desc: str = "cells",
) -> list[Part]:
    """Every task's part, in task order: finished cells read back from ``ws``, the rest computed by ``executor``
    (default serial) and saved into ``ws`` by this process as each arrives."""
    executor = executor or SerialExecutor()
    parts: list[Part | None] = []
    pending: list[int] = []
    for i, t in enumerate(tasks):
        cell = ws.get(t.key)
        parts.append(None if cell is None else Part(cell.tables, cell.arrays, cell.record))
        if cell is None:
            pending.append(i)
    done = len(tasks) - len(pending)
    with progress_callback(progress, desc) as report:
        if report is not None and done:
            report(done, len(tasks))
        for j, part in executor.run([tasks[i] for i in pending], models):
            i = pending[j]
            if parts[i] is not None:  # pragma: no cover - an executor that returned a cell twice
                raise RuntimeError(f"cell {tasks[i].key} came back twice")
            ws.put(tasks[i].key, part.tables, part.arrays, part.record)
            parts[i] = part
            done += 1
            if report is not None:
                report(done, len(tasks))
    assert all(p is not None for p in parts)
    return [p for p in parts if p is not None]
