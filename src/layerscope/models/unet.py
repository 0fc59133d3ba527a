"""Adapter for diffusers U-Net text-to-image pipelines: Stable Diffusion 1.x/2.x, SDXL, Kandinsky 2.2 (decoder).

Layer names are module paths inside ``UNet2DConditionModel`` (``down_blocks.1.attentions.0``, ``mid_block``,
``up_blocks.2.resnets.1``). Candidate spaces: ``noise`` (x_T), ``x_t`` (the U-Net's input at each step),
``text_embeds`` (per-token text encoder states the U-Net attends to), ``text_pooled`` (SDXL pooled embedding),
``image_embeds`` (Kandinsky's CLIP image embedding), ``h_space`` (mid-block output), ``vae_latent`` (the final
latent before decoding) and one ``skip.<consumer>`` per skip tensor: the down-path tensor that enters
``up_blocks.i.resnets.j`` by concatenation, patched on the consumer side so the main stream is untouched.
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
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "KandinskyV22Pipeline": "kandinsky22",
    "ShapesUNetPipeline": "shapes",  # the zoo's pixel-space U-Net (layerscope.world.zoo)
}

_IN = ("hidden_states",)


def _has(mod: Any, attr: str) -> bool:
    return getattr(mod, attr, None) is not None and len(getattr(mod, attr)) > 0


def _attn_path(attn: Any) -> tuple:
    # Transformer2DModel (SD, SDXL) is called with return_dict=False and returns a tuple; a bare Attention module
    # (Kandinsky's SimpleCrossAttn blocks) returns the tensor itself
    return (0,) if hasattr(attn, "transformer_blocks") else ()


def unet_layer_entries(unet: Any, prefix: str = "unet") -> tuple[list[LayerInfo], list[LayerInfo]]:
    """Layers of a ``UNet2DConditionModel`` in forward order, and its skip-tensor spaces.

    ``prefix`` is the module path of the U-Net inside the pipeline (the engine resolves ``prefix + '.' + name``).
    """
    layers: list[LayerInfo] = []
    depth = 0

    def add(name: str, kind: str, stage: str, path: tuple = (), in_path: tuple | None = _IN) -> None:
        nonlocal depth
        layers.append(
            LayerInfo(name, kind, stage, Site(f"{prefix}.{name}", "output", path, in_path, kw_fallback=0), depth=depth)
        )
        depth += 1

    producers: list[str] = ["conv_in"]
    for i, block in enumerate(unet.down_blocks):
        for j in range(len(block.resnets)):
            add(f"down_blocks.{i}.resnets.{j}", "resnet", "encoder")
            last = f"down_blocks.{i}.resnets.{j}"
            if _has(block, "attentions"):
                add(f"down_blocks.{i}.attentions.{j}", "attention", "encoder", _attn_path(block.attentions[j]))
                last = f"down_blocks.{i}.attentions.{j}"
            producers.append(last)
        if _has(block, "downsamplers"):
            add(f"down_blocks.{i}.downsamplers.0", "downsampler", "encoder")
            producers.append(f"down_blocks.{i}.downsamplers.0")
        add(f"down_blocks.{i}", "block", "encoder", (0,))
    mid = unet.mid_block
    if mid is not None:
        add("mid_block.resnets.0", "resnet", "bottleneck")
        attns = list(mid.attentions) if _has(mid, "attentions") else []
        for j in range(1, len(mid.resnets)):
            if j - 1 < len(attns):
                add(f"mid_block.attentions.{j - 1}", "attention", "bottleneck", _attn_path(attns[j - 1]))
            add(f"mid_block.resnets.{j}", "resnet", "bottleneck")
        add("mid_block", "block", "bottleneck")
    skips: list[LayerInfo] = []
    remaining = list(producers)
    for i, block in enumerate(unet.up_blocks):
        n_res = len(block.resnets)
        taken, remaining = remaining[-n_res:], remaining[:-n_res]
        for j in range(n_res):
            add(f"up_blocks.{i}.resnets.{j}", "resnet", "decoder")
            if _has(block, "attentions"):
                add(f"up_blocks.{i}.attentions.{j}", "attention", "decoder", _attn_path(block.attentions[j]))
            # resnet j pops the last remaining tensor of the tuple it was handed
            idx = n_res - 1 - j
            skips.append(
                LayerInfo(
                    f"skip.up_blocks.{i}.resnets.{j}",
                    "skip",
                    "skip",
                    Site(f"{prefix}.up_blocks.{i}", "input", ("res_hidden_states_tuple", idx)),
                    is_space=True,
                    note=f"skip tensor from {taken[idx]} into up_blocks.{i}.resnets.{j}",
                    role="skip",
                    source=taken[idx],
                )
            )
        if _has(block, "upsamplers"):
            add(f"up_blocks.{i}.upsamplers.0", "upsampler", "decoder")
        add(f"up_blocks.{i}", "block", "decoder")
    if remaining:
        raise ConfigError(f"unexpected U-Net layout: skip tensors {remaining} are never consumed")
    return layers, skips


def _shown(prompt: Any) -> str:
    return f"the text {prompt[:40]!r}" if isinstance(prompt, str) else f"a {type(prompt).__name__}"


class UNetPipelineGenerator(PipelineGenerator):
    """Stable Diffusion 1.x/2.x, SDXL and Kandinsky 2.2 decoder pipelines (UNet2DConditionModel backbones)."""

    denoiser_name = "unet"
    eos_tokenizer = "tokenizer"
    supported = SUPPORTED
    family_prefix = "unet"

    def __init__(self, pipe: Any, spec: str, variant: str | None = None, **opts: Any) -> None:
        super().__init__(pipe, spec, variant, **opts)
        self.default_config.guidance_scale = {"kandinsky22": 4.0, "shapes": 3.0}.get(self.variant, 7.5)
        self.default_config.num_inference_steps = 20
        if self.variant == "kandinsky22":
            self.conditioning = "image_embeds"
        self._apply_loader_defaults()

    # -- map ------------------------------------------------------------------------------------------------------
    def build_map(self) -> LayerMap:
        layers, skips = unet_layer_entries(self.pipe.unet)
        spaces = [
            self._noise_space(),
            self._denoiser_input(
                "x_t", "x_t", ("sample",), "noisy latent entering the U-Net", kw_fallback=0, role="denoiser_input"
            ),
        ]
        if self.variant == "kandinsky22":
            spaces.append(
                self._denoiser_input(
                    "image_embeds",
                    "image_embeds",
                    ("added_cond_kwargs", "image_embeds"),
                    "CLIP image embedding from the prior (the decoder's condition)",
                )
            )
        else:
            spaces.append(
                self._denoiser_input(
                    "text_embeds",
                    "text_embeds",
                    ("encoder_hidden_states",),
                    "per-token text encoder states (incl. the end-of-sentence token)",
                    dims=("token", "channel"),
                )
            )
            spaces += self._eos_space()
            if self.variant == "sdxl":
                spaces.append(
                    self._denoiser_input(
                        "text_pooled",
                        "text_pooled",
                        ("added_cond_kwargs", "text_embeds"),
                        "pooled (end-of-sentence) embedding of the second text encoder",
                        role="pooled_condition",
                    )
                )
        mid = next((e for e in layers if e.name == "mid_block"), None)
        if mid is not None:
            spaces.append(
                LayerInfo(
                    "h_space",
                    "h_space",
                    "bottleneck",
                    mid.site,
                    is_space=True,
                    note="mid-block output (h-space)",
                    role="bottleneck",
                )
            )
        spaces += skips
        spaces += self._vae_space()
        return LayerMap(layers + spaces, model=self.spec, detail=self._detail_entries(layers))

    # -- generation -----------------------------------------------------------------------------------------------
    def default_size(self) -> tuple[int, int]:
        unet = self.pipe.unet
        if self.variant == "kandinsky22":
            f = 2 ** (len(self.pipe.movq.config.block_out_channels) - 1)
        else:
            f = self.vae_factor
        s = unet.config.sample_size
        s = s if isinstance(s, int) else s[0]
        return (s * f, s * f)

    def trace_inputs(self) -> list[Any]:
        if self.variant == "kandinsky22":
            return [torch.zeros(self._embed_dim())]
        return ["a photo"]

    def _embed_dim(self) -> int:
        return int(self.pipe.unet.config.encoder_hid_dim)

    def _latent_shape(self, cfg: GenerationConfig) -> tuple[int, int, int]:
        c = self.pipe.unet.config.in_channels
        if self.variant == "kandinsky22":
            from diffusers.pipelines.kandinsky2_2.pipeline_kandinsky2_2 import downscale_height_and_width

            f = 2 ** (len(self.pipe.movq.config.block_out_channels) - 1)
            h, w = downscale_height_and_width(cfg.height, cfg.width, f)
            return (c, h, w)
        f = self.vae_factor
        if cfg.height % f or cfg.width % f:
            raise ConfigError(f"height and width must be multiples of {f} for this model, got {cfg.height}x{cfg.width}")
        return (c, cfg.height // f, cfg.width // f)

    def run_batch(
        self, prompts: Sequence[Any], seeds: Sequence[int], cfg: GenerationConfig
    ) -> tuple[torch.Tensor, dict]:
        latents = self._noise(seeds, self._latent_shape(cfg))
        kw = self._common_kwargs(cfg, seeds)
        if self.variant == "kandinsky22":
            embeds = self._image_embeds(prompts)
            neg = cfg.extra.get("negative_image_embeds")
            neg = torch.zeros_like(embeds) if neg is None else neg.to(embeds).expand_as(embeds)
            kw.pop("negative_image_embeds", None)
            out = self.pipe(image_embeds=embeds, negative_image_embeds=neg, latents=latents, **kw)
            lat = out[0]
            lat = self.taps["vae_latent"](lat)
            image = self.pipe.movq.decode(lat, force_not_quantize=True)["sample"]
            images = (image.float() * 0.5 + 0.5).clamp(0, 1)
        else:
            texts = self._check_prompts(prompts)
            out = self.pipe(prompt=texts, negative_prompt=self._negatives(texts, cfg), latents=latents, **kw)
            images = self._decode_kl(out[0])
        return images, {"timesteps": self._timesteps()}

    def _image_embeds(self, prompts: Sequence[Any]) -> torch.Tensor:
        from ..embeds import is_ref, load_ref

        prompts = [load_ref(p) if is_ref(p) else p for p in prompts]
        bad = [p for p in prompts if not isinstance(p, torch.Tensor)]
        if bad:
            raise ConfigError(
                "the Kandinsky 2.2 decoder is conditioned on CLIP image embeddings, not text: pass one embedding "
                f"tensor of shape ({self._embed_dim()},) per sample (e.g. from KandinskyV22PriorPipeline), or name "
                f"an embedding file (emb.npy, emb.npy#k for row k, or .safetensors), got {_shown(bad[0])}"
            )
        wrong = [tuple(p.shape) for p in prompts if p.numel() != self._embed_dim()]
        if wrong:
            raise ConfigError(f"image embeddings must have {self._embed_dim()} values, got shape {wrong[0]}")
        return torch.stack([p.reshape(-1) for p in prompts]).to(device=self.device, dtype=self.dtype)
