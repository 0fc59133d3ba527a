"""Streaming a capture to an :class:`~.store.ActivationStore` on a background thread while the denoiser runs.

The hooks hand every site's step to :class:`StoreWriter` as soon as the capture has filled it; the writer collects
them and hands each denoiser step over as one piece, which the writer thread puts straight into its place in the
store's chunk files (:class:`~.store.DirectBatch`), so when a batch's generation ends little is left to write. One
hand-over per step, not per site, matters on a machine whose cores torch keeps busy: every wake of the writer thread
preempts one of torch's threads mid-operation. Per site, a 25-layer, 10-step capture of one sample woke it about a
thousand times, and that cost about 0.08 s of a 0.54 s generation on 2 cores. The hand-over goes through a bounded
queue: a writer that falls behind makes the denoiser wait, so memory stays bounded. A batch counts as written only
when its files are complete, its manifest is recorded and its samples are marked done, in that order; a kill before
that leaves samples that a resumed run regenerates.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

import torch

from ..errors import LayerscopeError
from ..folders import disk_errors
from .store import ActivationStore, ArraySpec, DirectBatch

#: denoiser steps (every streamed site's tensor at one step) handed to the writer and not yet written, at most; the
#: data itself lives in the batch's capture buffers, so this bounds how far the writer may fall behind, not a copy
QUEUE_ITEMS = 64


class StoreWriteError(LayerscopeError, OSError):
    """Writing a streamed capture failed for a reason other than a full disk (which is ``DiskFullError``)."""


class StoreWriter:
    """One background thread writing a streamed capture: a fresh store's arrays first (while the first steps run),
    then every batch's steps as they come (:meth:`step`), then at :meth:`end` the batch's images, manifest and done
    flags. At most one finished batch waits to be written while the next generates (:meth:`begin` waits for the
    one before). The first error on the thread is raised in the main thread at its next call, or at :meth:`close`."""

    def __init__(self, store: ActivationStore, maxsize: int | None = None) -> None:
        self.store = store
        self.maxsize = maxsize = QUEUE_ITEMS if maxsize is None else maxsize
        self._q: queue.Queue[tuple[Any, ...] | None] = queue.Queue(maxsize)
        self._cond = threading.Condition()
        self.error: BaseException | None = None
        self.begun = 0  # batches handed over
        self.committed = 0  # batches written, recorded and marked done
        self.handed = 0  # steps handed over
        self.written = 0  # steps taken off the queue and written
        self.max_behind = 0  # the most steps handed over and not yet written at any time
        self.max_unwritten = 0  # the most batches not yet written when a batch began to generate
        self._batch: DirectBatch | None = None  # the batch being written straight into its files (writer thread)
        self._pending: list[tuple[ArraySpec, int, torch.Tensor]] = []  # the step being collected (main thread)
        self._thread = threading.Thread(target=self._run, name="layerscope-store-writer", daemon=True)
        self._thread.start()

    # -- the main thread ---------------------------------------------------------------------------------------------
    def begin(self, ids: list[int], specs: list[ArraySpec]) -> None:
        """A batch of samples ``ids`` starts generating; waits until at most one batch before it is unwritten."""
        with self._cond:
            while self.error is None and self.committed < self.begun - 1:
                self._cond.wait()
            self.max_unwritten = max(self.max_unwritten, self.begun - self.committed)
        self._pending = []  # left only by a batch whose generation failed
        self.begun += 1
        self._put(("begin", ids, specs))

    def step(self, spec: ArraySpec, k: int, buf: torch.Tensor) -> None:
        """Step index ``k`` of ``spec``'s capture buffer ``buf`` (batch, step, ...) is filled: write it. Collected
        until a site reports another step index, then handed over with the rest of its step."""
        if self._pending and self._pending[-1][1] != k:
            self._flush()
        self._pending.append((spec, k, buf))

    def _flush(self) -> None:
        if not self._pending:
            return
        items, self._pending = self._pending, []
        self._put(("step", items))
        with self._cond:
            self.handed += 1
            self.max_behind = max(self.max_behind, self.handed - self.written)

    def end(
        self,
        ids: list[int],
        items: list[tuple[ArraySpec, torch.Tensor]],
        images: torch.Tensor,
        timesteps: list[float],
    ) -> None:
        """The batch's generation ended: write what is left, its manifest, then mark its samples done."""
        self._flush()
        self._put(("end", ids, items, images, list(timesteps)))

    def close(self, abort: bool = False) -> None:
        """Wait for the thread to write everything handed over (batches never ended are left unfinished) and raise
        its error, unless ``abort`` (an error of the main thread is on its way: it wins)."""
        self._pending = []  # a step never ended belongs to a batch that failed
        self._q.put(None)  # the thread drains the queue even after an error, so this never blocks for long
        self._thread.join()
        if self.error is not None and not abort:
            raise self.error

    def _put(self, item: tuple[Any, ...]) -> None:
        if self.error is not None:
            raise self.error
        self._q.put(item)

    # -- the writer thread -------------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            with disk_errors(self.store.path):
                self.store.materialize()  # a fresh store's arrays, while the generation starts
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            self._fail(exc)
        while True:
            item = self._q.get()
            if item is None:
                break
            if self.error is not None:
                continue  # drained, so the main thread never blocks on a full queue
            try:
                with disk_errors(self.store.path):
                    self._handle(item)
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                self._fail(exc)
        if self._batch is not None:
            self._batch.abort()  # a batch whose generation failed: never finished, never recorded

    def _handle(self, item: tuple[Any, ...]) -> None:
        store, kind = self.store, item[0]
        if kind == "step":
            if self._batch is not None:
                for spec, k, buf in item[1]:
                    self._batch.write(spec, k, buf)
            with self._cond:
                self.written += 1
        elif kind == "begin":
            if self._batch is not None:
                self._batch.abort()  # the batch before failed in its generation
            _, ids, specs = item
            self._batch = store.direct_batch(specs, ids)
        else:
            _, ids, items, images, timesteps = item
            batch, self._batch = self._batch, None
            if batch is not None:
                store.commit_direct(batch, images)
            else:
                store.write_batch(items, ids, images)  # zarr writes what cannot go straight into the files
            store.mark_done(ids, timesteps)  # only now the samples count as finished
            with self._cond:
                self.committed += 1
                self._cond.notify_all()

    def _fail(self, exc: BaseException) -> None:
        if isinstance(exc, OSError) and not isinstance(exc, LayerscopeError):
            name = str(self.store.path)
            wrapped = StoreWriteError(
                f"writing the activation store {name!r} failed ({exc.strerror or exc}); the batches finished before "
                "are kept, rerun the same command to resume"
            )
            wrapped.__cause__ = exc
            exc = wrapped
        with self._cond:
            self.error = exc
            self._cond.notify_all()
