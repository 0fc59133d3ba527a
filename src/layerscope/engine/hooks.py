"""The only place in layerscope that registers forward hooks: on the modules a backend names, around one call of
:meth:`~.backend.Backend.run_batch`, removed afterwards whatever happens.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Protocol, cast

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..config import GenerationConfig
from ..errors import ConfigError
from ..layers import LayerInfo, Site
from .backend import Backend
from .handler import RunState
from .paths import get_input, get_path, set_input, set_path


class SiteProcessor(Protocol):
    """What the hooks drive at a site: :class:`~.handler.SiteHandler` or :class:`~.handler.ShapeRecorder`."""

    info: LayerInfo
    index: torch.Tensor | None

    def process(self, x: Any, get_in: Callable[[], Any] | None) -> Any: ...


def process_site(handler: SiteProcessor, x: Any, get_in: Callable[[], torch.Tensor] | None) -> Any:
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


def set_indices(
    gen: Backend,
    handlers: Mapping[str, SiteProcessor],
    prompts: Sequence[Any],
    cfg: GenerationConfig,
    branches: Sequence[str],
) -> None:
    for h in handlers.values():
        key = h.info.site.index
        h.index = gen.site_index(key, prompts, cfg, branches if h.info.branched else ["none"]) if key else None


def _in_place(mod: Any) -> bool:
    """Modules that declare they overwrite their input (``nn.ReLU(inplace=True)`` and the like)."""
    return bool(getattr(mod, "inplace", False))


def _input(site: Site, args: tuple[Any, ...], kwargs: dict[str, Any], saved: dict[str, Any], strict: bool) -> Any:
    """The site's input: for an update capture (``strict``) the copy kept before an in-place module ran, else the
    argument itself, which must then be as it was before the module ran (torch counts in-place writes)."""
    if "input" in saved:
        return saved.pop("input")
    x = get_input(site, args, kwargs, cast("tuple[Any, ...]", site.in_path))
    before = saved.pop("version", None)
    if strict and isinstance(x, torch.Tensor) and before is not None and x._version != before:
        raise ConfigError(
            f"{site.module}: the module wrote into its input (in place), so output - input is lost; capture its "
            "output only, or give the module an attribute inplace=True so layerscope keeps a copy of its input"
        )
    return x


@contextmanager
def installed_hooks(
    gen: Backend,
    run: RunState,
    handlers: Mapping[str, SiteProcessor],
    count_steps: bool = True,
    trace: bool = False,
) -> Iterator[None]:
    """Hooks for every handler's site while open (``trace``: a shape trace, where an attention module that forms no
    probabilities is left for the trace to report instead of failing the run)."""
    handles: list[Any] = []
    try:
        if count_steps and gen.step_module is not None:

            def count(_mod: Any, _args: Any) -> None:
                if run.call < 0:  # the pipeline has set its scheduler's timesteps for this run by now
                    run.call_steps = gen.call_steps()
                run.next_call()

            handles.append(gen.module(gen.step_module).register_forward_pre_hook(count))
        for handler in handlers.values():
            site = handler.info.site
            mod = gen.module(site.module)
            if site.hook == "attention":
                probs = AttentionProbs(handler, mod, strict=not trace)
                handles.append(mod.register_forward_pre_hook(probs.enter))
                handles.append(mod.register_forward_hook(probs.exit, always_call=True))
                handles.append(probs)  # left open by an exception in between: closed below
            elif site.hook == "output":
                saved: dict[str, Any] = {}
                if getattr(handler, "wants_input", False) and site.in_path is not None:

                    def keep(
                        _mod: Any,
                        args: tuple[Any, ...],
                        kwargs: dict[str, Any],
                        _s: Site = site,
                        _saved: dict[str, Any] = saved,
                        _copy: bool = _in_place(mod),
                    ) -> None:
                        x = get_input(_s, args, kwargs, cast("tuple[Any, ...]", _s.in_path))
                        if isinstance(x, torch.Tensor):  # a module that overwrites its input: keep a copy
                            _saved["input" if _copy else "version"] = x.clone() if _copy else x._version

                    handles.append(mod.register_forward_pre_hook(keep, with_kwargs=True))

                def fwd(
                    _mod: Any,
                    args: tuple[Any, ...],
                    kwargs: dict[str, Any],
                    out: Any,
                    _h: SiteProcessor = handler,
                    _s: Site = site,
                    _saved: dict[str, Any] = saved,
                    _strict: bool = bool(getattr(handler, "wants_input", False)),
                ) -> Any:
                    x = get_path(out, _s.path)
                    get_in = (lambda: _input(_s, args, kwargs, _saved, _strict)) if _s.in_path is not None else None
                    new = process_site(_h, x, get_in)
                    if new is not x:
                        return set_path(out, _s.path, new)
                    return None

                handles.append(mod.register_forward_hook(fwd, with_kwargs=True))
            else:

                def pre(
                    _mod: Any,
                    args: tuple[Any, ...],
                    kwargs: dict[str, Any],
                    _h: SiteProcessor = handler,
                    _s: Site = site,
                ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
                    x = get_input(_s, args, kwargs, _s.path)
                    new = process_site(_h, x, None)
                    if new is not x:
                        return set_input(_s, args, kwargs, _s.path, new)
                    return None

                handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


class AttentionProbs(TorchFunctionMode):
    """While its module runs, turns the module's call of ``F.scaled_dot_product_attention(q, k, v, ...)`` into
    probabilities P = softmax(q k^T * scale + mask) (rows, heads, queries, keys, float32) that the site's handler
    captures or edits. The module's own SDPA call runs as before, so its output is bitwise unchanged in every row
    the handler left as it was; an edited row's output is P' v. The module's processor is never replaced: any processor that calls torch's SDPA
    exposes its maps, with whatever normalisation or rotary embedding it applied to q and k first."""

    def __init__(self, handler: SiteProcessor, module: torch.nn.Module, strict: bool = True) -> None:
        super().__init__()
        self.handler = handler
        self.module = module
        self.strict = strict
        self.open = False
        self.calls = 0

    def enter(self, _mod: Any, _args: Any) -> None:
        self.calls = 0
        self.__enter__()  # type: ignore[no-untyped-call]
        self.open = True

    def exit(self, _mod: Any, _args: Any, _out: Any) -> None:
        self.remove()
        if (
            self.strict and self.calls == 0 and sys.exc_info()[0] is None
        ):  # (not while the module's own error propagates)
            name = self.handler.info.name
            proc = type(getattr(self.module, "processor", self.module)).__name__
            raise ConfigError(
                f"{name}: the attention module ran without calling torch.nn.functional.scaled_dot_product_attention "
                f"(its processor {proc} computes attention its own way), so its probabilities are never formed; "
                "give the module a processor that calls torch's SDPA (diffusers' AttnProcessor2_0 for Attention)"
            )

    def remove(self) -> None:
        if self.open:
            self.open = False
            self.__exit__(None, None, None)  # type: ignore[no-untyped-call]

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        self.calls += 1
        q, k, v, mask, dropout, causal, scale, gqa = _sdpa_args(args, kwargs)
        name = self.handler.info.name
        if q.ndim != 4 or k.ndim != 4 or dropout or causal or gqa:
            raise ConfigError(
                f"{name}: attention maps need 4-d (batch, heads, tokens, dim) queries and keys without dropout, causal "
                "masking or grouped heads"
            )
        p = attention_probs(q, k, mask, scale)
        new = process_site(self.handler, p, None)
        out = func(*args, **kwargs)
        if new is p:
            return out
        rows = (new != p).flatten(1).any(1).nonzero().flatten()  # edited rows get P' v; the others stay bitwise
        if len(rows):
            out = out.clone()
            out[rows] = torch.matmul(new[rows].to(v.dtype), v[rows])
        return out


def _sdpa_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    defaults: dict[str, Any] = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None}
    got = {**defaults, "enable_gqa": False, **dict(zip(names, args)), **kwargs}
    return tuple(got[n] for n in names)


def attention_probs(
    q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None, scale: float | None = None
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) in float32, as torch's scaled-dot-product attention forms it (scale defaults
    to 1/sqrt(head dim); a boolean mask keeps the keys where it is True)."""
    s = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q.float(), k.float().transpose(-2, -1)) * s
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.float()
    return scores.softmax(dim=-1)


def _to_meta(value: Any) -> Any:
    """``value`` with every CPU tensor in it (through tuples, lists and dicts) moved to the meta device."""
    if isinstance(value, torch.Tensor):
        return value.to("meta") if value.device.type == "cpu" else value
    if isinstance(value, (tuple, list)):
        return type(value)(_to_meta(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_meta(v) for k, v in value.items()}
    return value


@contextmanager
def meta_inputs(
    modules: Sequence[torch.nn.Module], drop: Mapping[torch.nn.Module, Sequence[str]] | None = None
) -> Iterator[None]:
    """While open, CPU tensors handed to any of ``modules`` (models on the meta device) are moved to meta on the way
    in, and the keyword arguments ``drop[module]`` are left out of that module's calls (a value-dependent argument
    such as a text encoder's attention mask, which decides what attends, never a shape). For tracing shapes only."""

    def pre(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        kwargs = _to_meta(kwargs)
        for name in (drop or {}).get(module, ()):
            kwargs.pop(name, None)
        return _to_meta(args), kwargs

    handles = [m.register_forward_pre_hook(pre, with_kwargs=True) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
