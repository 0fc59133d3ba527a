"""Batched injection sweep (Schaerf 2025, Fig. 5): O, E and O<-E@L for many layers in one generation.

For k layer sets one generation of batch k+2 runs rows ``[O, E, O<-E@L1, ..., O<-E@Lk]``; each injected row copies
E's activation at its layers from the same forward pass (a :class:`Row` source), so a k-layer sweep costs one
batched generation rather than k+1 generations. Rows are chunked by ``max_batch`` (each chunk re-runs O and E).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ConfigError
from ..progress import ProgressArg, progress_callback
from ..validate import check_seed
from .execute import execute
from .spec import Intervention, Row
from .steps import StepSel

if TYPE_CHECKING:  # pragma: no cover
    from ..config import GenerationConfig
    from ..layers import LayerMap
    from .backend import Backend


@dataclass
class SweepResult:
    """Images in [0, 1]: ``original`` (O), ``edit`` (E) and ``injected[name]`` for each layer set."""

    original: torch.Tensor
    edit: torch.Tensor
    injected: dict[str, torch.Tensor] = field(default_factory=dict)
    layer_sets: dict[str, tuple[str, ...]] = field(default_factory=dict)
    timesteps: list[float] = field(default_factory=list)

    def stack(self) -> torch.Tensor:
        """All images as one tensor in row order [O, E, injected...]."""
        return torch.stack([self.original, self.edit, *self.injected.values()])


def layer_sets(lmap: "LayerMap", layers: str | Sequence[str | Sequence[str]] | None) -> list[tuple[str, ...]]:
    """Resolve a sweep's layer selection into layer sets, one injected row each (errors name close matches).

    None = every layer of the map; a glob or list of names/globs gives one set per matching entry; a tuple of names
    is one combination (all patched in the same row). Duplicates are dropped, order kept.
    """
    if layers is None or isinstance(layers, str):
        sets: list[tuple[str, ...]] = [(e.name,) for e in lmap.select(layers)]
    else:
        sets = []
        for entry in layers:
            if isinstance(entry, str):
                sets += [(e.name,) for e in lmap.select(entry)]
            else:
                group = tuple(entry)
                if not group:
                    raise ConfigError("an empty layer combination was given to the sweep")
                for name in group:
                    lmap[name]  # raises with close matches
                sets.append(group)
    if not sets:
        raise ConfigError("the sweep selected no layer")
    return list(dict.fromkeys(sets))


def injection_sweep(
    model: "Backend",
    original: Any,
    edit: Any,
    layers: str | Sequence[str | Sequence[str]] | None = None,
    *,
    seeds: int | tuple[int, int] = 0,
    steps: StepSel = None,
    branches: Sequence[str] | None = None,
    max_batch: int | None = None,
    progress: ProgressArg = None,
    **gen_kwargs: Any,
) -> SweepResult:
    """Inject E's representation into O's generation at each layer set, batched.

    ``layers``: a glob or list of names/globs (each matching layer is one row), or explicit combinations as tuples
    of names (one row patches all of them); None = every layer of the map. ``seeds``: one seed for both or (O, E).
    ``steps``/``branches``: the window and CFG branches where E is injected. ``progress=True`` shows a bar.
    """
    cfg = model.config(**gen_kwargs)
    sets = layer_sets(model.layer_map(cfg.height, cfg.width), layers)
    s_o, s_e = _pair_seeds(seeds)
    max_batch = max_batch or model.default_max_batch
    if max_batch < 3:
        raise ConfigError(f"a sweep needs max_batch >= 3 (O, E and one injected row), got {max_batch}")
    per_chunk = max_batch - 2
    total = len(sets)
    with progress_callback(progress, f"injection sweep over {total} layer sets") as report:
        return _sweep_chunks(model, original, edit, sets, (s_o, s_e), per_chunk, cfg, steps, branches, report)


def _pair_seeds(seeds: Any) -> tuple[int, int]:
    """One seed for O and E, or an (O, E) pair, each checked."""
    if isinstance(seeds, (list, tuple)):
        if len(seeds) != 2:
            raise ConfigError(f"seeds must be one seed for O and E or an (O, E) pair of two, got {tuple(seeds)!r}")
        return check_seed(seeds[0], "seed of O"), check_seed(seeds[1], "seed of E")
    seed = check_seed(seeds)
    return seed, seed


def _sweep_chunks(
    model: "Backend",
    original: Any,
    edit: Any,
    sets: list[tuple[str, ...]],
    seeds: tuple[int, int],
    per_chunk: int,
    cfg: "GenerationConfig",
    steps: StepSel,
    branches: Sequence[str] | None,
    report: Callable[[int, int], None] | None,
) -> SweepResult:
    s_o, s_e = seeds
    result: SweepResult | None = None
    total = len(sets)
    for start in range(0, total, per_chunk):
        chunk = sets[start : start + per_chunk]
        prompts = [original, edit] + [original] * len(chunk)
        seeds_rows = [s_o, s_e] + [s_o] * len(chunk)
        ivs = [
            Intervention(name, "replace", Row(1), targets=[2 + k], steps=steps, branches=branches)
            for k, group in enumerate(chunk)
            for name in group
        ]
        out = execute(model, prompts, seeds_rows, cfg, None, ivs, max_batch=len(prompts))
        if result is None:
            result = SweepResult(out.images[0], out.images[1], timesteps=out.timesteps)
        for k, group in enumerate(chunk):
            key = "+".join(group)
            result.injected[key] = out.images[2 + k]
            result.layer_sets[key] = group
        if report is not None:
            report(min(start + per_chunk, total), total)
    assert result is not None
    return result
