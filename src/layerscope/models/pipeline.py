"""What every diffusers-pipeline adapter shares: module lookup, seeded noise, VAE decoding, spaces as taps."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import GenerationConfig
from ..engine import meta_inputs
from ..errors import ConfigError
from ..layers import LayerInfo, Site
from .base import FORK_KEY, Generator, Tap, seeded_noise


class PipelineGenerator(Generator):
    """Base of the diffusers adapters: ``self.pipe`` is a loaded pipeline; the denoiser is ``self.denoiser_name``."""

    denoiser_name = "unet"
    supported: dict[str, str] = {}  # pipeline class name -> variant
    family_prefix = ""
    pixel_variants: tuple[str, ...] = ("shapes",)  # denoise images directly: no VAE, scale factor 1
    supports_fork = True  # with a stochastic sampler: per-row sampler-noise generators, re-seeded at the fork

    def __init__(self, pipe: Any, spec: str, variant: str | None = None, **opts: Any) -> None:
        cls = type(pipe).__name__
        if variant is None and cls not in self.supported:
            raise ConfigError(
                f"{cls} is not a supported {self.family_prefix} pipeline; supported: {', '.join(self.supported)}"
            )
        self.variant = variant if variant is not None else self.supported[cls]
        self.family = f"{self.family_prefix}/{self.variant}"
        super().__init__(spec, **opts)
        self.pipe = pipe
        self.taps["noise"] = Tap()
        self.taps["vae_latent"] = Tap()
        self.step_module = self.denoiser_name
        self.default_config.guidance_scale = 5.0
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)

    def sampler_name(self) -> str | None:
        sched = getattr(self.pipe, "scheduler", None)
        return None if sched is None else type(sched).__name__

    @property
    def has_weights(self) -> bool:
        return self.device.type != "meta"

    def modules(self) -> list[nn.Module]:
        return [c for c in self.pipe.components.values() if isinstance(c, nn.Module)]

    @contextmanager
    def trace_context(self) -> Iterator[None]:
        """On the meta device, make the pipeline traceable: the scheduler keeps its timesteps and sigmas on the CPU
        (schedulers index their tables with them and compare them, which needs values; its arithmetic with meta
        tensors then gives meta tensors of the right shapes), and CPU tensors handed to a component (the timestep)
        are moved to meta on the way in. A text encoder's ``attention_mask`` is dropped: transformers reads its
        values to choose an attention kernel (``mask.all()``), and a mask decides which tokens attend, never a
        shape. Elsewhere nothing changes."""
        if self.has_weights:
            yield
            return
        sched = self.pipe.scheduler
        original = sched.set_timesteps

        @functools.wraps(original)
        def on_cpu(*args: Any, **kwargs: Any) -> Any:
            kwargs["device"] = "cpu"
            return original(*args, **kwargs)

        comps = self.modules()
        sched.set_timesteps = on_cpu
        try:
            with meta_inputs(comps, {c: ("attention_mask",) for c in comps if c is not self.denoiser}):
                yield
        finally:
            del sched.set_timesteps

    @property
    def denoiser(self) -> nn.Module:
        return getattr(self.pipe, self.denoiser_name)

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    @property
    def dtype(self) -> torch.dtype:
        return self.denoiser.dtype

    def module(self, path: str) -> nn.Module:
        head, _, rest = path.partition(".")
        if head == "taps":
            return self.taps[rest]
        root = getattr(self.pipe, head, None)
        if not isinstance(root, nn.Module):
            raise ConfigError(f"pipeline has no module component {head!r}")
        return root.get_submodule(rest) if rest else root

    # -- spaces shared by all families ----------------------------------------------------------------------------
    def _noise_space(self) -> LayerInfo:
        return LayerInfo(
            "noise",
            "noise",
            "input",
            Site("taps.noise"),
            per_step=False,
            branched=False,
            is_space=True,
            note="initial latent noise x_T, one seeded generator per sample",
            role="noise",
        )

    @property
    def pixel_space(self) -> bool:
        return self.variant in self.pixel_variants

    @property
    def vae_factor(self) -> int:
        return 1 if self.pixel_space else int(self.pipe.vae_scale_factor)

    def _vae_space(self) -> list[LayerInfo]:
        if self.pixel_space:
            return []
        return [
            LayerInfo(
                "vae_latent",
                "vae_latent",
                "output",
                Site("taps.vae_latent"),
                per_step=False,
                branched=False,
                is_space=True,
                note="final latent handed to the VAE decoder",
                role="latent",
            )
        ]

    def _denoiser_input(
        self,
        name: str,
        kind: str,
        path: tuple,
        note: str,
        kw_fallback: int | None = None,
        dims: tuple[str, ...] = (),
        role: str = "condition",
    ) -> LayerInfo:
        return LayerInfo(
            name,
            kind,
            "input",
            Site(self.denoiser_name, "input", path, kw_fallback=kw_fallback),
            is_space=True,
            note=note,
            dims=dims,
            role=role,
        )

    # -- end-of-sentence token -------------------------------------------------------------------------------------
    eos_tokenizer: str | None = None  # pipeline attribute of the tokenizer whose tokens open encoder_hidden_states
    eos_max_length: int = 77

    def _eos_tok(self) -> Any:
        """The tokenizer whose positions index ``encoder_hidden_states``: ``eos_tokenizer``, or ``tokenizer_2`` when
        a pipeline of two CLIP encoders ships the second alone (an SDXL refiner-style folder: the same BPE
        vocabulary, so the same end-of-sentence positions)."""
        if self.eos_tokenizer is None:
            return None
        tok = getattr(self.pipe, self.eos_tokenizer, None)
        if tok is None and self.eos_tokenizer == "tokenizer":
            tok = getattr(self.pipe, "tokenizer_2", None)
        return tok

    def _eos_space(self) -> list[LayerInfo]:
        if self._eos_tok() is None:
            return []
        return [
            LayerInfo(
                "text_eos",
                "text_eos",
                "input",
                Site(self.denoiser_name, "input", ("encoder_hidden_states",), index="eos"),
                is_space=True,
                note="text encoder state at each prompt's end-of-sentence token",
                role="condition",
            )
        ]

    def _eos_positions(self, texts: Sequence[str]) -> list[int]:
        tok = self._eos_tok()
        ids = tok(list(texts), truncation=True, max_length=self.eos_max_length)["input_ids"]
        return [len(row) - 1 for row in ids]

    def text_tokens(self, texts: Sequence[Any]) -> list[list[str]] | None:
        tok = self._eos_tok()
        if tok is None or self.conditioning != "text":
            return None
        length = min(self.eos_max_length, int(tok.model_max_length))
        ids = tok(list(self._check_prompts(texts)), padding="max_length", max_length=length, truncation=True)
        return [list(tok.convert_ids_to_tokens(row)) for row in ids["input_ids"]]

    def word_positions(self, word: str, texts: Sequence[Any]) -> list[list[int]]:
        tok = self._eos_tok()
        if tok is None or self.conditioning != "text":
            return super().word_positions(word, texts)
        piece = list(tok(word.strip(), add_special_tokens=False)["input_ids"])
        if not piece:
            raise ConfigError(f"the word {word!r} has no tokens in this model's tokenizer")
        length = min(self.eos_max_length, int(tok.model_max_length))
        rows = tok(list(self._check_prompts(texts)), truncation=True, max_length=length)["input_ids"]
        out = []
        for row in rows:
            row = list(row)
            hits = [i for i in range(len(row) - len(piece) + 1) if row[i : i + len(piece)] == piece]
            out.append([i + j for i in hits for j in range(len(piece))])
        return out

    # -- below the blocks: attention modules, projections, maps, feed-forwards ---------------------------------------
    def _attention_kind(self, path: str, attn: nn.Module) -> str:
        """What an attention module's keys are, by its structure: added key projections mean joint attention
        (text and image tokens together), a cross-attention module attends to the condition, otherwise itself."""
        if getattr(attn, "add_k_proj", None) is not None:
            return "joint_attention"
        return "cross_attention" if getattr(attn, "is_cross_attention", False) else "self_attention"

    def _attention_keys(self, path: str, attn: nn.Module, kind: str) -> str:
        """The keys of an attention module's map in order (adapters of joint attention say which stream opens)."""
        cond = "text" if self.conditioning == "text" else "condition"
        return {"self_attention": "image", "cross_attention": cond}.get(kind, f"{cond}+image")

    def _detail_entries(self, compact: Sequence[LayerInfo]) -> list[LayerInfo]:
        """The sites below the blocks of the compact map, for every attention module of the denoiser (any module
        with an attention processor and a query projection): its output (kind by what it attends to), ``to_q`` /
        ``to_k`` / ``to_v`` (and a joint block's context projections), ``heads`` (per-head outputs before the
        output projection) and ``map`` (its softmax probabilities); and each feed-forward (``ff``,
        ``ff_context``, a parallel MLP's ``proj_mlp``)."""
        parents = sorted((e for e in compact if not e.is_space), key=lambda e: -len(e.name))
        den, root = self.denoiser, self.denoiser_name
        taken = {e.name for e in compact}
        out: list[LayerInfo] = []

        def parent_of(path: str) -> LayerInfo | None:
            return next((e for e in parents if path == e.name or path.startswith(e.name + ".")), None)

        for path, mod in den.named_modules():
            leaf = path.rpartition(".")[2]
            par = parent_of(path)
            if par is None:
                continue

            def entry(name: str, kind: str, site: Site, note: str, **kw: Any) -> None:
                if name not in taken:
                    taken.add(name)
                    assert par is not None
                    out.append(
                        LayerInfo(name, kind, par.stage, site, depth=par.depth, note=note, parent=par.name, **kw)
                    )

            if (
                leaf in ("ff", "ff_context", "proj_mlp")
                and isinstance(mod, nn.Module)
                and not hasattr(mod, "processor")
            ):
                stream = " (text stream)" if leaf == "ff_context" else ""
                entry(path, "ff", Site(f"{root}.{path}"), f"feed-forward{stream}", dims=("token", "channel"))
                continue
            to_q = getattr(mod, "to_q", None)
            if not hasattr(mod, "processor") or not isinstance(to_q, nn.Linear):
                continue
            heads = int(getattr(mod, "heads"))
            head_dim = to_q.out_features // heads
            kind = self._attention_kind(path, mod)
            keys = self._attention_keys(path, mod, kind)
            att = {"heads": heads, "head_dim": head_dim, "keys": keys}
            two_streams = getattr(mod, "add_q_proj", None) is not None  # returns (image, text) outputs
            out_site = Site(f"{root}.{path}", "output", (0,) if two_streams else ())
            entry(path, kind, out_site, f"{kind.replace('_', '-')} output ({heads} heads x {head_dim})",
                  dims=("token", "channel"), **att)  # fmt: skip
            for proj, k, what in (
                ("to_q", "q", "queries"),
                ("to_k", "k", "keys"),
                ("to_v", "v", "values"),
                ("add_q_proj", "q", "queries of the text stream"),
                ("add_k_proj", "k", "keys of the text stream"),
                ("add_v_proj", "v", "values of the text stream"),
            ):
                if isinstance(getattr(mod, proj, None), nn.Linear):
                    entry(f"{path}.{proj}", k, Site(f"{root}.{path}.{proj}"), f"{what}, {heads} heads x {head_dim}",
                          dims=("token", "channel"), **att)  # fmt: skip
            to_out = getattr(mod, "to_out", None)
            if isinstance(to_out, nn.ModuleList) and len(to_out) and isinstance(to_out[0], nn.Linear):
                head_site = Site(f"{root}.{path}.to_out.0", "input", (0,))
                note = f"per-head outputs softmax(QK^T/sqrt d)V before to_out, {heads} heads x {head_dim}"
            else:
                head_site = out_site
                note = f"per-head outputs (the module has no output projection), {heads} heads x {head_dim}"
            entry(f"{path}.heads", "heads", head_site, note, dims=("token", "channel"), **att)
            entry(f"{path}.map", "attention_map", Site(f"{root}.{path}", "attention"),
                  f"attention probabilities, keys: {keys} tokens", dims=("head", "query", "key"), **att)  # fmt: skip
        return out

    def site_index(
        self, key: str, prompts: Sequence[Any], cfg: GenerationConfig, branches: Sequence[str]
    ) -> torch.Tensor:
        if key != "eos":
            return super().site_index(key, prompts, cfg, branches)
        pos = self._eos_positions(self._check_prompts(prompts))
        neg = self._eos_positions([cfg.negative_prompt])[0]
        rows: list[int] = []
        for b in branches:
            rows += [neg] * len(pos) if b == "uncond" else pos
        return torch.tensor(rows, dtype=torch.long)

    # -- helpers for run_batch -----------------------------------------------------------------------------------------
    def _noise(self, seeds: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
        noise = seeded_noise(seeds, shape, self.device, self.dtype)
        return self.taps["noise"](noise)

    def _generator(self, seeds: Sequence[int]) -> list[torch.Generator]:
        """One sampler-noise generator per row, seeded from the row's own seed (or its fork seed when it forks at
        step 0), so a row's noise does not depend on its batch. Only stochastic samplers draw from them; the
        deterministic ones (DDIM eta=0, Euler, flow matching) ignore them."""
        return [
            torch.Generator("cpu").manual_seed(
                sampler_seed(s.fork_seed, FORK_STREAM) if getattr(s, "at", None) == 0 else sampler_seed(int(s))
            )
            for s in seeds
        ]

    def _fork_callback(self, seeds: Sequence[int], gens: list[torch.Generator], kw: dict) -> None:
        """Re-seed each forking row's generator with its fork seed at the end of step ``at - 1``, i.e. before the
        scheduler step of step ``at`` draws its noise (forks at step 0 are seeded so by :meth:`_generator`)."""
        plan: dict[int, list[int]] = {}
        for r, s in enumerate(seeds):
            at = getattr(s, "at", None)
            if at:
                plan.setdefault(at - 1, []).append(r)
        if not plan:
            return

        def reseed(call: int) -> None:  # diffusers passes the loop index: a denoiser call, not always a step
            steps = self.call_steps()
            step = int(call)
            if steps is not None and step < len(steps):
                if step + 1 < len(steps) and steps[step + 1] == steps[step]:
                    return  # not the last call of its step
                step = steps[step]
            for r in plan.get(step, ()):
                gens[r].manual_seed(sampler_seed(seeds[r].fork_seed, FORK_STREAM))

        params = inspect.signature(self.pipe.__call__).parameters
        if "callback_on_step_end" in params:
            user = kw.get("callback_on_step_end")

            def on_step_end(pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
                reseed(step)
                return user(pipe, step, timestep, callback_kwargs) if user is not None else {}

            kw["callback_on_step_end"] = on_step_end
        elif "callback" in params:  # older pipelines (PixArt-alpha): callback(step, timestep, latents)
            user = kw.get("callback")

            def on_step(step: int, timestep: Any, latents: torch.Tensor) -> None:
                reseed(step)
                if user is not None:
                    user(step, timestep, latents)

            kw["callback"] = on_step
            kw["callback_steps"] = 1
        else:
            raise ConfigError(f"{type(self.pipe).__name__} takes no step callback: it cannot fork after step 0")

    def _stochastic(self, cfg: GenerationConfig) -> tuple[bool, str]:
        """Whether this scheduler with these settings draws fresh noise at each step (needed to fork), and why."""
        sched = self.pipe.scheduler
        name = type(sched).__name__
        if name in ("DDIMScheduler", "DDIMParallelScheduler"):
            eta = float(cfg.extra.get("eta", 0.0))
            return eta > 0, f"{name} with eta={eta:g}"
        if hasattr(sched, "noise_sampler_seed"):
            return False, f"{name} draws its noise from Brownian trees seeded once per run, not re-seedable at a fork"
        if "generator" not in inspect.signature(sched.step).parameters:
            return False, f"{name} draws no noise in its steps"
        if name in STOCHASTIC_SCHEDULERS:
            return True, name
        algo = str(getattr(sched.config, "algorithm_type", ""))
        if algo.startswith("sde"):
            return True, f"{name} with algorithm_type={algo}"
        return False, f"{name} (deterministic as configured)"

    def _check_fork(self, cfg: GenerationConfig) -> None:
        ok, what = self._stochastic(cfg)
        if not ok:
            raise ConfigError(
                f"cannot fork with a deterministic sampler ({what}): continuations from one state would all be the "
                "same. Use a stochastic sampler, e.g. DDIM with eta > 0 (eta=1 is DDPM-like: pass eta=1.0), or a "
                f"scheduler among {', '.join(sorted(STOCHASTIC_SCHEDULERS))}"
            )

    def _decode_kl(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] from the final latent (pixel-space pipelines: the sample itself, in [-1, 1])."""
        if self.pixel_space:
            return (latents.float() / 2 + 0.5).clamp(0, 1)
        vae = self.pipe.vae
        latents = self.taps["vae_latent"](latents)
        cfg = vae.config
        mean = getattr(cfg, "latents_mean", None)
        std = getattr(cfg, "latents_std", None)
        z = latents.to(vae.dtype)
        if mean is not None and std is not None:
            m = torch.tensor(mean).view(1, -1, 1, 1).to(z)
            s = torch.tensor(std).view(1, -1, 1, 1).to(z)
            z = z * s / cfg.scaling_factor + m
        else:
            z = z / cfg.scaling_factor
            if getattr(cfg, "shift_factor", None) is not None:
                z = z + cfg.shift_factor
        image = vae.decode(z, return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    def call_steps(self) -> list[int] | None:
        """The step of each denoiser call of the running generation, read from the scheduler as diffusers' own
        pipelines count steps for their progress bar: the scheduler's ``timesteps`` has one entry per call; with
        ``order`` k, after the first ``len(timesteps) - steps * k`` calls (warm-up: PNDM's PRK or first PLMS step),
        every k-th call and the last one complete a step. So Heun / KDPM2 (order 2) evaluate each step twice (the
        last once), and PNDM with ``skip_prk_steps`` evaluates its first step twice. None when there is one call per
        step."""
        sched = getattr(self.pipe, "scheduler", None)
        ts = getattr(sched, "timesteps", None)
        n = getattr(sched, "num_inference_steps", None)
        if ts is None or not n or len(ts) == n:
            return None
        order = int(getattr(sched, "order", 1) or 1)
        calls = len(ts)
        warmup = calls - n * order
        steps, done = [], 0
        for i in range(calls):
            steps.append(done)
            if i == calls - 1 or (i + 1 > warmup and (i + 1) % order == 0):
                done += 1
        if done != n:
            raise ConfigError(
                f"{type(sched).__name__} runs {calls} denoiser calls for {n} steps (order {order}) and layerscope "
                "cannot tell which step each call belongs to; use a scheduler such as DDIM, Euler, DPM-Solver, PNDM "
                "or Heun"
            )
        return steps

    def _timesteps(self) -> list[float]:
        ts = getattr(self.pipe.scheduler, "timesteps", None)
        return [float(t) for t in ts] if ts is not None else []

    def _common_kwargs(self, cfg: GenerationConfig, seeds: Sequence[int]) -> dict:
        kw = dict(
            num_inference_steps=cfg.num_inference_steps,
            guidance_scale=cfg.guidance_scale,
            height=cfg.height,
            width=cfg.width,
            output_type="latent",
            return_dict=False,
            generator=self._generator(seeds),
        )
        kw.update(cfg.extra)
        kw.pop(FORK_KEY, None)
        self._fork_callback(seeds, kw["generator"], kw)
        if hasattr(self.pipe.scheduler, "noise_sampler_seed"):
            # SDE samplers draw from Brownian trees, not from the generators: one tree per row, seeded from the row's
            # seed, so a row's noise does not depend on its batch (a single seed would make one tree for the batch)
            self.pipe.scheduler.noise_sampler_seed = [sampler_seed(int(s)) for s in seeds]
            self.pipe.scheduler.noise_sampler = None
        return kw

    def _negatives(self, prompts: Sequence[Any], cfg: GenerationConfig) -> list[str] | None:
        if cfg.guidance_scale <= 1.0:
            return None
        return [cfg.negative_prompt] * len(prompts)

    @staticmethod
    def _check_prompts(prompts: Sequence[Any]) -> list[str]:
        bad = [p for p in prompts if not isinstance(p, str)]
        if bad:
            raise ConfigError(f"this pipeline takes text prompts; got a {type(bad[0]).__name__}")
        return list(prompts)


# schedulers whose every step (but possibly the last) draws fresh noise from the generator it is passed
STOCHASTIC_SCHEDULERS = frozenset(
    {
        "DDPMScheduler",
        "DDPMParallelScheduler",
        "EulerAncestralDiscreteScheduler",
        "KDPM2AncestralDiscreteScheduler",
        "LCMScheduler",
    }
)
SAMPLER_STREAM = 1  # sampler noise is seeded from (seed, stream): not the seed itself, which drew x_T
FORK_STREAM = 2


def sampler_seed(seed: int, stream: int = SAMPLER_STREAM) -> int:
    """A 63-bit generator seed derived from (seed, stream) (numpy SeedSequence): a row's sampler noise must not
    replay the draws of its initial noise, which a generator seeded with the seed itself would."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, stream]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])
