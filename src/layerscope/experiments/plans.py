"""Study plans without running (``--dry-run``): what an experiment will generate, capture and store, and whether it
fits a memory budget, computed from its own validated plan and the model's layer map; nothing is generated.

Each experiment's ``plan(model(s), settings)`` returns a :class:`StudyPlan`: one :class:`Generations` row per kind
of generation call (how many calls, images per call, rows per denoiser batch, steps, bytes captured in memory and
written to disk). Exact: a test counts the images a real run generates on tiny models against the plan's. The
memory peak is an estimate, said so: weights + the captures one call holds in memory + a working set per batch row
(every skip tensor the U-Net holds for its decoder + twice the largest layer output, per CFG branch).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from ..engine import Capture, fmt_bytes
from ..errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from ..models.base import Generator

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})


def parse_bytes(text: str) -> int:
    """``"80GiB"``, ``"24 GB"``, ``"512MiB"`` or a plain number of bytes -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS:
        raise ConfigError(f"cannot read a memory budget from {text!r}; write e.g. 80GiB, 24GB or 512MiB")
    return int(float(m.group(1)) * _UNITS[unit])


@dataclass(frozen=True)
class Generations:
    """``calls`` generate calls of one kind making ``images`` images in all, in denoiser batches of at most ``batch``
    rows (times ``branches`` CFG branches), ``steps`` steps each; ``captured``: bytes the largest call holds in
    memory (or streams to a store, ``streamed``); ``stored``: bytes all calls write to disk."""

    what: str
    calls: int
    images: int
    batch: int
    steps: int
    branches: int
    captured: int = 0
    stored: int = 0
    streamed: bool = False


@dataclass
class StudyPlan:
    """What a study will do on one model (see the module docstring)."""

    experiment: str
    model: str
    rows: list[Generations]
    weights: int  # bytes of the model's parameters in their dtype
    row_bytes: int  # working set of one batch row in one CFG branch (an estimate)
    notes: list[str] = field(default_factory=list)

    @property
    def images(self) -> int:
        return sum(r.images for r in self.rows)

    @property
    def denoiser_rows(self) -> int:
        """Rows the denoiser evaluates over the whole study: images x branches x steps."""
        return sum(r.images * r.branches * max(1, r.steps) for r in self.rows)

    @property
    def stored(self) -> int:
        return sum(r.stored for r in self.rows)

    def peak(self) -> int:
        """Estimated peak memory of the device: weights + the largest call's in-memory capture and working set."""
        calls = [(0 if r.streamed else r.captured) + r.batch * r.branches * self.row_bytes for r in self.rows]
        return self.weights + max(calls, default=0)

    def fits(self, budget: int) -> bool:
        return self.peak() <= budget

    def table(self) -> pd.DataFrame:
        return pd.DataFrame(
            [
                {
                    "generation": r.what,
                    "calls": r.calls,
                    "images": r.images,
                    "rows per batch": f"{r.batch} x {r.branches}" if r.branches > 1 else str(r.batch),
                    "steps": r.steps,
                    "captured (largest call)": (
                        ("streamed " if r.streamed else "") + fmt_bytes(r.captured) if r.captured else "-"
                    ),
                    "stored": fmt_bytes(r.stored) if r.stored else "-",
                }
                for r in self.rows
            ]
        )

    def summary(self, budget: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "experiment": self.experiment,
            "model": self.model,
            "images": self.images,
            "denoiser rows (images x branches x steps)": self.denoiser_rows,
            "stored": fmt_bytes(self.stored),
            "weights": fmt_bytes(self.weights),
            "peak memory (estimate)": fmt_bytes(self.peak()),
        }
        if budget is not None:
            out["budget"] = fmt_bytes(budget)
            out["fits"] = self.fits(budget)
        return out


def model_bytes(model: "Generator") -> tuple[int, int]:
    """(parameter bytes, working-set bytes of one batch row in one branch) of ``model`` from its modules and map."""
    cfg = model.config()
    lmap = model.layer_map(cfg.height, cfg.width)
    item = torch.empty((), dtype=getattr(model, "dtype", torch.float32)).element_size()
    weights = sum(p.numel() * p.element_size() for m in model.modules() for p in m.parameters())
    sizes = [math.prod(e.shape) for e in lmap.layers if e.shape]
    skips = sum(math.prod(e.shape) for e in lmap.spaces if e.role == "skip" and e.shape)
    return weights, item * (skips + 2 * max(sizes, default=0))


def capture_bytes(model: "Generator", capture: Capture, n: int, **gen_kwargs: Any) -> int:
    return model.capture_bytes(capture, n_samples=n, **gen_kwargs) if capture.layers else 0


def image_bytes(model: "Generator", images: int, **gen_kwargs: Any) -> int:
    """Bytes of ``images`` images stored as uint8 RGB at the configuration's size."""
    cfg = model.config(**gen_kwargs)
    if cfg.height is None or cfg.width is None:
        return 0
    return images * 3 * cfg.height * cfg.width


def print_plan(plan: StudyPlan, console: Any, budget: int | None = None) -> None:
    """The plan as a rich table and a summary (the CLI's ``--dry-run``)."""
    from rich.table import Table

    t = Table(title=f"{plan.experiment} on {plan.model}: plan (nothing generated)")
    df = plan.table()
    for col in df.columns:
        t.add_column(col)
    for row in df.itertuples(index=False):
        t.add_row(*[str(v) for v in row])
    console.print(t)
    for k, v in plan.summary(budget).items():
        if k not in ("experiment", "model"):
            console.print(f"{k}: {'yes' if v is True else 'NO' if v is False else v}")
    for n in plan.notes:
        console.print(f"note: {n}")
