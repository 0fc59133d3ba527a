"""Model specs: ``hf:<repo id or local folder>``, ``torch:<module>:<factory>``, ``tiny:<family>``, ``zoo:<name>``."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

from .errors import SpecError
from .models.base import Generator

SCHEMES = ("hf", "torch", "tiny", "zoo")


def adapter_for_pipeline(pipe: Any, spec: str) -> Generator:
    """Wrap a loaded diffusers pipeline in the adapter of its family (error names the supported classes)."""
    from .models import transformer, unet

    cls = type(pipe).__name__
    if cls in unet.SUPPORTED:
        return unet.UNetPipelineGenerator(pipe, spec)
    if cls in transformer.SUPPORTED:
        return transformer.TransformerPipelineGenerator(pipe, spec)
    supported = list(unet.SUPPORTED) + list(transformer.SUPPORTED)
    raise SpecError(f"{cls} is not supported; supported pipeline classes: {', '.join(supported)}")


def _load_hf(target: str, spec: str, **kw: Any) -> Generator:
    import torch
    from diffusers import DiffusionPipeline

    path = Path(target).expanduser()
    local = path.exists()
    if not local and (target.startswith((".", "/", "~")) or target.count("/") != 1):
        raise SpecError(f"no local folder {target!r}; give an existing diffusers pipeline folder or a hub repo id")
    offline = local or os.environ.get("HF_HUB_OFFLINE") == "1"
    kw.setdefault("dtype", torch.float32)
    try:
        pipe = DiffusionPipeline.from_pretrained(str(path) if local else target, local_files_only=offline, **kw)
    except (OSError, ValueError, EnvironmentError) as exc:
        where = f"folder {str(path)!r}" if local else f"repo {target!r} (not in the local cache)"
        raise SpecError(f"could not load a diffusers pipeline from {where}: {str(exc).splitlines()[0]}") from exc
    return adapter_for_pipeline(pipe, spec)


def _load_torch(target: str, spec: str, **kw: Any) -> Generator:
    from .models.latent import LatentGenerator

    mod_name, sep, factory = target.rpartition(":")
    if not sep or not mod_name or not factory:
        raise SpecError(f"torch specs look like 'torch:package.module:factory', got {spec!r}")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as exc:
        raise SpecError(f"cannot import module {mod_name!r} for spec {spec!r}: {exc}") from exc
    fn = getattr(mod, factory, None)
    if fn is None or not callable(fn):
        names = [n for n in dir(mod) if not n.startswith("_") and callable(getattr(mod, n))]
        raise SpecError(f"module {mod_name!r} has no callable {factory!r}; callables there: {', '.join(names[:10])}")
    made = fn()
    if isinstance(made, Generator):
        return made
    opts = dict(kw)
    if isinstance(made, tuple):
        made, *rest = made
        if rest:
            opts.setdefault("latent_dim", rest[0])
    return LatentGenerator(made, spec, **opts)


def _load_tiny(target: str, spec: str, **kw: Any) -> Generator:
    from .models.tiny import FAMILIES, build_tiny_pipeline

    if target not in FAMILIES:
        raise SpecError(f"unknown tiny family {target!r}; valid: {', '.join('tiny:' + f for f in FAMILIES)}")
    from .models.tiny import DEFAULT_SIZE

    gen = adapter_for_pipeline(build_tiny_pipeline(target, **kw), spec)
    gen.size_override = (DEFAULT_SIZE[target], DEFAULT_SIZE[target])
    return gen


def _load_zoo(target: str, spec: str, **kw: Any) -> Generator:
    from .world import zoo

    return zoo.load(target, spec, **kw)


def load(spec: str, **kwargs: Any) -> Generator:
    """Load a model from a spec string and return its :class:`~layerscope.models.base.Generator`.

    - ``hf:<repo id or folder>``: a diffusers pipeline (offline from a local folder);
    - ``torch:<module>:<factory>``: ``factory()`` returns an ``nn.Module`` mapping latent vectors to images
      (or ``(module, latent_dim)``, or a ready Generator);
    - ``tiny:<family>``: a tiny random-weight pipeline built from configs in code (sd, sd2, sdxl, kandinsky22, sd3,
      flux, pixart) for tests and demos;
    - ``zoo:<name>``: the shipped Shapes-world models (unet, dit, vae, gan; ``layerscope zoo list``).
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise SpecError(f"model spec {spec!r} has no scheme; valid schemes: {', '.join(s + ':' for s in SCHEMES)}")
    scheme, _, target = spec.partition(":")
    loaders = {"hf": _load_hf, "torch": _load_torch, "tiny": _load_tiny, "zoo": _load_zoo}
    if scheme not in loaders:
        raise SpecError(f"unknown model scheme {scheme!r} in {spec!r}; valid schemes: {', '.join(s + ':' for s in SCHEMES)}")
    if not target:
        raise SpecError(f"model spec {spec!r} names no model after {scheme!r}:")
    return loaders[scheme](target, spec, **kwargs)
