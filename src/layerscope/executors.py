"""Executors that run an experiment's cells elsewhere than in this process: :class:`RayExecutor`, and
:func:`make_executor` (``--executor serial|ray``). The seam itself (:class:`~.experiments.executor.Task`,
:func:`~.experiments.executor.run_cells`, the serial executor) is in :mod:`layerscope.experiments.executor`; this
module is the one that loads models on workers, by the same ``ls.load`` call that loaded the driver's.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from .errors import ConfigError
from .experiments.executor import Executor, Part, SerialExecutor, Task

if TYPE_CHECKING:  # pragma: no cover
    from .models.base import Generator

EXECUTORS = ("serial", "ray")
#: how often a cell is started again after the worker running it died, before the run fails
MAX_RESTARTS = 3


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
            from .loading import load

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
