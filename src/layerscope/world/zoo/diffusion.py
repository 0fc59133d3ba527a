"""Build and train the zoo's text-conditioned pixel-space diffusion models (``zoo:unet``, ``zoo:dit``).

One recipe for both: fresh renders of the training split with their prompts (the prompt is dropped to "" one time
in ten, for classifier-free guidance), a cosine noise schedule with v-prediction, min-SNR-5 loss weighting, AdamW
with warm-up and cosine decay, bf16 autocast, gradient clipping, and an exponential moving average of the weights
(the EMA weights are what ships). The text encoder (a small ``CLIPTextModel`` over the world's vocabulary) is
trained jointly from scratch. The same code runs on CUDA when one is available (``--device cuda``).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, PixArtTransformer2DModel, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from ..factors import sample_factors
from ..render import render
from ..text import MAX_LENGTH, encode, prompts_for, tokenizer, vocabulary
from ..training import TrainLog, autocast, pick_device, progress, read_json, seed_everything, write_json
from .pipelines import ShapesDiTPipeline, ShapesUNetPipeline, load_pipeline, save_pipeline

TEXT = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256)
SCHEDULE = dict(
    num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", clip_sample=False
)
# bf16 "auto": on for CUDA; off on CPU, where it measured slower for these small convs and attentions (0.79 s vs
# 0.47 s per U-Net step of batch 32 on one thread)
TRAIN = dict(
    steps=4000,
    batch=32,
    lr=8e-4,
    warmup=200,
    weight_decay=0.01,
    ema=0.999,
    p_uncond=0.1,
    min_snr=5.0,
    grad_clip=1.0,
    seed=0,
    bf16="auto",
    size=32,
)

DEFAULTS: dict[str, dict[str, Any]] = {
    "unet": dict(
        model=dict(
            sample_size=32,
            in_channels=3,
            out_channels=3,
            layers_per_block=1,
            block_out_channels=[16, 32, 64],
            down_block_types=["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
            mid_block_type="UNetMidBlock2DCrossAttn",
            norm_num_groups=8,
            attention_head_dim=4,
            cross_attention_dim=TEXT["hidden_size"],
        ),
        text=TEXT,
        schedule=SCHEDULE,
        train=dict(TRAIN),
    ),
    "dit": dict(
        model=dict(
            sample_size=32,
            in_channels=3,
            out_channels=3,
            patch_size=4,
            num_layers=6,
            num_attention_heads=4,
            attention_head_dim=16,
            cross_attention_dim=64,
            caption_channels=TEXT["hidden_size"],
            norm_type="ada_norm_single",
            num_embeds_ada_norm=1000,
            use_additional_conditions=False,
        ),
        text=TEXT,
        schedule=SCHEDULE,
        train=dict(TRAIN, steps=5000, batch=48),
    ),
}


def build_text_encoder(cfg: dict) -> CLIPTextModel:
    tok = tokenizer()
    conf = CLIPTextConfig(
        vocab_size=len(vocabulary()),
        max_position_embeddings=MAX_LENGTH,
        hidden_act="gelu",
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        projection_dim=cfg["hidden_size"],
        **cfg,
    )
    return CLIPTextModel(conf)


def build_pipeline(name: str, config: dict | None = None):
    """An untrained zoo diffusion pipeline from its config (random weights)."""
    cfg = config or DEFAULTS[name]
    text = build_text_encoder(cfg["text"])
    sched = DDIMScheduler(**cfg["schedule"])
    if name == "unet":
        return ShapesUNetPipeline(UNet2DConditionModel(**cfg["model"]), text, tokenizer(), sched)
    if name == "dit":
        return ShapesDiTPipeline(PixArtTransformer2DModel(**cfg["model"]), text, tokenizer(), sched)
    raise ValueError(f"no zoo diffusion model {name!r}; valid: {', '.join(DEFAULTS)}")


def _merge(base: dict, over: dict | None) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def train_diffusion(
    name: str,
    out: Path,
    config: dict | None = None,
    device: str | None = None,
    show_progress: bool = True,
    resume: bool = False,
) -> dict:
    """Train ``zoo:<name>`` with the shared recipe and save the EMA pipeline into ``out``.

    ``resume=True`` continues from the model saved in ``out`` (its EMA weights) for ``train.steps`` more steps with
    a fresh warm-up + cosine schedule (seeded by ``seed + steps done``), appends to the loss log and records the
    run in ``training.json``'s history.
    """
    out = Path(out)
    prior = read_json(out / "training.json") if resume else None
    if resume and (prior is None or not (out / "model_index.json").exists()):
        raise FileNotFoundError(f"nothing to resume in {out}: train it first")
    cfg = _merge(prior["config"] if prior else DEFAULTS[name], config)
    tr = cfg["train"]
    done = prior["steps"] if prior else 0
    dev = pick_device(device)
    bf16 = dev.type == "cuda" if tr["bf16"] == "auto" else bool(tr["bf16"])
    gen = seed_everything(tr["seed"] + done)
    rng = np.random.default_rng(tr["seed"] + done)
    pipe = load_pipeline(out) if prior else build_pipeline(name, cfg)
    model = getattr(pipe, pipe.denoiser_name).to(dev).train()
    text = pipe.text_encoder.to(dev).train()
    params = list(model.parameters()) + list(text.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=tr["lr"], weight_decay=tr["weight_decay"], betas=(0.9, 0.99))
    steps, warm = tr["steps"], tr["warmup"]

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm))) * 0.95 + 0.05

    sched_lr = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    noise_sched = DDPMScheduler(**cfg["schedule"])
    alphas = noise_sched.alphas_cumprod.to(dev)
    snr_all = alphas / (1 - alphas)
    log = TrainLog(
        out / "train_log.csv", ["loss", "lr"], append=resume, offset_seconds=prior["seconds"] if prior else 0.0
    )
    running = None
    with progress(steps, f"zoo:{name}", show_progress) as advance:
        for step in range(steps):
            f = sample_factors(tr["batch"], rng, split="train")
            x0 = (render(f, tr["size"]) * 2 - 1).to(dev)
            prompts = prompts_for(f)
            drop = rng.random(len(prompts)) < tr["p_uncond"]
            ids = encode(["" if d else p for p, d in zip(prompts, drop)]).to(dev)
            t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(x0),), generator=gen).to(dev)
            noise = torch.randn(x0.shape, generator=gen).to(dev)
            xt = noise_sched.add_noise(x0, noise, t)
            target = noise_sched.get_velocity(x0, noise, t)
            with autocast(dev, bf16):
                states = text(ids).last_hidden_state
                pred = pipe._predict(xt, t, states)
            per = F.mse_loss(pred.float(), target, reduction="none").mean(dim=(1, 2, 3))
            snr = snr_all[t]
            weight = torch.clamp(snr, max=tr["min_snr"]) / (snr + 1)  # min-SNR-gamma for v-prediction
            loss = (weight * per).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, tr["grad_clip"])
            opt.step()
            sched_lr.step()
            with torch.no_grad():
                decay = min(tr["ema"], (1 + step) / (10 + step))
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
            running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
            if (step + 1) % 25 == 0 or step + 1 == steps:
                log.write(done + step + 1, loss=running, lr=sched_lr.get_last_lr()[0])
                advance(25 if (step + 1) % 25 == 0 else (step + 1) % 25, loss=running)
    seconds = log.close()
    run = {
        "steps": steps,
        "seconds": round(seconds, 1),
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "train": dict(tr),
    }
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    model.eval().cpu().float()
    text.eval().cpu().float()
    pipe.scheduler = DDIMScheduler(**cfg["schedule"])
    save_pipeline(pipe, out)
    n_params = sum(p.numel() for p in params)
    history = (
        prior.get("history") or [{k: prior[k] for k in ("steps", "seconds", "device", "threads")}] if prior else []
    ) + [run]
    summary = {
        "model": f"zoo:{name}",
        "steps": done + steps,
        "seconds": round(sum(h["seconds"] for h in history), 1),
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "parameters": n_params,
        "config": cfg,
        "history": history,
    }
    write_json(out / "training.json", summary)
    return summary
