"""What every diffusers-pipeline adapter shares: module lookup, seeded noise, VAE decoding, spaces as taps."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..config import GenerationConfig
from ..errors import ConfigError
from ..layers import LayerInfo, Site
from .base import Generator, Tap, seeded_noise


class PipelineGenerator(Generator):
    """Base of the diffusers adapters: ``self.pipe`` is a loaded pipeline; the denoiser is ``self.denoiser_name``."""

    denoiser_name = "unet"
    supported: dict[str, str] = {}  # pipeline class name -> variant
    family_prefix = ""
    pixel_variants: tuple[str, ...] = ("shapes",)  # denoise images directly: no VAE, scale factor 1

    def __init__(self, pipe: Any, spec: str) -> None:
        cls = type(pipe).__name__
        if cls not in self.supported:
            raise ConfigError(
                f"{cls} is not a supported {self.family_prefix} pipeline; supported: {', '.join(self.supported)}"
            )
        self.variant = self.supported[cls]
        self.family = f"{self.family_prefix}/{self.variant}"
        super().__init__(spec)
        self.pipe = pipe
        self.taps["noise"] = Tap()
        self.taps["vae_latent"] = Tap()
        self.step_module = self.denoiser_name
        self.default_config.guidance_scale = 5.0
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)

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
        return LayerInfo("noise", "noise", "input", Site("taps.noise"), per_step=False, branched=False,
                         is_space=True, note="initial latent noise x_T, one seeded generator per sample")

    @property
    def pixel_space(self) -> bool:
        return self.variant in self.pixel_variants

    @property
    def vae_factor(self) -> int:
        return 1 if self.pixel_space else int(self.pipe.vae_scale_factor)

    def _vae_space(self) -> list[LayerInfo]:
        if self.pixel_space:
            return []
        return [LayerInfo("vae_latent", "vae_latent", "output", Site("taps.vae_latent"), per_step=False, branched=False,
                         is_space=True, note="final latent handed to the VAE decoder")]

    def _denoiser_input(self, name: str, kind: str, path: tuple, note: str, kw_fallback: int | None = None,
                        dims: tuple[str, ...] = ()) -> LayerInfo:
        return LayerInfo(name, kind, "input", Site(self.denoiser_name, "input", path, kw_fallback=kw_fallback),
                         is_space=True, note=note, dims=dims)

    # -- end-of-sentence token -------------------------------------------------------------------------------------
    eos_tokenizer: str | None = None  # pipeline attribute of the tokenizer whose tokens open encoder_hidden_states
    eos_max_length: int = 77

    def _eos_space(self) -> list[LayerInfo]:
        if self.eos_tokenizer is None or getattr(self.pipe, self.eos_tokenizer, None) is None:
            return []
        return [LayerInfo("text_eos", "text_eos", "input",
                          Site(self.denoiser_name, "input", ("encoder_hidden_states",), index="eos"),
                          is_space=True, note="text encoder state at each prompt's end-of-sentence token")]

    def _eos_positions(self, texts: Sequence[str]) -> list[int]:
        tok = getattr(self.pipe, self.eos_tokenizer)
        ids = tok(list(texts), truncation=True, max_length=self.eos_max_length)["input_ids"]
        return [len(row) - 1 for row in ids]

    def site_index(self, key: str, prompts: Sequence[Any], cfg: GenerationConfig,
                   branches: Sequence[str]) -> torch.Tensor:
        if key != "eos":
            return super().site_index(key, prompts, cfg, branches)
        pos = self._eos_positions(self._check_prompts(prompts))
        neg = self._eos_positions([cfg.negative_prompt])[0]
        rows: list[int] = []
        for b in branches:
            rows += [neg] * len(pos) if b == "uncond" else pos
        return torch.tensor(rows, dtype=torch.long)

    # -- helpers for _run -----------------------------------------------------------------------------------------
    def _noise(self, seeds: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
        noise = seeded_noise(seeds, shape, self.device, self.dtype)
        return self.taps["noise"](noise)

    def _generator(self, seeds: Sequence[int]) -> torch.Generator:
        # only stochastic schedulers draw from it; deterministic ones (DDIM eta=0, Euler, flow matching) ignore it
        return torch.Generator("cpu").manual_seed(int(seeds[0]))

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
