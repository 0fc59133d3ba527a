"""The one interface every model family implements: :class:`Generator`.

An adapter subclass knows its family (which modules are layers, how CFG lays out the batch, how a batch is
generated); everything else — capture, intervention, sweeps, stores — is generic and lives in the engine.
"""

from __future__ import annotations

import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from ..config import GenerationConfig
from ..engine import Capture, GenerationResult, Intervention, estimate_bytes, execute, plan_capture, trace_shapes
from ..errors import ConfigError
from ..layers import LayerInfo, LayerMap
from ..progress import progress_callback
from ..validate import MAX_STEPS, check_float, check_int, check_seed, check_seeds


class Tap(nn.Identity):
    """An identity module an adapter passes a tensor through so the engine can hook it like any layer output."""


@dataclass
class CaptureHandle:
    """Filled by :meth:`Generator.generate` inside a ``with model.capture(...)`` block."""

    spec: Capture
    result: Any = None

    def __getitem__(self, layer: str) -> Any:
        if self.result is None:
            raise ConfigError(
                "nothing captured yet: call model.generate(...) inside the `with model.capture(...)` block"
            )
        return self.result[layer]


@dataclass(frozen=True)
class Capabilities:
    """What a generator is and can do, for experiments that decide from metadata (never from spec strings).

    ``oracle``: the world whose oracle reads this model's images (``"shapes"`` for the zoo), None for open-domain
    models; ``conditioning``: what a prompt is (``"text"``, ``"image_embeds"``, or ``"latent"`` for a generator
    that maps a latent vector to an image); ``iterative``: it denoises in steps (False: one forward pass);
    ``forkable``: it can fork a generation at a step (given a stochastic sampler configuration);
    ``sampler``: the scheduler's class name (None without one).
    """

    oracle: str | None = None
    conditioning: str = "text"
    iterative: bool = True
    forkable: bool = False
    sampler: str | None = None

    @property
    def default_scorer(self) -> str:
        """``"oracle"`` when an oracle reads the images, else ``"open"`` (open-domain image measures)."""
        return "oracle" if self.oracle else "open"


class Generator(ABC):
    """A generative image model seen through layerscope: layers, candidate spaces, generation with hooks.

    Implements the engine's :class:`~layerscope.engine.backend.Backend`. Subclasses set ``family`` and
    ``step_module`` (the module called once per denoising step, or None for single-pass generators) and implement
    :meth:`build_map`, :meth:`module`, :meth:`run_batch`. ``defaults`` (generation settings), ``card`` (the model
    card), ``oracle`` (see :class:`Capabilities`) and ``size`` (default height, width) come from the loader.
    """

    family: str = ""
    step_module: str | None = None
    load_call: tuple[str, dict[str, Any]] | None = None  # the ls.load(spec, **kwargs) that made it (None: built here)
    control: dict[str, Any] | None = None  # what control this is (layerscope.controls); None: the model itself
    default_max_batch: int = 16
    supports_fork: bool = False  # adapters that can fork a generation at a step (see :meth:`generate`)
    conditioning: str = "text"

    def __init__(
        self,
        spec: str,
        *,
        defaults: dict[str, Any] | None = None,
        card: dict[str, Any] | None = None,
        oracle: str | None = None,
        size: tuple[int, int] | None = None,
    ) -> None:
        self.spec = spec
        self.taps = nn.ModuleDict()
        self._maps: dict[tuple[int | None, int | None], LayerMap] = {}
        self._pending_capture: CaptureHandle | None = None
        self._pending_ivs: list[Intervention] = []
        self.default_config = GenerationConfig()
        self.size_override: tuple[int, int] | None = size
        self.card: dict[str, Any] = dict(card) if card else {"name": spec}
        self.oracle = oracle
        self._loader_defaults = dict(defaults or {})

    def _apply_loader_defaults(self) -> None:
        """Called by each adapter at the end of its ``__init__``: the loader's defaults override the family's."""
        known = set(GenerationConfig.__dataclass_fields__)
        bad = sorted(set(self._loader_defaults) - known)
        if bad:
            raise ConfigError(f"unknown default generation setting(s) {bad}; valid: {', '.join(sorted(known))}")
        for key, value in self._loader_defaults.items():
            setattr(self.default_config, key, value)

    @property
    def capabilities(self) -> Capabilities:
        """What this generator is and can do (see :class:`Capabilities`)."""
        return Capabilities(
            oracle=self.oracle,
            conditioning=self.conditioning,
            iterative=self.step_module is not None,
            forkable=self.supports_fork,
            sampler=self.sampler_name(),
        )

    def sampler_name(self) -> str | None:
        """The scheduler's class name (None for single-pass generators)."""
        return None

    # -- family-specific -------------------------------------------------------------------------------------------
    @abstractmethod
    def build_map(self) -> LayerMap:
        """Layers and spaces in forward order, without shapes."""

    @abstractmethod
    def module(self, path: str) -> nn.Module:
        """The module a :class:`~layerscope.layers.Site` names."""

    @abstractmethod
    def run_batch(
        self, prompts: Sequence[Any], seeds: Sequence[int], cfg: GenerationConfig
    ) -> tuple[torch.Tensor, dict]:
        """Generate one batch: images (n, 3, H, W) in [0, 1] and meta (``timesteps``)."""

    def trace_inputs(self) -> list[Any]:
        """One input used to trace shapes."""
        return ["a photo"]

    def branch_labels(self, cfg: GenerationConfig) -> tuple[str, ...]:
        """CFG branch labels in batch order for this configuration."""
        return ("uncond", "cond") if cfg.guidance_scale > 1.0 else ("cond",)

    def num_steps(self, cfg: GenerationConfig) -> int:
        return cfg.num_inference_steps if self.step_module is not None else 0

    def call_steps(self) -> list[int] | None:
        return None  # one denoiser call per step

    def default_size(self) -> tuple[int, int] | None:
        return None

    def modules(self) -> list[nn.Module]:
        """The model's torch modules (its parameters are the model's weights)."""
        return [self.taps]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's parameters (float32 for a model without any)."""
        for m in self.modules():
            for p in m.parameters():
                return p.dtype
        return torch.float32

    @property
    def has_weights(self) -> bool:
        """False for an architecture without weights (``arch:`` specs, on the meta device): it has a layer map and
        byte estimates, but cannot generate."""
        return True

    def trace_context(self) -> AbstractContextManager[None]:
        """Entered around the trace generation that measures the layer map's shapes (adapters of models without
        weights make their pipeline traceable on meta tensors here)."""
        return nullcontext()

    def site_index(
        self, key: str, prompts: Sequence[Any], cfg: GenerationConfig, branches: Sequence[str]
    ) -> torch.Tensor:
        """Per-row token index for sites with ``Site.index`` (rows in batch layout order)."""
        raise ConfigError(f"{type(self).__name__} has no per-row index {key!r}")

    def text_tokens(self, texts: Sequence[Any]) -> list[list[str]] | None:
        """Token strings per position of the text the denoiser attends to (None: not a text-conditioned model)."""
        return None

    def word_positions(self, word: str, texts: Sequence[Any]) -> list[list[int]]:
        """Positions of ``word``'s tokens in each text (adapters of text-conditioned models implement it)."""
        raise ConfigError(f"{self.spec} is not conditioned on text tokens, so a word cannot select attention keys")

    # -- generic --------------------------------------------------------------------------------------------------
    def config(self, **overrides: Any) -> GenerationConfig:
        """The default generation config with ``overrides`` applied (unknown keys go to ``extra``)."""
        base = replace(self.default_config, extra=dict(self.default_config.extra))
        known = set(GenerationConfig.__dataclass_fields__)
        if "num_images_per_prompt" in overrides:
            raise ConfigError(
                "num_images_per_prompt is an argument of generate() (each image is a row with its own seed); "
                "experiments choose their samples themselves: give more prompts or seeds instead"
            )
        for k, v in overrides.items():
            if v is None and k in ("height", "width"):
                continue
            if k in known:
                setattr(base, k, v)
            else:
                base.extra[k] = v
        if base.height is None or base.width is None:
            size = self.size_override or self.default_size()
            if size is not None:
                base.height = base.height or size[0]
                base.width = base.width or size[1]
        check_int(base.num_inference_steps, "num_inference_steps (denoising steps)", minimum=1, maximum=MAX_STEPS)
        check_float(base.guidance_scale, "guidance_scale", minimum=0.0, optional=True)
        check_int(base.height, "height", minimum=1, optional=True)
        check_int(base.width, "width", minimum=1, optional=True)
        return base

    def layer_map(self, height: int | None = None, width: int | None = None) -> LayerMap:
        """The layer map with per-sample shapes at this resolution (traced once by a 1-step generation, cached)."""
        cfg = self.config(height=height, width=width)
        key = (cfg.height, cfg.width)
        if key not in self._maps:
            with self.trace_context():
                self._maps[key] = trace_shapes(self, self.build_map(), cfg)
        return self._maps[key]

    def layers(
        self, pattern: str | Iterable[str] | None = None, *, detail: bool = False, **size: Any
    ) -> list[LayerInfo]:
        """Layers (no pattern) or every entry matching the glob(s), spaces included; ``detail=True`` adds the
        sites below the blocks (attention modules, Q/K/V, heads, attention maps, feed-forwards)."""
        return self.layer_map(size.get("height"), size.get("width")).select(pattern, detail=detail)

    def spaces(self, **size: Any) -> list[LayerInfo]:
        """Candidate spaces that are not layers: noise, text embeddings, VAE latent, h-space, skips."""
        return self.layer_map(size.get("height"), size.get("width")).spaces

    def capture_bytes(self, capture: Capture, n_samples: int = 1, **gen_kwargs: Any) -> int:
        """Bytes a capture of ``n_samples`` samples will occupy with these generation settings (no generation)."""
        cfg = self.config(**gen_kwargs)
        lmap = self.layer_map(cfg.height, cfg.width)
        capture = capture.resolved(self.dtype)
        plan = plan_capture(capture, lmap, n_samples, self.num_steps(cfg), self.branch_labels(cfg))
        return estimate_bytes(plan, capture.torch_dtype)

    @contextmanager
    def capture(self, layers: str | Sequence[str] = "*", **kw: Any) -> Iterator[CaptureHandle]:
        """Capture ``layers`` in every :meth:`generate` call inside the block (keywords as in :class:`Capture`)."""
        if self._pending_capture is not None:
            raise ConfigError("a capture block is already open on this model; close it first")
        handle = CaptureHandle(Capture(layers=layers, **kw))
        self._pending_capture = handle
        try:
            yield handle
        finally:
            self._pending_capture = None

    @contextmanager
    def intervene(self, *interventions: Intervention) -> Iterator[None]:
        """Apply ``interventions`` to every :meth:`generate` call inside the block."""
        self._pending_ivs.extend(interventions)
        try:
            yield
        finally:
            for iv in interventions:
                self._pending_ivs.remove(iv)

    def generate(
        self,
        prompts: str | Sequence[Any],
        seeds: int | Sequence[int] | None = None,
        *,
        capture: Capture | None = None,
        interventions: Sequence[Intervention] = (),
        max_batch: int | None = None,
        progress: bool | Callable[[int, int], None] | None = None,
        fork_at: int | Sequence[int] | None = None,
        fork_seeds: int | Sequence[int] | None = None,
        **gen_kwargs: Any,
    ) -> GenerationResult:
        """Generate one image per prompt (seed i for prompt i; default seeds 0..n-1) with captures/interventions.

        ``gen_kwargs``: ``num_inference_steps``, ``guidance_scale``, ``height``, ``width``, ``negative_prompt`` or
        pipeline-specific keywords. ``num_images_per_prompt=k`` (as in diffusers) makes k rows per prompt, in prompt
        order; their seeds are ``seeds[i], seeds[i] + 1, ...`` given one seed per prompt, else consecutive (default
        ``0..n*k-1``). ``progress=True`` shows a progress bar over samples (or pass a callback
        ``f(done, total)``).

        **Forking** (stochastic samplers only, e.g. DDIM with ``eta=1``): ``fork_at`` (a step, or one per row) and
        ``fork_seeds`` (one per row; an int ``k`` means ``k, k+1, ...``). A row's initial noise and its sampler noise
        up to step ``fork_at`` come from its seed, as without forking; the sampler noise drawn in step ``fork_at``
        and after comes from its fork seed. Rows with the same prompt and seed therefore share the whole trajectory:
        the denoiser's inputs at steps ``0..fork_at`` are identical, and they go apart from step ``fork_at + 1`` on.
        A row's noise depends only on its own seeds, never on its batch.
        """
        if not self.has_weights:
            raise ConfigError(
                f"{self.spec} is an architecture without weights (meta device): it lists layers, estimates bytes and "
                "plans studies (--dry-run), but cannot generate; load the model with its weights (hf:<folder>)"
            )
        if isinstance(prompts, (str, torch.Tensor)) and not (isinstance(prompts, torch.Tensor) and prompts.ndim > 1):
            prompts = [prompts]
        prompts = list(prompts)
        per = check_int(gen_kwargs.pop("num_images_per_prompt", 1), "num_images_per_prompt", minimum=1)
        if seeds is None:
            seeds = list(range(len(prompts) * per))
        elif isinstance(seeds, numbers.Integral) and not isinstance(seeds, bool):
            seeds = [int(seeds) + i for i in range(len(prompts) * per)]
        elif isinstance(seeds, (str, float)):
            check_seed(seeds)
        elif per > 1:  # one seed per prompt: its images take seed, seed + 1, ...
            seeds = check_seeds(seeds)
            if len(seeds) != len(prompts):
                raise ConfigError(
                    f"with num_images_per_prompt, give one seed per prompt ({len(prompts)} prompts, {len(seeds)} "
                    "seeds): prompt i's images take seeds[i], seeds[i] + 1, ..."
                )
            seeds = [s + j for s in seeds for j in range(per)]
        prompts = [p for p in prompts for _ in range(per)]
        seeds = check_seeds(seeds)
        check_int(max_batch, "max_batch (rows per generation)", minimum=1, optional=True)
        cfg = self.config(**gen_kwargs)
        if fork_at is not None or fork_seeds is not None:
            seeds = self._fork_seeds(list(seeds), cfg, fork_at, fork_seeds)
        handle = self._pending_capture
        if capture is not None and handle is not None:
            raise ConfigError("pass capture= or use a `with model.capture(...)` block, not both")
        cap = capture if capture is not None else (handle.spec if handle is not None else None)
        cap = cap.resolved(self.dtype) if cap is not None else None
        ivs = list(self._pending_ivs) + list(interventions)
        with progress_callback(progress, f"generating {len(prompts)} samples") as report:
            result = execute(self, prompts, list(seeds), cfg, cap, ivs, max_batch, report)
        if handle is not None:
            handle.result = result.capture
        return result

    def _fork_seeds(self, seeds: list[int], cfg: GenerationConfig, fork_at: Any, fork_seeds: Any) -> list["ForkedSeed"]:
        """Validate a fork request and attach it to each row's seed (so it travels with the row through batching)."""
        n = len(seeds)
        if fork_at is None or fork_seeds is None:
            raise ConfigError("forking needs both fork_at (the step) and fork_seeds (one per row)")
        if not self.supports_fork:
            raise ConfigError(
                f"{type(self).__name__} cannot fork a generation: forking needs a diffusers pipeline "
                "with a stochastic sampler"
            )
        at = [int(fork_at)] * n if isinstance(fork_at, (int, np.integer)) else [int(a) for a in fork_at]
        fs = (
            [int(fork_seeds) + i for i in range(n)]
            if isinstance(fork_seeds, (int, np.integer))
            else [int(f) for f in fork_seeds]
        )
        if len(at) != n or len(fs) != n:
            raise ConfigError(f"got {n} prompts but {len(at)} fork steps and {len(fs)} fork seeds; give one per row")
        steps = self.num_steps(cfg)
        bad = [a for a in at if not 0 <= a < steps]
        if bad:
            raise ConfigError(f"fork_at must be a step in 0..{steps - 1} (of {steps} steps), got {bad[0]}")
        self._check_fork(cfg)
        # the fork goes into the configuration's record too, so a stored run's fingerprint tells forks apart
        cfg.extra[FORK_KEY] = ";".join(f"{a}:{f}" for a, f in zip(at, fs))
        return [ForkedSeed(s, a, f) for s, a, f in zip(seeds, at, fs)]

    def _check_fork(self, cfg: GenerationConfig) -> None:
        """Raise :class:`ConfigError` unless this configuration samples stochastically (adapters override)."""
        raise ConfigError(f"{type(self).__name__} cannot fork a generation")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.spec!r} family={self.family}>"


FORK_KEY = "_fork"  # GenerationConfig.extra key recording a fork request (adapters drop it from pipeline kwargs)


class ForkedSeed(int):
    """A row's seed (its int value: initial noise and sampler noise before the fork) carrying its fork: from step
    ``at`` on, the row's sampler noise comes from ``fork_seed``. Made by :meth:`Generator.generate`."""

    at: int
    fork_seed: int

    def __new__(cls, seed: int, at: int, fork_seed: int) -> "ForkedSeed":
        obj = super().__new__(cls, int(seed))
        obj.at = int(at)
        obj.fork_seed = int(fork_seed)
        return obj

    def __getnewargs__(self) -> tuple[int, int, int]:  # pickle / copy
        return (int(self), self.at, self.fork_seed)

    def __repr__(self) -> str:
        return f"ForkedSeed({int(self)}, at={self.at}, fork_seed={self.fork_seed})"


def seeded_noise(
    seeds: Sequence[int], shape: Sequence[int], device: torch.device | str, dtype: torch.dtype
) -> torch.Tensor:
    """Initial noise, one independent CPU generator per row, so a row's noise does not depend on its batch."""
    rows = [torch.randn(tuple(shape), generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds]
    return torch.stack(rows).to(device=device, dtype=dtype)
