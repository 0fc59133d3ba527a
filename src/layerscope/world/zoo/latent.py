"""Build and train the zoo's single-latent generators (``zoo:vae``, ``zoo:gan``) at 32x32.

Both ship one generator ``images = module(z)`` with ``z ~ N(0, I)``, served by the torch-generator adapter
(:class:`~layerscope.models.latent.LatentGenerator`). The generator is a flat stack of named blocks, so each block
is one layer for capture and injection: ``code`` (the latent read as one categorical code per world factor: linear
logits, one-hot of each argmax), ``fc`` (the codes projected to a 4x4 feature map), ``net.0``..``net.2``
(transposed-conv up-sampling blocks 4 -> 8 -> 16 -> 32, each conv + norm + activation) and ``net.3`` (the RGB head).

Why the ``code`` layer: the Shapes world is a grid (every factor takes one of 4-15 values), and the oracle reads a
scene between two grid values (a hue between colours, a scale between sizes) with low confidence. A generator whose
image moves continuously with ``z`` decodes a large share of its prior to such in-between scenes: the first shipped
VAE and GAN (no code layer) were in-distribution in 19% and 21% of samples. With the code layer every latent
decodes to one combination of factor values; ``z`` still decides the whole image, but piecewise constantly (cells
of the code layer's argmax), which the property experiments then measure.

- ``zoo:vae``: a convolutional VAE with a 16-d latent; Bernoulli (BCE) reconstruction through the code layer
  (straight-through gradient) + beta * KL with a linear beta warm-up + ``sup`` * the cross-entropy of the code
  layer's logits on the sampled latent against the render's factor labels (a semi-supervised VAE: the labels teach
  the code layer to read the factors, the decoder learns to draw each code) - ``code_div`` * the entropy of the
  code usage of a batch of prior samples (so that the prior's cells cover every factor value, not only the ones
  the encoder's clusters happen to sit near). Only the decoder ships
  (``model.safetensors``); the encoder is used for training only.
- ``zoo:gan``: an AC-GAN (Odena et al. 2017) whose class codes are read from its one latent by the code layer:
  DCGAN-style generator (batch norm, ReLU, tanh), spectral-norm discriminator with one auxiliary classifier head per
  factor (trained on the labels of real renders), hinge loss, Adam; the generator's samples must be classified as
  their own codes (weight ``ac``) and the batch's code usage is kept spread over all classes (entropy, weight
  ``code_div``). No labels are needed to sample. An exponential moving average of the generator weights is what
  ships (its batch-norm statistics re-estimated on prior samples after training).

Both train on fresh renders of the training split, are seeded, and run unchanged on CUDA (``pick_device``).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm

from ..factors import FACTORS, SIZES, sample_factors
from ..render import render
from ..training import TrainLog, autocast, pick_device, progress, read_json, seed_everything, write_json

SIZE = 32

CODE = [SIZES[f] for f in FACTORS]  # one categorical code per world factor: 10, 10, 10, 8, 4, 15 classes

DEFAULTS: dict[str, dict[str, Any]] = {
    "vae": dict(
        latent_dim=16,
        widths=[128, 64, 32, 16],
        enc_widths=[32, 64, 128],
        norm="batch",
        output="sigmoid",
        code=CODE,
        sup=0.1,
        steps=10000,
        batch=64,
        lr=1e-3,
        lr_min=0.05,
        warmup=100,
        beta=1.0,
        beta_warmup=1000,
        grad_clip=1.0,
        adv=0.0,
        adv_start=500,
        d_widths=[64, 128, 256],
        lr_d=2e-4,
        betas=[0.0, 0.9],
        aux=0.0,
        aux_d=1.0,
        aux_fake=0.0,
        aux_div=1.0,
        ac=0.0,
        code_div=0.1,
        seed=0,
        bf16="auto",
        size=SIZE,
    ),
    "gan": dict(
        latent_dim=32,
        widths=[128, 64, 32, 16],
        d_widths=[64, 128, 256],
        norm="batch",
        output="tanh",
        code=CODE,
        steps=12000,
        batch=64,
        lr_g=2e-4,
        lr_d=2e-4,
        betas=[0.0, 0.9],
        loss="hinge",
        adv=1.0,
        aux=0.0,
        aux_d=1.0,
        aux_fake=0.0,
        aux_div=1.0,
        ac=1.0,
        proj=True,
        code_div=1.0,
        ema=0.999,
        bn_batches=40,
        balance=200_000,
        seed=0,
        bf16="auto",
        size=SIZE,
    ),
}

_RANGES = {"sigmoid": (0.0, 1.0), "tanh": (-1.0, 1.0)}


# -- architecture ---------------------------------------------------------------------------------------------------
def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be 'batch', 'group' or 'none', got {kind!r}")


class Project(nn.Module):
    """The latent projected to a (C, 4, 4) feature map: linear, norm, ReLU."""

    def __init__(self, latent_dim: int, channels: int, norm: str) -> None:
        super().__init__()
        self.channels = channels
        self.linear = nn.Linear(latent_dim, channels * 16)
        self.norm = _norm(norm, channels)
        self.act = nn.ReLU()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.linear(z).view(len(z), self.channels, 4, 4)))


class Up(nn.Module):
    """One up-sampling block: 4x4 transposed conv with stride 2 (doubles the resolution), norm, ReLU."""

    def __init__(self, cin: int, cout: int, norm: str) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=norm == "none")
        self.norm = _norm(norm, cout)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class ToRGB(nn.Module):
    """The RGB head: 3x3 conv to 3 channels, then sigmoid (range [0, 1]) or tanh (range [-1, 1])."""

    def __init__(self, cin: int, output: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, 3, 3, padding=1)
        self.output = output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x).sigmoid() if self.output == "sigmoid" else self.logits(x).tanh()

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Code(nn.Module):
    """The latent read as one categorical code per group: linear logits, then the one-hot of each group's argmax.

    The forward value is exactly one-hot (so every latent decodes to one combination of codes); in training the
    gradient is the softmax's (straight-through estimator, Bengio et al. 2013). Its role in a layer map is ``code``:
    with the shipped groups (one per factor, in factor order), class ``k`` of a group draws value ``k`` of the factor.
    """

    layerscope_role = "code"

    def __init__(self, latent_dim: int, groups: list[int]) -> None:
        super().__init__()
        self.groups = [int(g) for g in groups]
        if not self.groups or min(self.groups) < 2:
            raise ValueError(f"code groups must list class counts >= 2, got {groups}")
        self.linear = nn.Linear(latent_dim, sum(self.groups))

    def logits(self, z: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(z).float().split(self.groups, dim=1)

    @torch.no_grad()
    def balance(self, z: torch.Tensor, steps: int = 600) -> list[tuple[float, float]]:
        """Set each group's biases so that its classes take equal shares of the latents ``z`` (prior samples).

        An argmax over linear logits cuts the latent space into cells (a power diagram); moving the biases moves the
        cell borders without changing what any class decodes to. Equal cell masses are the optimum of a convex dual
        (semi-discrete optimal transport): gradient descent on ``max_k(w_k z + b_k) - mean(b)``, whose gradient is
        each class's share minus its target. Returns (max/min share before, after) per group.
        """
        logits = z.float() @ self.linear.weight.float().T
        bias = self.linear.bias
        out, start = [], 0
        for k in self.groups:
            part, b = logits[:, start : start + k], bias[start : start + k].float().clone()

            def ratio(b_: torch.Tensor) -> tuple[torch.Tensor, float]:
                share = torch.bincount((part + b_).argmax(1), minlength=k).float() / len(z)
                return share, float(share.max() / share.min().clamp_min(1.0 / len(z)))

            before = ratio(b)[1]
            eta = 0.2 * float(part.std())  # steps in logit units, decaying linearly to zero
            for step in range(steps):
                share, _ = ratio(b)
                b -= eta * (1.0 - step / steps) * k * (share - 1.0 / k)
            bias[start : start + k] = b.to(bias.dtype)
            out.append((before, ratio(b)[1]))
            start += k
        return out

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        parts = []
        for logits in self.logits(z):
            soft = logits.softmax(dim=1)
            hard = F.one_hot(soft.argmax(dim=1), soft.shape[1]).to(soft)
            parts.append(hard + (soft - soft.detach()))  # exactly one-hot in value
        return torch.cat(parts, dim=1)


class ConvGenerator(nn.Module):
    """``z`` (n, latent_dim) -> images (n, 3, 32, 32) in ``output_range``; children (``code``,) ``fc`` and ``net``.

    With ``code`` (a list of class counts) the latent first passes through a :class:`Code` layer, so the image is a
    function of one categorical code per group; without it ``fc`` projects the latent itself.
    """

    def __init__(
        self,
        latent_dim: int,
        widths: list[int],
        norm: str = "batch",
        output: str = "tanh",
        code: list[int] | None = None,
    ) -> None:
        super().__init__()
        if len(widths) != 4:
            raise ValueError(f"widths must list 4 channel counts (4x4, 8x8, 16x16, 32x32), got {widths}")
        if output not in _RANGES:
            raise ValueError(f"output must be 'sigmoid' or 'tanh', got {output!r}")
        self.latent_dim = int(latent_dim)
        self.output_range = _RANGES[output]
        self.code = Code(latent_dim, code) if code else None
        self.fc = Project(sum(code) if code else latent_dim, widths[0], norm)
        self.net = nn.Sequential(*[Up(a, b, norm) for a, b in zip(widths[:-1], widths[1:])], ToRGB(widths[-1], output))

    def project(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc(self.code(z) if self.code is not None else z)

    def features(self, z: torch.Tensor) -> torch.Tensor:
        return self.net[:-1](self.project(z))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(self.project(z))


class Encoder(nn.Module):
    """The VAE's encoder: strided 4x4 convs 32 -> 16 -> 8 -> 4 (norm, leaky ReLU), then mean and log-variance."""

    def __init__(self, latent_dim: int, widths: list[int], norm: str = "batch") -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for w in widths:
            layers += [nn.Conv2d(cin, w, 4, 2, 1, bias=norm == "none"), _norm(norm, w), nn.LeakyReLU(0.2)]
            cin = w
        self.body = nn.Sequential(*layers, nn.Flatten())
        res = SIZE // 2 ** len(widths)
        self.head = nn.Linear(cin * res * res, 2 * latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.head(self.body(x * 2.0 - 1.0)).chunk(2, dim=1)
        return mu, logvar.clamp(-12.0, 6.0)


class Discriminator(nn.Module):
    """DCGAN discriminator with spectral norm: strided 4x4 convs 32 -> 16 -> 8 -> 4 (leaky ReLU), linear to a score.

    With ``aux=True`` it also carries one linear classifier head per world factor on the same features (an
    auxiliary classifier trained on the labels of real renders, as in AC-GAN). With ``project=True`` it is a
    projection discriminator (Miyato & Koyama 2018): the score of an image given its codes (one one-hot per factor,
    concatenated) adds the inner product of the features with one learned embedding per factor's code, so an image
    is judged real or fake *as an image of that factor value*.
    """

    def __init__(self, widths: list[int], aux: bool = False, project: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for w in widths:
            layers += [spectral_norm(nn.Conv2d(cin, w, 4, 2, 1)), nn.LeakyReLU(0.2)]
            cin = w
        self.body = nn.Sequential(*layers, nn.Flatten())
        res = SIZE // 2 ** len(widths)
        self.head = spectral_norm(nn.Linear(cin * res * res, 1))
        self.classes = nn.ModuleDict({f: nn.Linear(cin * res * res, SIZES[f]) for f in FACTORS}) if aux else None
        self.embed = spectral_norm(nn.Linear(sum(CODE), cin * res * res, bias=False)) if project else None

    def forward(self, x: torch.Tensor, classify: bool = False, codes: torch.Tensor | None = None):
        h = self.body(x)
        score = self.head(h).flatten()
        if self.embed is not None:
            if codes is None or codes.shape != (len(x), sum(CODE)):
                raise ValueError(
                    f"a projection discriminator scores images with their codes: one-hot "
                    f"(n, {sum(CODE)}), got {None if codes is None else tuple(codes.shape)}"
                )
            score = score + (self.embed(codes.to(h.dtype)) * h).sum(dim=1)
        if not classify:
            return score
        return score, {f: head(h).float() for f, head in self.classes.items()}


def _one_hot(labels: torch.Tensor) -> torch.Tensor:
    """Factor labels (n, 6) as the concatenated one-hot codes (n, sum(CODE)) a code layer outputs."""
    return torch.cat([F.one_hot(labels[:, i], SIZES[f]) for i, f in enumerate(FACTORS)], dim=1).float()


def _aux_real(logits: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the auxiliary classifier on real renders, summed over factors."""
    return sum(F.cross_entropy(logits[f], labels[:, i]) for i, f in enumerate(FACTORS))


def _aux_fake(logits: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean per-sample entropy, entropy of the batch-mean prediction), each summed over factors, on samples."""
    cond, marg = 0.0, 0.0
    for f in FACTORS:
        p = logits[f].softmax(dim=1)
        logp = logits[f].log_softmax(dim=1)
        cond = cond - (p * logp).sum(dim=1).mean()
        m = p.mean(dim=0)
        marg = marg - (m * (m + 1e-8).log()).sum()
    return cond, marg


def _architecture(name: str, cfg: dict) -> dict:
    return {
        "kind": name,
        "latent_dim": cfg["latent_dim"],
        "widths": list(cfg["widths"]),
        "norm": cfg["norm"],
        "output": cfg["output"],
        "code": list(cfg["code"]) if cfg.get("code") else None,
        "resolution": cfg["size"],
        "prior": "N(0, I)",
    }


def build_generator(arch: dict) -> ConvGenerator:
    """An untrained generator (decoder) from an ``architecture`` dict of ``config.json``."""
    return ConvGenerator(
        arch["latent_dim"], arch["widths"], arch.get("norm", "batch"), arch.get("output", "tanh"), arch.get("code")
    )


def load_latent(folder: Path | str) -> ConvGenerator:
    """The decoder/generator saved in ``folder`` (``config.json`` + ``model.safetensors``), in eval mode on CPU."""
    folder = Path(folder)
    if not (folder / "model.safetensors").exists() or not (folder / "config.json").exists():
        raise FileNotFoundError(f"no latent generator in {folder} (need config.json and model.safetensors)")
    from safetensors.torch import load_model

    model = build_generator(read_json(folder / "config.json")["architecture"])
    load_model(model, str(folder / "model.safetensors"))
    return model.eval()


# -- training helpers ------------------------------------------------------------------------------------------------
def _config(name: str, config: dict | None) -> dict:
    cfg = copy.deepcopy(DEFAULTS[name])
    unknown = set(config or {}) - set(cfg)
    if unknown:
        raise ValueError(f"unknown {name} config keys: {sorted(unknown)}; valid: {sorted(cfg)}")
    cfg.update({k: v for k, v in (config or {}).items() if v is not None})
    if cfg["size"] != SIZE:
        raise ValueError(f"the latent zoo models are built for {SIZE}x{SIZE}, got size={cfg['size']}")
    labelled = cfg.get("sup", 0) > 0 or cfg["ac"] > 0 or bool(cfg.get("proj"))
    if labelled and list(cfg["code"] or []) != CODE:
        raise ValueError(
            f"sup, ac or proj read the code groups as the world's factors: code must be {CODE}, got {cfg['code']}"
        )
    if cfg["code_div"] > 0 and not cfg["code"]:
        raise ValueError("code_div > 0 needs a code layer (code=[...])")
    return cfg


def _classifies(cfg: dict) -> bool:
    """Whether the discriminator carries the auxiliary factor classifier."""
    return cfg["aux"] > 0 or cfg["ac"] > 0


def _code_terms(gen_: ConvGenerator, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes (n, groups) as class indices, entropy of each group's batch-mean softmax summed over groups)."""
    codes, marg = [], 0.0
    for logits in gen_.code.logits(z):
        codes.append(logits.argmax(dim=1))
        m = logits.softmax(dim=1).mean(dim=0)
        marg = marg - (m * (m + 1e-8).log()).sum()
    return torch.stack(codes, dim=1), marg


def _use_bf16(flag: Any, dev: torch.device) -> bool:
    # "auto": on for CUDA only (bf16 convolutions are slower than fp32 on most CPUs)
    return dev.type == "cuda" if flag == "auto" else bool(flag)


def _batch(cfg: dict, rng: np.random.Generator, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh renders of the training split in [0, 1] and their factor labels."""
    f = sample_factors(cfg["batch"], rng, split="train")
    return render(f, cfg["size"]).to(dev), torch.from_numpy(f).to(dev)


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _lr_factor(step: int, steps: int, warmup: int, floor: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _save(name: str, out: Path, gen: ConvGenerator, cfg: dict, dev: torch.device, seconds: float, extra: dict) -> dict:
    from safetensors.torch import save_model

    out.mkdir(parents=True, exist_ok=True)
    gen = gen.eval().cpu().float()
    save_model(gen, str(out / "model.safetensors"))
    params = _n_params(gen)
    write_json(out / "config.json", {"model": f"zoo:{name}", "architecture": _architecture(name, cfg), "training": cfg})
    summary = {
        "model": f"zoo:{name}",
        "steps": cfg["steps"],
        "seconds": round(seconds, 1),
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "seed": cfg["seed"],
        "params": params,
        **extra,
    }
    write_json(out / "training.json", summary)
    return summary


# -- VAE -------------------------------------------------------------------------------------------------------------
def train_vae(out: Path, config: dict | None = None, device: str | None = None, show_progress: bool = True) -> dict:
    """Train ``zoo:vae`` (config: :data:`DEFAULTS` ``["vae"]`` updated with ``config``) and save it into ``out``.

    Loss per image: summed Bernoulli NLL of the pixels + beta * KL (beta warmed up linearly over ``beta_warmup``
    steps), divided by the number of pixel values; with a code layer (``code``), plus ``sup`` * the code logits'
    cross-entropy against the factor labels (summed over factors) and minus ``code_div`` * the entropy of the code
    usage of a batch of prior samples. With ``adv > 0`` (from step ``adv_start``) the decoder also gets a hinge
    adversarial loss on samples from the prior, against a spectral-norm discriminator (a VAE-GAN), and with
    ``aux > 0`` the entropy terms of an auxiliary classifier on those samples (see :func:`train_gan`)."""
    cfg = _config("vae", config)
    out = Path(out)
    dev = pick_device(device)
    bf16 = _use_bf16(cfg["bf16"], dev)
    gen = seed_everything(cfg["seed"])
    rng = np.random.default_rng(cfg["seed"])
    if cfg["output"] != "sigmoid":
        raise ValueError("the VAE's Bernoulli reconstruction loss needs output='sigmoid'")
    enc = Encoder(cfg["latent_dim"], cfg["enc_widths"], cfg["norm"]).to(dev).train()
    dec = build_generator(_architecture("vae", cfg)).to(dev).train()
    params = list(enc.parameters()) + list(dec.parameters())
    opt = torch.optim.Adam(params, lr=cfg["lr"])
    steps, zdim = cfg["steps"], cfg["latent_dim"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, steps, cfg["warmup"], cfg["lr_min"]))
    adversarial = cfg["adv"] > 0 or _classifies(cfg)
    D = opt_d = None
    if adversarial:
        D = Discriminator(cfg["d_widths"], aux=_classifies(cfg)).to(dev).train()
        opt_d = torch.optim.Adam(D.parameters(), lr=cfg["lr_d"], betas=tuple(cfg["betas"]))
    fields = ["loss", "recon", "kl", "beta", "lr"] + (["ce", "code_acc"] if cfg["sup"] > 0 else [])
    fields += ["loss_d", "d_real", "d_fake", "adv"] if D else []
    fields += ["aux_real", "ent_d"] if D and _classifies(cfg) else []
    fields += ["ent", "div"] if cfg["aux"] > 0 else []
    fields += ["ac"] if cfg["ac"] > 0 else []
    fields += ["code_ent"] if cfg["code_div"] > 0 else []
    log = TrainLog(out / "train_log.csv", fields)
    run: dict[str, float] = {}
    every = 25
    with progress(steps, "zoo:vae", show_progress) as advance:
        for step in range(steps):
            x, y = _batch(cfg, rng, dev)
            eps = torch.randn((len(x), zdim), generator=gen).to(dev)
            beta = cfg["beta"] * min(1.0, (step + 1) / max(1, cfg["beta_warmup"]))
            with autocast(dev, bf16):
                mu, logvar = enc(x)
                mu, logvar = mu.float(), logvar.float()
                z = mu + eps * (0.5 * logvar).exp()
                logits = dec.net[-1].logits(dec.features(z)).float()
            # per image: summed Bernoulli NLL over pixels and summed KL over latent dims
            recon = F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(dim=(1, 2, 3)).mean()
            kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1).mean()
            loss = recon + beta * kl
            total = loss / x[0].numel()  # per pixel, so that the clipping threshold and adv weights have a scale
            vals = {"loss": loss.item(), "recon": recon.item(), "kl": kl.item()}
            if cfg["sup"] > 0:
                # the code layer reads the factors from the (sampled) latent: summed cross-entropy over factors
                code_logits = dec.code.logits(z)
                ce = sum(F.cross_entropy(lg, y[:, i]) for i, lg in enumerate(code_logits))
                acc = torch.stack([lg.argmax(1) == y[:, i] for i, lg in enumerate(code_logits)]).all(0)
                total = total + cfg["sup"] * ce
                vals.update(ce=ce.item(), code_acc=acc.float().mean().item())
            if cfg["code_div"] > 0:
                # the prior's samples spread over every code (entropy of the batch's code usage, maximised)
                _, code_ent = _code_terms(dec, torch.randn((len(x), zdim), generator=gen).to(dev))
                total = total - cfg["code_div"] * code_ent
                vals["code_ent"] = code_ent.item()
            if D is not None and step >= cfg["adv_start"]:
                zp = torch.randn((len(x), zdim), generator=gen).to(dev)
                with autocast(dev, bf16):
                    fake = dec(zp).float() * 2.0 - 1.0
                vals.update(_d_step(D, opt_d, x * 2.0 - 1.0, y, fake.detach(), cfg, dev, bf16))
                g_adv, g_vals = _g_terms(D, fake, cfg, dev, bf16, dec, zp)
                total = total + g_adv
                vals.update(g_vals)
            opt.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"])
            opt.step()
            sched.step()
            for k, v in vals.items():
                run[k] = v if k not in run else 0.95 * run[k] + 0.05 * v
            if (step + 1) % every == 0 or step + 1 == steps:
                log.write(step + 1, **run, beta=beta, lr=sched.get_last_lr()[0])
                advance(every if (step + 1) % every == 0 else (step + 1) % every, **run)
    seconds = log.close()
    extra = {"encoder_params": _n_params(enc)}
    if D is not None:
        extra["discriminator_params"] = _n_params(D)
    extra["final"] = {k: round(v, 4) for k, v in run.items()}
    return _save("vae", out, dec, cfg, dev, seconds, extra)


# -- GAN -------------------------------------------------------------------------------------------------------------
def _d_step(
    D: Discriminator,
    opt_d: torch.optim.Optimizer,
    real: torch.Tensor,
    labels: torch.Tensor,
    fake: torch.Tensor,
    cfg: dict,
    dev: torch.device,
    bf16: bool,
    fake_codes: torch.Tensor | None = None,
) -> dict[str, float]:
    """One discriminator update: hinge (or logistic) loss; with the auxiliary classifier, its cross-entropy on real
    renders (weight ``aux_d``) and, CatGAN-style, its entropy on samples maximised (weight ``aux_fake``). A
    projection discriminator scores real renders with their labels and samples with their codes ``fake_codes``."""
    aux = _classifies(cfg)
    n = len(real)
    codes = torch.cat([_one_hot(labels), fake_codes]) if D.embed is not None else None
    with autocast(dev, bf16):
        out = D(torch.cat([real, fake]), classify=aux, codes=codes)  # no batch statistics in D: one pass for both
    score, logits = (out[0].float(), out[1]) if aux else (out.float(), None)
    d_real, d_fake = score[:n], score[n:]
    if cfg.get("loss", "hinge") == "hinge":
        loss_d = F.relu(1.0 - d_real).mean() + F.relu(1.0 + d_fake).mean()
    else:
        loss_d = F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
    vals = {"loss_d": loss_d.item(), "d_real": d_real.mean().item(), "d_fake": d_fake.mean().item()}
    if aux:
        ce = _aux_real({f: v[:n] for f, v in logits.items()}, labels)
        ent_fake, _ = _aux_fake({f: v[n:] for f, v in logits.items()})
        loss_d = loss_d + cfg["aux_d"] * ce - cfg["aux_fake"] * ent_fake
        vals.update(aux_real=ce.item(), ent_d=ent_fake.item())
    opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    opt_d.step()
    return vals


def _g_terms(
    D: Discriminator,
    fake: torch.Tensor,
    cfg: dict,
    dev: torch.device,
    bf16: bool,
    gen_: ConvGenerator | None = None,
    z: torch.Tensor | None = None,
    codes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The generator's loss on its samples ``fake = gen_(z)``: adversarial (weight ``adv``), the aux classifier's
    entropy terms (weight ``aux``), AC-GAN's cross-entropy of that classifier against the sample's own codes
    (weight ``ac``) and the entropy of the batch's code usage, maximised (weight ``code_div``). A projection
    discriminator scores each sample with its own one-hot code ``codes``."""
    classify = _classifies(cfg)
    D.requires_grad_(False)
    with autocast(dev, bf16):
        out = D(fake, classify=classify, codes=codes)
    D.requires_grad_(True)
    score = (out[0] if classify else out).float()
    adv = -score.mean() if cfg.get("loss", "hinge") == "hinge" else F.softplus(-score).mean()
    loss = cfg["adv"] * adv
    vals = {"adv": adv.item()}
    if cfg["aux"] > 0:
        # confident on every factor (low conditional entropy), diverse over the batch (high marginal entropy)
        ent, div = _aux_fake(out[1])
        loss = loss + cfg["aux"] * (ent - cfg["aux_div"] * div)
        vals.update(ent=ent.item(), div=div.item())
    if cfg["ac"] > 0 or cfg["code_div"] > 0:
        codes, code_ent = _code_terms(gen_, z)
        if cfg["ac"] > 0:
            ac = _aux_real(out[1], codes)
            loss = loss + cfg["ac"] * ac
            vals["ac"] = ac.item()
        if cfg["code_div"] > 0:
            loss = loss - cfg["code_div"] * code_ent
            vals["code_ent"] = code_ent.item()
    return loss, vals


@torch.no_grad()
def _reestimate_bn(gen_: ConvGenerator, cfg: dict, torch_gen: torch.Generator, dev: torch.device) -> None:
    """Batch-norm statistics of the (EMA) generator re-estimated as exact averages over prior samples."""
    bns = [m for m in gen_.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or cfg["bn_batches"] <= 0:
        return
    moms = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    gen_.train()
    for _ in range(cfg["bn_batches"]):
        gen_(torch.randn((cfg["batch"], cfg["latent_dim"]), generator=torch_gen).to(dev))
    for m, mom in zip(bns, moms):
        m.momentum = mom
    gen_.eval()


def train_gan(out: Path, config: dict | None = None, device: str | None = None, show_progress: bool = True) -> dict:
    """Train ``zoo:gan`` (config: :data:`DEFAULTS` ``["gan"]`` updated with ``config``) and save it into ``out``.

    Hinge loss, spectral norm in D, Adam; the EMA of the generator ships. With ``aux > 0`` the discriminator also
    classifies the six factors of real renders (weight ``aux_d``) and the generator minimises the classifier's
    per-sample entropy on its samples while maximising the entropy of its batch-mean prediction (weight ``aux_div``):
    samples that show one clear value of every factor, all values used (CatGAN's entropy terms, AC-GAN's classifier).
    With ``ac > 0`` the generator's samples must instead be classified as their own codes (AC-GAN with classes from
    the latent); with ``proj`` the discriminator is a projection discriminator that judges each image together with
    its code. After training, :func:`finish_gan` balances the code layer and re-estimates batch norm.
    """
    cfg = _config("gan", config)
    out = Path(out)
    dev = pick_device(device)
    bf16 = _use_bf16(cfg["bf16"], dev)
    gen = seed_everything(cfg["seed"])
    rng = np.random.default_rng(cfg["seed"])
    G = build_generator(_architecture("gan", cfg)).to(dev).train()
    D = Discriminator(cfg["d_widths"], aux=_classifies(cfg), project=bool(cfg["proj"])).to(dev).train()
    ema = copy.deepcopy(G).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    betas = tuple(cfg["betas"])
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg["lr_g"], betas=betas)
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg["lr_d"], betas=betas)
    lo, hi = G.output_range
    steps, zdim = cfg["steps"], cfg["latent_dim"]
    fields = ["loss_d", "adv", "d_real", "d_fake"] + (["aux_real", "ent_d"] if _classifies(cfg) else [])
    fields += (["ent", "div"] if cfg["aux"] > 0 else []) + (["ac"] if cfg["ac"] > 0 else [])
    fields += ["code_ent"] if cfg["code_div"] > 0 else []
    log = TrainLog(out / "train_log.csv", fields)
    run: dict[str, float] = {}
    every = 25
    g_params, e_params = list(G.parameters()), list(ema.parameters())
    with progress(steps, "zoo:gan", show_progress) as advance:
        for step in range(steps):
            x, y = _batch(cfg, rng, dev)
            real = x * (hi - lo) + lo
            z = torch.randn((len(real), zdim), generator=gen).to(dev)
            with autocast(dev, bf16):
                fake = G(z).float()
            codes = G.code(z).detach() if D.embed is not None else None
            vals = _d_step(D, opt_d, real, y, fake.detach(), cfg, dev, bf16, codes)
            loss_g, g_vals = _g_terms(D, fake, cfg, dev, bf16, G, z, codes)
            vals.update(g_vals)
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
            with torch.no_grad():
                decay = min(cfg["ema"], (1 + step) / (10 + step))
                torch._foreach_lerp_(e_params, [p.detach() for p in g_params], 1 - decay)
            for k, v in vals.items():
                run[k] = v if k not in run else 0.95 * run[k] + 0.05 * v
            if (step + 1) % every == 0 or step + 1 == steps:
                log.write(step + 1, **run)
                advance(every if (step + 1) % every == 0 else (step + 1) % every, **run)
    seconds = log.close()
    extra = {"discriminator_params": _n_params(D), "final": {k: round(v, 4) for k, v in run.items()}}
    return _save("gan", out, ema, cfg, dev, seconds, {**extra, **finish_gan(ema, cfg)})


def finish_gan(gen_: ConvGenerator, cfg: dict) -> dict:
    """The trained (EMA) generator's last steps, seeded by ``cfg["seed"]`` alone: with ``balance`` > 0, its code
    layer's biases set so every value of every factor takes an equal share of ``balance`` prior samples
    (:meth:`Code.balance`); then its batch-norm statistics re-estimated on ``bn_batches`` prior batches."""
    dev = next(gen_.parameters()).device
    torch_gen = torch.Generator().manual_seed(cfg["seed"] + 1)
    info: dict = {}
    if cfg.get("balance", 0) and gen_.code is not None:
        z = torch.randn((int(cfg["balance"]), cfg["latent_dim"]), generator=torch_gen).to(dev)
        ratios = gen_.code.balance(z)
        names = FACTORS if gen_.code.groups == CODE else [f"group {i}" for i in range(len(ratios))]
        info["code_balance"] = {
            f: {"max_min_share_before": round(a, 3), "after": round(b, 3)} for f, (a, b) in zip(names, ratios)
        }
    _reestimate_bn(gen_, cfg, torch_gen, dev)
    return info
