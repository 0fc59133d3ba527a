"""The engine: hooks on the modules an adapter names, step counting, capture and intervention.

This is the only code in layerscope that registers forward hooks. It knows nothing of model families: an adapter
gives it a :class:`~layerscope.layers.LayerMap` (which module, where the tensor sits), the module that is called once
per denoising step, the CFG branch labels and a function that generates a batch. Rows of a branched tensor are laid
out as ``branch * n_samples + sample`` (diffusers concatenates the unconditional half first).
"""

from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .._version import __version__
from ..config import GenerationConfig
from ..errors import BudgetError, ConfigError, ShapeError
from ..layers import LayerInfo, LayerMap
from .paths import get_input, get_path, set_input, set_path
from .spec import OPS, Capture, Intervention, PerTarget, Row, Stored
from .steps import resolve_steps
from .store import ActivationStore, ArraySpec, CaptureResult, fingerprint

if TYPE_CHECKING:  # pragma: no cover
    from ..models.base import Generator


@dataclass
class GenerationResult:
    """Images (sample, 3, H, W) in [0, 1], the capture (memory or store) and the scheduler's timesteps."""

    images: torch.Tensor
    capture: CaptureResult | ActivationStore | None = None
    timesteps: list[float] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------------
# planning (everything here runs before any generation, so mistakes fail fast)


@dataclass
class _PlannedIV:
    iv: Intervention
    info: LayerInfo
    steps: frozenset[int] | None  # None: once-per-generation tensor, no step window
    branch_idx: list[int]  # branch positions affected (unbranched sites: [0])
    targets: list[int]  # global sample indices
    kind: str  # row | stored | tensor | per_target | none
    tensor: torch.Tensor | None = None
    stored_branch: dict[int, str | None] = field(default_factory=dict)


@dataclass
class _CapPlan:
    infos: list[LayerInfo]
    steps: tuple[int, ...]
    specs: dict[tuple[str, str], ArraySpec]


def _feature_shape(info: LayerInfo, pooled: bool) -> tuple[int, ...]:
    if not pooled:
        return info.shape
    return tuple(s for s, d in zip(info.shape, info.dims) if d not in ("h", "w", "token"))


def _feature_dims(info: LayerInfo, pooled: bool) -> tuple[str, ...]:
    if not pooled:
        return info.dims
    return tuple(d for d in info.dims if d not in ("h", "w", "token"))


def _branch_labels(info: LayerInfo, branches: Sequence[str]) -> list[str]:
    return list(branches) if info.branched else ["none"]


def _resolve_branches(
    info: LayerInfo, wanted: Sequence[str] | None, branches: Sequence[str], what: str
) -> list[int]:
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


def plan_capture(cap: Capture, lmap: LayerMap, n: int, num_steps: int, branches: Sequence[str]) -> _CapPlan:
    infos = lmap.select(cap.layers)
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
        bidx = _resolve_branches(info, cap.branches, branches, f"capture of {info.name}")
        labels = _branch_labels(info, branches)
        st: list[int | None] = list(steps) if info.per_step else [None]
        feat = _feature_shape(info, cap.pools(info.name))
        for what in ("output", "update") if cap.update else ("output",):
            specs[(what, info.name)] = ArraySpec(
                layer=info.name,
                what=what,
                shape=(n, len(st), len(bidx)) + feat,
                dims=("sample", "step", "branch") + _feature_dims(info, cap.pools(info.name)),
                steps=st,
                branches=[labels[b] for b in bidx],
                attrs={"kind": info.kind, "stage": info.stage, "pooled": cap.pools(info.name)},
            )
    return _CapPlan(infos, steps, specs)


def estimate_bytes(plan: _CapPlan, dtype: torch.dtype, n_samples: int | None = None) -> int:
    """Bytes the planned capture occupies (for ``n_samples`` samples, default all)."""
    item = torch.empty((), dtype=dtype).element_size()
    total = 0
    for s in plan.specs.values():
        per_sample = math.prod(s.shape[1:])
        total += per_sample * (s.shape[0] if n_samples is None else n_samples) * item
    return total


def _fmt_bytes(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if b < 1024 or unit == "TiB":
            return f"{b:.1f} {unit}"
        b /= 1024
    return f"{b:.1f} TiB"


def _plan_interventions(
    ivs: Sequence[Intervention], lmap: LayerMap, n: int, num_steps: int, branches: Sequence[str]
) -> list[_PlannedIV]:
    planned = []
    for iv in ivs:
        if iv.op not in OPS:
            raise ConfigError(f"unknown intervention op {iv.op!r}; valid ops: {', '.join(OPS)}")
        info = lmap[iv.layer]
        what = f"intervention {iv.op} at {iv.layer}"
        steps = frozenset(resolve_steps(iv.steps, num_steps)) if (info.per_step and num_steps) else None
        bidx = _resolve_branches(info, iv.branches, branches, what)
        src = iv.source
        targets = list(range(n)) if iv.targets is None else [int(t) for t in iv.targets]
        bad = [t for t in targets if not 0 <= t < n]
        if bad:
            raise ConfigError(f"{what}: target samples {bad} are outside this batch of {n} (valid: 0..{n - 1})")
        if iv.op in ("blend",) and not 0.0 <= iv.alpha <= 1.0:
            raise ConfigError(f"{what}: blend alpha must be in [0, 1], got {iv.alpha}")
        p = _PlannedIV(iv, info, steps, bidx, targets, "none")
        if iv.op == "zero":
            if src is not None:
                raise ConfigError(f"{what}: zero takes no source")
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
            _check_stored(p, src, info, branches, what)
        elif isinstance(src, torch.Tensor):
            p.kind = "tensor"
            p.tensor = _shape_tensor(src, info, iv.op, what)
        elif isinstance(src, PerTarget):
            vals = src.values
            if not isinstance(vals, torch.Tensor) or vals.ndim < 1 or vals.shape[0] != len(p.targets):
                got = tuple(vals.shape) if isinstance(vals, torch.Tensor) else type(vals).__name__
                raise ConfigError(f"{what}: PerTarget needs one value per target ({len(p.targets)} targets), got {got}")
            if len(set(p.targets)) != len(p.targets):
                raise ConfigError(f"{what}: PerTarget targets must be distinct samples")
            p.kind = "per_target"
            one = _shape_tensor(vals[0], info, iv.op, what)  # validates the per-sample shape
            p.tensor = vals.detach().reshape((len(p.targets),) + tuple(one.shape))
        else:
            raise ConfigError(
                f"{what}: source must be Row, Stored, PerTarget or a torch.Tensor, got {type(src).__name__}"
            )
        planned.append(p)
    return planned


def _fits(src_shape: tuple[int, ...], info: LayerInfo, op: str, what: str) -> None:
    if tuple(src_shape) == tuple(info.shape):
        return
    if op in ("add", "blend"):
        try:
            if tuple(torch.broadcast_shapes(tuple(src_shape), info.shape)) == tuple(info.shape):
                return
        except RuntimeError:
            pass
    allowed = "exactly" if op == "replace" else "broadcastable to"
    raise ShapeError(
        f"{what}: source shape {tuple(src_shape)} does not fit the activation shape {info.shape} "
        f"(dims {info.dims}); {op} needs a source {allowed} that shape"
    )


def _channel_view(src: torch.Tensor, info: LayerInfo) -> torch.Tensor:
    """A 1-D channel vector is broadcast over positions: (C,) -> (C,1,1) for maps, (1,C) for token sequences."""
    if src.ndim == 1 and len(info.shape) > 1 and "channel" in info.dims:
        shape = [1] * len(info.shape)
        shape[info.dims.index("channel")] = src.shape[0]
        return src.reshape(shape)
    return src


def _shape_tensor(src: torch.Tensor, info: LayerInfo, op: str, what: str) -> torch.Tensor:
    src = _channel_view(src.detach(), info)
    _fits(tuple(src.shape), info, op, what)
    return src


def _check_stored(p: _PlannedIV, src: Stored, info: LayerInfo, branches: Sequence[str], what: str) -> None:
    cap = src.capture
    layer = src.layer or info.name
    cap.check_layer(layer, src.what)
    if not 0 <= src.sample < cap.n_samples(layer, src.what):
        raise ConfigError(f"{what}: stored sample {src.sample} is outside the capture's {cap.n_samples(layer, src.what)}")
    feat = cap.feature_shape(layer, src.what)
    view = (feat[0],) if len(feat) == 1 else feat
    probe = _channel_view(torch.empty(view, device="meta"), info)
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


# ---------------------------------------------------------------------------------------------------------------------
# running


class _RunState:
    def __init__(self, n: int, branches: Sequence[str]) -> None:
        self.n = n
        self.branches = list(branches)
        self.step = -1

    def rows(self, info: LayerInfo, samples: Sequence[int], branch_idx: Sequence[int]) -> list[int]:
        if not info.branched:
            return list(samples)
        return [b * self.n + i for b in branch_idx for i in samples]


class _Handler:
    """Everything that happens at one site in one chunk: interventions, then capture."""

    def __init__(
        self,
        info: LayerInfo,
        run: _RunState,
        sample_ids: list[int],
        ivs: list[_PlannedIV],
        cap: Capture | None,
        cap_plan: _CapPlan | None,
    ) -> None:
        self.info = info
        self.run = run
        self.ivs = []
        local = {g: k for k, g in enumerate(sample_ids)}
        for p in ivs:
            tl = [local[t] for t in p.targets if t in local]
            src_local = local.get(p.iv.source.index) if p.kind == "row" else None
            if p.kind == "row" and src_local is None and tl:
                raise ConfigError(
                    f"intervention at {info.name}: source row {p.iv.source.index} is not in the same batch as its "
                    "targets; raise max_batch or use injection_sweep, which keeps sources and targets together"
                )
            if tl:
                if p.kind == "per_target":  # the rows of the source that belong to this chunk's targets
                    src_local = [k for k, t in enumerate(p.targets) if t in local]
                self.ivs.append((p, tl, src_local))
        self.cap = cap
        self.cap_steps = set(cap_plan.steps) if cap_plan else set()
        self.cap_specs = (
            [s for (w, l), s in cap_plan.specs.items() if l == info.name] if cap_plan else []
        )
        self.cap_branch_idx = (
            _resolve_branches(info, cap.branches, run.branches, "capture") if cap is not None else []
        )
        self.buffers: dict[str, torch.Tensor] = {}
        self.filled: dict[str, int] = {}
        self.calls_at: int | None = None
        self._tensor_cache: dict[tuple, torch.Tensor] = {}

    # -- called from the hooks --------------------------------------------------------------------------------------
    def process(self, x: torch.Tensor, get_in: Callable[[], torch.Tensor] | None) -> torch.Tensor:
        info, run = self.info, self.run
        step = run.step if info.per_step else None
        key = step if info.per_step else -99
        if self.calls_at == key:
            raise ConfigError(
                f"{info.name} ran twice in {'step ' + str(step) if info.per_step else 'one generation'}; layerscope "
                "needs each layer called once per denoiser call (is the module reused or true-CFG enabled?)"
            )
        self.calls_at = key
        if not isinstance(x, torch.Tensor):
            raise ConfigError(f"{info.name}: expected a tensor at its site, found {type(x).__name__}")
        expect_rows = run.n * len(run.branches) if info.branched else run.n
        if x.shape[0] != expect_rows:
            raise ConfigError(
                f"{info.name}: its tensor has {x.shape[0]} rows but this batch lays out {expect_rows} "
                f"({run.n} samples x {len(run.branches) if info.branched else 1} branches); the adapter's batch layout "
                "does not fit this pipeline call"
            )
        active = [(p, tl, s) for (p, tl, s) in self.ivs if p.steps is None or step in p.steps]
        if active:
            orig = x
            x = x.clone()
            for p, tl, src_local in active:
                self._apply(x, orig, p, tl, src_local, step)
        if self.cap_specs and (step is None or step in self.cap_steps):
            self._capture(x, get_in)
        return x

    def _apply(self, x, orig, p: _PlannedIV, tl, src_local, step) -> None:
        op, alpha = p.iv.op, p.iv.alpha
        for b in p.branch_idx:
            rows = self.run.rows(self.info, tl, [b])
            if op == "zero":
                x[rows] = 0
                continue
            if p.kind == "row":
                src = orig[self.run.rows(self.info, [src_local], [b])[0]]
            elif p.kind == "tensor":
                src = self._cached(("t",), p.tensor, x)
            elif p.kind == "per_target":
                src = self._cached(("p", id(p)), p.tensor, x)[src_local]
            else:
                s: Stored = p.iv.source
                layer = s.layer or self.info.name
                t = s.capture.lookup(layer, s.what, s.sample, step, p.stored_branch[b])
                src = _channel_view(t, self.info).to(device=x.device, dtype=x.dtype)
            cur = x[rows]
            if op == "replace":
                new = src.expand_as(cur)
            elif op == "add":
                new = cur + alpha * src
            else:  # blend
                new = (1 - alpha) * cur + alpha * src
            x[rows] = new.to(x.dtype)

    def _cached(self, key, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        k = key + (like.device, like.dtype, id(t))
        if k not in self._tensor_cache:
            self._tensor_cache[k] = t.to(device=like.device, dtype=like.dtype)
        return self._tensor_cache[k]

    def _take(self, x: torch.Tensor) -> torch.Tensor:
        """The captured rows as a view (sample, branch, *feature), pooled if asked; no copy yet."""
        info, run = self.info, self.run
        if info.branched:
            x = x.reshape((len(run.branches), run.n) + tuple(x.shape[1:]))
            if len(self.cap_branch_idx) != len(run.branches):
                x = x[self.cap_branch_idx]
            x = x.transpose(0, 1)
        else:
            x = x.unsqueeze(1)
        if self.cap.pools(info.name):
            dims = [k + 2 for k, d in enumerate(info.dims) if d in ("h", "w", "token")]
            if dims:
                x = x.float().mean(dim=dims)
        return x.detach()

    def _capture(self, x: torch.Tensor, get_in) -> None:
        for spec in self.cap_specs:
            data = self._take(x if spec.what == "output" else x - get_in())
            buf = self.buffers.get(spec.what)
            if buf is None:  # one preallocated (sample, step, branch, *feature) buffer: a single copy per capture
                buf = torch.empty((data.shape[0], len(spec.steps)) + tuple(data.shape[1:]), dtype=self.cap.dtype)
                self.buffers[spec.what] = buf
            k = self.filled.get(spec.what, 0)
            if k >= len(spec.steps):
                raise ConfigError(f"{self.info.name}: captured more steps than the {len(spec.steps)} planned")
            buf[:, k].copy_(data)
            self.filled[spec.what] = k + 1

    def finish(self) -> dict[str, torch.Tensor]:
        out = {}
        for spec in self.cap_specs:
            got = self.filled.get(spec.what, 0)
            if got != len(spec.steps):
                raise ConfigError(
                    f"{self.info.name}: captured {got} of {len(spec.steps)} expected steps; the layer did not run "
                    "once per denoising step (is it skipped or cached by the pipeline?)"
                )
            out[spec.what] = self.buffers[spec.what]
        return out


def _process(handler: Any, x: Any, get_in: Callable[[], torch.Tensor] | None) -> Any:
    """Run a handler on the site's tensor; for indexed sites on the per-row selected token only."""
    idx = getattr(handler, "index", None)
    if idx is None or not isinstance(x, torch.Tensor):
        return handler.process(x, get_in)
    rows = torch.arange(x.shape[0], device=x.device)
    idx = idx.to(x.device)
    sub = x[rows, idx]
    new = handler.process(sub, None)
    if new is sub:
        return x
    out = x.clone()
    out[rows, idx] = new
    return out


def _set_indices(gen: "Generator", handlers: dict, prompts: Sequence[Any], cfg: GenerationConfig,
                 branches: Sequence[str]) -> None:
    for h in handlers.values():
        key = h.info.site.index
        h.index = gen.site_index(key, prompts, cfg, branches if h.info.branched else ["none"]) if key else None


@contextmanager
def _hooks(gen: "Generator", run: _RunState, handlers: dict[str, _Handler], count_steps: bool = True):
    handles = []
    try:
        if count_steps and gen.step_module is not None:

            def count(_mod, _args):
                run.step += 1

            handles.append(gen.module(gen.step_module).register_forward_pre_hook(count))
        for handler in handlers.values():
            site = handler.info.site
            mod = gen.module(site.module)
            if site.hook == "output":

                def fwd(_mod, args, kwargs, out, _h=handler, _s=site):
                    x = get_path(out, _s.path)
                    get_in = (lambda: get_input(_s, args, kwargs, _s.in_path)) if _s.in_path is not None else None
                    new = _process(_h, x, get_in)
                    if new is not x:
                        return set_path(out, _s.path, new)
                    return None

                handles.append(mod.register_forward_hook(fwd, with_kwargs=True))
            else:

                def pre(_mod, args, kwargs, _h=handler, _s=site):
                    x = get_input(_s, args, kwargs, _s.path)
                    new = _process(_h, x, None)
                    if new is not x:
                        return set_input(_s, args, kwargs, _s.path, new)
                    return None

                handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


class _ShapeRecorder:
    """Records per-sample output (and input) shapes of every site during a trace run."""

    def __init__(self, info: LayerInfo) -> None:
        self.info = info
        self.shape: tuple[int, ...] | None = None
        self.in_shape: tuple[int, ...] | None = None

    def process(self, x, get_in):
        if isinstance(x, torch.Tensor) and x.shape[0] != 1:
            raise ConfigError(
                f"{self.info.name}: the trace batch has 1 row but the tensor at this site has {x.shape[0]}; the "
                "adapter's site does not point at the activation"
            )
        if self.shape is None and isinstance(x, torch.Tensor):
            self.shape = tuple(x.shape[1:])
            if get_in is not None:
                inp = get_in()
                if isinstance(inp, torch.Tensor):
                    self.in_shape = tuple(inp.shape[1:])
        return x


def trace_shapes(gen: "Generator", lmap: LayerMap, cfg: GenerationConfig) -> LayerMap:
    """Run one 2-step generation of one sample (PixArt cannot run 1 step) and fill in every entry's per-sample shape."""
    run = _RunState(1, ["cond"])
    recorders = {e.name: _ShapeRecorder(e) for e in lmap}
    trace_cfg = GenerationConfig(
        num_inference_steps=2, guidance_scale=1.0, height=cfg.height, width=cfg.width,
        negative_prompt=cfg.negative_prompt, extra=dict(cfg.extra),
    )
    inputs = gen.trace_inputs()
    _set_indices(gen, recorders, inputs, trace_cfg, ["cond"])
    with torch.no_grad(), _hooks(gen, run, recorders, count_steps=False):  # type: ignore[arg-type]
        gen._run(inputs, [0], trace_cfg)
    missing = [n for n, r in recorders.items() if r.shape is None]
    if missing:
        raise ConfigError(
            f"layers never ran during a trace generation: {', '.join(missing[:6])}; the adapter's layer map does not "
            "fit this model"
        )
    entries = []
    for e in lmap:
        r = recorders[e.name]
        entries.append(e.with_shape(r.shape, r.in_shape))
    return LayerMap(entries, model=lmap.model)


def _chunks(ids: list[int], size: int) -> list[list[int]]:
    return [ids[i : i + size] for i in range(0, len(ids), size)]


def execute(
    gen: "Generator",
    prompts: Sequence[Any],
    seeds: Sequence[int],
    cfg: GenerationConfig,
    capture: Capture | None = None,
    interventions: Sequence[Intervention] = (),
    max_batch: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    experiment: dict | None = None,
) -> GenerationResult:
    """Generate ``prompts`` with ``seeds`` while capturing and intervening; chunks of at most ``max_batch`` samples.

    All validation (names, steps, branches, shapes, byte budget, store compatibility) happens before the first
    generation.
    """
    n = len(prompts)
    if n == 0:
        raise ConfigError("nothing to generate: give at least one prompt")
    if len(seeds) != n:
        raise ConfigError(f"got {n} prompts but {len(seeds)} seeds; give one seed per prompt")
    max_batch = max_batch or gen.default_max_batch
    if max_batch < 1:
        raise ConfigError(f"max_batch must be >= 1, got {max_batch}")
    lmap = gen.layer_map(cfg.height, cfg.width)
    branches = gen.branch_labels(cfg)
    num_steps = gen.num_steps(cfg)

    cap_plan = plan_capture(capture, lmap, n, num_steps, branches) if capture is not None else None
    planned = _plan_interventions(interventions, lmap, n, num_steps, branches)
    if any(p.kind == "row" for p in planned) and n > max_batch:
        raise ConfigError(
            f"interventions with Row sources need their rows in one batch, but {n} samples exceed max_batch={max_batch}; "
            "raise max_batch or use injection_sweep"
        )

    store: ActivationStore | None = None
    todo = list(range(n))
    if capture is not None:
        total = estimate_bytes(cap_plan, capture.dtype)
        if capture.store is None and total > capture.budget_bytes:
            raise BudgetError(
                f"this capture needs about {_fmt_bytes(total)}, over the budget of {_fmt_bytes(capture.budget_bytes)}; "
                "stream it to disk with store='acts.zarr', capture pooled=True, or select fewer layers or steps"
            )
        per_batch = estimate_bytes(cap_plan, capture.dtype, min(n, max_batch))
        if capture.store is not None and per_batch > capture.budget_bytes:
            raise BudgetError(
                f"one batch of {min(n, max_batch)} samples holds about {_fmt_bytes(per_batch)} of captures before it is "
                f"written, over the budget of {_fmt_bytes(capture.budget_bytes)}; lower max_batch"
            )
        if capture.store is not None:
            attrs = _store_attrs(gen, prompts, seeds, cfg, capture, interventions, branches, experiment)
            store = ActivationStore.create_or_resume(
                capture.store, attrs, list(cap_plan.specs.values()), max_batch, capture.dtype
            )
            todo = store.pending()

    result_cap = CaptureResult() if capture is not None and store is None else None
    images: list[tuple[list[int], torch.Tensor]] = []
    timesteps: list[float] = []
    done = n - len(todo)
    # a store batch is written on a background thread while the next batch generates
    writer = ThreadPoolExecutor(max_workers=1) if store is not None else None
    pending: Future | None = None
    try:
        by_layer: dict[str, list[_PlannedIV]] = {}
        for p in planned:
            by_layer.setdefault(p.info.name, []).append(p)
        cap_names = {i.name for i in cap_plan.infos} if cap_plan else set()
        for ids in _chunks(todo, max_batch):
            run = _RunState(len(ids), branches)
            handlers: dict[str, _Handler] = {}
            for info in lmap:
                name = info.name
                if name not in by_layer and name not in cap_names:
                    continue
                handlers[name] = _Handler(
                    info, run, ids, by_layer.get(name, []),
                    capture if name in cap_names else None, cap_plan if name in cap_names else None,
                )
            chunk_prompts = [prompts[i] for i in ids]
            _set_indices(gen, handlers, chunk_prompts, cfg, branches)
            with torch.no_grad(), _hooks(gen, run, handlers):
                imgs, meta = gen._run(chunk_prompts, [seeds[i] for i in ids], cfg)
            if gen.step_module is not None and run.step + 1 != num_steps:
                raise ConfigError(
                    f"the denoiser ran {run.step + 1} times for {num_steps} expected steps; this scheduler calls the "
                    "model more than once per step, which layerscope does not support yet"
                )
            timesteps = [float(t) for t in meta.get("timesteps", [])]
            images.append((ids, imgs.detach().float().cpu()))
            if cap_plan is not None:
                items = [(cap_plan.specs[(what, name)], data)
                         for name, h in handlers.items() if name in cap_names for what, data in h.finish().items()]
                if store is not None:
                    if pending is not None:
                        pending.result()
                    pending = writer.submit(_write_and_mark, store, items, ids, timesteps)
                else:
                    for spec, data in items:
                        result_cap._append(spec, data)
            done += len(ids)
            if progress is not None:
                progress(done, n)
    finally:
        if writer is not None:
            writer.shutdown(wait=True)  # a finished batch is kept even when a later one fails
    if pending is not None:
        pending.result()

    out_images = _assemble(images, n) if images else torch.empty(0)
    if result_cap is not None:
        result_cap._finalize()
        result_cap.timesteps = timesteps
        result_cap.attrs = _store_attrs(gen, prompts, seeds, cfg, capture, interventions, branches, experiment)
    return GenerationResult(out_images, store if store is not None else result_cap, timesteps)


def _write_and_mark(store: ActivationStore, items: list, ids: list[int], timesteps: list[float]) -> None:
    store.write_batch(items, ids)
    store.mark_done(ids, timesteps)


def _assemble(parts: list[tuple[list[int], torch.Tensor]], n: int) -> torch.Tensor:
    first = parts[0][1]
    have = sum(len(ids) for ids, _ in parts)
    if have == n:
        out = torch.empty((n,) + tuple(first.shape[1:]), dtype=first.dtype)
        for ids, imgs in parts:
            out[ids] = imgs
        return out
    # a resumed store run: only the newly generated samples have images
    return torch.cat([imgs for _, imgs in parts])


def _prompt_repr(p: Any) -> str:
    if isinstance(p, torch.Tensor):
        return f"tensor{tuple(p.shape)}:{float(p.double().sum()):.8g}"
    return str(p)


def _store_attrs(gen, prompts, seeds, cfg, capture, interventions, branches, experiment) -> dict:
    exp = {
        "layers": capture.layers if isinstance(capture.layers, str) else list(capture.layers),
        "steps": capture.steps if isinstance(capture.steps, (int, str, type(None))) else str(capture.steps),
        "branches": None if capture.branches is None else list(capture.branches),
        "pooled": capture.pooled,
        # only when used, so stores written before the option existed keep their fingerprint
        **({"unpooled": [capture.unpooled] if isinstance(capture.unpooled, str) else list(capture.unpooled)}
           if capture.unpooled else {}),
        "update": capture.update,
        "dtype": str(capture.dtype),
        "interventions": [iv.describe() for iv in interventions],
        **(experiment or {}),
    }
    attrs = {
        "layerscope": {"schema": 1, "version": __version__},
        "model": gen.spec,
        "prompts": [_prompt_repr(p) for p in prompts],
        "negative_prompt": cfg.negative_prompt,
        "seeds": [int(s) for s in seeds],
        "num_inference_steps": cfg.num_inference_steps,
        "guidance_scale": cfg.guidance_scale,
        "height": cfg.height,
        "width": cfg.width,
        "generation": cfg.describe(),
        "branches": list(branches),
        "experiment": exp,
        "timesteps": [],
    }
    attrs["fingerprint"] = fingerprint({k: v for k, v in attrs.items() if k not in ("timesteps", "layerscope")})
    return attrs
