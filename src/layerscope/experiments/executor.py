"""Where an experiment's cells are computed: in this process (``serial``) or on Ray actors (``ray``).

An experiment cuts its work into independent cells (an injection cell is one pair x seed x window) and hands them to
:func:`run_cells` as :class:`Task` s: a key, a module-level function ``fn(model, *args) -> Part`` and its
arguments. Finished cells come back from the workspace; the others go to the executor, and the **driver alone**
writes each part into the workspace as it arrives, whatever the completion order. The parts are returned in task
order, so a table built from them is the same whichever executor ran them.

- :class:`SerialExecutor` (the default) computes the cells one after another with the driver's own models.
- :class:`RayExecutor` (``pip install -e ".[ray]"``) starts ``workers`` Ray actors; each loads a model by its spec
  once (``ls.load(spec, **kwargs)``, the same call that loaded the driver's) and keeps it for every cell it is given.
  A worker that dies mid-cell (killed, out of memory, a lost node) is replaced and its cell runs again on another
  worker; nothing finished is recomputed and nothing is written twice. A cell that fails with an error of its own
  (bad input: the same error on any worker) fails the run with that error, without retries.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pandas as pd

from ..errors import ConfigError
from ..progress import ProgressArg, progress_callback

if TYPE_CHECKING:  # pragma: no cover
    from ..models.base import Generator
    from .workspace import Workspace

EXECUTORS = ("serial", "ray")
#: how often a cell is started again after the worker running it died, before the run fails
MAX_RESTARTS = 3


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


def load_call(model: "Generator") -> tuple[str, dict[str, Any]]:
    """The ``ls.load`` call that made ``model`` (a spec and keywords), for a worker to make its own copy."""
    call = getattr(model, "load_call", None)
    if call is None:
        raise ConfigError(
            f"{model.spec} was built in this process (not loaded from a spec string), so a Ray worker cannot load "
            "its own copy; load it with ls.load('<scheme>:...') or run with the serial executor"
        )
    return call


class RayExecutor:
    """Cells on Ray actors that each load the models once and keep them.

    ``address``: None starts a local Ray instance (or uses the one already initialised in this process); ``"auto"``
    or ``"ray://host:port"`` joins a cluster. ``workers``: actors to start (default: one per GPU when
    ``gpus_per_worker`` > 0, else one per CPU of the cluster, at most the number of cells). ``threads``: torch
    threads per worker (default: this machine's CPUs shared among the workers)."""

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        workers: int | None = None,
        gpus_per_worker: float = 0.0,
        threads: int | None = None,
    ) -> None:
        try:
            import ray
        except ImportError as exc:
            raise ConfigError(
                'the ray executor needs Ray: install the extra with pip install -e ".[ray]" (or pip install '
                "'layerscope[ray]')"
            ) from exc
        if workers is not None and workers < 1:
            raise ConfigError(f"workers must be >= 1, got {workers}")
        if gpus_per_worker < 0:
            raise ConfigError(f"gpus_per_worker must be >= 0, got {gpus_per_worker}")
        self.ray = ray
        self.address = address
        self.workers = workers
        self.gpus_per_worker = float(gpus_per_worker)
        self.threads = threads
        self.restarts: list[str] = []  # keys of cells started again after their worker died

    def _init(self) -> None:
        ray = self.ray
        if not ray.is_initialized():
            # the workers import layerscope like the driver: from the same environment and source tree
            ray.init(address=self.address, include_dashboard=False, logging_level="ERROR", log_to_driver=False)

    def _n_workers(self, n_tasks: int) -> int:
        if self.workers is not None:
            return min(self.workers, max(1, n_tasks))
        res = self.ray.cluster_resources()
        if self.gpus_per_worker > 0:
            n = int(res.get("GPU", 0) // self.gpus_per_worker)
            if n < 1:
                raise ConfigError(
                    f"the Ray cluster has {res.get('GPU', 0):g} GPUs, fewer than gpus_per_worker="
                    f"{self.gpus_per_worker:g}"
                )
        else:
            n = int(res.get("CPU", 1))
        return max(1, min(n, n_tasks))

    def run(self, tasks: Sequence[Task], models: dict[str, "Generator"]) -> Iterator[tuple[int, Part]]:
        if not tasks:
            return
        ray = self.ray
        self._init()
        calls = {spec: load_call(m) for spec, m in models.items()}
        n = self._n_workers(len(tasks))
        threads = self.threads or max(1, (os.cpu_count() or 1) // n)
        actor_cls = ray.remote(num_cpus=1, num_gpus=self.gpus_per_worker, max_restarts=0)(CellWorker)

        def start() -> Any:
            return actor_cls.remote(calls, threads)

        idle = [start() for _ in range(n)]
        queue = list(range(len(tasks)))
        running: dict[Any, tuple[int, Any]] = {}  # object ref -> (task index, actor)
        attempts = [0] * len(tasks)
        try:
            while queue or running:
                while queue and idle:
                    i = queue.pop(0)
                    actor = idle.pop()
                    t = tasks[i]
                    running[actor.run.remote(t.fn, t.model, t.args)] = (i, actor)
                ready, _ = ray.wait(list(running), num_returns=1)
                ref = ready[0]
                i, actor = running.pop(ref)
                try:
                    part = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:  # the cell's own error: the same anywhere, no retry
                    cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else None
                    raise (cause or exc) from None
                except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as exc:
                    attempts[i] += 1
                    if attempts[i] > MAX_RESTARTS:
                        raise ConfigError(
                            f"cell {tasks[i].key}: its worker died {attempts[i]} times ({type(exc).__name__}); "
                            "giving up (is a worker running out of memory?)"
                        ) from exc
                    self.restarts.append(tasks[i].key)
                    queue.insert(0, i)  # again, first, on a fresh worker
                    idle.append(start())
                    continue
                idle.append(actor)
                yield i, part
        finally:
            for ref in running:
                ray.cancel(ref, force=True)
            for actor in idle + [a for _, a in running.values()]:
                ray.kill(actor)


class CellWorker:
    """A Ray actor's state: the models it loaded (lazily, once each) and the cells it runs on them."""

    def __init__(self, calls: dict[str, tuple[str, dict[str, Any]]], threads: int) -> None:
        import torch

        torch.set_num_threads(max(1, int(threads)))
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.calls = calls
        self.models: dict[str, Any] = {}

    def pid(self) -> int:
        return os.getpid()

    def run(self, fn: Callable[..., Part], spec: str, args: tuple[Any, ...]) -> Part:
        if spec not in self.models:
            from ..loading import load

            target, kwargs = self.calls[spec]
            self.models[spec] = load(target, **kwargs)
        return fn(self.models[spec], *args)


def make_executor(
    executor: "str | Executor | None",
    *,
    address: str | None = None,
    workers: int | None = None,
    gpus_per_worker: float = 0.0,
    threads: int | None = None,
) -> "Executor":
    """An executor from its name (``serial``, ``ray``), or the one given; the Ray options are for ``ray`` only."""
    if executor is None or executor == "serial":
        if executor == "serial" and (address or workers or gpus_per_worker):
            raise ConfigError("--ray-address, --workers and --gpus-per-worker go with --executor ray")
        return SerialExecutor()
    if executor == "ray":
        return RayExecutor(address, workers, gpus_per_worker, threads)
    if isinstance(executor, str):
        raise ConfigError(f"unknown executor {executor!r}; valid: {', '.join(EXECUTORS)}")
    return executor


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
