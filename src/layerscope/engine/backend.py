"""The contract between the engine and the adapters: :class:`Backend`.

The engine imports nothing from :mod:`layerscope.models`; whatever a model family is, its adapter gives the engine
these few things (nnsight's ``Batchable`` and TransformerLens's ``component_mapping`` play the same role there).
:class:`layerscope.models.base.Generator` implements it for every family; a new family implements it too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from ..config import GenerationConfig
from ..layers import LayerMap


@runtime_checkable
class Backend(Protocol):
    """What the engine needs of a model: module lookup, one batch, the step module, branches, steps, the map.

    - ``spec``: the model's name in records and stores;
    - ``step_module``: path (for :meth:`module`) of the module called once per denoising step, None for single-pass
      generators (their sites are captured once per generation);
    - ``default_max_batch``: rows per chunk when the caller gives none.
    """

    spec: str
    step_module: str | None
    default_max_batch: int

    def module(self, path: str) -> nn.Module:
        """The module a :class:`~layerscope.layers.Site` names (``Site.module``)."""
        ...

    def run_batch(
        self, prompts: Sequence[Any], seeds: Sequence[int], cfg: GenerationConfig
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Generate one batch with whatever hooks are installed: images (n, 3, H, W) in [0, 1] and meta
        (``timesteps``: the scheduler's timesteps of the steps, in order)."""
        ...

    def branch_labels(self, cfg: GenerationConfig) -> tuple[str, ...]:
        """CFG branch labels in batch order for this configuration (``("uncond", "cond")``, ``("cond",)``, ...)."""
        ...

    def num_steps(self, cfg: GenerationConfig) -> int:
        """Denoising steps per generation with this configuration (0 for single-pass generators)."""
        ...

    def sampler_name(self) -> str | None:
        """The scheduler's class name (None for single-pass generators), for messages and records."""
        ...

    def call_steps(self) -> list[int] | None:
        """During a generation, at its first denoiser call: the step of each denoiser call of this run, or None when
        the denoiser runs once per step. Schedulers that evaluate it more than once per step (Heun, KDPM2, PNDM)
        map several calls to one step."""
        ...

    def site_index(
        self, key: str, prompts: Sequence[Any], cfg: GenerationConfig, branches: Sequence[str]
    ) -> torch.Tensor:
        """Per-row token index of sites with ``Site.index`` (e.g. each prompt's end-of-sentence token), rows in
        batch layout order."""
        ...

    def text_tokens(self, texts: Sequence[Any]) -> list[list[str]] | None:
        """The token strings at each position of the text the denoiser attends to (padding included), one list per
        text; None for a model not conditioned on text (attention maps are then stored without token labels)."""
        ...

    def word_positions(self, word: str, texts: Sequence[Any]) -> list[list[int]]:
        """For each text, the positions (in the denoiser's text sequence) of every token of each occurrence of
        ``word``; empty where the word does not occur."""
        ...

    def trace_inputs(self) -> list[Any]:
        """One input for the trace generation that measures every site's shape."""
        ...

    def config(self, **overrides: Any) -> GenerationConfig:
        """The model's default generation configuration with ``overrides`` applied (validated)."""
        ...

    def layer_map(self, height: int | None = None, width: int | None = None) -> LayerMap:
        """The layer map with per-sample shapes at this resolution."""
        ...
