"""Controls as models: :func:`untrained`, a copy of a loaded model whose weights are re-initialised, and the
``untrained:`` scheme that loads one (``ls.load("untrained:zoo:unet@3+text")``).

A control is an ordinary :class:`~layerscope.models.base.Generator`: the same layer map, capabilities, default
generation settings and oracle as its model, so every experiment and CLI command runs it with the same code,
settings and seeds. What it is says itself in its ``spec``, in ``model.control`` and in ``model.card["control"]``.

How a component is re-initialised (see docs/controls.md):

1. On a CPU float32 copy of its tensors (so the weights depend on the seed and the architecture, not on the device
   or dtype the model sits on), with the CPU random generator seeded from ``(seed, component name)``: a component's
   weights do not depend on which other components are re-initialised. The global RNG is left as it was.
2. Transformers models (``text_encoder="reinit"``): their own ``_init_weights`` on every submodule, children first
   (as ``post_init`` does).
3. Every submodule with ``reset_parameters()`` whose own parameters step 2 left alone, children first (as
   construction does: a parent that re-initialises a child's parameters has the last word).
4. Every parameter still untouched takes :func:`fallback_init`, which imitates what diffusers' constructors give
   such parameters; their names are listed in the record's ``fallback_init``.

Buffers (sinusoidal tables, position ids, the scheduler's state) are left alone, except where a module's own reset
resets them (a batch norm's running statistics, which are learned from data). So are the parameters a constructor
makes fixed (``requires_grad=False`` by design: :data:`FIXED`).
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, SpecError
from .loading import load, register_scheme
from .models.base import Generator
from .validate import check_seed

SCHEME = "untrained"
TEXT_ENCODER = ("keep", "reinit")
#: parameters a diffusers constructor makes with requires_grad=False (fixed random features, not learned): left alone
FIXED: dict[str, tuple[str, ...]] = {"GaussianFourierProjection": ("weight", "W")}
#: card entries that describe the trained weights (their training and measured quality), not the control's
TRAINED_ONLY = ("quality", "steps", "train_seconds", "device", "threads")


def untrained(model: Generator, seed: int = 0, text_encoder: str = "keep") -> Generator:
    """An untrained control of ``model``: a deep copy with every parameter re-initialised, deterministically from
    ``seed`` (see the module docstring for exactly how).

    ``text_encoder="keep"`` keeps the conditioning encoders trained (transformers models and components named
    ``text_encoder*``), ``"reinit"`` re-initialises them too. The copy's spec is ``untrained:<spec>``, with
    ``@<seed>`` for seeds other than 0 and ``+text`` for ``"reinit"``; ``model`` itself is left untouched.

    >>> import layerscope as ls
    >>> ls.untrained(ls.load("zoo:gan"), seed=3).spec
    'untrained:zoo:gan@3'
    """
    seed, text_encoder = _check(model, seed, text_encoder)
    pending = (model._pending_capture, model._pending_ivs)
    model._pending_capture, model._pending_ivs = None, []  # an open capture block belongs to the original only
    try:
        control = copy.deepcopy(model)
    finally:
        model._pending_capture, model._pending_ivs = pending
    return _make_control(control, seed, text_encoder)


def control_spec(spec: str, seed: int = 0, text_encoder: str = "keep") -> str:
    """The spec of a control: ``untrained:<spec>[@<seed>][+text]`` (no suffix for seed 0 and kept encoders)."""
    return f"{SCHEME}:{spec}{f'@{seed}' if seed else ''}{'+text' if text_encoder == 'reinit' else ''}"


def parse_spec(target: str) -> tuple[str, int, str]:
    """``<spec>[@<seed>][+text]`` (the part after ``untrained:``; the suffixes in either order) as
    ``(spec, seed, text_encoder)``."""
    inner, seed, text = target, None, None
    while True:
        found = re.search(r"(@(\d+)|\+text)$", inner)
        if found is None:
            break
        if found.group(2) is not None:
            if seed is not None:
                raise SpecError(f"untrained:{target} gives two seeds; give at most one @<seed>")
            seed = check_seed(int(found.group(2)), "control's seed")
        else:
            if text is not None:
                raise SpecError(f"untrained:{target} says +text twice")
            text = "reinit"
        inner = inner[: found.start()]
    bad = re.search(r"(@-\d+|\+[A-Za-z_]+)$", inner)
    if bad is not None:
        raise SpecError(
            f"untrained:{target} ends in {bad.group(1)!r}: after the model spec come @<seed> (an integer >= 0) "
            "and +text (re-initialise the text encoders too), e.g. untrained:zoo:unet@3+text"
        )
    if ":" not in inner:
        raise SpecError(f"untrained:{target} names no model spec after 'untrained:'; e.g. untrained:zoo:unet")
    return inner, seed or 0, text or "keep"


def fallback_init(param: torch.Tensor, name: str) -> None:
    """Initialise, in place, a parameter no ``reset_parameters`` / ``_init_weights`` covers, as diffusers'
    constructors make such parameters (``nn.Parameter(torch.zeros(dim))``, ``torch.ones(dim)``,
    ``torch.randn(k, dim) / dim**0.5``), decided by its name and shape:

    - ``scale_shift_table`` (the adaLN-single modulation tables of PixArt / DiT blocks): normal(0, 1/sqrt(dim));
    - names with ``bias``, ``shift``, ``offset`` or ``beta``: zeros;
    - vectors (at most one dimension above 1) named ``weight``, ``scale``, ``gamma``, ``gain`` or ``g``: ones;
    - anything else (learned positional embeddings, tokens, other tables): normal(0, 0.02).
    """
    leaf = name.rsplit(".", 1)[-1].lower()
    vector = param.ndim == 0 or param.numel() == max(param.shape)
    with torch.no_grad():
        if "scale_shift_table" in leaf:
            nn.init.normal_(param, 0.0, float(param.shape[-1]) ** -0.5)
        elif any(k in leaf for k in ("bias", "shift", "offset", "beta")):
            nn.init.zeros_(param)
        elif vector and (leaf == "g" or any(k in leaf for k in ("weight", "scale", "gamma", "gain"))):
            nn.init.ones_(param)
        else:
            nn.init.normal_(param, 0.0, 0.02)


# -- the work --------------------------------------------------------------------------------------------------------


def _check(model: Any, seed: Any, text_encoder: Any) -> tuple[int, str]:
    """Refuse what cannot be a control, in one sentence, before any copying."""
    if not isinstance(model, Generator):
        raise ConfigError(f"untrained() takes a loaded model (ls.load(...)), got a {type(model).__name__}")
    if not model.has_weights:
        raise ConfigError(
            f"{model.spec} has no weights (an architecture on the meta device), so it has no untrained copy to "
            "generate with; load a model with weights (hf:, zoo:, tiny:, torch:)"
        )
    if model.control is not None:
        raise ConfigError(
            f"{model.spec} is already a control (of {model.control.get('of')}); make the control you want from "
            "that model instead, e.g. ls.untrained(ls.load(spec), seed=1)"
        )
    seed = check_seed(seed, "control's seed")
    if text_encoder not in TEXT_ENCODER:
        near = difflib.get_close_matches(str(text_encoder), TEXT_ENCODER, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ConfigError(
            f"text_encoder must be 'keep' (text encoders stay trained) or 'reinit' (re-initialised too), got "
            f"{text_encoder!r}{hint}"
        )
    return seed, str(text_encoder)


def _make_control(model: Generator, seed: int, text_encoder: str) -> Generator:
    """Re-initialise ``model`` in place and make it say which control it is."""
    of, call = model.spec, model.load_call
    kept: list[str] = []
    todo: list[tuple[str, nn.Module]] = []
    for name, comp in _components(model):
        if next(comp.parameters(), None) is None:
            continue
        if text_encoder == "keep" and _is_text_encoder(name, comp):
            kept.append(name)
        else:
            todo.append((name, comp))
    if not todo:
        raise ConfigError(
            f"{of} has no parameters to re-initialise besides its text encoders ({', '.join(kept) or 'none'}); "
            "pass text_encoder='reinit' to re-initialise those"
        )
    fallback: list[str] = []
    with torch.random.fork_rng(devices=[]):  # CPU only: every draw is made on the CPU (see _on_cpu)
        for name, comp in todo:
            torch.default_generator.manual_seed(_component_seed(seed, name))
            fallback += [f"{name}.{p}" for p in _reinit(comp, hf=text_encoder == "reinit")]
    spec = control_spec(of, seed, text_encoder)
    record = {
        "kind": SCHEME,
        "of": of,
        "seed": seed,
        "text_encoder": text_encoder,
        "kept": kept,
        "fallback_init": fallback,
    }
    card = {k: v for k, v in model.card.items() if k not in TRAINED_ONLY}
    what = f"untrained control of {of}: every weight re-initialised (seed {seed})"
    what += f", {', '.join(kept)} kept trained" if kept else ""
    card["description"] = f"{what}; architecture: {card['description']}" if card.get("description") else what
    card["name"] = spec
    card["control"] = record
    model.spec = spec
    for lmap in model._maps.values():  # layer maps traced before the copy: the same layers, named for the control
        lmap.model = spec
    model.card = card
    model.control = record
    model.load_call = (control_spec(call[0], seed, text_encoder), dict(call[1])) if call is not None else None
    return model


def _components(model: Generator) -> list[tuple[str, nn.Module]]:
    """The model's torch components (``model.modules()``) with their names: a pipeline's component names, else the
    model's attribute holding it (``net``), else ``module<i>``."""
    names: dict[int, str] = {}
    found = getattr(getattr(model, "pipe", None), "components", None)
    if isinstance(found, dict):
        for name, comp in found.items():
            names.setdefault(id(comp), str(name))
    for name, value in vars(model).items():
        if isinstance(value, nn.Module):
            names.setdefault(id(value), name)
    out: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()
    for i, comp in enumerate(model.modules()):
        if id(comp) not in seen:
            seen.add(id(comp))
            out.append((names.get(id(comp), f"module{i}"), comp))
    return out


def _is_text_encoder(name: str, comp: nn.Module) -> bool:
    """A conditioning encoder trained elsewhere: a transformers model, or a component named ``text_encoder*`` /
    ``tokenizer*``."""
    return _is_transformers(comp) or name.startswith(("text_encoder", "tokenizer"))


def _is_transformers(comp: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers comes with diffusers' pipelines
        return False
    return isinstance(comp, PreTrainedModel)


def _component_seed(seed: int, name: str) -> int:
    """A component's own seed, from the control's seed and the component's name."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _reinit(comp: nn.Module, hf: bool) -> list[str]:
    """Re-initialise every learned parameter of ``comp`` in place; the names of those that took the fallback."""
    fixed = {
        id(p)
        for m in comp.modules()
        for attr in FIXED.get(type(m).__name__, ())
        if isinstance(p := getattr(m, attr, None), nn.Parameter)
    }
    with _on_cpu(comp):
        params = dict(comp.named_parameters())
        before = {id(p): p._version for p in params.values()}  # in-place init bumps a tensor's version counter

        def touched(p: torch.Tensor) -> bool:
            return id(p) in fixed or p._version != before[id(p)]

        modules = list(comp.modules())[::-1]  # children before their parents (reversed pre-order)
        if hf and _is_transformers(comp):
            init = getattr(comp, "_init_weights")
            for p in params.values():
                if getattr(p, "_is_hf_initialized", False):
                    p._is_hf_initialized = False  # type: ignore[attr-defined]  # loaded weights skip HF's init
            for m in modules:
                init(m)
        for m in modules:
            own = list(m.parameters(recurse=False))
            reset = getattr(m, "reset_parameters", None)
            if own and callable(reset) and not any(touched(p) for p in own):
                reset()
        left = [name for name, p in params.items() if not touched(p)]
        for name in left:
            fallback_init(params[name], name)
    return left


@contextmanager
def _on_cpu(comp: nn.Module) -> Iterator[None]:
    """Hold ``comp``'s floating-point tensors on the CPU in float32 inside the block (the random draws are then
    the same on every device and dtype), and put each back where and as it was afterwards."""
    tensors = list(comp.named_parameters()) + list(comp.named_buffers())
    where = {name: (t.device, t.dtype) for name, t in tensors}
    moved = any(t.is_floating_point() and (t.device.type != "cpu" or t.dtype != torch.float32) for _, t in tensors)
    if moved:
        nn.Module.to(comp, device="cpu", dtype=torch.float32)
    try:
        yield
    finally:
        if moved:
            for name, p in comp.named_parameters():
                if (p.device, p.dtype) != where[name]:
                    p.data = p.data.to(*where[name])
            for name, b in list(comp.named_buffers()):
                if (b.device, b.dtype) != where[name]:
                    owner, _, leaf = name.rpartition(".")
                    comp.get_submodule(owner)._buffers[leaf] = b.to(*where[name])


def _load_untrained(target: str, spec: str, kw: dict[str, Any]) -> Generator:
    """``untrained:<spec>[@<seed>][+text]``: load ``<spec>`` (keyword arguments go to its loader) and make it the
    control (in place: no second copy of the weights)."""
    inner, seed, text_encoder = parse_spec(target)
    model = load(inner, **kw)
    seed, text_encoder = _check(model, seed, text_encoder)
    return _make_control(model, seed, text_encoder)


register_scheme(SCHEME, _load_untrained)
