"""Running a generation with captures and interventions: :func:`execute` (chunks, stores) and :func:`trace_shapes`.

The engine knows nothing of model families: a :class:`~.backend.Backend` gives it a
:class:`~layerscope.layers.LayerMap` (which module, where the tensor sits), the module called once per denoising
step, the CFG branch labels and a function that generates a batch. Validation happens in :mod:`.plan` before the
first generation; hooks are installed by :mod:`.hooks`; each site's work is done by :mod:`.handler`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch

from .._version import __version__
from ..allocator import tune_cpu_allocator
from ..config import GenerationConfig
from ..errors import BudgetError, ConfigError, GenerationError
from ..folders import check_output, lock
from ..layers import LayerMap
from .backend import Backend
from .handler import RunState, ShapeRecorder, SiteHandler
from .hooks import installed_hooks, set_indices
from .plan import (
    CapturePlan,
    PlannedIntervention,
    RunInfo,
    check_stored_timesteps,
    estimate_bytes,
    fmt_bytes,
    plan_capture,
    plan_interventions,
)
from .spec import Capture, Intervention
from .store import SCHEMA, ActivationStore, CaptureResult, check_array_names, fingerprint
from .stream import StoreWriter


@dataclass
class GenerationResult:
    """Images (sample, 3, H, W) in [0, 1], the capture (memory or store) and the scheduler's timesteps."""

    images: torch.Tensor
    capture: CaptureResult | ActivationStore | None = None
    timesteps: list[float] = field(default_factory=list)


def trace_shapes(gen: Backend, lmap: LayerMap, cfg: GenerationConfig) -> LayerMap:
    """Run one 2-step generation of one sample (PixArt cannot run 1 step; a scheduler that cannot run 2, such as
    PNDM with Runge-Kutta warm-up steps, runs the configuration's own steps) and fill in every entry's per-sample
    shape."""
    inputs = gen.trace_inputs()
    every = lmap.all()
    for steps in dict.fromkeys((2, max(2, cfg.num_inference_steps))):
        run = RunState(1, ["cond"])
        recorders = {e.name: ShapeRecorder(e) for e in every}
        trace_cfg = GenerationConfig(
            num_inference_steps=steps,
            guidance_scale=1.0,
            height=cfg.height,
            width=cfg.width,
            negative_prompt=cfg.negative_prompt,
            extra=dict(cfg.extra),
        )
        set_indices(gen, recorders, inputs, trace_cfg, ["cond"])
        try:
            with torch.no_grad(), installed_hooks(gen, run, recorders, count_steps=False, trace=True):
                gen.run_batch(inputs, [0], trace_cfg)
            break
        except ValueError:  # the scheduler's own error for too few steps; the last try raises it
            if steps == max(2, cfg.num_inference_steps):
                raise
    missing = [e.name for e in lmap if recorders[e.name].shape is None]
    if missing:
        raise ConfigError(
            f"layers never ran during a trace generation: {', '.join(missing[:6])}; the adapter's layer map does not "
            "fit this model"
        )
    entries = [e.with_shape(*_traced(recorders[e.name])) for e in lmap]
    detail, unavailable = [], dict(lmap.unavailable)
    for e in lmap.detail:
        r = recorders[e.name]
        if r.shape is not None:
            detail.append(e.with_shape(*_traced(r)))
        elif e.site.hook == "attention":
            proc = type(getattr(gen.module(e.site.module), "processor", None)).__name__
            unavailable[e.name] = (
                f"the attention module's processor ({proc}) does not call torch.nn.functional."
                "scaled_dot_product_attention, so its probabilities are never formed; give the module a processor "
                "that does (diffusers' AttnProcessor2_0) to capture or edit its map"
            )
        else:
            unavailable[e.name] = "this site never ran during a trace generation of the model"
    return LayerMap(entries, model=lmap.model, detail=detail, unavailable=unavailable)


def _traced(r: ShapeRecorder) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    assert r.shape is not None  # the caller checked the recorder saw its site
    return r.shape, r.in_shape


def _branch_texts(prompts: Sequence[Any], cfg: GenerationConfig, branch: str) -> list[Any]:
    """The text each row of a branch is conditioned on: its prompt, or the negative prompt for ``uncond`` rows."""
    return [cfg.negative_prompt or ""] * len(prompts) if branch == "uncond" else list(prompts)


def _resolve_words(
    gen: Backend, planned: list[PlannedIntervention], prompts: Sequence[Any], cfg: GenerationConfig
) -> None:
    """Key positions of each ``tokens=<word>`` edit in every target row's text, branch by branch (before generating:
    a target whose text lacks the word is an error naming it)."""
    for p in planned:
        if p.word is None:
            continue
        labels = gen.branch_labels(cfg) if p.info.branched else ("none",)
        for b in p.branch_idx:
            branch = labels[b]
            texts = _branch_texts([prompts[t] for t in p.targets], cfg, branch)
            for t, text, pos in zip(p.targets, texts, gen.word_positions(p.word, texts)):
                if not pos:
                    shown = gen.text_tokens([text])
                    while shown and len(shown[0]) > 1 and shown[0][-1] == shown[0][-2]:
                        shown[0].pop()  # the padding
                    raise ConfigError(
                        f"intervention {p.iv.op} at {p.iv.layer}: the word {p.word!r} is not in the "
                        f"{'negative prompt' if branch == 'uncond' else 'prompt'} {text!r} of sample {t}"
                        + (f" (its tokens: {', '.join(shown[0][:24])})" if shown else "")
                    )
                p.key_pos[(branch, t)] = pos


def _label_keys(gen: Backend, plan: CapturePlan, prompts: Sequence[Any], cfg: GenerationConfig) -> None:
    """Attention maps whose keys open with the text tokens record the token strings, per branch and sample
    (``attrs["key_tokens"][branch][sample]``; the uncond branch's one negative prompt is listed once)."""
    specs = [s for (_, name), s in plan.specs.items() if s.attrs.get("kind") == "attention_map"]
    if not specs:
        return
    keyed = {i.name for i in plan.infos if i.keys.startswith("text")}
    cond = gen.text_tokens(list(prompts)) if keyed else None
    if cond is None:
        return
    neg = gen.text_tokens([cfg.negative_prompt or ""]) or [[]]
    for spec in specs:
        if spec.layer in keyed:
            spec.attrs["key_tokens"] = {b: (neg if b == "uncond" else cond) for b in spec.branches}


def checked_images(gen: Backend, imgs: Any, n: int) -> torch.Tensor:
    """A batch's images as float32 on the CPU, after checking they are ``n`` finite images (n, 3, H, W)."""
    if not isinstance(imgs, torch.Tensor):
        raise GenerationError(f"{gen.spec} returned {type(imgs).__name__}, not a tensor of images")
    if imgs.ndim != 4 or imgs.shape[0] != n or imgs.shape[1] != 3:
        raise GenerationError(
            f"{gen.spec} returned a tensor of shape {tuple(imgs.shape)} for {n} samples; images must be "
            f"(samples, 3, height, width), here ({n}, 3, H, W)"
        )
    out = imgs.detach().float().cpu()
    bad = ~torch.isfinite(out)
    if bad.any():
        rows = sorted({int(i) for i in bad.flatten(1).any(1).nonzero().flatten()})
        raise GenerationError(
            f"{gen.spec} generated NaN or infinite pixels in {len(rows)} of {n} samples of this batch (batch rows "
            f"{rows[:5]}{' ...' if len(rows) > 5 else ''}); an intervention may have blown up the activations, or "
            "the model is broken"
        )
    return out


def _chunks(ids: list[int], size: int) -> list[list[int]]:
    return [ids[i : i + size] for i in range(0, len(ids), size)]


def execute(
    gen: Backend,
    prompts: Sequence[Any],
    seeds: Sequence[int],
    cfg: GenerationConfig,
    capture: Capture | None = None,
    interventions: Sequence[Intervention] = (),
    max_batch: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    experiment: dict[str, Any] | None = None,
) -> GenerationResult:
    """Generate ``prompts`` with ``seeds`` while capturing and intervening; chunks of at most ``max_batch`` samples.

    All validation (names, steps, branches, shapes, byte budget, stored sources, the store's path and
    compatibility) happens before the first generation. A store is locked for the whole run
    (:func:`layerscope.folders.lock`: a second run on it fails at once with "in use by pid N"); a resumed store run
    returns every row, the finished ones read back from the store.
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
    if cap_plan is not None:
        _label_keys(gen, cap_plan, prompts, cfg)
    run_info = RunInfo(gen.spec, cfg.num_inference_steps, num_steps, cfg.height, cfg.width)
    planned = plan_interventions(interventions, lmap, n, num_steps, branches, run_info)
    _resolve_words(gen, planned, prompts, cfg)
    if any(p.kind == "row" for p in planned) and n > max_batch:
        raise ConfigError(
            f"interventions with Row sources need their rows in one batch, but {n} samples exceed max_batch={max_batch}; "
            "raise max_batch or use injection_sweep"
        )
    if capture is not None:
        assert cap_plan is not None
        total = estimate_bytes(cap_plan, capture.torch_dtype)
        if capture.store is None and total > capture.budget_bytes:
            raise BudgetError(
                f"this capture needs about {fmt_bytes(total)}, over the budget of {fmt_bytes(capture.budget_bytes)}; "
                "stream it to disk with store='acts.zarr', capture pooled=True, or select fewer layers or steps"
            )
        per_batch = estimate_bytes(cap_plan, capture.torch_dtype, min(n, max_batch))
        if capture.store is not None and per_batch > capture.budget_bytes:
            raise BudgetError(
                f"one batch of {min(n, max_batch)} samples holds about {fmt_bytes(per_batch)} of captures before it is "
                f"written, over the budget of {fmt_bytes(capture.budget_bytes)}; lower max_batch"
            )

    if _denoiser_on_cpu(gen):
        tune_cpu_allocator()
    with ExitStack() as held:
        store: ActivationStore | None = None
        todo = list(range(n))
        if capture is not None and capture.store is not None:
            assert cap_plan is not None
            specs = list(cap_plan.specs.values())
            check_array_names(specs)
            path = check_output(capture.store, "activation store")
            ActivationStore.check_target(path)  # before a lock file goes into someone's folder
            held.enter_context(lock(path, "activation store"))
            attrs = _store_attrs(gen, prompts, seeds, cfg, capture, interventions, branches, experiment)
            # a fresh store is checked here and created by the writer thread while the first steps run
            store = ActivationStore.create_or_resume(path, attrs, specs, max_batch, capture.torch_dtype, defer=True)
            todo = store.pending()
        result_cap = CaptureResult() if capture is not None and store is None else None
        images, timesteps = _run_chunks(
            gen, prompts, seeds, cfg, capture, cap_plan, planned, lmap, branches, num_steps, todo, max_batch,
            progress, store, result_cap,
        )  # fmt: skip
        if store is not None:
            finished = sorted(set(range(n)) - set(todo))
            if finished:  # a resumed run: the rows finished before come back from the store
                images.append((finished, store.images(finished)))
            if not timesteps:
                timesteps = [float(t) for t in store.attrs.get("timesteps", [])]

    out_images = _assemble(images, n) if images else torch.empty(0)
    if result_cap is not None:
        assert capture is not None
        result_cap._finalize()
        result_cap.timesteps = timesteps
        result_cap.attrs = _store_attrs(gen, prompts, seeds, cfg, capture, interventions, branches, experiment)
    return GenerationResult(out_images, store if store is not None else result_cap, timesteps)


def _denoiser_on_cpu(gen: Backend) -> bool:
    """Whether the denoiser's weights are on the CPU (single-pass generators: False; they run once per sample)."""
    if gen.step_module is None:
        return False
    first = next(gen.module(gen.step_module).parameters(), None)
    return first is not None and first.device.type == "cpu"


def per_step_timesteps(timesteps: list[float], call_steps: list[int] | None) -> list[float]:
    """The timestep of each step: that of its first denoiser call when a scheduler calls the denoiser several
    times per step (``call_steps``: the step of each call)."""
    if call_steps is None or len(timesteps) != len(call_steps):
        return timesteps
    return [t for k, t in enumerate(timesteps) if k == 0 or call_steps[k] != call_steps[k - 1]]


def _run_chunks(
    gen: Backend,
    prompts: Sequence[Any],
    seeds: Sequence[int],
    cfg: GenerationConfig,
    capture: Capture | None,
    cap_plan: CapturePlan | None,
    planned: list[PlannedIntervention],
    lmap: LayerMap,
    branches: Sequence[str],
    num_steps: int,
    todo: list[int],
    max_batch: int,
    progress: Callable[[int, int], None] | None,
    store: ActivationStore | None,
    result_cap: CaptureResult | None,
) -> tuple[list[tuple[list[int], torch.Tensor]], list[float]]:
    """Generate the ``todo`` samples in chunks; captures go to ``store`` (streamed by a :class:`.StoreWriter`
    thread: each site's step as soon as it is captured) or ``result_cap``. Returns the images by chunk and the
    scheduler's timesteps."""
    n = len(prompts)
    images: list[tuple[list[int], torch.Tensor]] = []
    timesteps: list[float] = []
    done = n - len(todo)
    writer = StoreWriter(store) if store is not None and cap_plan is not None else None
    try:
        by_layer: dict[str, list[PlannedIntervention]] = {}
        for p in planned:
            by_layer.setdefault(p.info.name, []).append(p)
        cap_names = {i.name for i in cap_plan.infos} if cap_plan else set()
        specs = list(cap_plan.specs.values()) if cap_plan else []
        for ids in _chunks(todo, max_batch):
            if writer is not None:
                writer.begin(ids, specs)
            run = RunState(len(ids), branches)
            handlers: dict[str, SiteHandler] = {}
            for info in lmap.all():
                name = info.name
                if name not in by_layer and name not in cap_names:
                    continue
                handlers[name] = SiteHandler(
                    info,
                    run,
                    ids,
                    by_layer.get(name, []),
                    capture if name in cap_names else None,
                    cap_plan if name in cap_names else None,
                    writer.step if writer is not None and name in cap_names else None,
                )
            chunk_prompts = [prompts[i] for i in ids]
            set_indices(gen, handlers, chunk_prompts, cfg, branches)
            with torch.no_grad(), installed_hooks(gen, run, handlers):
                imgs, meta = gen.run_batch(chunk_prompts, [seeds[i] for i in ids], cfg)
            if gen.step_module is not None and run.step + 1 != num_steps:
                calls = run.call + 1
                raise ConfigError(
                    f"the denoiser ran {calls} times and reached step {run.step + 1} of {num_steps} expected steps "
                    f"({gen.sampler_name() or 'its scheduler'}); layerscope could not tell which step each call "
                    "belongs to"
                )
            first = not timesteps
            timesteps = per_step_timesteps([float(t) for t in meta.get("timesteps", [])], run.call_steps)
            if first:  # before anything is kept: stored sources must come from steps at these timesteps
                check_stored_timesteps(planned, timesteps)
            batch_images = checked_images(gen, imgs, len(ids))
            images.append((ids, batch_images))
            if cap_plan is not None:
                items = [
                    (cap_plan.specs[(what, name)], data)
                    for name, h in handlers.items()
                    if name in cap_names
                    for what, data in h.finish().items()
                ]
                if writer is not None:
                    writer.end(ids, items, batch_images, timesteps)
                else:
                    assert result_cap is not None
                    for spec, data in items:
                        result_cap._append(spec, data)
            done += len(ids)
            if progress is not None:
                progress(done, n)
    except BaseException:
        if writer is not None:
            writer.close(abort=True)  # a finished batch is kept even when a later one fails
        raise
    if writer is not None:
        writer.close()  # raises what failed on the writer thread
    return images, timesteps


def _assemble(parts: list[tuple[list[int], torch.Tensor]], n: int) -> torch.Tensor:
    """Every row in prompt order (a resumed store run adds the rows it read back from the store)."""
    first = parts[0][1]
    out = torch.empty((n,) + tuple(first.shape[1:]), dtype=first.dtype)
    have = 0
    for ids, imgs in parts:
        out[ids] = imgs.to(first.dtype)
        have += len(ids)
    assert have == n, f"{have} of {n} rows assembled"
    return out


def _prompt_repr(p: Any) -> str:
    if isinstance(p, torch.Tensor):
        return f"tensor{tuple(p.shape)}:{float(p.double().sum()):.8g}"
    return str(p)


def _store_attrs(
    gen: Backend,
    prompts: Sequence[Any],
    seeds: Sequence[int],
    cfg: GenerationConfig,
    capture: Capture,
    interventions: Sequence[Intervention],
    branches: Sequence[str],
    experiment: dict[str, Any] | None,
) -> dict[str, Any]:
    exp = {
        "layers": capture.layers if isinstance(capture.layers, str) else list(capture.layers),
        "steps": capture.steps if isinstance(capture.steps, (int, str, type(None))) else str(capture.steps),
        "branches": None if capture.branches is None else list(capture.branches),
        "pooled": capture.pooled,
        # only when used, so stores written before the option existed keep their fingerprint
        **(
            {"unpooled": [capture.unpooled] if isinstance(capture.unpooled, str) else list(capture.unpooled)}
            if capture.unpooled
            else {}
        ),
        "update": capture.update,
        "dtype": str(capture.torch_dtype),
        "interventions": [iv.describe() for iv in interventions],
        **(experiment or {}),
    }
    attrs = {
        "layerscope": {"schema": SCHEMA, "version": __version__},
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
