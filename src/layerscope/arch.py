"""``arch:<name>``: the seeds' own models at full size, without weights, on PyTorch's meta device.

Each entry builds the published diffusers pipeline of a model — its denoiser, VAE and text encoders from their
published ``config.json`` values, written below in code (no download) — with every parameter on the ``meta`` device:
no weights, no memory, no arithmetic. What such a model can do is everything that needs shapes only: its full layer
map at the native resolution (``layerscope layers arch:sdxl``), byte estimates, and study plans (``--dry-run``). It
cannot generate; ``hf:<folder>`` loads the same architecture with its weights.

The published tokenizers' vocabularies cannot be fetched, so each pipeline gets stand-in tokenizers
(:mod:`layerscope.standins`) with the real sequence lengths (77 for CLIP; the pipeline's own T5 length): every
tensor the denoiser sees has its real shape. Tracing on meta tensors works for every family once the scheduler's
arithmetic runs on the CPU (its ``set_timesteps`` on meta would put the timesteps on meta, and schedulers index
tables with them, which needs their values); see :meth:`PipelineGenerator.trace_context`.

>>> import layerscope as ls
>>> m = ls.load("arch:sd14")
>>> m.layers("mid_block")[0].shape
(1280, 8, 8)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import SpecError, close_matches

# Sources: the ``config.json`` files of each model's diffusers repository on the Hugging Face hub (named per entry),
# restated here with only the values that differ from the diffusers / transformers class defaults.

_SD_SCHED = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)

# CompVis/stable-diffusion-v1-4 (unet, vae, text_encoder = openai/clip-vit-large-patch14, scheduler: PNDM)
SD14 = dict(
    unet=dict(
        sample_size=64,
        cross_attention_dim=768,
        attention_head_dim=8,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        layers_per_block=2,
    ),
    vae=dict(sample_size=512),
    text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, act="quick_gelu"),
    scheduler=("PNDMScheduler", dict(_SD_SCHED, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)),
)

# stabilityai/stable-diffusion-2-1 (768-px, v-prediction; text_encoder: OpenCLIP ViT-H/14 as CLIPTextModel)
SD21 = dict(
    unet=dict(
        sample_size=96,
        cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20),
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        layers_per_block=2,
        use_linear_projection=True,
        upcast_attention=True,
    ),
    vae=dict(sample_size=768),
    text=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16, act="gelu"),
    scheduler=(
        "DDIMScheduler",
        dict(_SD_SCHED, clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction"),
    ),
)

# stabilityai/stable-diffusion-xl-base-1.0 (text_encoder: CLIP ViT-L; text_encoder_2: OpenCLIP ViT-bigG with
# projection; scheduler: EulerDiscrete)
SDXL = dict(
    unet=dict(
        sample_size=128,
        cross_attention_dim=2048,
        attention_head_dim=(5, 10, 20),
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 10),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    ),
    vae=dict(sample_size=1024, scaling_factor=0.13025, force_upcast=True),
    text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, act="quick_gelu"),
    text_2=dict(
        hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, act="gelu", proj=1280
    ),
    scheduler=(
        "EulerDiscreteScheduler",
        dict(_SD_SCHED, steps_offset=1, timestep_spacing="leading", interpolation_type="linear"),
    ),
)

# kandinsky-community/kandinsky-2-2-decoder (unet conditioned on a 1280-d CLIP image embedding; movq: VQModel)
KANDINSKY22 = dict(
    unet=dict(
        sample_size=64,
        in_channels=4,
        out_channels=8,
        block_out_channels=(384, 768, 1152, 1536),
        down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 3,
        up_block_types=("SimpleCrossAttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        layers_per_block=3,
        attention_head_dim=64,
        cross_attention_dim=768,
        encoder_hid_dim=1280,
        encoder_hid_dim_type="image_proj",
        addition_embed_type="image",
        addition_embed_type_num_heads=64,
        resnet_time_scale_shift="scale_shift",
    ),
    movq=dict(
        block_out_channels=(128, 256, 256, 512),
        down_block_types=("DownEncoderBlock2D",) * 3 + ("AttnDownEncoderBlock2D",),
        up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        layers_per_block=2,
        norm_num_groups=32,
        norm_type="spatial",
        num_vq_embeddings=16384,
        vq_embed_dim=4,
        sample_size=32,
    ),
    scheduler=(
        "DDPMScheduler",
        dict(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="linear",
            clip_sample=False,
            steps_offset=1,
            timestep_spacing="leading",
        ),
    ),
)

_CLIP_L_PROJ = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, act="quick_gelu", proj=768
)
_CLIP_G_PROJ = dict(
    hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, act="gelu", proj=1280
)
# google/t5-v1_1-xxl encoder (SD3 / SD3.5 text_encoder_3, Flux text_encoder_2, PixArt text_encoder)
_T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24)
_FLUX_VAE = dict(
    latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False
)

# stabilityai/stable-diffusion-3.5-medium (MMDiT-X: dual attention in its first 13 blocks)
SD35_MEDIUM = dict(
    transformer=dict(
        sample_size=128,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=24,
        attention_head_dim=64,
        num_attention_heads=24,
        joint_attention_dim=4096,
        caption_projection_dim=1536,
        pooled_projection_dim=2048,
        pos_embed_max_size=384,
        dual_attention_layers=tuple(range(13)),
        qk_norm="rms_norm",
    ),
    vae=dict(
        sample_size=1024,
        latent_channels=16,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ),
    text=_CLIP_L_PROJ,
    text_2=_CLIP_G_PROJ,
    t5=_T5_XXL,
    scheduler=("FlowMatchEulerDiscreteScheduler", dict(num_train_timesteps=1000, shift=3.0)),
)

# stabilityai/stable-diffusion-3.5-large
SD35_LARGE = dict(
    SD35_MEDIUM,
    transformer=dict(
        SD35_MEDIUM["transformer"],
        num_layers=38,
        num_attention_heads=38,
        caption_projection_dim=2432,
        pos_embed_max_size=192,
        dual_attention_layers=(),
    ),
)

# black-forest-labs/FLUX.1-dev and FLUX.1-schnell (19 double-stream + 38 single-stream blocks; dev embeds guidance)
FLUX_DEV = dict(
    transformer=dict(
        patch_size=1,
        in_channels=64,
        num_layers=19,
        num_single_layers=38,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    ),
    vae=dict(_FLUX_VAE, sample_size=1024),
    text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, act="quick_gelu"),
    t5=_T5_XXL,
    scheduler=(
        "FlowMatchEulerDiscreteScheduler",
        dict(
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        ),
    ),
)
FLUX_SCHNELL = dict(
    FLUX_DEV,
    transformer=dict(FLUX_DEV["transformer"], guidance_embeds=False),
    scheduler=("FlowMatchEulerDiscreteScheduler", dict(num_train_timesteps=1000, shift=1.0)),
)

# PixArt-alpha/PixArt-XL-2-1024-MS (28 DiT blocks, 1152 wide; vae: sd-vae-ft-ema; scheduler: DPM-Solver++)
PIXART_ALPHA = dict(
    transformer=dict(
        sample_size=128,
        num_layers=28,
        patch_size=2,
        attention_head_dim=72,
        num_attention_heads=16,
        cross_attention_dim=1152,
        caption_channels=4096,
        in_channels=4,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        use_additional_conditions=True,
    ),
    vae=dict(sample_size=512),
    t5=_T5_XXL,
    scheduler=(
        "DPMSolverMultistepScheduler",
        dict(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", num_train_timesteps=1000),
    ),
)


@dataclass(frozen=True)
class Arch:
    """One published architecture: its pipeline class, the configs above, the generation settings its authors
    recommend (``defaults``) and a line for listings."""

    name: str
    pipeline: str
    config: dict[str, Any]
    title: str
    defaults: dict[str, Any] = field(default_factory=dict)


ARCHS: dict[str, Arch] = {
    a.name: a
    for a in (
        Arch("sd14", "StableDiffusionPipeline", SD14, "Stable Diffusion 1.4 (512 px)", dict(num_inference_steps=50)),
        Arch(
            "sd21",
            "StableDiffusionPipeline",
            SD21,
            "Stable Diffusion 2.1 (768 px, v-prediction)",
            dict(num_inference_steps=50),
        ),
        Arch(
            "sdxl",
            "StableDiffusionXLPipeline",
            SDXL,
            "SDXL base 1.0 (1024 px)",
            dict(num_inference_steps=50, guidance_scale=5.0),
        ),
        Arch(
            "kandinsky22",
            "KandinskyV22Pipeline",
            KANDINSKY22,
            "Kandinsky 2.2 decoder (512 px)",
            dict(num_inference_steps=100, guidance_scale=4.0),
        ),
        Arch(
            "sd35-medium",
            "StableDiffusion3Pipeline",
            SD35_MEDIUM,
            "Stable Diffusion 3.5 Medium (1024 px)",
            dict(num_inference_steps=40, guidance_scale=4.5),
        ),
        Arch(
            "sd35-large",
            "StableDiffusion3Pipeline",
            SD35_LARGE,
            "Stable Diffusion 3.5 Large (1024 px)",
            dict(num_inference_steps=28, guidance_scale=3.5),
        ),
        Arch(
            "flux-schnell",
            "FluxPipeline",
            FLUX_SCHNELL,
            "FLUX.1 [schnell] (1024 px, 4 steps)",
            dict(num_inference_steps=4, guidance_scale=0.0),
        ),
        Arch(
            "flux-dev",
            "FluxPipeline",
            FLUX_DEV,
            "FLUX.1 [dev] (1024 px, guidance-distilled)",
            dict(num_inference_steps=50, guidance_scale=3.5),
        ),
        Arch(
            "pixart-alpha",
            "PixArtAlphaPipeline",
            PIXART_ALPHA,
            "PixArt-alpha XL-2 1024-MS (1024 px)",
            dict(num_inference_steps=20, guidance_scale=4.5),
        ),
    )
}


def _clip(cfg: dict[str, Any], projection: bool) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    conf = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        max_position_embeddings=77,
        hidden_act=cfg["act"],
        projection_dim=cfg.get("proj", 768),
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(conf)


def _t5(cfg: dict[str, Any]) -> Any:
    from transformers import T5Config, T5EncoderModel

    conf = T5Config(
        vocab_size=32128,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
        **cfg,
    )
    return T5EncoderModel(conf)


def _scheduler(spec: tuple[str, dict[str, Any]]) -> Any:
    import diffusers

    name, kw = spec
    return getattr(diffusers, name)(**kw)


def _kl_vae(cfg: dict[str, Any]) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        **{"latent_channels": 4, **cfg},
    )


def _build(arch: Arch, device: str = "meta") -> Any:
    import diffusers

    from .standins import clip_tokenizer, standin_dir, t5_tokenizer

    c = arch.config
    cache = standin_dir()
    cls = getattr(diffusers, arch.pipeline)
    sched = _scheduler(c["scheduler"])  # on the CPU: a scheduler's tables are small, and it needs their values
    with torch.device(device):
        if arch.pipeline == "StableDiffusionPipeline":
            return cls(
                vae=_kl_vae(c["vae"]),
                text_encoder=_clip(c["text"], False),
                tokenizer=clip_tokenizer(cache),
                unet=diffusers.UNet2DConditionModel(**c["unet"]),
                scheduler=sched,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
        if arch.pipeline == "StableDiffusionXLPipeline":
            return cls(
                vae=_kl_vae(c["vae"]),
                text_encoder=_clip(c["text"], False),
                text_encoder_2=_clip(c["text_2"], True),
                tokenizer=clip_tokenizer(cache),
                tokenizer_2=clip_tokenizer(cache),
                unet=diffusers.UNet2DConditionModel(**c["unet"]),
                scheduler=sched,
            )
        if arch.pipeline == "KandinskyV22Pipeline":
            return cls(
                unet=diffusers.UNet2DConditionModel(**c["unet"]),
                scheduler=sched,
                movq=diffusers.VQModel(**c["movq"]),
            )
        if arch.pipeline == "StableDiffusion3Pipeline":
            return cls(
                transformer=diffusers.SD3Transformer2DModel(**c["transformer"]),
                scheduler=sched,
                vae=_kl_vae(c["vae"]),
                text_encoder=_clip(c["text"], True),
                tokenizer=clip_tokenizer(cache),
                text_encoder_2=_clip(c["text_2"], True),
                tokenizer_2=clip_tokenizer(cache),
                text_encoder_3=_t5(c["t5"]),
                tokenizer_3=t5_tokenizer(cache),
            )
        if arch.pipeline == "FluxPipeline":
            return cls(
                scheduler=sched,
                vae=_kl_vae(c["vae"]),
                text_encoder=_clip(c["text"], False),
                tokenizer=clip_tokenizer(cache),
                text_encoder_2=_t5(c["t5"]),
                tokenizer_2=t5_tokenizer(cache),
                transformer=diffusers.FluxTransformer2DModel(**c["transformer"]),
                image_encoder=None,
                feature_extractor=None,
            )
        if arch.pipeline == "PixArtAlphaPipeline":
            return cls(
                tokenizer=t5_tokenizer(cache),
                text_encoder=_t5(c["t5"]),
                vae=_kl_vae(c["vae"]),
                transformer=diffusers.PixArtTransformer2DModel(**c["transformer"]),
                scheduler=sched,
            )
    raise SpecError(f"no builder for pipeline class {arch.pipeline}")  # an entry of ARCHS without one


def get(name: str) -> Arch:
    """The entry ``name`` of :data:`ARCHS` (the error names the closest and lists all)."""
    if name not in ARCHS:
        near = close_matches(name, list(ARCHS), n=2)
        hint = f"did you mean {' or '.join('arch:' + n for n in near)}? " if near else ""
        raise SpecError(f"unknown architecture {name!r}; {hint}valid: {', '.join('arch:' + n for n in ARCHS)}")
    return ARCHS[name]


def build(name: str, dtype: torch.dtype | None = None, device: str = "meta", seed: int = 0) -> Any:
    """The pipeline of ``arch:<name>`` with every parameter on the meta device (``dtype``: the parameters' dtype,
    float32 by default, as the byte estimates will assume). ``device="cpu"`` builds it for real with random weights
    (seeded), for timing the engine at full size (``benchmarks/bench_realsize.py``); it cannot draw images."""
    if device != "meta":
        torch.manual_seed(seed)
    pipe = _build(get(name), device)
    if dtype is not None:
        for comp in pipe.components.values():
            if isinstance(comp, torch.nn.Module):
                torch.nn.Module.to(comp, dtype=dtype)
    for comp in pipe.components.values():
        if isinstance(comp, torch.nn.Module):
            comp.eval().requires_grad_(False)
    return pipe
