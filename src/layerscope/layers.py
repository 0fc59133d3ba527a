"""Canonical layer map: what a model's representational layers and candidate spaces are, and where they live.

Adapters build the map (model-family knowledge); the engine only reads :class:`Site` to know which module to hook
and where the tensor sits in that module's inputs or outputs.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, TypeAlias, overload

from .errors import LayerNameError, close_matches

PathElem: TypeAlias = int | str

#: what an entry of the layer map is, for experiments that must decide without knowing the family:
#: ``noise`` (initial noise x_T), ``denoiser_input`` (x_t entering the denoiser), ``condition`` (per-token or image
#: conditioning the denoiser reads), ``pooled_condition`` (a pooled / end-of-sentence embedding input), ``skip`` (a
#: U-Net skip tensor), ``bottleneck`` (a view of the bottleneck, e.g. h-space), ``latent`` (the one latent a
#: generator or VAE decoder maps to the image), ``code`` (a categorical code layer: one one-hot per factor of the
#: model's world, concatenated in the world's factor order), ``layer`` (a representational layer of the network)
ROLES = ("noise", "denoiser_input", "condition", "pooled_condition", "skip", "bottleneck", "latent", "code", "layer")


@dataclass(frozen=True)
class Site:
    """Where a tensor lives: a module (path the adapter resolves) and a path into its outputs or inputs.

    ``hook="output"``: ``path`` indexes the module's return value (``()`` for a plain tensor, ``(1,)`` for the second
    element of a tuple). ``hook="input"``: the first element of ``path`` is a positional index (int) or a keyword
    name (str) of the call, the rest indexes into that value (e.g. ``("res_hidden_states_tuple", 2)``).
    ``in_path`` locates the module's main input (for block updates = output - input), same convention as inputs.
    """

    module: str
    hook: Literal["output", "input"] = "output"
    path: tuple[PathElem, ...] = ()
    in_path: tuple[PathElem, ...] | None = None
    kw_fallback: int | None = None  # positional index to try when an input keyword is passed positionally
    index: str | None = None  # per-row token index the adapter supplies (e.g. "eos"): the site is x[row, index[row]]


@dataclass(frozen=True)
class LayerInfo:
    """One entry of the layer map: a representational layer or a candidate space.

    ``shape`` is the per-sample shape of one step's tensor (``()`` until traced). ``per_step``: the tensor is
    recomputed at every denoising step (False for the initial noise or the final VAE latent). ``branched``: the rows
    of this tensor follow the classifier-free-guidance layout (uncond rows, then cond rows). ``role``: one of
    :data:`ROLES`, what the entry is whatever the family. ``source``: for a skip tensor, the encoder layer it comes
    from.
    """

    name: str
    kind: str
    stage: str
    site: Site
    depth: int = 0
    shape: tuple[int, ...] = ()
    in_shape: tuple[int, ...] | None = None
    per_step: bool = True
    branched: bool = True
    is_space: bool = False
    dims: tuple[str, ...] = ()
    note: str = ""
    role: str = "layer"
    source: str = ""  # skip tensors: the layer that produced it (the consumer is in the name)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown layer role {self.role!r}; valid: {', '.join(ROLES)}")

    def with_shape(self, shape: Sequence[int], in_shape: Sequence[int] | None = None) -> "LayerInfo":
        shape = tuple(int(s) for s in shape)
        ins = tuple(int(s) for s in in_shape) if in_shape is not None else None
        return replace(self, shape=shape, in_shape=ins, dims=default_dims(shape, self.dims))


def default_dims(shape: tuple[int, ...], given: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Name the per-sample dims of an activation: (channel, h, w) for maps, (token, channel) for sequences."""
    if given and len(given) == len(shape):
        return given
    return {0: (), 1: ("channel",), 2: ("token", "channel"), 3: ("channel", "h", "w")}.get(
        len(shape), tuple(f"d{i}" for i in range(len(shape)))
    )


@dataclass
class LayerMap(Sequence[LayerInfo]):
    """Ordered layers and spaces of a model with glob selection and helpful errors."""

    entries: list[LayerInfo] = field(default_factory=list)
    model: str = ""

    def __post_init__(self) -> None:
        self._by_name = {e.name: e for e in self.entries}
        if len(self._by_name) != len(self.entries):
            raise ValueError("duplicate layer names in layer map")

    def __len__(self) -> int:
        return len(self.entries)

    @overload
    def __getitem__(self, key: int | str) -> LayerInfo: ...

    @overload
    def __getitem__(self, key: slice) -> list[LayerInfo]: ...

    def __getitem__(self, key: int | str | slice) -> LayerInfo | list[LayerInfo]:
        if isinstance(key, str):
            if key not in self._by_name:
                raise unknown_name(key, self.names())
            return self._by_name[key]
        return self.entries[key]

    def __iter__(self) -> Iterator[LayerInfo]:
        return iter(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    @property
    def layers(self) -> list[LayerInfo]:
        return [e for e in self.entries if not e.is_space]

    @property
    def spaces(self) -> list[LayerInfo]:
        return [e for e in self.entries if e.is_space]

    def select(
        self, patterns: str | Iterable[str] | None = None, *, kinds: Iterable[str] | None = None
    ) -> list[LayerInfo]:
        """Entries matching any of the glob ``patterns`` (``None``: every layer, no spaces), in map order.

        An exact name or glob that matches nothing raises :class:`LayerNameError` listing the closest names.
        """
        if patterns is None:
            chosen = self.layers
        else:
            if isinstance(patterns, str):
                patterns = [patterns]
            patterns = list(patterns)
            if not patterns:
                raise LayerNameError("empty layer selection: give at least one layer name or glob, e.g. 'up_blocks.*'")
            hit: set[str] = set()
            for pat in patterns:
                matched = [n for n in self._by_name if fnmatch.fnmatchcase(n, pat)]
                if not matched:
                    raise unknown_name(pat, self.names())
                hit.update(matched)
            chosen = [e for e in self.entries if e.name in hit]
        if kinds is not None:
            kinds = set(kinds)
            chosen = [e for e in chosen if e.kind in kinds]
        return chosen


def unknown_name(name: str, valid: Sequence[str]) -> LayerNameError:
    near = close_matches(name, valid)
    return LayerNameError(
        f"no layer or space matches {name!r}; closest valid names: {', '.join(near)} "
        f"(see `layerscope layers MODEL` for all {len(valid)})"
    )
