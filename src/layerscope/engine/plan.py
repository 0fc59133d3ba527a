"""Planning: everything that runs before any generation, so mistakes fail fast.

A capture becomes a :class:`CapturePlan` (one :class:`~.store.ArraySpec` per recorded array) and each intervention a
:class:`PlannedIntervention` (its site, steps, branches, target rows and validated source); names, steps, branches
and shapes are checked here, and :func:`estimate_bytes` sizes a capture before the engine agrees to run it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from ..errors import ConfigError, ShapeError
from ..layers import LayerInfo, LayerMap
from .spec import OPS, Capture, Intervention, PerTarget, Row, Stored
from .steps import resolve_steps
from .store import ArraySpec


@dataclass
class PlannedIntervention:
    iv: Intervention
    info: LayerInfo
    steps: frozenset[int] | None  # None: once-per-generation tensor, no step window
    branch_idx: list[int]  # branch positions affected (unbranched sites: [0])
    targets: list[int]  # global sample indices
    kind: str  # row | stored | tensor | per_target | none
    tensor: torch.Tensor | None = None
    stored_branch: dict[int, str | None] = field(default_factory=dict)
    head_mask: torch.Tensor | None = None  # bool, broadcastable to the per-sample shape: the heads= selection
    keys: list[int] | None = None  # tokens= given as key indices
    word: str | None = None  # tokens= given as a word: positions per (branch label, sample) in key_pos
    key_pos: dict[tuple[str, int], list[int]] = field(default_factory=dict)


@dataclass(frozen=True)
class RunInfo:
    """What a stored intervention source must share with the run it goes into (checked before generating)."""

    model: str
    num_inference_steps: int
    num_steps: int  # denoiser calls per generation (0: single pass)
    height: int | None
    width: int | None


@dataclass
class CapturePlan:
    infos: list[LayerInfo]
    steps: tuple[int, ...]
    specs: dict[tuple[str, str], ArraySpec]


#: sites whose channels (or "head" dim) are split into heads, where heads= can select some of them
PER_HEAD_KINDS = ("q", "k", "v", "heads", "attention_map")

#: dims a pooled capture averages over (positions of a map, tokens of a sequence, queries of an attention map)
POOLED_DIMS = ("h", "w", "token", "query")


def reduced_dims(info: LayerInfo, cap: Capture) -> list[int]:
    """Per-sample dims (indices into ``info.dims``) a capture averages over: pooled positions, and the heads of an
    attention map captured with ``heads="mean"``."""
    pooled = cap.pools(info.name)
    return [
        k for k, d in enumerate(info.dims) if (pooled and d in POOLED_DIMS) or (d == "head" and cap.heads == "mean")
    ]


def _feature_shape(info: LayerInfo, cap: Capture) -> tuple[int, ...]:
    drop = reduced_dims(info, cap)
    return tuple(s for k, s in enumerate(info.shape) if k not in drop)


def _feature_dims(info: LayerInfo, cap: Capture) -> tuple[str, ...]:
    drop = reduced_dims(info, cap)
    return tuple(d for k, d in enumerate(info.dims) if k not in drop)


def _branch_labels(info: LayerInfo, branches: Sequence[str]) -> list[str]:
    return list(branches) if info.branched else ["none"]


def resolve_branches(info: LayerInfo, wanted: Sequence[str] | None, branches: Sequence[str], what: str) -> list[int]:
    labels = _branch_labels(info, branches)
    if wanted is None or not info.branched:
        return list(range(len(labels)))
    bad = [b for b in wanted if b not in labels]
    if bad:
        raise ConfigError(
            f"{what}: branch {bad[0]!r} does not exist in this run; valid branches: {', '.join(labels)}"
            + (" (guidance_scale <= 1 disables the uncond branch)" if "uncond" not in labels else "")
        )
    return [labels.index(b) for b in wanted]


def plan_capture(cap: Capture, lmap: LayerMap, n: int, num_steps: int, branches: Sequence[str]) -> CapturePlan:
    infos = lmap.select(cap.layers)
    if cap.heads not in ("all", "mean"):
        raise ConfigError(f"a capture's heads must be 'all' or 'mean', got {cap.heads!r}")
    steps = resolve_steps(cap.steps, num_steps) if num_steps else ()
    if cap.update:
        bad = [i.name for i in infos if i.in_shape != i.shape]
        if bad:
            raise ConfigError(
                f"block update (output - input) is undefined where input and output shapes differ: {', '.join(bad[:6])}"
                f"{' ...' if len(bad) > 6 else ''}; select other layers or capture with update=False"
            )
    specs: dict[tuple[str, str], ArraySpec] = {}
    for info in infos:
        bidx = resolve_branches(info, cap.branches, branches, f"capture of {info.name}")
        labels = _branch_labels(info, branches)
        st: list[int | None] = list(steps) if info.per_step else [None]
        feat = _feature_shape(info, cap)
        for what in ("output", "update") if cap.update else ("output",):
            specs[(what, info.name)] = ArraySpec(
                layer=info.name,
                what=what,
                shape=(n, len(st), len(bidx)) + feat,
                dims=("sample", "step", "branch") + _feature_dims(info, cap),
                steps=st,
                branches=[labels[b] for b in bidx],
                attrs={"kind": info.kind, "stage": info.stage, "pooled": cap.pools(info.name)},
            )
    return CapturePlan(infos, steps, specs)


def estimate_bytes(plan: CapturePlan, dtype: torch.dtype, n_samples: int | None = None) -> int:
    """Bytes the planned capture occupies (for ``n_samples`` samples, default all)."""
    item = torch.empty((), dtype=dtype).element_size()
    total = 0
    for s in plan.specs.values():
        per_sample = math.prod(s.shape[1:])
        total += per_sample * (s.shape[0] if n_samples is None else n_samples) * item
    return total


def fmt_bytes(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if b < 1024 or unit == "TiB":
            return f"{b:.1f} {unit}"
        b /= 1024
    return f"{b:.1f} TiB"


def plan_interventions(
    ivs: Sequence[Intervention],
    lmap: LayerMap,
    n: int,
    num_steps: int,
    branches: Sequence[str],
    run: RunInfo | None = None,
) -> list[PlannedIntervention]:
    """Validate every intervention; ``run`` (when given) is checked against each :class:`Stored` source's record."""
    planned = []
    for iv in ivs:
        if iv.op not in OPS:
            raise ConfigError(f"unknown intervention op {iv.op!r}; valid ops: {', '.join(OPS)}")
        info = lmap[iv.layer]
        what = f"intervention {iv.op} at {iv.layer}"
        steps = frozenset(resolve_steps(iv.steps, num_steps)) if (info.per_step and num_steps) else None
        bidx = resolve_branches(info, iv.branches, branches, what)
        src = iv.source
        targets = list(range(n)) if iv.targets is None else [int(t) for t in iv.targets]
        bad = [t for t in targets if not 0 <= t < n]
        if bad:
            raise ConfigError(f"{what}: target samples {bad} are outside this batch of {n} (valid: 0..{n - 1})")
        if iv.op in ("blend",) and not 0.0 <= iv.alpha <= 1.0:
            raise ConfigError(f"{what}: blend alpha must be in [0, 1], got {iv.alpha}")
        p = PlannedIntervention(iv, info, steps, bidx, targets, "none")
        _plan_selection(p, info, what)
        if iv.op in ("zero", "scale"):
            if src is not None:
                raise ConfigError(f"{what}: {iv.op} takes no source")
        elif src is None:
            raise ConfigError(f"{what}: needs a source (Row, Stored or a tensor)")
        elif isinstance(src, Row):
            if not 0 <= src.index < n:
                raise ConfigError(f"{what}: source row {src.index} is outside this batch of {n} (valid: 0..{n - 1})")
            if iv.targets is None:
                p.targets = [t for t in targets if t != src.index]
            p.kind = "row"
        elif isinstance(src, Stored):
            p.kind = "stored"
            if run is not None:
                _check_stored_run(src, run, what)
            _check_stored(p, src, info, branches, what)
        elif isinstance(src, torch.Tensor):
            p.kind = "tensor"
            _check_finite(src, what)
            p.tensor = _shape_tensor(src, info, iv.op, what)
        elif isinstance(src, PerTarget):
            vals = src.values
            if not isinstance(vals, torch.Tensor) or vals.ndim < 1 or vals.shape[0] != len(p.targets):
                got = tuple(vals.shape) if isinstance(vals, torch.Tensor) else type(vals).__name__
                raise ConfigError(f"{what}: PerTarget needs one value per target ({len(p.targets)} targets), got {got}")
            if len(set(p.targets)) != len(p.targets):
                raise ConfigError(f"{what}: PerTarget targets must be distinct samples")
            p.kind = "per_target"
            _check_finite(vals, what)
            one = _shape_tensor(vals[0], info, iv.op, what)  # validates the per-sample shape
            p.tensor = vals.detach().reshape((len(p.targets),) + tuple(one.shape))
        else:
            raise ConfigError(
                f"{what}: source must be Row, Stored, PerTarget or a torch.Tensor, got {type(src).__name__}"
            )
        planned.append(p)
    return planned


def _plan_selection(p: PlannedIntervention, info: LayerInfo, what: str) -> None:
    """Check and prepare an intervention's ``heads`` and ``tokens`` (which heads, which keys of a map)."""
    iv = p.iv
    if iv.heads is not None:
        heads = [int(h) for h in iv.heads]
        if not info.heads:
            raise ConfigError(f"{what}: heads= selects attention heads, but {info.name} ({info.kind}) has none")
        if info.kind not in PER_HEAD_KINDS:
            raise ConfigError(
                f"{what}: {info.name} ({info.kind}) is the attention output after its output projection, which mixes "
                "the heads; select heads at its per-head outputs (its 'heads' site), its q, k, v or its map"
            )
        bad = [h for h in heads if not 0 <= h < info.heads]
        if bad or not heads:
            raise ConfigError(
                f"{what}: head {bad[0] if bad else '(none given)'} is out of range: {info.name} has {info.heads} "
                f"heads (0..{info.heads - 1})"
            )
        shape = [1] * len(info.shape)
        if "head" in info.dims:
            k = info.dims.index("head")
            shape[k] = info.heads
            mask = torch.zeros(info.heads, dtype=torch.bool)
            mask[heads] = True
        else:  # channels are heads x head_dim, head-major (as diffusers splits them)
            k = info.dims.index("channel")
            shape[k] = info.shape[k]
            mask = torch.zeros(info.heads, info.shape[k] // info.heads, dtype=torch.bool)
            mask[heads] = True
        p.head_mask = mask.reshape(shape)
    if iv.tokens is None:
        return
    if info.kind != "attention_map":
        raise ConfigError(f"{what}: tokens= selects keys of an attention map; {info.name} is a {info.kind} site")
    n_keys = info.shape[-1]
    if isinstance(iv.tokens, str):
        if not info.keys.startswith("text"):
            raise ConfigError(
                f"{what}: the keys of {info.name} are {info.keys or 'not text'} tokens"
                + (", the text ones last: give key indices (tokens=[...])" if "text" in info.keys else "")
                + "; a word selects keys of a map whose keys open with the prompt's tokens (cross-attention)"
            )
        p.word = iv.tokens
        return
    keys = [int(t) for t in iv.tokens]
    bad = [t for t in keys if not 0 <= t < n_keys]
    if bad or not keys:
        raise ConfigError(f"{what}: key index {bad[0] if bad else '(none given)'} is outside 0..{n_keys - 1}")
    p.keys = keys


def _check_finite(t: torch.Tensor, what: str) -> None:
    if t.is_floating_point() or t.is_complex():
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise ConfigError(f"{what}: the source tensor holds {bad} NaN or infinite value(s) of {t.numel()}")


def _fits(src_shape: tuple[int, ...], info: LayerInfo, op: str, what: str) -> None:
    if tuple(src_shape) == tuple(info.shape):
        return
    if op in ("add", "blend"):
        try:
            # torch.broadcast_shapes has no annotations in torch
            broadcast = torch.broadcast_shapes(tuple(src_shape), info.shape)  # type: ignore[no-untyped-call]
            if tuple(broadcast) == tuple(info.shape):
                return
        except RuntimeError:
            pass
    allowed = "exactly" if op == "replace" else "broadcastable to"
    raise ShapeError(
        f"{what}: source shape {tuple(src_shape)} does not fit the activation shape {info.shape} "
        f"(dims {info.dims}); {op} needs a source {allowed} that shape"
    )


def channel_view(src: torch.Tensor, info: LayerInfo) -> torch.Tensor:
    """A 1-D channel vector is broadcast over positions: (C,) -> (C,1,1) for maps, (1,C) for token sequences."""
    if src.ndim == 1 and len(info.shape) > 1 and "channel" in info.dims:
        shape = [1] * len(info.shape)
        shape[info.dims.index("channel")] = src.shape[0]
        return src.reshape(shape)
    return src


def _shape_tensor(src: torch.Tensor, info: LayerInfo, op: str, what: str) -> torch.Tensor:
    src = channel_view(src.detach(), info)
    _fits(tuple(src.shape), info, op, what)
    return src


def _check_stored(p: PlannedIntervention, src: Stored, info: LayerInfo, branches: Sequence[str], what: str) -> None:
    cap = src.capture
    layer = src.layer or info.name
    cap.check_layer(layer, src.what)
    if not 0 <= src.sample < cap.n_samples(layer, src.what):
        raise ConfigError(
            f"{what}: stored sample {src.sample} is outside the capture's {cap.n_samples(layer, src.what)}"
        )
    feat = cap.feature_shape(layer, src.what)
    view = (feat[0],) if len(feat) == 1 else feat
    probe = channel_view(torch.empty(view, device="meta"), info)
    _fits(tuple(probe.shape), info, p.iv.op, what)
    stored_steps = cap.steps_of(layer, src.what)
    if info.per_step and p.steps is not None and stored_steps != [None]:
        missing = sorted(set(p.steps) - set(stored_steps))
        if missing:
            raise ConfigError(
                f"{what}: the stored capture lacks steps {missing[:8]}; it holds steps {stored_steps[:8]}"
                f"{'...' if len(stored_steps) > 8 else ''}"
            )
    stored_br = cap.branches_of(layer, src.what)
    labels = _branch_labels(info, branches)
    for b in p.branch_idx:
        if len(stored_br) == 1:
            p.stored_branch[b] = stored_br[0]
        elif labels[b] in stored_br:
            p.stored_branch[b] = labels[b]
        else:
            raise ConfigError(f"{what}: the stored capture has no branch {labels[b]!r}; it has {', '.join(stored_br)}")


def _recorded(capture: Any) -> dict[str, Any]:
    rec = getattr(capture, "recorded", None)
    return dict(rec()) if callable(rec) else {}


def _check_stored_run(src: Stored, run: RunInfo, what: str) -> None:
    """Refuse a stored capture recorded by another model, step count or image size than this run's."""
    rec = _recorded(src.capture)
    diffs = []
    if "model" in rec and rec["model"] != run.model:
        diffs.append(f"model {rec['model']!r} (this run: {run.model!r})")
    if run.num_steps:
        ts = rec.get("timesteps") or []
        if "num_inference_steps" in rec and rec["num_inference_steps"] != run.num_inference_steps:
            diffs.append(f"num_inference_steps={rec['num_inference_steps']} (this run: {run.num_inference_steps})")
        elif ts and len(ts) != run.num_steps:
            diffs.append(f"{len(ts)} denoising steps (this run: {run.num_steps})")
    for key in ("height", "width"):
        if key in rec and rec[key] != getattr(run, key):
            diffs.append(f"{key}={rec[key]} (this run: {getattr(run, key)})")
    if diffs:
        raise ConfigError(
            f"{what}: the stored capture comes from another run, with {', '.join(diffs)}, so its activations would "
            "land at other steps or positions; capture the source with this run's model, steps and size"
        )


def check_stored_timesteps(planned: Sequence[PlannedIntervention], timesteps: Sequence[float]) -> None:
    """After the first batch (before anything is kept): stored sources must have been recorded at this run's
    scheduler timesteps (the step counts were checked before generating; this catches another schedule)."""
    if not timesteps:
        return
    for p in planned:
        if p.kind != "stored":
            continue
        ts = _recorded(cast(Stored, p.iv.source).capture).get("timesteps") or []
        same = len(ts) == len(timesteps) and all(
            math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-6) for a, b in zip(ts, timesteps)
        )
        if ts and not same:
            raise ConfigError(
                f"intervention {p.iv.op} at {p.iv.layer}: the stored capture was recorded at timesteps "
                f"{_fmt_ts(ts)} but this run steps through {_fmt_ts(timesteps)}; capture the source with this run's "
                "scheduler settings"
            )


def _fmt_ts(ts: Sequence[float]) -> str:
    shown = ", ".join(f"{float(t):g}" for t in ts[:6])
    return f"[{shown}{', ...' if len(ts) > 6 else ''}]"
