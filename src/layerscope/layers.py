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

#: kinds of the sites below a block (``detail`` entries of the map): an attention module's output, by what its keys
#: are (``self_attention``: the image tokens; ``cross_attention``: the text tokens; ``joint_attention``: text and
#: image tokens together), its projections ``q``, ``k``, ``v``, ``heads`` (the per-head attention output before the
#: output projection), ``attention_map`` (softmax probabilities, head x query x key) and ``ff`` (a feed-forward)
DETAIL_KINDS = ("self_attention", "cross_attention", "joint_attention", "q", "k", "v", "heads", "attention_map", "ff")


@dataclass(frozen=True)
class Site:
    """Where a tensor lives: a module (path the adapter resolves) and a path into its outputs or inputs.

    ``hook="output"``: ``path`` indexes the module's return value (``()`` for a plain tensor, ``(1,)`` for the second
    element of a tuple). ``hook="input"``: the first element of ``path`` is a positional index (int) or a keyword
    name (str) of the call, the rest indexes into that value (e.g. ``("res_hidden_states_tuple", 2)``).
    ``in_path`` locates the module's main input (for block updates = output - input), same convention as inputs.
    ``hook="attention"``: the attention probabilities the module forms while it runs: the engine computes
    softmax(QK^T * scale) at the module's call of ``torch.nn.functional.scaled_dot_product_attention`` (rows, heads,
    queries, keys) and hands it on (edited or not) as the module's processor would have used it.
    """

    module: str
    hook: Literal["output", "input", "attention"] = "output"
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
    parent: str = ""  # detail entries: the entry of the compact map they sit in
    heads: int = 0  # attention sites: number of heads (channels or the "head" dim split into them)
    head_dim: int = 0
    keys: str = ""  # attention sites: what the keys are, in order ("image", "text", "text+image", "image+text")

    @property
    def detail(self) -> bool:
        """Whether this entry sits below the block level (listed with ``detail=True``, selected by globs that reach
        below the blocks)."""
        return bool(self.parent)

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
    """Ordered layers and spaces of a model with glob selection and helpful errors.

    ``entries`` is the compact map (blocks, their resnets and attention blocks, spaces): iteration, ``len`` and
    :attr:`layers` / :attr:`spaces` see only these. ``detail`` holds the sites below the blocks (attention modules,
    Q/K/V, heads, attention maps, feed-forwards), each naming its ``parent`` entry; indexing by name, ``in`` and
    :meth:`select` reach them too. ``unavailable`` maps names of sites the adapter listed but this model cannot
    serve (e.g. attention maps behind a processor that never calls torch's scaled-dot-product attention) to why.
    """

    entries: list[LayerInfo] = field(default_factory=list)
    model: str = ""
    detail: list[LayerInfo] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._by_name = {e.name: e for e in self.entries}
        self._detail = {e.name: e for e in self.detail}
        if len(self._by_name) != len(self.entries) or len(self._detail) != len(self.detail):
            raise ValueError("duplicate layer names in layer map")
        clash = set(self._by_name) & set(self._detail)
        if clash:
            raise ValueError(f"detail entries repeat compact names: {sorted(clash)[:4]}")
        orphans = [e.name for e in self.detail if e.parent not in self._by_name]
        if orphans:
            raise ValueError(f"detail entries without a compact parent: {orphans[:4]}")

    def __len__(self) -> int:
        return len(self.entries)

    @overload
    def __getitem__(self, key: int | str) -> LayerInfo: ...

    @overload
    def __getitem__(self, key: slice) -> list[LayerInfo]: ...

    def __getitem__(self, key: int | str | slice) -> LayerInfo | list[LayerInfo]:
        if isinstance(key, str):
            if key in self._by_name:
                return self._by_name[key]
            if key in self._detail:
                return self._detail[key]
            raise self._unknown(key)
        return self.entries[key]

    def __iter__(self) -> Iterator[LayerInfo]:
        return iter(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name or name in self._detail

    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def all(self) -> list[LayerInfo]:
        """Every entry, compact and detail, in forward order (each block's detail entries right after it)."""
        below: dict[str, list[LayerInfo]] = {}
        for e in self.detail:
            below.setdefault(e.parent, []).append(e)
        out: list[LayerInfo] = []
        for e in self.entries:
            out.append(e)
            out += below.get(e.name, [])
        return out

    @property
    def layers(self) -> list[LayerInfo]:
        return [e for e in self.entries if not e.is_space]

    @property
    def spaces(self) -> list[LayerInfo]:
        return [e for e in self.entries if e.is_space]

    def select(
        self,
        patterns: str | Iterable[str] | None = None,
        *,
        kinds: Iterable[str] | None = None,
        detail: bool = False,
    ) -> list[LayerInfo]:
        """Entries matching any of the glob ``patterns`` (``None``: every layer, no spaces), in forward order.

        A pattern selects among the compact map's entries; one that matches none of them selects among the detail
        sites below the blocks, so ``'*'`` and ``'up_blocks.*'`` keep their meaning while ``'*.attn1'``,
        ``'*.attn2.to_v'`` or ``'transformer_blocks.3.*'`` reach the attention modules. ``detail=True`` matches
        every pattern against both (``None`` then means every layer and every detail site). An exact name or glob
        that matches nothing raises :class:`LayerNameError` listing the closest names.
        """
        if patterns is None:
            chosen = self.layers + (list(self.detail) if detail else [])
            order = {e.name: k for k, e in enumerate(self.all())}
            chosen.sort(key=lambda e: order[e.name])
        else:
            if isinstance(patterns, str):
                patterns = [patterns]
            patterns = list(patterns)
            if not patterns:
                raise LayerNameError("empty layer selection: give at least one layer name or glob, e.g. 'up_blocks.*'")
            hit: set[str] = set()
            for pat in patterns:
                matched = [n for n in self._by_name if fnmatch.fnmatchcase(n, pat)]
                if detail or not matched:
                    matched += [n for n in self._detail if fnmatch.fnmatchcase(n, pat)]
                if not matched:
                    raise self._unknown(pat)
                hit.update(matched)
            chosen = [e for e in self.all() if e.name in hit]
        if kinds is not None:
            kinds = set(kinds)
            chosen = [e for e in chosen if e.kind in kinds]
        return chosen

    def _unknown(self, name: str) -> LayerNameError:
        why = self.unavailable.get(name) or next(
            (r for n, r in self.unavailable.items() if fnmatch.fnmatchcase(n, name)), None
        )
        if why is not None:
            return LayerNameError(f"{name}: {why}")
        return unknown_name(name, self.names() + list(self._detail))


def unknown_name(name: str, valid: Sequence[str]) -> LayerNameError:
    near = close_matches(name, valid)
    return LayerNameError(
        f"no layer or space matches {name!r}; closest valid names: {', '.join(near)} "
        f"(see `layerscope layers MODEL` for all {len(valid)})"
    )
