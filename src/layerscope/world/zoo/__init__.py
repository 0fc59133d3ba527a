"""The zoo: small models trained on the Shapes world, shipped as safetensors inside the package.

``zoo:unet`` and ``zoo:dit`` are text-conditioned pixel-space diffusion models (Stable Diffusion in miniature,
served by the same adapters as SD and PixArt); ``zoo:vae`` and ``zoo:gan`` map one latent vector to an image
(served by the torch-generator adapter). ``layerscope zoo train NAME`` retrains one (seeded, configs in
:mod:`.diffusion` and :mod:`.latent`, loss log kept next to the weights); ``layerscope zoo eval NAME`` measures its
quality with the oracle; ``layerscope zoo list`` prints every model's card.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import SpecError
from ..training import read_json, write_json

WEIGHTS = Path(__file__).resolve().parent.parent / "weights"


@dataclass(frozen=True)
class ZooModel:
    name: str
    kind: str  # "diffusion" (pixel space), "latent_diffusion" (a VAE's latent space) or "latent" (one latent vector)
    description: str
    resolution: int = 32

    @property
    def folder(self) -> Path:
        return WEIGHTS / self.name


MODELS: dict[str, ZooModel] = {
    "unet": ZooModel(
        "unet",
        "diffusion",
        "text-conditioned pixel-space U-Net (UNet2DConditionModel with "
        "cross-attention and skips, CLIPTextModel text encoder), classifier-free guidance",
    ),
    "dit": ZooModel(
        "dit",
        "diffusion",
        "text-conditioned pixel-space diffusion transformer (PixArtTransformer2DModel "
        "blocks, CLIPTextModel text encoder), classifier-free guidance",
    ),
    "vae": ZooModel(
        "vae",
        "latent",
        "convolutional VAE; the decoder reads a 16-d N(0, I) latent as one categorical code per factor and draws it",
    ),
    "gan": ZooModel(
        "gan",
        "latent",
        "AC-GAN with a DCGAN-style generator that reads a 32-d N(0, I) latent as one "
        "categorical code per factor and draws it",
    ),
    "ldm": ZooModel(
        "ldm",
        "latent_diffusion",
        "latent diffusion in Stable Diffusion 1.x's layout (StableDiffusionPipeline: AutoencoderKL 64x64 -> 4x16x16, "
        "UNet2DConditionModel with 3 cross-attention down/up blocks, 2 layers each, CLIPTextModel, DDIM), trained on "
        "captions that name a random subset of the factors",
        resolution=64,
    ),
}
TRAINABLE = (*MODELS, "oracle")


def _entry(name: str) -> ZooModel:
    if name not in MODELS:
        raise SpecError(f"no zoo model {name!r}; valid: {', '.join('zoo:' + n for n in MODELS)}")
    return MODELS[name]


def source(name: str, folder: str | Path | None = None) -> dict[str, Any]:
    """``zoo:<name>`` from its shipped weights (or from ``folder``): the built pipeline or generator module, its
    default sampling settings (those its shipped quality was measured at), its card, and the world's oracle.

    ``layerscope.load("zoo:<name>")`` wraps this in the family's adapter."""
    entry = _entry(name)
    where = Path(folder) if folder else entry.folder
    index = entry.kind != "latent"  # a diffusers pipeline folder
    if (
        not where.exists()
        or not any(where.glob("**/*.safetensors"))
        or (index and not (where / "model_index.json").exists())
    ):
        raise SpecError(f"zoo model {name!r} has no weights in {where}; train it with `layerscope zoo train {name}`")
    defaults: dict[str, Any] = {}
    if entry.kind in ("diffusion", "latent_diffusion"):
        if entry.kind == "diffusion":
            from .pipelines import load_pipeline

            model: Any = load_pipeline(where)
        else:
            from .ldm import load_ldm

            model = load_ldm(where)
        if (where / "quality.json").exists():
            settings = read_json(where / "quality.json").get("settings", {})
            defaults = {k: settings[k] for k in ("num_inference_steps", "guidance_scale") if k in settings}
    else:
        from .latent import load_latent

        model = load_latent(where)
    return {"model": model, "defaults": defaults, "card": card(name, where), "oracle": "shapes"}


def train(
    name: str,
    out: str | Path | None = None,
    device: str | None = None,
    steps: int | None = None,
    show_progress: bool = True,
    resume: bool = False,
    lr: float | None = None,
) -> dict:
    """Train one zoo model (or the oracle) with its config and save it (default: into the package).

    ``resume`` (diffusion models): continue from the saved model for ``steps`` more steps (peak ``lr``).
    """
    if resume and (name not in MODELS or MODELS[name].kind not in ("diffusion", "latent_diffusion")):
        raise SpecError(f"--resume is supported for the diffusion models (unet, dit, ldm), not {name!r}")
    if name == "oracle":
        from ..oracle import train_oracle

        kw = {"steps": steps} if steps else {}
        return train_oracle(Path(out) if out else None, device=device, show_progress=show_progress, **kw)
    if name == "ldm":  # both stages (world VAE, then the latent U-Net), each resuming from its checkpoint
        from . import ldm

        where = Path(out) if out else WEIGHTS / "ldm"
        return ldm.train(where, device=device, steps=steps, show_progress=show_progress, resume=resume, lr=lr)
    entry = _entry(name)
    folder = Path(out) if out else entry.folder
    folder.mkdir(parents=True, exist_ok=True)
    if entry.kind == "diffusion":
        from .diffusion import train_diffusion

        over = {"train": {k: v for k, v in (("steps", steps), ("lr", lr)) if v}}
        return train_diffusion(name, folder, over, device=device, show_progress=show_progress, resume=resume)
    from . import latent

    fn = latent.train_vae if name == "vae" else latent.train_gan
    cfg = dict(latent.DEFAULTS[name], steps=steps) if steps else None
    return fn(folder, cfg, device=device, show_progress=show_progress)


def evaluate(
    model: Any,
    name: str,
    n: int = 1000,
    folder: str | Path | None = None,
    save: bool = True,
    progress: bool = True,
    **gen_kwargs: Any,
) -> dict:
    """Measure a loaded zoo model's quality with the oracle (see :mod:`layerscope.world.quality`; zoo:ldm, trained
    on partial captions: :func:`.ldm.evaluate_ldm`); saved as quality.json in ``folder`` (default: the shipped
    weights of ``name``)."""
    from ..quality import measure

    if _entry(name).kind == "latent_diffusion":
        from .ldm import evaluate_ldm

        kw = {k: gen_kwargs[k] for k in ("num_inference_steps", "guidance_scale") if k in gen_kwargs}
        return evaluate_ldm(
            folder or MODELS[name].folder, n=n, save=save, pipe=model.pipe, show_progress=progress, **kw
        )

    q = measure(model, n=n, progress=progress, **gen_kwargs)
    if save:
        write_json(Path(folder or MODELS[name].folder) / "quality.json", q)
    return q


def card(name: str, folder: str | Path | None = None) -> dict:
    """Parameters, resolution, training steps and time, and measured quality of a zoo model (shipped, or in
    ``folder``)."""
    entry = _entry(name)
    info: dict[str, Any] = {"name": f"zoo:{name}", "kind": entry.kind, "description": entry.description}
    folder = Path(folder) if folder else entry.folder
    if (folder / "training.json").exists():
        t = read_json(folder / "training.json")
        info.update(
            parameters=t.get("parameters") or t.get("params"),
            steps=t.get("steps"),
            train_seconds=t.get("seconds"),
            device=t.get("device"),
            threads=t.get("threads"),
        )
    info["resolution"] = entry.resolution
    info["weights_bytes"] = sum(p.stat().st_size for p in folder.glob("**/*.safetensors")) if folder.exists() else 0
    if (folder / "quality.json").exists():
        info["quality"] = read_json(folder / "quality.json")
    return info
