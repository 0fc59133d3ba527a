"""Loading models: ``load(spec | pipeline | module)`` through two registries.

- **Schemes** (:func:`register_scheme`): ``hf:``, ``torch:``, ``tiny:`` and ``zoo:`` are registered below like any
  other; a scheme loader turns the part after the colon into a ready :class:`~layerscope.models.base.Generator`, a
  :class:`Source` (a built pipeline or module plus what its adapter should know), or a bare pipeline / module.
- **Adapters** (:func:`register_adapter`): a table from diffusers pipeline class names to the adapter of their
  family and its variant (as TransformerLens v3's architecture-adapter factory). The built-in entries come from the
  adapters' own declarative ``SUPPORTED`` tables.

>>> import layerscope as ls
>>> ls.load("tiny:sd").family
'unet/sd'
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .errors import ConfigError, SpecError
from .models import transformer, unet
from .models.base import Generator
from .models.latent import LatentGenerator
from .models.pipeline import PipelineGenerator


@dataclass(frozen=True)
class Source:
    """A built model and what its adapter should know about it (returned by scheme loaders such as ``zoo:``).

    ``obj``: a diffusers pipeline or an ``nn.Module`` generator; ``defaults``: default generation settings
    (:class:`~layerscope.config.GenerationConfig` fields, e.g. the steps its quality was measured at); ``card``: the
    model card (shown in reports); ``oracle``: the world whose oracle reads its images (``"shapes"``), None for
    open-domain models; ``size``: default (height, width); ``options``: adapter keyword arguments (a latent
    generator's ``latent_dim`` / ``output_range``).
    """

    obj: Any
    defaults: dict[str, Any] = field(default_factory=dict)
    card: dict[str, Any] | None = None
    oracle: str | None = None
    size: tuple[int, int] | None = None
    options: dict[str, Any] = field(default_factory=dict)


SchemeLoader = Callable[[str, str, dict[str, Any]], Any]  # (target, spec, keyword args) -> Generator | Source | obj
_SCHEMES: dict[str, SchemeLoader] = {}


def register_scheme(name: str, loader: SchemeLoader, *, replace: bool = False) -> None:
    """Make ``load(f"{name}:...")`` call ``loader(target, spec, kwargs)``."""
    if not name.isidentifier():
        raise ConfigError(f"a scheme name must be an identifier, got {name!r}")
    if name in _SCHEMES and not replace:
        raise ConfigError(f"scheme {name!r} is already registered; pass replace=True to override it")
    _SCHEMES[name] = loader


def schemes() -> list[str]:
    """The registered schemes, in registration order."""
    return list(_SCHEMES)


@dataclass(frozen=True)
class AdapterEntry:
    adapter: type[PipelineGenerator]
    variant: str


_ADAPTERS: dict[str, AdapterEntry] = {}


def register_adapter(
    pipeline_class: str | type, adapter: type[PipelineGenerator], variant: str, *, replace: bool = False
) -> None:
    """Serve pipelines of ``pipeline_class`` (a class or its name) with ``adapter`` as ``variant``."""
    name = pipeline_class if isinstance(pipeline_class, str) else pipeline_class.__name__
    if not (isinstance(adapter, type) and issubclass(adapter, PipelineGenerator)):
        raise ConfigError(f"an adapter must be a PipelineGenerator subclass, got {adapter!r}")
    if name in _ADAPTERS and not replace:
        raise ConfigError(f"{name} already has an adapter ({_ADAPTERS[name].adapter.__name__}); pass replace=True")
    _ADAPTERS[name] = AdapterEntry(adapter, variant)


def adapters() -> dict[str, AdapterEntry]:
    """Pipeline class name -> adapter entry, for every registered pipeline class."""
    return dict(_ADAPTERS)


for _table, _cls in (
    (unet.SUPPORTED, unet.UNetPipelineGenerator),
    (transformer.SUPPORTED, transformer.TransformerPipelineGenerator),
):
    for _name, _variant in _table.items():
        register_adapter(_name, _cls, _variant)


def adapter_for_pipeline(pipe: Any, spec: str, **opts: Any) -> Generator:
    """Wrap a loaded diffusers pipeline in the adapter registered for its class (error names the supported ones)."""
    cls = type(pipe).__name__
    entry = _ADAPTERS.get(cls)
    if entry is None:
        raise SpecError(
            f"{cls} is not supported; supported pipeline classes: {', '.join(_ADAPTERS)} "
            "(or register one with layerscope.register_adapter)"
        )
    return entry.adapter(pipe, spec, variant=entry.variant, **opts)


def _from_object(obj: Any, spec: str, **opts: Any) -> Generator:
    if isinstance(obj, Generator):
        return obj
    if isinstance(obj, Source):
        kw = dict(defaults=obj.defaults, card=obj.card, oracle=obj.oracle, size=obj.size, **obj.options, **opts)
        return _from_object(obj.obj, spec, **kw)
    if type(obj).__name__ in _ADAPTERS:
        return adapter_for_pipeline(obj, spec, **opts)
    if isinstance(obj, nn.Module):
        return LatentGenerator(obj, spec, **opts)
    if hasattr(obj, "components") and callable(obj):  # a diffusers pipeline of an unregistered class
        return adapter_for_pipeline(obj, spec, **opts)
    raise SpecError(
        f"cannot load a {type(obj).__name__}: give a spec string, a diffusers pipeline or a torch nn.Module generator"
    )


def load(spec: Any, **kwargs: Any) -> Generator:
    """Load a model and return its :class:`~layerscope.models.base.Generator`.

    ``spec`` is a string with a registered scheme or an object:

    - ``hf:<repo id or folder>``: a diffusers pipeline (offline from a local folder);
    - ``torch:<module>:<factory>``: ``factory()`` returns an ``nn.Module`` mapping latent vectors to images
      (or ``(module, latent_dim)``, or a ready Generator);
    - ``tiny:<family>``: a tiny random-weight pipeline built from configs in code (sd, sd2, sdxl, kandinsky22, sd3,
      flux, pixart) for tests and demos;
    - ``zoo:<name>``: the shipped Shapes-world models (unet, dit, vae, gan; ``layerscope zoo list``);
    - ``arch:<name>``: a published architecture at full size without weights, on the meta device (sd14, sd21,
      sdxl, kandinsky22, sd35-medium, sd35-large, flux-schnell, flux-dev, pixart-alpha): layer maps, byte estimates
      and study plans, no generation (:mod:`layerscope.arch`);
    - ``untrained:<spec>[@<seed>][+text]``: an untrained control of the model ``<spec>`` loads (keyword arguments go
      to that load): every weight re-initialised from the seed (default 0), text encoders kept trained unless
      ``+text`` (:func:`layerscope.untrained`, :mod:`layerscope.controls`, docs/controls.md);
    - an already-built diffusers pipeline or ``nn.Module`` generator (keyword arguments go to its adapter, e.g.
      ``latent_dim=``), or a Generator (returned as it is).
    """
    if not isinstance(spec, str):
        name = f"object:{type(spec).__name__}"
        return _from_object(spec, getattr(spec, "spec", name) if isinstance(spec, Generator) else name, **kwargs)
    valid = ", ".join(s + ":" for s in _SCHEMES)
    if ":" not in spec:
        raise SpecError(f"model spec {spec!r} has no scheme; valid schemes: {valid}")
    scheme, _, target = spec.partition(":")
    if scheme not in _SCHEMES:
        raise SpecError(f"unknown model scheme {scheme!r} in {spec!r}; valid schemes: {valid}")
    if not target:
        raise SpecError(f"model spec {spec!r} names no model after {scheme!r}:")
    model = _from_object(_SCHEMES[scheme](target, spec, dict(kwargs)), spec)
    model.load_call = (spec, dict(kwargs))  # how a worker process loads its own copy (experiments.executor)
    return model


# -- the built-in schemes --------------------------------------------------------------------------------------------


def _load_hf(target: str, spec: str, kw: dict[str, Any]) -> Any:
    import torch
    from diffusers import DiffusionPipeline

    path = Path(target).expanduser()
    local = path.exists()
    if not local and (target.startswith((".", "/", "~")) or target.count("/") != 1):
        raise SpecError(f"no local folder {target!r}; give an existing diffusers pipeline folder or a hub repo id")
    offline = local or os.environ.get("HF_HUB_OFFLINE") == "1"
    dtype, kw = _dtype_option(kw, spec)  # torch_dtype=: diffusers' older name for dtype
    kw["dtype"] = dtype or torch.float32
    try:
        pipe = DiffusionPipeline.from_pretrained(str(path) if local else target, local_files_only=offline, **kw)
    except (OSError, ValueError, EnvironmentError) as exc:
        where = f"folder {str(path)!r}" if local else f"repo {target!r} (not in the local cache)"
        raise SpecError(f"could not load a diffusers pipeline from {where}: {str(exc).splitlines()[0]}") from exc
    return adapter_for_pipeline(pipe, spec)


def _said(exc: BaseException) -> str:
    """An exception in one line: its type and first line."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _load_torch(target: str, spec: str, kw: dict[str, Any]) -> Any:
    mod_name, sep, factory = target.rpartition(":")
    if not sep or not mod_name or not factory:
        raise SpecError(f"torch specs look like 'torch:package.module:factory', got {spec!r}")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as exc:
        raise SpecError(f"cannot import module {mod_name!r} for spec {spec!r}: {exc}") from exc
    except Exception as exc:  # the module itself fails while importing (SyntaxError, an error at top level)
        raise SpecError(f"importing module {mod_name!r} for spec {spec!r} failed: {_said(exc)}") from exc
    fn = getattr(mod, factory, None)
    if fn is None or not callable(fn):
        names = [n for n in dir(mod) if not n.startswith("_") and callable(getattr(mod, n))]
        raise SpecError(f"module {mod_name!r} has no callable {factory!r}; callables there: {', '.join(names[:10])}")
    try:
        inspect.signature(fn).bind()
    except TypeError as exc:
        raise SpecError(
            f"{mod_name}:{factory} must be callable without arguments (it builds the generator), but it needs "
            f"some: {exc}; wrap it in a factory that takes none"
        ) from None
    except ValueError:  # no signature to inspect (some builtins): call it and see
        pass
    try:
        made = fn()
    except Exception as exc:
        raise SpecError(f"the factory {mod_name}:{factory} of spec {spec!r} raised {_said(exc)}") from exc
    if isinstance(made, Generator):
        return made
    opts = dict(kw)
    if isinstance(made, tuple):
        made, *rest = made
        if rest:
            opts.setdefault("latent_dim", rest[0])
    return Source(made, options=opts)


def _load_tiny(target: str, spec: str, kw: dict[str, Any]) -> Any:
    from .testing.pipelines import DEFAULT_SIZE, FAMILIES, build_tiny_pipeline

    if target not in FAMILIES:
        raise SpecError(f"unknown tiny family {target!r}; valid: {', '.join('tiny:' + f for f in FAMILIES)}")
    dtype, rest = _dtype_option(kw, spec)
    pipe = build_tiny_pipeline(target, **rest)
    if dtype is not None:  # as diffusers users run pipelines: every component in half precision
        for comp in pipe.components.values():
            if isinstance(comp, nn.Module):
                nn.Module.to(comp, dtype=dtype)  # diffusers' own .to warns about keep-in-fp32 lists these lack
    return Source(pipe, size=(DEFAULT_SIZE[target], DEFAULT_SIZE[target]))


def _load_zoo(target: str, spec: str, kw: dict[str, Any]) -> Any:
    from .world import zoo

    found = zoo.source(target, **kw)
    return Source(found["model"], defaults=found["defaults"], card=found["card"], oracle=found["oracle"])


def _dtype_option(kw: dict[str, Any], spec: str) -> tuple[Any, dict[str, Any]]:
    """``dtype=`` (or diffusers' ``torch_dtype=``) as a torch dtype (a dtype or its name, ``"bfloat16"``; None when
    not given), and the other keyword arguments."""
    import torch

    kw = dict(kw)
    if "torch_dtype" in kw:
        if "dtype" in kw:
            raise SpecError("give dtype= or torch_dtype= (the same setting), not both")
        kw["dtype"] = kw.pop("torch_dtype")
    dtype = kw.pop("dtype", None)
    if dtype is None or isinstance(dtype, torch.dtype):
        found = dtype
    else:
        found = getattr(torch, str(dtype).removeprefix("torch."), None)
    if dtype is not None and not (isinstance(found, torch.dtype) and found.is_floating_point):
        raise SpecError(f"unknown dtype {dtype!r} for {spec}; give e.g. torch.float16, 'float16', 'bfloat16'")
    return found, kw


def _load_arch(target: str, spec: str, kw: dict[str, Any]) -> Any:
    from . import arch

    entry = arch.get(target)
    dtype, rest = _dtype_option(kw, spec)
    if rest:
        raise SpecError(f"unknown option(s) {', '.join(sorted(rest))} for {spec}; arch: specs take dtype= only")
    pipe = arch.build(target, dtype)
    card = {"name": spec, "title": entry.title, "weights": "none (meta device: shapes only)"}
    return Source(pipe, defaults=entry.defaults, card=card)


register_scheme("hf", _load_hf)
register_scheme("torch", _load_torch)
register_scheme("tiny", _load_tiny)
register_scheme("zoo", _load_zoo)
register_scheme("arch", _load_arch)
