"""Build and train ``zoo:ldm``: a Stable-Diffusion-shaped latent diffusion model of the Shapes world (issue 16).

Two stages, each seeded and resumable:

1. **The world VAE** (:func:`train_vae`): a diffusers ``AutoencoderKL`` for 64x64 renders with downsampling factor 4
   (three encoder/decoder levels, 16x16x4 latents). Trained on fresh renders of the training split in [-1, 1] with
   a reconstruction loss (MSE + ``l1`` * L1) plus ``kl`` * the KL divergence to N(0, I) per latent element (small,
   as in SD: it keeps the latent bounded and its posterior noise alive without costing reconstruction), AdamW,
   an EMA of the weights (what ships). After training the latent ``scaling_factor`` is computed as SD did: 1 / std
   of ``latent_dist.sample()`` over a few thousand training renders, stored in the VAE config.
   :func:`evaluate_vae` reads reconstructions of held-out scenes with the oracle (``quality.json``).
2. **The latent diffusion model** (:func:`train_ldm`): a ``StableDiffusionPipeline`` whose ``UNet2DConditionModel``
   has SD 1.x's layout in miniature (``CrossAttnDownBlock2D`` x3 + ``DownBlock2D``, ``UNetMidBlock2DCrossAttn``,
   ``UpBlock2D`` + ``CrossAttnUpBlock2D`` x3, two layers per block, transformer blocks with self- and
   cross-attention), a small ``CLIPTextModel`` on the world's tokenizer trained jointly from scratch, SD's noise
   schedule (scaled-linear betas 0.00085..0.012, epsilon prediction; ``DDPMScheduler`` for training, a
   ``DDIMScheduler`` with SD's settings ships), trained on latents of the frozen VAE
   (``latent_dist.sample() * scaling_factor``) of fresh renders with **captions that leave factors open**
   (:func:`layerscope.world.text.partial_captions`: each factor named with probability 1/2, phrase order varied,
   10% empty captions for classifier-free guidance), optional min-SNR weighting, EMA.

**Training that survives stops.** Every ``checkpoint_seconds`` (3 minutes) and at the end, the whole training state
(weights, EMA, optimizer, step, numpy / torch RNG states, elapsed seconds, running loss) is written atomically to
``<out>/checkpoint/state.pt`` (a temporary file, then ``os.replace``); a new call with the same config resumes from
it and ends with the same weights as an uninterrupted run (bitwise on CPU with the same thread count). Loading uses
``torch.load(weights_only=True)``: no pickled code. The loss log ``train_log.csv`` (cut back to the checkpoint's
step on resume, then appended) and ``training.json`` sit beside the weights.

Layout of a trained model (default ``weights/ldm``)::

    ldm/                 StableDiffusionPipeline folder (model_index.json, unet/, text_encoder/, tokenizer/,
                         scheduler/, vae/), train_log.csv, training.json, checkpoint/ (training only)
    ldm/vae/             the world VAE (config.json with scaling_factor, weights), its train_log.csv,
                         training.json, quality.json, checkpoint/
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..factors import FACTORS, sample_factors
from ..render import render
from ..text import encode, partial_captions, tokenizer  # captions that leave factors open: world.text
from ..training import TrainLog, autocast, pick_device, progress, read_json, seed_everything, write_json
from .diffusion import build_text_encoder  # the zoo's one CLIPTextModel on the world's tokenizer

SIZE = 64  # render resolution of the VAE and the LDM
CHECKPOINT = "checkpoint/state.pt"
# keys of a train config that do not change the result (may differ between a checkpoint and its resume)
_NEUTRAL = ("checkpoint_seconds",)

VAE: dict[str, Any] = dict(
    model=dict(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        block_out_channels=[16, 32, 64],
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=SIZE,
    ),
    train=dict(
        steps=5000,
        batch=16,
        lr=1e-3,
        lr_min=0.05,
        warmup=100,
        weight_decay=0.0,
        betas=[0.9, 0.99],
        ema=0.999,
        kl=1e-4,
        l1=0.0,
        grad_clip=1.0,
        seed=0,
        bf16="auto",
        size=SIZE,
        scale_samples=2000,
        log_every=25,
        checkpoint_seconds=180,
    ),
)

TEXT = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256)
# SD 1.x's noise schedule (its scheduler_config.json): training uses DDPMScheduler(**SCHEDULE), the shipped sampler
# is DDIMScheduler(**SCHEDULE, **SAMPLER)
SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    clip_sample=False,
)
SAMPLER = dict(set_alpha_to_one=False, steps_offset=1)

LDM: dict[str, Any] = dict(
    vae="vae",  # the VAE folder, relative to the LDM's folder (or absolute)
    model=dict(
        sample_size=SIZE // 4,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=[32, 64, 64, 64],
        down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        mid_block_type="UNetMidBlock2DCrossAttn",
        norm_num_groups=8,
        attention_head_dim=2,  # diffusers' name for the number of heads (SD 1.x: 8); head dims 16 / 32
        cross_attention_dim=TEXT["hidden_size"],
    ),
    text=TEXT,
    schedule=SCHEDULE,
    sampler=SAMPLER,
    captions=dict(p_name=0.5, p_empty=0.1, p_shuffle=0.5),
    # 0.69 s per step on one CPU thread (measured: median of 7 steps, batch 32, rendering + VAE encoding included)
    train=dict(
        steps=12000,
        batch=32,
        lr=5e-4,
        lr_min=0.05,
        warmup=500,
        weight_decay=0.01,
        betas=[0.9, 0.99],
        ema=0.999,
        min_snr=5.0,
        grad_clip=1.0,
        seed=0,
        bf16="auto",
        size=SIZE,
        log_every=25,
        checkpoint_seconds=180,
    ),
)

DEFAULTS: dict[str, dict[str, Any]] = {"vae": VAE, "ldm": LDM}


# -- checkpointed training loop ---------------------------------------------------------------------------------


def _merge(base: dict, over: dict | None) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _comparable(cfg: dict) -> str:
    c = copy.deepcopy(cfg)
    for k in _NEUTRAL:
        c.get("train", {}).pop(k, None)
    return json.dumps(c, sort_keys=True)


def _save_atomic(state: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    with open(tmp, "rb") as fh:  # on disk before it replaces the last good checkpoint
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _checkpoint(stage: int) -> str:
    return CHECKPOINT if stage == 1 else f"checkpoint/stage{stage}.pt"


def load_checkpoint(out: str | Path, stage: int = 1) -> dict | None:
    """The training state saved in ``<out>/checkpoint/state.pt`` (stage ``k`` > 1: ``checkpoint/stage<k>.pt``;
    tensors and plain data only), or None."""
    path = Path(out) / _checkpoint(stage)
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def _cut_log(path: Path, step: int) -> None:
    """Drop log rows written after the checkpoint at ``step`` (they are trained again on resume)."""
    if not path.exists():
        return
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        return
    keep = [rows[0]] + [r for r in rows[1:] if r and int(float(r[0])) <= step]
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as fh:
        csv.writer(fh).writerows(keep)
    os.replace(tmp, path)


def _lr_factor(step: int, tr: dict) -> float:
    warm, steps = tr["warmup"], tr["steps"]
    if step < warm:
        return (step + 1) / warm
    lo = tr.get("lr_min", 0.05)
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm))) * (1 - lo) + lo


def _run(
    out: Path,
    label: str,
    cfg: dict,
    modules: dict[str, nn.Module],
    step_fn: Callable[[np.random.Generator, torch.Generator], tuple[torch.Tensor, dict[str, float]]],
    fields: list[str],
    dev: torch.device,
    show_progress: bool,
    max_seconds: float | None,
    stop_step: int | None,
    stage: int = 1,
    prior_steps: int = 0,
    prior_seconds: float = 0.0,
) -> dict | None:
    """Train ``modules`` with ``step_fn`` (one batch's loss) for ``cfg['train']['steps']`` steps, resuming from and
    writing ``<out>/checkpoint/state.pt``. Leaves the EMA weights in the modules and returns the run's summary, or
    None when stopped early (``max_seconds`` of this session passed, or ``stop_step`` reached) with a checkpoint.

    ``stage`` > 1: a further stage after ``prior_steps`` steps (and ``prior_seconds``) of earlier stages, from the
    weights the modules hold: its own checkpoint (``checkpoint/stage<k>.pt``), RNGs seeded by ``seed +
    prior_steps``, and the loss log continued at step ``prior_steps + 1``."""
    tr = cfg["train"]
    steps = tr["steps"]
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tr["lr"], weight_decay=tr["weight_decay"], betas=tuple(tr["betas"]))
    gen = seed_everything(tr["seed"] + prior_steps)
    rng = np.random.default_rng(tr["seed"] + prior_steps)
    ema = [p.detach().clone() for p in params]
    done, before, running = 0, 0.0, {}
    where = _checkpoint(stage)
    ident = _comparable({**cfg, "stage": stage, "prior_steps": prior_steps})
    state = load_checkpoint(out, stage)
    if state is not None:
        if state["config"] != (ident if stage > 1 else _comparable(cfg)):
            raise ValueError(
                f"the checkpoint in {out / where} was written with another config; resume with the same config "
                "or delete the checkpoint folder to start over"
            )
        for name, m in modules.items():
            m.load_state_dict(state["model"][name])
        opt.load_state_dict(state["optimizer"])
        with torch.no_grad():
            for e, s in zip(ema, state["ema"]):
                e.copy_(s)
        rng.bit_generator.state = json.loads(state["numpy"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch"])
        if torch.cuda.is_available() and len(state.get("cuda", [])) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        done, before = int(state["step"]), float(state["seconds"])
        running = {k: float(v) for k, v in state["running"].items()}
    if done or prior_steps:
        _cut_log(out / "train_log.csv", prior_steps + done)
    log = TrainLog(
        out / "train_log.csv", [*fields, "lr"], append=done + prior_steps > 0, offset_seconds=prior_seconds + before
    )
    start = time.perf_counter()
    last_save = start

    def save(step: int) -> None:
        _save_atomic(
            {
                "step": step,
                "seconds": before + time.perf_counter() - start,
                "model": {name: m.state_dict() for name, m in modules.items()},
                "ema": [e.detach().cpu() for e in ema],
                "optimizer": opt.state_dict(),
                "numpy": json.dumps(rng.bit_generator.state),
                "generator": gen.get_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "running": dict(running),
                "config": ident if stage > 1 else _comparable(cfg),
            },
            out / where,
        )

    for m in modules.values():
        m.train()
    every = tr.get("log_every", 25)
    stopped = False
    with progress(steps, label, show_progress) as advance:
        advance(done)
        for step in range(done, steps):
            lr = tr["lr"] * _lr_factor(step, tr)
            for g in opt.param_groups:
                g["lr"] = lr
            loss, values = step_fn(rng, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if tr.get("grad_clip"):
                torch.nn.utils.clip_grad_norm_(params, tr["grad_clip"])
            opt.step()
            with torch.no_grad():
                decay = min(tr["ema"], (1 + step) / (10 + step))
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
            values = {"loss": float(loss.detach()), **values}
            for k, v in values.items():
                running[k] = v if k not in running else 0.98 * running[k] + 0.02 * v
            n = step + 1
            if n % every == 0 or n == steps:
                log.write(prior_steps + n, **{k: running[k] for k in fields}, lr=lr)
                advance(every if n % every == 0 else n % every, loss=running["loss"])
            now = time.perf_counter()
            stopped = (stop_step is not None and n >= stop_step) or (
                max_seconds is not None and now - start >= max_seconds
            )
            if n == steps or stopped or now - last_save >= tr["checkpoint_seconds"]:
                save(n)
                last_save = time.perf_counter()
            if stopped and n < steps:
                log.close()
                return None
    session = log.close()
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    return {
        "stage": stage,
        "steps": steps,
        "seconds": round(before + session, 1),
        "session_seconds": round(session, 1),
        "resumed_at": done,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in params),
    }


# -- the world VAE ----------------------------------------------------------------------------------------------


def build_vae(config: dict | None = None):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**(config or VAE)["model"])


def load_vae(folder: str | Path):
    """The trained world VAE (float32, eval mode, CPU)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(Path(folder), local_files_only=True, dtype=torch.float32).eval()


def _bf16(tr: dict, dev: torch.device) -> bool:
    return dev.type == "cuda" if tr["bf16"] == "auto" else bool(tr["bf16"])


def _sample(dist, gen: torch.Generator) -> torch.Tensor:
    """``latent_dist.sample()`` with the noise drawn from a CPU generator (same numbers on every device)."""
    noise = torch.randn(dist.mean.shape, generator=gen).to(dist.mean.device, dist.mean.dtype)
    return dist.mean + dist.std * noise


@torch.no_grad()
def scaling_factor(vae, n: int = 2000, seed: int = 1, batch: int = 100, size: int = SIZE) -> float:
    """SD's latent scaling: 1 / std of ``latent_dist.sample()`` over ``n`` renders of the training split."""
    dev = next(vae.parameters()).device
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    zs = []
    for s in range(0, n, batch):
        x = (render(sample_factors(min(batch, n - s), rng, split="train"), size) * 2 - 1).to(dev)
        zs.append(_sample(vae.encode(x).latent_dist, gen).float().cpu())
    return float(1.0 / torch.cat(zs).std())


def train_vae(
    out: str | Path,
    config: dict | None = None,
    device: str | None = None,
    show_progress: bool = True,
    max_seconds: float | None = None,
    _stop_step: int | None = None,
) -> dict | None:
    """Train the world VAE into ``out`` (resuming from ``out/checkpoint`` when there is one) and save it with its
    latent scaling factor. ``config`` overrides :data:`VAE` (nested dicts merge). Returns the summary written to
    ``training.json``, or None if ``max_seconds`` ran out first (a checkpoint is saved; call again to resume)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = _merge(VAE, config)
    tr = cfg["train"]
    dev = pick_device(device)
    bf16 = _bf16(tr, dev)
    torch.manual_seed(tr["seed"])  # the initial weights
    vae = build_vae(cfg).to(dev)

    def step_fn(rng: np.random.Generator, gen: torch.Generator):
        f = sample_factors(tr["batch"], rng, split="train")
        x = (render(f, tr["size"]) * 2 - 1).to(dev)
        with autocast(dev, bf16):
            dist = vae.encode(x).latent_dist
            z = _sample(dist, gen)
            rec = vae.decode(z).sample.float()
        mse = F.mse_loss(rec, x)
        l1 = (rec - x).abs().mean()
        mean, logvar = dist.mean.float(), dist.logvar.float()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()  # per latent element
        loss = mse + tr["l1"] * l1 + tr["kl"] * kl
        return loss, {"mse": float(mse.detach()), "kl": float(kl.detach())}

    run = _run(
        out,
        "zoo:ldm vae",
        cfg,
        {"vae": vae},
        step_fn,
        ["loss", "mse", "kl"],
        dev,
        show_progress,
        max_seconds,
        _stop_step,
    )
    if run is None:
        return None
    vae.eval()
    sf = scaling_factor(vae, tr["scale_samples"], seed=tr["seed"] + 1, size=tr["size"])
    vae = vae.cpu().float()
    vae.register_to_config(scaling_factor=round(sf, 6))
    vae.save_pretrained(out, safe_serialization=True)
    summary = {
        "model": "zoo:ldm vae",
        **run,
        "scaling_factor": round(sf, 6),
        "bf16": bf16,
        "config": cfg,
        "data": "fresh renders of the training split at 64x64 in [-1, 1]",
    }
    write_json(out / "training.json", summary)
    return summary


@torch.no_grad()
def evaluate_vae(
    folder: str | Path, n: int = 1000, seed: int = 0, batch: int = 100, save: bool = True, device: str | None = None
) -> dict:
    """Reconstructions of ``n`` held-out scenes (latent mean) read by the oracle: per-factor agreement with the true
    factors, PSNR / MSE in [0, 1], and the oracle's agreement on the original 64x64 renders (the ceiling). Saved as
    ``quality.json`` in ``folder``."""
    from ..oracle import load_oracle, read

    folder = Path(folder)
    dev = pick_device(device)
    vae = load_vae(folder).to(dev)
    f = sample_factors(n, seed, split="test")
    x = render(f, SIZE)
    recs, lats = [], []
    for s in range(0, n, batch):
        xb = (x[s : s + batch] * 2 - 1).to(dev)
        z = vae.encode(xb).latent_dist.mode()
        lats.append(z.float().cpu())
        recs.append((vae.decode(z).sample.float().cpu() / 2 + 0.5).clamp(0, 1))
    rec = torch.cat(recs)
    oracle = load_oracle()
    r, ref = read(rec, oracle), read(x, oracle)
    mse = float(((rec - x) ** 2).mean())
    per_image = ((rec - x) ** 2).mean(dim=(1, 2, 3))
    lat = torch.cat(lats) * vae.config.scaling_factor
    q = {
        "samples": n,
        "seed": seed,
        "split": "test",
        "size": SIZE,
        "latent_shape": list(lat.shape[1:]),
        "agreement": {name: float((r.pred[:, i] == f[:, i]).mean()) for i, name in enumerate(FACTORS)},
        "ceiling": {name: float((ref.pred[:, i] == f[:, i]).mean()) for i, name in enumerate(FACTORS)},
        "agreement_with_ceiling_reading": {
            name: float((r.pred[:, i] == ref.pred[:, i]).mean()) for i, name in enumerate(FACTORS)
        },
        "in_distribution": float((r.confidence >= 0.9).all(axis=1).mean()),
        "mse": mse,
        "psnr": float(-10 * math.log10(mse)),
        "psnr_worst_image": float(-10 * torch.log10(per_image.max())),
        "scaling_factor": float(vae.config.scaling_factor),
        "scaled_latent_mean_std": [float(lat.mean()), float(lat.std())],
    }
    q["passes"] = bool(min(q["agreement"].values()) >= 0.99)
    if save:
        write_json(folder / "quality.json", q)
    return q


# -- the latent diffusion model ---------------------------------------------------------------------------------


def build_unet(config: dict | None = None):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**(config or LDM)["model"])


def _vae_folder(out: Path, cfg: dict) -> Path:
    v = Path(cfg["vae"])
    return v if v.is_absolute() else out / v


def build_pipeline(unet, text, vae, cfg: dict):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer(),
        unet=unet,
        scheduler=DDIMScheduler(**cfg["schedule"], **cfg["sampler"]),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def load_ldm(folder: str | Path):
    """The trained ``zoo:ldm`` pipeline (``StableDiffusionPipeline``, float32, CPU, offline)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(Path(folder), local_files_only=True, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def train_ldm(
    out: str | Path,
    config: dict | None = None,
    device: str | None = None,
    show_progress: bool = True,
    max_seconds: float | None = None,
    _stop_step: int | None = None,
    resume: bool = False,
) -> dict | None:
    """Train ``zoo:ldm`` on latents of the trained world VAE (``config['vae']``, default ``out/vae``) and save the
    ``StableDiffusionPipeline`` (EMA weights) into ``out``; resumes from ``out/checkpoint``. Returns the summary
    written to ``training.json``, or None if ``max_seconds`` ran out first (checkpoint saved; call again).

    ``resume=True`` trains a further stage from the model saved in ``out`` (its EMA weights: what ships) for
    ``config['train']['steps']`` more steps with a fresh warm-up and cosine schedule (the earlier config, updated by
    ``config``), itself resumable; ``training.json`` keeps every stage in ``history``."""
    from diffusers import DDPMScheduler

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if resume and not ((out / "training.json").exists() and (out / "model_index.json").exists()):
        raise FileNotFoundError(f"nothing to resume in {out}: train zoo:ldm there first")
    prior = read_json(out / "training.json") if resume else None
    history = list(prior.get("history") or [_stage_of(prior)]) if prior else []
    prior_steps = sum(int(h["steps"]) for h in history)
    prior_seconds = sum(float(h["seconds"]) for h in history)
    cfg = _merge(prior["config"] if prior else LDM, config)
    tr, caps = cfg["train"], cfg["captions"]
    vae_dir = _vae_folder(out, cfg)
    if not (vae_dir / "config.json").exists() or not any(vae_dir.glob("*.safetensors")):
        raise FileNotFoundError(f"no trained VAE in {vae_dir}: run train_vae({str(vae_dir)!r}) first")
    dev = pick_device(device)
    bf16 = _bf16(tr, dev)
    vae = load_vae(vae_dir).to(dev).requires_grad_(False)
    sf = float(vae.config.scaling_factor)
    if prior:  # a further stage starts from the shipped (EMA) weights
        saved = load_ldm(out)
        unet, text = saved.unet.to(dev), saved.text_encoder.to(dev)
    else:
        torch.manual_seed(tr["seed"])  # the initial weights
        unet, text = build_unet(cfg).to(dev), build_text_encoder(cfg["text"]).to(dev)
    noise_sched = DDPMScheduler(**cfg["schedule"])
    alphas = noise_sched.alphas_cumprod.to(dev)
    snr_all = alphas / (1 - alphas)
    n_t = noise_sched.config.num_train_timesteps

    def step_fn(rng: np.random.Generator, gen: torch.Generator):
        f = sample_factors(tr["batch"], rng, split="train")
        x = (render(f, tr["size"]) * 2 - 1).to(dev)
        captions, _ = partial_captions(f, rng, caps["p_name"], caps["p_empty"], caps["p_shuffle"])
        ids = encode(captions).to(dev)
        with torch.no_grad(), autocast(dev, bf16):
            z0 = (_sample(vae.encode(x).latent_dist, gen) * sf).float()
        t = torch.randint(0, n_t, (len(z0),), generator=gen).to(dev)
        noise = torch.randn(z0.shape, generator=gen).to(dev)
        zt = noise_sched.add_noise(z0, noise, t)
        with autocast(dev, bf16):
            states = text(ids).last_hidden_state
            pred = unet(zt, t, encoder_hidden_states=states, return_dict=False)[0]
        per = F.mse_loss(pred.float(), noise, reduction="none").mean(dim=(1, 2, 3))
        if tr.get("min_snr"):
            snr = snr_all[t]
            per = per * torch.clamp(snr, max=tr["min_snr"]) / snr  # min-SNR-gamma for epsilon prediction
        return per.mean(), {}

    run = _run(
        out,
        "zoo:ldm",
        cfg,
        {"unet": unet, "text_encoder": text},
        step_fn,
        ["loss"],
        dev,
        show_progress,
        max_seconds,
        _stop_step,
        stage=len(history) + 1,
        prior_steps=prior_steps,
        prior_seconds=prior_seconds,
    )
    if run is None:
        return None
    history.append(_stage_of({**run, "config": cfg}))
    run = {
        **run,
        "steps": prior_steps + run["steps"],
        "seconds": round(prior_seconds + run["seconds"], 1),
        "history": history,
    }
    unet.eval().cpu().float()
    text.eval().cpu().float()
    pipe = build_pipeline(unet, text, vae.cpu().float(), cfg)
    _save_pipeline(pipe, out)
    summary = {
        "model": "zoo:ldm",
        **run,
        "vae": cfg["vae"],  # as configured (relative to the model folder unless absolute)
        "vae_scaling_factor": sf,
        "bf16": bf16,
        "config": cfg,
        "data": "latents of fresh 64x64 renders of the training split, captions naming a random subset of factors",
    }
    write_json(out / "training.json", summary)
    return summary


def export_unfinished(out: str | Path, stage: int = 1, device: str | None = None, threads: int | None = None) -> dict:
    """Save the EMA weights of a stage stopped before its last step (its checkpoint in ``out``) as the pipeline in
    ``out``, with a ``training.json`` that records the step it reached of the planned ones (``device`` and
    ``threads``: where it ran, as the caller reports it; the checkpoint does not record them). A later
    ``train_ldm(out, resume=True)`` trains a further stage from these weights. Returns the summary."""
    out = Path(out)
    state = load_checkpoint(out, stage)
    if state is None:
        raise FileNotFoundError(f"no checkpoint of stage {stage} in {out}")
    cfg = json.loads(state["config"])
    prior_steps = int(cfg.pop("prior_steps", 0))
    cfg.pop("stage", None)
    cfg["train"].setdefault("checkpoint_seconds", LDM["train"]["checkpoint_seconds"])
    prior = read_json(out / "training.json") if stage > 1 else None
    history = list(prior.get("history") or [_stage_of(prior)]) if prior else []
    unet, text = build_unet(cfg), build_text_encoder(cfg["text"])
    params = [p for m in (unet, text) for p in m.parameters() if p.requires_grad]
    with torch.no_grad():
        for p, e in zip(params, state["ema"], strict=True):
            p.copy_(e)
    vae_dir = _vae_folder(out, cfg)
    vae = load_vae(vae_dir)
    _save_pipeline(build_pipeline(unet.eval(), text.eval(), vae, cfg), out)
    run = {
        "stage": stage,
        "steps": int(state["step"]),
        "planned_steps": int(cfg["train"]["steps"]),
        "stopped_early": int(state["step"]) < int(cfg["train"]["steps"]),
        "seconds": round(float(state["seconds"]), 1),
        "device": device or "unknown",
        "threads": threads,
        "parameters": sum(p.numel() for p in params),
    }
    history.append(_stage_of({**run, "config": cfg}))
    summary = {
        "model": "zoo:ldm",
        **run,
        "steps": prior_steps + run["steps"],
        "seconds": round(sum(float(h["seconds"]) for h in history), 1),
        "history": history,
        "vae": cfg["vae"],  # as configured (relative to the model folder unless absolute)
        "vae_scaling_factor": float(vae.config.scaling_factor),
        "bf16": False if (device or "cpu") == "cpu" else None,
        "config": cfg,
        "data": "latents of fresh 64x64 renders of the training split, captions naming a random subset of factors",
    }
    write_json(out / "training.json", summary)
    return summary


def _save_pipeline(pipe: Any, out: Path) -> None:
    """Save the pipeline folder without the local paths diffusers records for modules loaded from a folder (a
    further stage loads the VAE and U-Net from ``out``), so the shipped configs name no machine's paths."""
    pipe.save_pretrained(out, safe_serialization=True)
    for config in out.glob("*/config.json"):
        doc = json.loads(config.read_text())
        if doc.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def _stage_of(summary: dict) -> dict:
    """What ``training.json``'s history keeps of one training stage."""
    keep = ("stage", "steps", "planned_steps", "stopped_early", "seconds", "session_seconds", "resumed_at", "device")
    keep += ("threads",)
    return {**{k: summary[k] for k in keep if k in summary}, "train": dict(summary.get("config", {}).get("train", {}))}


@torch.no_grad()
def evaluate_ldm(
    folder: str | Path,
    n: int = 1000,
    seed: int = 0,
    num_inference_steps: int = 20,
    guidance_scale: float = 3.0,
    batch: int = 100,
    save: bool = True,
    device: str | None = None,
    pipe: Any = None,
    show_progress: bool = True,
) -> dict:
    """Quality of ``zoo:ldm`` read by the oracle on ``n`` held-out scenes with partial captions (each factor named
    with probability 1/2, none empty), one seed per sample: per factor, the share of samples that follow it where
    it is named, and where it is left open the shares of its values (max / min over values; uniform is 1 / size);
    plus prompt agreement on ``n // 4`` full prompts, the in-distribution share and the Frechet distance to held-out
    renders with its floor. Saved as ``quality.json`` in ``folder`` (with ``save``)."""
    from ..factors import SIZES
    from ..oracle import load_oracle, read
    from ..quality import IN_DISTRIBUTION, frechet_distance, reference_features
    from ..text import prompts_for

    dev = pick_device(device)
    pipe = (pipe or load_ldm(folder)).to(dev)
    pipe.set_progress_bar_config(disable=True)

    n_full = max(1, n // 4)

    def generate(prompts: list[str], seeds: list[int], advance: Callable[..., None]) -> torch.Tensor:
        out = []
        for s in range(0, len(prompts), batch):
            gens = [torch.Generator().manual_seed(k) for k in seeds[s : s + batch]]
            img = pipe(
                prompts[s : s + batch],
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=gens,
                output_type="pt",
            ).images
            out.append(img.float().cpu().clamp(0, 1))
            advance(len(gens))
        return torch.cat(out)

    oracle = load_oracle()
    f = sample_factors(n, seed + 7, split="test")
    caps, named = partial_captions(f, np.random.default_rng(seed + 8), p_empty=0.0)
    with progress(n + n_full, "zoo:ldm eval", show_progress) as advance:
        r = read(generate(caps, list(range(seed, seed + n)), advance), oracle)
        ff = sample_factors(n_full, seed + 9, split="test")
        rf = read(generate(prompts_for(ff), list(range(seed + n, seed + n + n_full)), advance), oracle)
    follow, open_shares = {}, {}
    for i, name in enumerate(FACTORS):
        m = named[:, i]
        follow[name] = float((r.pred[m, i] == f[m, i]).mean()) if m.any() else float("nan")
        counts = np.bincount(r.pred[~m, i], minlength=SIZES[name]) / max(1, int((~m).sum()))
        open_shares[name] = {
            "samples": int((~m).sum()),
            "uniform": 1.0 / SIZES[name],
            "max": float(counts.max()),
            "min": float(counts.min()),
            "shares": [round(float(c), 4) for c in counts],
        }
    ref = reference_features(n, seed + 1, size=SIZE)
    q = {
        "samples": n,
        "seed": seed,
        "settings": {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale},
        "named_followed": follow,
        "named_share": {name: float(named[:, i].mean()) for i, name in enumerate(FACTORS)},
        "unnamed_value_shares": open_shares,
        "full_prompt_samples": n_full,
        "prompt_agreement": {name: float((rf.pred[:, i] == ff[:, i]).mean()) for i, name in enumerate(FACTORS)},
        "in_distribution": float((r.confidence >= IN_DISTRIBUTION).all(axis=1).mean()),
        "frechet_distance": frechet_distance(r.features, ref),
        "frechet_floor": frechet_distance(reference_features(n, seed + 2, size=SIZE), ref),
    }
    if save:
        write_json(Path(folder) / "quality.json", q)
    return q


def train(
    out: str | Path,
    device: str | None = None,
    steps: int | None = None,
    show_progress: bool = True,
    max_seconds: float | None = None,
    resume: bool = False,
    lr: float | None = None,
) -> dict | None:
    """Both stages into ``out``: the VAE into ``out/vae`` (skipped when it has finished), then the LDM (``steps``
    overrides its step count, ``lr`` its peak learning rate). Each resumes from its checkpoint. ``resume``: a further
    LDM stage from the model saved in ``out`` (see :func:`train_ldm`)."""
    out = Path(out)
    vae_dir = out / "vae"
    start = time.perf_counter()
    if not resume and not (vae_dir / "training.json").exists():
        if train_vae(vae_dir, device=device, show_progress=show_progress, max_seconds=max_seconds) is None:
            return None
        evaluate_vae(vae_dir, device=device)
    left = None if max_seconds is None else max(1.0, max_seconds - (time.perf_counter() - start))
    train_over = {k: v for k, v in (("steps", steps), ("lr", lr)) if v}
    over = {"train": train_over} if train_over else None
    return train_ldm(out, over, device=device, show_progress=show_progress, max_seconds=left, resume=resume)
