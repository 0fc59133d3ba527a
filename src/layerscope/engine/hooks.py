"""The only place in layerscope that registers forward hooks: on the modules a backend names, around one call of
:meth:`~.backend.Backend.run_batch`, removed afterwards whatever happens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import torch

from ..config import GenerationConfig
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


@contextmanager
def installed_hooks(
    gen: Backend, run: RunState, handlers: Mapping[str, SiteProcessor], count_steps: bool = True
) -> Iterator[None]:
    handles = []
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
            if site.hook == "output":

                def fwd(
                    _mod: Any,
                    args: tuple[Any, ...],
                    kwargs: dict[str, Any],
                    out: Any,
                    _h: SiteProcessor = handler,
                    _s: Site = site,
                ) -> Any:
                    x = get_path(out, _s.path)
                    get_in = (  # mypy checks the lambda body also without the `is not None` narrowing
                        (lambda: get_input(_s, args, kwargs, _s.in_path))  # type: ignore[arg-type]
                        if _s.in_path is not None
                        else None
                    )
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
