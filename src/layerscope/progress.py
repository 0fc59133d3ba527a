"""Progress reporting for long generations: a rich progress bar, or the caller's own callback."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

ProgressArg = bool | Callable[[int, int], None] | None


@contextmanager
def progress_callback(progress: ProgressArg, description: str) -> Iterator[Callable[[int, int], None] | None]:
    """``True``: show a rich bar (done/total units); a callable is passed through; ``None``/``False``: silent."""
    if not progress:
        yield None
        return
    if callable(progress):
        yield progress
        return
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=False,
    )
    task = None

    def update(done: int, total: int) -> None:
        nonlocal task
        if task is None:
            task = bar.add_task(description, total=total)
        bar.update(task, completed=done)

    with bar:
        yield update
