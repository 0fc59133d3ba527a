"""The oracle: a small CNN that reads all six factors off an image, with calibrated probabilities.

It is how every experiment reads what a generated image shows. Trained on fresh renders of the training split
(with light pixel noise, so it tolerates generated images), one temperature per factor fitted on held-out renders
(temperature scaling), checked on other held-out renders: accuracy and expected calibration error (ECE, 15 equal-
width confidence bins) per factor are stored in ``weights/oracle/config.json`` and printed by ``layerscope zoo list``.
Its penultimate features (256-d) feed the Frechet distance of :mod:`layerscope.world.quality`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .factors import FACTORS, SIZES, sample_factors
from .render import render
from .training import TrainLog, autocast, pick_device, progress, read_json, seed_everything, write_json

WEIGHTS = Path(__file__).parent / "weights"
INPUT = 32


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class Oracle(nn.Module):
    """CNN (3x32x32 -> 256 features -> one softmax head per factor). Other resolutions are area-resized to 32."""

    def __init__(self, width: int = 16, features: int = 256) -> None:
        super().__init__()
        self.body = nn.Sequential(_block(3, width), _block(width, 2 * width), _block(2 * width, 4 * width))
        self.neck = nn.Sequential(nn.Flatten(), nn.Linear(4 * width * 16, features), nn.ReLU(inplace=True))
        self.heads = nn.ModuleDict({f: nn.Linear(features, SIZES[f]) for f in FACTORS})
        self.register_buffer("temperature", torch.ones(len(FACTORS)))
        self.width, self.n_features = width, features

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[-2:] != (INPUT, INPUT):
            x = F.interpolate(x, size=(INPUT, INPUT), mode="area")
        return self.neck(self.body(x * 2.0 - 1.0))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw logits per factor (uncalibrated)."""
        h = self.features(images)
        return {f: head(h) for f, head in self.heads.items()}


@dataclass
class Reading:
    """What the oracle sees in a batch: ``probs[factor]`` (n, k) calibrated, ``pred`` (n, 6), ``features`` (n, 256)."""

    probs: dict[str, torch.Tensor]
    pred: np.ndarray
    features: torch.Tensor

    @property
    def confidence(self) -> np.ndarray:
        """Max probability per factor (n, 6)."""
        return np.stack([self.probs[f].max(dim=1).values.numpy() for f in FACTORS], axis=1)


@torch.no_grad()
def read(images: torch.Tensor, oracle: Oracle | None = None, batch: int = 1024) -> Reading:
    """Read factors off images (n, 3, H, W) in [0, 1] with calibrated probabilities."""
    model = oracle or load_oracle()
    device = next(model.parameters()).device
    probs: dict[str, list[torch.Tensor]] = {f: [] for f in FACTORS}
    feats: list[torch.Tensor] = []
    for s in range(0, len(images), batch):
        x = images[s : s + batch].to(device)
        h = model.features(x)
        feats.append(h.float().cpu())
        for i, f in enumerate(FACTORS):
            probs[f].append(torch.softmax(model.heads[f](h).float() / model.temperature[i], dim=1).cpu())
    p = {f: torch.cat(v) for f, v in probs.items()}
    pred = np.stack([p[f].argmax(dim=1).numpy() for f in FACTORS], axis=1)
    return Reading(p, pred, torch.cat(feats))


def ece(probs: torch.Tensor, labels: torch.Tensor | np.ndarray, bins: int = 15) -> float:
    """Expected calibration error: sum over confidence bins of |accuracy - confidence| weighted by bin share."""
    labels = torch.as_tensor(labels)
    conf, pred = probs.max(dim=1)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            total += m.float().mean().item() * abs(correct[m].mean().item() - conf[m].mean().item())
    return total


def augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Light pixel noise of random strength (0 to 0.05 std), clipped to [0, 1]."""
    sigma = torch.rand(len(images), 1, 1, 1, generator=gen) * 0.05
    return (images + sigma * torch.randn(images.shape, generator=gen)).clamp(0, 1)


def _fit_temperatures(model: Oracle, images: torch.Tensor, labels: torch.Tensor) -> list[float]:
    with torch.no_grad():
        logits = model(images)
    temps = []
    for i, f in enumerate(FACTORS):
        log_t = torch.zeros(1, requires_grad=True)
        opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200)
        lg, y = logits[f].float(), labels[:, i]

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(lg / log_t.exp(), y)
            loss.backward()
            return loss

        opt.step(closure)
        temps.append(float(log_t.detach().exp()))
    return temps


def evaluate(model: Oracle, n: int = 10_000, seed: int = 12345, size: int = 32) -> dict:
    """Accuracy and ECE per factor on ``n`` fresh held-out renders."""
    f = sample_factors(n, seed, split="test")
    r = read(render(f, size), model)
    out = {}
    for i, name in enumerate(FACTORS):
        out[name] = {"accuracy": float((r.pred[:, i] == f[:, i]).mean()), "ece": ece(r.probs[name], f[:, i])}
    return out


def train_oracle(
    out: Path | None = None,
    steps: int = 2500,
    batch: int = 256,
    lr: float = 2e-3,
    seed: int = 0,
    device: str | None = None,
    bf16: bool = True,
    show_progress: bool = True,
) -> dict:
    """Train the oracle on fresh renders, fit temperatures, evaluate, save to ``out`` (default: the package)."""
    out = Path(out or WEIGHTS / "oracle")
    dev = pick_device(device)
    gen = seed_everything(seed)
    rng = np.random.default_rng(seed)
    model = Oracle().to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    log = TrainLog(out / "train_log.csv", ["loss", "lr"])
    model.train()
    with progress(steps, "oracle", show_progress) as advance:
        for step in range(1, steps + 1):
            f = sample_factors(batch, rng, split="train")
            x = augment(render(f, INPUT), gen).to(dev)
            y = torch.from_numpy(f).to(dev)
            with autocast(dev, bf16):
                logits = model(x)
                loss = sum(F.cross_entropy(logits[name].float(), y[:, i]) for i, name in enumerate(FACTORS))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step % 20 == 0 or step == steps:
                log.write(step, loss=loss.item(), lr=sched.get_last_lr()[0])
                advance(20 if step % 20 == 0 else step % 20, loss=loss.item())
    seconds = log.close()
    model.eval().cpu()
    cal = sample_factors(5000, seed + 1, split="test")
    model.temperature.copy_(torch.tensor(_fit_temperatures(model, render(cal, INPUT), torch.from_numpy(cal))))
    metrics = evaluate(model, seed=seed + 2)
    from safetensors.torch import save_model

    save_model(model, str(out / "model.safetensors"))
    write_json(
        out / "config.json",
        {
            "architecture": {"width": model.width, "features": model.n_features, "input": INPUT},
            "training": {
                "steps": steps,
                "batch": batch,
                "lr": lr,
                "seed": seed,
                "device": str(dev),
                "bf16": bf16,
                "seconds": round(seconds, 1),
                "data": "fresh renders of the training split, pixel noise <= 0.05",
            },
            "temperature": [round(float(t), 4) for t in model.temperature],
            "heldout": metrics,
        },
    )
    return metrics


@lru_cache(maxsize=1)
def load_oracle(path: str | None = None) -> Oracle:
    """The shipped oracle (or one saved at ``path``), in eval mode on CPU."""
    folder = Path(path) if path else WEIGHTS / "oracle"
    if not (folder / "model.safetensors").exists():
        raise FileNotFoundError(f"no oracle weights in {folder}; train them with `layerscope zoo train oracle`")
    cfg = read_json(folder / "config.json")["architecture"]
    model = Oracle(cfg["width"], cfg["features"])
    from safetensors.torch import load_model

    load_model(model, str(folder / "model.safetensors"))
    return model.eval()


def oracle_card(path: str | None = None) -> dict:
    folder = Path(path) if path else WEIGHTS / "oracle"
    return read_json(folder / "config.json")
