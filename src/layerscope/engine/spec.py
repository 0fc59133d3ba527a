"""What to capture and how to intervene: plain data, validated by the engine before any generation starts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ..errors import ConfigError
from .steps import StepSel

OPS = ("replace", "add", "blend", "zero", "scale")


@dataclass(frozen=True)
class Row:
    """Source = sample ``index`` of the same batch, same branch, same forward pass."""

    index: int


@dataclass(frozen=True)
class Stored:
    """Source = a previous capture (in memory or a zarr store) of sample ``sample``.

    ``layer`` defaults to the intervened layer; ``what`` is ``"output"`` or ``"update"``. A capture with a single
    branch serves every branch; otherwise branches are matched by label. The capture must come from a run like
    this one: its recorded model, step count and height/width are checked before generating, its timesteps after
    the first batch (before anything is kept), so activations never land at other steps.
    """

    capture: Any
    sample: int = 0
    layer: str | None = None
    what: str = "output"


@dataclass(frozen=True)
class PerTarget:
    """Source = one tensor per target sample: ``values[k]`` goes to ``targets[k]``.

    ``values`` has shape ``(len(targets), *shape)`` where ``shape`` fits the activation as a plain tensor source does
    (the full per-sample shape, or a channel vector for add/blend). This is how many different perturbations of one
    space run in one batched generation (e.g. a noise draw per row).
    """

    values: torch.Tensor


Source = Row | Stored | PerTarget | torch.Tensor | None


@dataclass
class Capture:
    """Which activations to record.

    ``layers``: names or globs from the layer map; ``steps``: step selection (None = all); ``branches``: CFG branch
    labels to keep (None = all); ``pooled``: mean over spatial positions / tokens, except for the layers matching
    ``unpooled`` (names or globs kept whole in the same run, e.g. ``x_t`` next to pooled layers); ``update``: also record
    output - input of the module; ``store``: zarr folder to stream to (None = memory); ``budget_bytes``: refuse
    (memory) or refuse per batch (store) above this size; ``dtype``: storage dtype (a torch floating dtype, its name,
    or ``"model"``: the model's own dtype, e.g. bfloat16 for a bfloat16 pipeline; zarr stores hold float16/32/64);
    ``heads``: ``"all"`` keeps every head of an attention map (dims head x query x key), ``"mean"`` keeps the mean
    over heads (query x key). A pooled attention map is averaged over its queries (head x key: how much attention
    each key receives).
    """

    layers: str | Sequence[str] = "*"
    steps: StepSel = None
    branches: Sequence[str] | None = None
    pooled: bool = False
    unpooled: str | Sequence[str] = ()
    update: bool = False
    store: str | Path | None = None
    budget_bytes: int = 4 * 2**30
    dtype: torch.dtype | str = torch.float32
    heads: Literal["all", "mean"] = "all"

    def resolved(self, model_dtype: torch.dtype) -> "Capture":
        """This capture with ``dtype`` a torch floating dtype (``"model"`` -> ``model_dtype``), checked."""
        import dataclasses

        d = self.dtype
        if d == "model":
            d = model_dtype
        elif isinstance(d, str):
            found = getattr(torch, d.removeprefix("torch."), None)
            if not isinstance(found, torch.dtype):
                raise ConfigError(f"unknown capture dtype {d!r}; give float32, float16, bfloat16, float64 or 'model'")
            d = found
        if not isinstance(d, torch.dtype) or not d.is_floating_point:
            raise ConfigError(f"a capture's dtype must be a floating dtype or 'model', got {self.dtype!r}")
        if self.store is not None and d == torch.bfloat16:
            raise ConfigError(
                "zarr stores cannot hold bfloat16 (numpy has no such dtype): stream with dtype=torch.float16 or "
                "torch.float32, or keep a bfloat16 capture in memory"
            )
        return self if d is self.dtype else dataclasses.replace(self, dtype=d)

    @property
    def torch_dtype(self) -> torch.dtype:
        """The storage dtype of a resolved capture (:meth:`resolved`; the engine receives resolved captures)."""
        if isinstance(self.dtype, torch.dtype):
            return self.dtype
        if self.dtype == "model":
            raise ConfigError(
                "a capture with dtype='model' must be resolved against its model first (Capture.resolved)"
            )
        return self.resolved(torch.float32).torch_dtype  # a dtype's name

    def pools(self, layer: str) -> bool:
        """Whether ``layer`` is captured pooled in this capture."""
        import fnmatch

        keep = [self.unpooled] if isinstance(self.unpooled, str) else list(self.unpooled)
        return self.pooled and not any(fnmatch.fnmatchcase(layer, g) for g in keep)


@dataclass
class Intervention:
    """Change an activation at ``layer`` for the ``targets`` samples during ``steps`` on ``branches``.

    ``op``: replace (x = s), add (x = x + alpha*s), blend (x = (1-alpha)*x + alpha*s), zero (x = 0). ``source``: a
    :class:`Row` of the same batch, a :class:`Stored` capture, a tensor (per-sample shape, or a channel vector
    broadcast over positions for add/blend), or :class:`PerTarget` tensors (one per target). ``targets`` are sample
    indices (None = every sample but the source row).

    At attention sites: ``heads`` (head indices) limits the change to those heads (the head's channels of Q, K, V
    and per-head outputs, the head's slice of a map); ``tokens`` limits a map edit to some keys: a word of the
    prompt (every position of its tokens in each target's prompt; an error names a prompt without it) or key
    indices. ``scale`` multiplies the activation by ``alpha`` (with ``tokens``: prompt-to-prompt's reweighting of
    one word's attention).
    """

    layer: str
    op: Literal["replace", "add", "blend", "zero", "scale"] = "replace"
    source: Source = None
    targets: Sequence[int] | None = None
    steps: StepSel = None
    branches: Sequence[str] | None = None
    alpha: float = 1.0
    heads: Sequence[int] | None = None
    tokens: str | Sequence[int] | None = None

    def describe(self) -> dict[str, Any]:
        src = self.source
        if isinstance(src, Row):
            s = f"row:{src.index}"
        elif isinstance(src, Stored):
            s = f"stored:{src.layer or self.layer}:{src.what}:{src.sample}"
        elif isinstance(src, PerTarget):
            s = f"per_target{tuple(src.values.shape)}:{float(src.values.double().sum()):.6g}"
        elif isinstance(src, torch.Tensor):
            s = f"tensor{tuple(src.shape)}:{float(src.double().sum()):.6g}"
        else:
            s = None
        steps = self.steps if isinstance(self.steps, (int, str, type(None))) else str(self.steps)
        return {
            "layer": self.layer,
            "op": self.op,
            "source": s,
            "targets": None if self.targets is None else list(self.targets),
            "steps": steps,
            "branches": None if self.branches is None else list(self.branches),
            "alpha": self.alpha,
            # only when used, so records written before the options existed keep their fingerprint
            **({"heads": [int(h) for h in self.heads]} if self.heads is not None else {}),
            **(
                {"tokens": self.tokens if isinstance(self.tokens, str) else [int(t) for t in self.tokens]}
                if self.tokens is not None
                else {}
            ),
        }


def replace(layer: str, source: Source, **kw: Any) -> Intervention:
    """Replace the activation at ``layer`` with ``source``."""
    return Intervention(layer, "replace", source, **kw)


def add(layer: str, source: Source, alpha: float = 1.0, **kw: Any) -> Intervention:
    """Add ``alpha * source`` (e.g. a concept direction) to the activation at ``layer``."""
    return Intervention(layer, "add", source, alpha=alpha, **kw)


def blend(layer: str, source: Source, alpha: float = 0.5, **kw: Any) -> Intervention:
    """Move the activation at ``layer`` a fraction ``alpha`` of the way to ``source``."""
    return Intervention(layer, "blend", source, alpha=alpha, **kw)


def zero(layer: str, **kw: Any) -> Intervention:
    """Set the activation at ``layer`` to zero (ablation)."""
    return Intervention(layer, "zero", None, **kw)


def reweight(layer: str, token: str | Sequence[int], scale: float, **kw: Any) -> Intervention:
    """Multiply the attention that every query pays to ``token`` (a word of the prompt, or key indices) by
    ``scale`` in the attention map at ``layer`` (prompt-to-prompt's reweighting; the rows are not renormalised).
    Acts on the ``cond`` branch unless ``branches`` is given (the unconditional prompt lacks the word)."""
    kw.setdefault("branches", ("cond",))
    return Intervention(layer, "scale", None, alpha=scale, tokens=token, **kw)
