"""What the world's trainers share: device choice, bf16 autocast, seeding, the loss log, a progress bar."""

from __future__ import annotations

import csv
import json
import random
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ..allocator import tune_cpu_allocator


def pick_device(device: str | None = None) -> torch.device:
    """``device`` if given, else CUDA when available, else CPU. On the CPU it also tunes glibc's allocator once per
    process (:mod:`layerscope.allocator`): zoo training and evaluation allocate large tensors every step."""
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cpu":
        tune_cpu_allocator()
    return dev


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CPU and CUDA (a no-op when disabled)."""
    if not enabled:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


class TrainLog:
    """Loss log written as CSV while training (``train_log.csv`` next to the weights)."""

    def __init__(self, path: Path, fields: list[str], append: bool = False, offset_seconds: float = 0.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fields = ["step", "seconds", *fields]
        append = append and self.path.exists()
        self._fh = self.path.open("a" if append else "w", newline="")
        self._w = csv.DictWriter(self._fh, fieldnames=self.fields)
        if not append:
            self._w.writeheader()
        self.offset = offset_seconds
        self.start = time.perf_counter()

    def write(self, step: int, **values: float) -> None:
        row = {"step": step, "seconds": round(self.offset + time.perf_counter() - self.start, 2)}
        row.update({k: (round(float(v), 6) if isinstance(v, (int, float)) else v) for k, v in values.items()})
        self._w.writerow(row)
        self._fh.flush()

    def close(self) -> float:
        self._fh.close()
        return time.perf_counter() - self.start


@contextmanager
def progress(total: int, description: str, enabled: bool = True) -> Iterator[Any]:
    """A rich progress bar over training steps; yields ``advance(n=1, **fields)``."""
    if not enabled:
        yield lambda n=1, **kw: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    cols = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    ]
    with Progress(*cols, transient=False) as bar:
        task = bar.add_task(description, total=total, info="")

        def advance(n: int = 1, **fields: float) -> None:
            info = " ".join(f"{k}={v:.4g}" for k, v in fields.items())
            bar.update(task, advance=n, info=info)

        yield advance


def write_json(path: Path, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
