"""Adapter for diffusers transformer (DiT / MM-DiT) text-to-image pipelines: SD3/3.5, Flux, PixArt-alpha.

Layer names are module paths inside the transformer: ``transformer_blocks.7`` (SD3 joint blocks, Flux double-stream
blocks, PixArt blocks) and ``single_transformer_blocks.3`` (Flux). A block's representation is its image-token stream
(dims token x channel); the text stream of joint blocks is left alone. Stage is the depth in the stack.
Spaces: ``noise``, ``x_t`` (the transformer's input tokens/latent at each step), ``text_embeds``, ``text_pooled``
(SD3, Flux), ``vae_latent``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..config import GenerationConfig
from ..errors import ConfigError
from ..layers import LayerInfo, LayerMap, Site
from .pipeline import PipelineGenerator

SUPPORTED = {
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
    "PixArtAlphaPipeline": "pixart",
    "ShapesDiTPipeline": "shapes",  # the zoo's pixel-space PixArt-style transformer (layerscope.world.zoo)
}


class TransformerPipelineGenerator(PipelineGenerator):
    """SD3/3.5, Flux and PixArt-alpha pipelines."""

    denoiser_name = "transformer"
    supported = SUPPORTED
    family_prefix = "transformer"

    def __init__(self, pipe: Any, spec: str, variant: str | None = None, **opts: Any) -> None:
        super().__init__(pipe, spec, variant, **opts)
        # encoder_hidden_states opens with CLIP tokens in SD3, with T5 tokens in Flux and PixArt
        self.eos_tokenizer = {"sd3": "tokenizer", "flux": "tokenizer_2"}.get(self.variant, "tokenizer")
        self.eos_max_length = {"sd3": 77, "flux": 512, "pixart": 120, "shapes": 24}[self.variant]
        self.default_config.num_inference_steps = 20
        self.default_config.guidance_scale = {"sd3": 7.0, "flux": 3.5, "pixart": 4.5, "shapes": 3.0}[self.variant]
        self._apply_loader_defaults()

    def config(self, **overrides: Any) -> GenerationConfig:
        cfg = super().config(**overrides)
        if self.variant == "flux":
            true_cfg = cfg.extra.get("true_cfg_scale")
            if true_cfg is not None and float(true_cfg) > 1.0:
                raise ConfigError(
                    f"true_cfg_scale={true_cfg}: Flux's true CFG runs the transformer twice per step (the negative "
                    "prompt in a call of its own), which layerscope cannot label by branch yet; use guidance_scale "
                    "(Flux's distilled guidance, one call per step)"
                )
            if cfg.negative_prompt or cfg.extra.get("negative_prompt"):
                raise ConfigError(
                    "Flux is guidance-distilled: it uses a negative prompt only under true CFG (true_cfg_scale > 1), "
                    "which layerscope does not support yet; drop negative_prompt"
                )
        return cfg

    def branch_labels(self, cfg: GenerationConfig) -> tuple[str, ...]:
        if self.variant == "flux":
            # guidance-distilled: the guidance scale is an input of the model, not a second batch half
            return ("cond",)
        return super().branch_labels(cfg)

    # -- map ------------------------------------------------------------------------------------------------------
    def build_map(self) -> LayerMap:
        tr = self.pipe.transformer
        stacks = [("transformer_blocks", len(tr.transformer_blocks))]
        if hasattr(tr, "single_transformer_blocks"):
            stacks.append(("single_transformer_blocks", len(tr.single_transformer_blocks)))
        total = sum(n for _, n in stacks)
        layers: list[LayerInfo] = []
        depth = 0
        for stack, n in stacks:
            for i in range(n):
                if self.variant in ("pixart", "shapes"):
                    site = Site(f"transformer.{stack}.{i}", "output", (), ("hidden_states",), kw_fallback=0)
                else:  # joint / double / single blocks return (encoder_hidden_states, hidden_states)
                    site = Site(f"transformer.{stack}.{i}", "output", (1,), ("hidden_states",), kw_fallback=0)
                layers.append(
                    LayerInfo(
                        f"{stack}.{i}",
                        "transformer_block",
                        f"depth {depth}/{total}",
                        site,
                        depth=depth,
                        dims=("token", "channel"),
                    )
                )
                depth += 1
        spaces = [
            self._noise_space(),
            self._denoiser_input(
                "x_t",
                "x_t",
                ("hidden_states",),
                "noisy latent entering the transformer",
                kw_fallback=0,
                role="denoiser_input",
            ),
            self._denoiser_input(
                "text_embeds",
                "text_embeds",
                ("encoder_hidden_states",),
                "per-token text encoder states",
                dims=("token", "channel"),
            ),
        ]
        spaces += self._eos_space()
        if self.variant in ("sd3", "flux"):
            spaces.append(
                self._denoiser_input(
                    "text_pooled",
                    "text_pooled",
                    ("pooled_projections",),
                    "pooled CLIP (end-of-sentence) embedding",
                    role="pooled_condition",
                )
            )
        spaces += self._vae_space()
        return LayerMap(layers + spaces, model=self.spec, detail=self._detail_entries(layers))

    def _attention_kind(self, path: str, attn: Any) -> str:
        if path.startswith("single_transformer_blocks."):
            return "joint_attention"  # Flux's single-stream blocks attend over text and image tokens as one sequence
        return super()._attention_kind(path, attn)

    def _attention_keys(self, path: str, attn: Any, kind: str) -> str:
        if kind != "joint_attention":
            return super()._attention_keys(path, attn, kind)
        # SD3's joint processor puts the image tokens first; Flux concatenates the text tokens first
        return "image+text" if self.variant == "sd3" else "text+image"

    # -- generation -----------------------------------------------------------------------------------------------
    def default_size(self) -> tuple[int, int]:
        f = self.vae_factor
        s = getattr(self.pipe.transformer.config, "sample_size", None) or getattr(self.pipe, "default_sample_size", 64)
        return (s * f, s * f)

    def run_batch(
        self, prompts: Sequence[Any], seeds: Sequence[int], cfg: GenerationConfig
    ) -> tuple[torch.Tensor, dict]:
        texts = self._check_prompts(prompts)
        f = self.vae_factor
        kw = self._common_kwargs(cfg, seeds)
        if self.variant == "flux":
            # Flux packs 2x2 latent patches into tokens; noise is drawn unpacked so it is a map like elsewhere
            h, w = 2 * (cfg.height // (f * 2)), 2 * (cfg.width // (f * 2))
            c = self.pipe.transformer.config.in_channels // 4
            noise = self._noise(seeds, (c, h, w))
            latents = self.pipe._pack_latents(noise, len(texts), c, h, w)
            out = self.pipe(prompt=texts, latents=latents, **kw)
            lat = self.pipe._unpack_latents(out[0], cfg.height, cfg.width, f)
            images = self._decode_kl(lat)
        else:
            if cfg.height % (f * 2) or cfg.width % (f * 2):
                raise ConfigError(f"height and width must be multiples of {f * 2}, got {cfg.height}x{cfg.width}")
            c = self.pipe.transformer.config.in_channels
            latents = self._noise(seeds, (c, cfg.height // f, cfg.width // f))
            if self.variant == "pixart":
                kw.setdefault("use_resolution_binning", False)
                kw.setdefault("clean_caption", False)
            out = self.pipe(prompt=texts, negative_prompt=self._negatives(texts, cfg), latents=latents, **kw)
            images = self._decode_kl(out[0])
        return images, {"timesteps": self._timesteps()}
