"""Pixel-space text-to-image pipelines of the zoo: Stable Diffusion in miniature.

``ShapesUNetPipeline`` (a ``UNet2DConditionModel`` with cross-attention and skips) and ``ShapesDiTPipeline`` (a
``PixArtTransformer2DModel``: diffusers transformer blocks with adaLN-single and cross-attention) share one
sampling loop, written like ``StableDiffusionPipeline.__call__``: the prompt goes through the world's word-level
tokenizer and a small ``CLIPTextModel``; classifier-free guidance runs the unconditional (empty-prompt) and
conditional halves as one batch ``[uncond, cond]``; the denoiser is called once per step; a DDIM scheduler
steps in pixel space (no VAE: the final sample is the image in [-1, 1]).

A saved model is a folder a diffusers user recognises: ``model_index.json``, ``unet/`` or ``transformer/``,
``text_encoder/``, ``scheduler/``, ``tokenizer/``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler, DiffusionPipeline, PixArtTransformer2DModel, UNet2DConditionModel
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel

from ..text import MAX_LENGTH


class _ShapesPipeline(DiffusionPipeline):
    denoiser_name = "unet"

    def encode_prompt(self, prompts: list[str], negative: list[str] | None) -> torch.Tensor:
        """Text encoder states (n, MAX_LENGTH, d); ``[negative; prompts]`` stacked when guiding."""
        texts = list(negative) + list(prompts) if negative is not None else list(prompts)
        ids = self.tokenizer(
            texts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
        ).input_ids.to(self.text_encoder.device)
        return self.text_encoder(ids).last_hidden_state

    def _predict(self, x: torch.Tensor, t: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def _model(self) -> torch.nn.Module:
        return getattr(self, self.denoiser_name)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 3.0,
        height: int | None = None,
        width: int | None = None,
        latents: torch.Tensor | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pt",
        return_dict: bool = True,
        eta: float = 0.0,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> Any:
        """As ``StableDiffusionPipeline.__call__``: ``generator`` may be one per sample (then each sample's noise is
        its own: the initial noise when ``latents`` is None, and DDIM's step noise when ``eta > 0``), and
        ``callback_on_step_end(pipe, step, timestep, {"latents": x})`` runs after each step (it may return a new
        ``latents``)."""
        if set(callback_on_step_end_tensor_inputs or ["latents"]) != {"latents"}:
            raise ValueError("callback_on_step_end_tensor_inputs: this pipeline passes only 'latents'")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        model = self._model
        size = model.config.sample_size
        height, width = height or size, width or size
        guide = guidance_scale > 1.0
        negative = None
        if guide:
            negative = (
                [negative_prompt or ""] * len(prompts) if not isinstance(negative_prompt, list) else negative_prompt
            )
        states = self.encode_prompt(prompts, negative).to(model.dtype)
        channels = model.config.in_channels
        if latents is None:
            latents = randn_tensor((len(prompts), channels, height, width), generator=generator, dtype=model.dtype)
        x = latents.to(device=model.device, dtype=model.dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=model.device)
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            inp = torch.cat([x, x]) if guide else x
            inp = self.scheduler.scale_model_input(inp, t)
            out = self._predict(inp, t.expand(len(inp)), states)
            if guide:
                uncond, cond = out.chunk(2)
                out = uncond + guidance_scale * (cond - uncond)
            x = self.scheduler.step(out, t, x, eta=eta, generator=generator, return_dict=False)[0]
            if callback_on_step_end is not None:
                outputs = callback_on_step_end(self, i, t, {"latents": x}) or {}
                x = outputs.pop("latents", x)
        images = x if output_type == "latent" else (x.float() / 2 + 0.5).clamp(0, 1)
        self.maybe_free_model_hooks()
        return (images,) if not return_dict else {"images": images}


class ShapesUNetPipeline(_ShapesPipeline):
    """Pixel-space text-to-image U-Net pipeline (``unet``, ``text_encoder``, ``tokenizer``, ``scheduler``)."""

    denoiser_name = "unet"
    model_cpu_offload_seq = "text_encoder->unet"

    def __init__(
        self, unet: UNet2DConditionModel, text_encoder: CLIPTextModel, tokenizer: Any, scheduler: DDIMScheduler
    ) -> None:
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)

    def _predict(self, x, t, states):
        return self.unet(x, t, encoder_hidden_states=states, return_dict=False)[0]


class ShapesDiTPipeline(_ShapesPipeline):
    """Pixel-space text-to-image diffusion transformer pipeline (``transformer`` = PixArtTransformer2DModel)."""

    denoiser_name = "transformer"
    model_cpu_offload_seq = "text_encoder->transformer"

    def __init__(
        self,
        transformer: PixArtTransformer2DModel,
        text_encoder: CLIPTextModel,
        tokenizer: Any,
        scheduler: DDIMScheduler,
    ) -> None:
        super().__init__()
        self.register_modules(
            transformer=transformer, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler
        )

    def _predict(self, x, t, states):
        return self.transformer(
            x,
            encoder_hidden_states=states,
            timestep=t,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            return_dict=False,
        )[0]


PIPELINES = {"unet": ShapesUNetPipeline, "transformer": ShapesDiTPipeline}
MODEL_CLASSES = {"unet": UNet2DConditionModel, "transformer": PixArtTransformer2DModel}


def save_pipeline(pipe: _ShapesPipeline, folder: Path) -> None:
    """Write the pipeline as a diffusers-style folder (safetensors weights, configs, tokenizer files)."""
    folder = Path(folder)
    getattr(pipe, pipe.denoiser_name).save_pretrained(folder / pipe.denoiser_name, safe_serialization=True)
    pipe.text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
    pipe.scheduler.save_pretrained(folder / "scheduler")
    pipe.tokenizer.save_pretrained(folder / "tokenizer")
    import json

    index = {
        "_class_name": type(pipe).__name__,
        "_diffusers_version": __import__("diffusers").__version__,
        "_layerscope_module": "layerscope.world.zoo.pipelines",
        pipe.denoiser_name: ["diffusers", MODEL_CLASSES[pipe.denoiser_name].__name__],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "scheduler": ["diffusers", "DDIMScheduler"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def load_pipeline(folder: Path) -> _ShapesPipeline:
    """Load a zoo diffusion pipeline saved by :func:`save_pipeline` (offline, float32, CPU)."""
    import json

    from transformers import PreTrainedTokenizerFast

    folder = Path(folder)
    index = json.loads((folder / "model_index.json").read_text())
    name = "unet" if "unet" in index else "transformer"
    model = MODEL_CLASSES[name].from_pretrained(folder / name, local_files_only=True)
    text = CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True)
    tok = PreTrainedTokenizerFast.from_pretrained(folder / "tokenizer", local_files_only=True)
    sched = DDIMScheduler.from_pretrained(folder / "scheduler", local_files_only=True)
    pipe = PIPELINES[name](model, text.eval(), tok, sched)
    getattr(pipe, name).eval()
    return pipe
