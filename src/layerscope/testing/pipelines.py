"""Tiny random-weight diffusers pipelines, built from configs in code, for CPU tests that run in seconds.

Every family mirrors the *structure* of its real counterpart (block types, text-encoder layout, latent packing,
scheduler kind, CFG handling) at toy width, so layer maps and hooks behave as they would on the real model. Nothing is
downloaded: tokenizers are built from tiny vocab files written into ``cache_dir``.

>>> pipe = build_tiny_pipeline("sd", seed=0)
>>> out = pipe(**tiny_call_kwargs("sd"), output_type="pt").images  # (1, 3, 32, 32)
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ConfigError
from ..standins import clip_tokenizer as _clip_tokenizer
from ..standins import t5_tokenizer as _t5_tokenizer

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

FAMILIES: tuple[str, ...] = ("sd", "sd2", "sdxl", "kandinsky22", "sd3", "flux", "pixart")

#: Image side (pixels) each family is meant to run at in tests; every family also works at 64.
DEFAULT_SIZE: dict[str, int] = {family: 32 for family in FAMILIES}

#: Width of the image embedding the tiny Kandinsky 2.2 decoder expects (``image_embeds`` is ``(batch, 32)``).
KANDINSKY22_IMAGE_EMBED_DIM = 32

_DEFAULT_PROMPT = "a photo of a red cat"


# -------------------------------------------------------------------------------------------- text encoders ---


def _clip_text_config(tokenizer: Any, *, hidden_act: str = "quick_gelu", projection_dim: int = 32) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        projection_dim=projection_dim,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=hidden_act,
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _clip_text_model(tokenizer: Any, seed: int, *, with_projection: bool = False, hidden_act: str = "quick_gelu"):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(_clip_text_config(tokenizer, hidden_act=hidden_act))


def _t5_encoder(tokenizer: Any, seed: int, *, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",  # T5 v1.1, as used by SD3 / Flux / PixArt
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config)


# ----------------------------------------------------------------------------------------------------- VAEs ---


def _vae(
    seed: int,
    *,
    latent_channels: int = 4,
    scaling_factor: float = 0.18215,
    shift_factor: float | None = None,
    quant_convs: bool = True,
):
    """AutoencoderKL with two blocks (16, 32): downsamples images by 2."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=32,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=quant_convs,
        use_post_quant_conv=quant_convs,
    )


def _sd_ddim(**overrides: Any):
    from diffusers import DDIMScheduler

    kwargs: dict[str, Any] = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    kwargs.update(overrides)
    return DDIMScheduler(**kwargs)


# ------------------------------------------------------------------------------------------------- families ---


def _build_sd(seed: int, cache_dir: Path, *, v2: bool = False):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet_kwargs: dict[str, Any] = dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=2,
        cross_attention_dim=32,
        norm_num_groups=8,
    )
    if v2:  # SD2: per-block head counts, linear proj_in/proj_out
        unet_kwargs.update(attention_head_dim=(2, 4), use_linear_projection=True)
    else:
        unet_kwargs.update(attention_head_dim=4)
    unet = UNet2DConditionModel(**unet_kwargs)
    vae = _vae(seed)
    tokenizer = _clip_tokenizer(cache_dir)
    text_encoder = _clip_text_model(tokenizer, seed, hidden_act="gelu" if v2 else "quick_gelu")
    scheduler = _sd_ddim(prediction_type="v_prediction") if v2 else _sd_ddim()
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _build_sdxl(seed: int, cache_dir: Path):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=2,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 time ids x 8 + text_encoder_2 projection_dim
        cross_attention_dim=64,  # text_encoder (32) + text_encoder_2 (32) hidden states, concatenated
        norm_num_groups=8,
    )
    vae = _vae(seed, scaling_factor=0.13025)
    tokenizer = _clip_tokenizer(cache_dir)
    tokenizer_2 = _clip_tokenizer(cache_dir)
    text_encoder = _clip_text_model(tokenizer, seed)
    text_encoder_2 = _clip_text_model(tokenizer_2, seed + 1, with_projection=True, hidden_act="gelu")
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        image_encoder=None,
        feature_extractor=None,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def _build_kandinsky22(seed: int, cache_dir: Path):
    from diffusers import KandinskyV22Pipeline, UNet2DConditionModel, VQModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=8,  # epsilon + learned variance
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        block_out_channels=(32, 64),
        layers_per_block=1,
        encoder_hid_dim=KANDINSKY22_IMAGE_EMBED_DIM,
        encoder_hid_dim_type="image_proj",
        addition_embed_type="image",
        cross_attention_dim=32,
        attention_head_dim=4,
        resnet_time_scale_shift="scale_shift",
        class_embed_type=None,
        norm_num_groups=8,
    )
    torch.manual_seed(seed)
    movq = VQModel(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
        up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        norm_type="spatial",
        num_vq_embeddings=12,
        vq_embed_dim=4,
    )
    scheduler = _sd_ddim(beta_schedule="linear")
    return KandinskyV22Pipeline(unet=unet, scheduler=scheduler, movq=movq)


def _build_sd3(seed: int, cache_dir: Path):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    t5_dim = 64  # >= 32 + 32 (the two CLIP hidden sizes), so CLIP embeds are zero-padded to it as in SD3
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=t5_dim,
        caption_projection_dim=32,  # = num_attention_heads * attention_head_dim
        pooled_projection_dim=64,  # CLIP-L projection (32) + CLIP-G projection (32)
        out_channels=16,
        pos_embed_max_size=32,
    )
    vae = _vae(seed, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, quant_convs=False)
    tokenizer = _clip_tokenizer(cache_dir)
    tokenizer_2 = _clip_tokenizer(cache_dir)
    tokenizer_3 = _t5_tokenizer(cache_dir)
    text_encoder = _clip_text_model(tokenizer, seed, with_projection=True)
    text_encoder_2 = _clip_text_model(tokenizer_2, seed + 1, with_projection=True, hidden_act="gelu")
    text_encoder_3 = _t5_encoder(tokenizer_3, seed, d_model=t5_dim)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


def _build_flux(seed: int, cache_dir: Path):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels x 2x2 packing
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,  # T5 d_model
        pooled_projection_dim=32,  # CLIP pooler_output width
        guidance_embeds=True,  # like FLUX.1-dev
        axes_dims_rope=(4, 6, 6),
    )
    vae = _vae(seed, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, quant_convs=False)
    tokenizer = _clip_tokenizer(cache_dir)
    tokenizer_2 = _t5_tokenizer(cache_dir)
    text_encoder = _clip_text_model(tokenizer, seed)
    text_encoder_2 = _t5_encoder(tokenizer_2, seed, d_model=32)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
        image_encoder=None,
        feature_extractor=None,
    )


def _build_pixart(seed: int, cache_dir: Path):
    from diffusers import DDIMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        sample_size=16,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=3,
        cross_attention_dim=24,  # = num_attention_heads * attention_head_dim
        caption_channels=32,  # T5 d_model
        in_channels=4,
        out_channels=8,  # epsilon + learned sigma
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        use_additional_conditions=False,
    )
    vae = _vae(seed)
    tokenizer = _t5_tokenizer(cache_dir)
    text_encoder = _t5_encoder(tokenizer, seed, d_model=32)
    # PixArt ships DPMSolverMultistep, but its pipeline reads ``scheduler.step(...)[1]`` (the x0 prediction) when
    # num_inference_steps == 1, which only DDIM-like schedulers return: DDIM keeps 1-step calls working.
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        clip_sample=False,
        set_alpha_to_one=False,
        prediction_type="epsilon",
    )
    return PixArtAlphaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )


_BUILDERS: dict[str, Callable[[int, Path], Any]] = {
    "sd": _build_sd,
    "sd2": lambda seed, cache_dir: _build_sd(seed, cache_dir, v2=True),
    "sdxl": _build_sdxl,
    "kandinsky22": _build_kandinsky22,
    "sd3": _build_sd3,
    "flux": _build_flux,
    "pixart": _build_pixart,
}


def _check_family(family: str) -> None:
    if family not in _BUILDERS:
        raise ConfigError(f"unknown tiny pipeline family {family!r}; valid families: {', '.join(FAMILIES)}")


def build_tiny_pipeline(family: str, seed: int = 0, cache_dir: str | os.PathLike | None = None) -> DiffusionPipeline:
    """Build a tiny random-weight diffusers pipeline of ``family`` (one of :data:`FAMILIES`), float32, eval mode.

    The same ``seed`` gives bitwise identical weights (``torch.manual_seed`` runs before each component).
    Tokenizer vocab files are written into ``cache_dir`` (a fresh temporary folder when ``None``); nothing is
    downloaded. Raises ``ValueError`` (:class:`~layerscope.errors.ConfigError`) for an unknown family.
    """
    _check_family(family)
    cache = Path(cache_dir) if cache_dir is not None else Path(tempfile.mkdtemp(prefix="layerscope-tiny-"))
    cache.mkdir(parents=True, exist_ok=True)
    rng_state = torch.random.get_rng_state()
    try:
        pipe = _BUILDERS[family](int(seed), cache)
    finally:
        torch.random.set_rng_state(rng_state)  # building must not perturb the caller's global RNG
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            if any(t.dtype != torch.float32 for t in component.parameters()):  # only when the default dtype differs
                component.to(dtype=torch.float32)
            component.eval()
            component.requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_call_kwargs(
    family: str,
    *,
    size: int | None = None,
    num_inference_steps: int = 2,
    seed: int = 0,
    prompt: str = _DEFAULT_PROMPT,
    batch_size: int = 1,
) -> dict[str, Any]:
    """Keyword arguments for a quick, deterministic call of ``build_tiny_pipeline(family)`` (add ``output_type``).

    Holds what each family needs at tiny scale: explicit ``height``/``width`` (Flux and Kandinsky default to
    256/512 px otherwise), ``use_resolution_binning=False`` and ``clean_caption=False`` for PixArt, seeded
    ``image_embeds``/``negative_image_embeds`` for Kandinsky 2.2 (no prompt), and short T5 sequences.
    """
    _check_family(family)
    side = int(size if size is not None else DEFAULT_SIZE[family])
    kwargs: dict[str, Any] = {
        "height": side,
        "width": side,
        "num_inference_steps": num_inference_steps,
        "generator": torch.Generator("cpu").manual_seed(seed),
    }
    if family == "kandinsky22":
        g = torch.Generator("cpu").manual_seed(seed + 1)
        kwargs["image_embeds"] = torch.randn(batch_size, KANDINSKY22_IMAGE_EMBED_DIM, generator=g)
        kwargs["negative_image_embeds"] = torch.randn(batch_size, KANDINSKY22_IMAGE_EMBED_DIM, generator=g)
        kwargs["guidance_scale"] = 4.0
        return kwargs
    kwargs["prompt"] = [prompt] * batch_size if batch_size > 1 else prompt
    if family == "flux":
        kwargs["guidance_scale"] = 3.5  # distilled guidance embedding, not CFG
        kwargs["max_sequence_length"] = 32
    elif family == "sd3":
        kwargs["guidance_scale"] = 5.0
        kwargs["max_sequence_length"] = 32
    elif family == "pixart":
        kwargs["guidance_scale"] = 4.5
        kwargs["max_sequence_length"] = 32
        kwargs["use_resolution_binning"] = False
        kwargs["clean_caption"] = False
    else:
        kwargs["guidance_scale"] = 7.5 if family in ("sd", "sd2") else 5.0
    return kwargs


__all__ = ["DEFAULT_SIZE", "FAMILIES", "KANDINSKY22_IMAGE_EMBED_DIM", "build_tiny_pipeline", "tiny_call_kwargs"]
