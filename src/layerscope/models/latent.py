"""Adapter for single-latent generators: any torch module mapping a latent vector to images (GAN generator, VAE
decoder). The latent ``z`` is the one candidate space; there are no steps and no CFG branches.

Layers are the module's children, with containers (``nn.Sequential``, ``nn.ModuleList``, ``nn.ModuleDict``) opened
(``main.0``, ``main.1``...). A generator whose parts all sit in one child (``self.net = MyNet()``, a wrapper) is
opened until it shows more than one layer. ``depth=k`` opens every module with children down to ``k`` levels below
the generator (containers do not count as a level); ``depth="leaves"`` opens all the way to modules without
children. The module may set ``layerscope_depth`` itself (so ``torch:`` specs choose from their factory). A child
module may declare its role in the map with a ``layerscope_role`` attribute (e.g. ``"code"``, see
:data:`layerscope.layers.ROLES`).

Outputs must be image batches ``(n, 3, H, W)`` (one channel is repeated to three) in ``output_range``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..config import GenerationConfig
from ..errors import ConfigError, GenerationError
from ..layers import LayerInfo, LayerMap, Site
from .base import Generator, seeded_noise

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _latent_shape(module: nn.Module, given: int | Sequence[int] | None) -> tuple[int, ...]:
    if given is None:
        for attr in ("latent_shape", "latent_dim", "z_dim", "nz", "latent_size"):
            if getattr(module, attr, None) is not None:
                given = getattr(module, attr)
                break
    if given is None:
        raise ConfigError(
            f"cannot tell the latent size of {type(module).__name__}: give latent_dim=..., or set an attribute "
            "latent_dim (or latent_shape, z_dim, nz) on the module"
        )
    return (int(given),) if isinstance(given, int) else tuple(int(s) for s in given)


def _check_depth(depth: Any) -> int | str | None:
    if depth is None or depth == "leaves":
        return depth
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ConfigError(f"depth must be a whole number >= 1 or 'leaves', got {depth!r}")
    return depth


class LatentGenerator(Generator):
    """A torch generator ``images = module(z)``; ``output_range`` is the range of its raw output (mapped to [0, 1])."""

    family = "latent"
    step_module = None
    conditioning = "latent"

    def __init__(
        self,
        module: nn.Module,
        spec: str,
        latent_dim: int | Sequence[int] | None = None,
        output_range: tuple[float, float] | None = None,
        depth: int | str | None = None,
        **opts: Any,
    ) -> None:
        super().__init__(spec, **opts)
        if not isinstance(module, nn.Module):
            raise ConfigError(f"a latent generator must be a torch.nn.Module, got {type(module).__name__}")
        self.depth = _check_depth(depth if depth is not None else getattr(module, "layerscope_depth", None))
        self.net = module.eval()
        self.latent_shape = _latent_shape(module, latent_dim)
        self.output_range = tuple(output_range or getattr(module, "output_range", (-1.0, 1.0)))
        self.default_config.guidance_scale = 1.0
        self._apply_loader_defaults()

    def branch_labels(self, cfg: GenerationConfig) -> tuple[str, ...]:
        return ("none",)

    def modules(self) -> list[nn.Module]:
        return [self.net]

    def module(self, path: str) -> nn.Module:
        return self.net.get_submodule(path) if path else self.net

    def _layer_names(self) -> list[tuple[str, nn.Module]]:
        leaves = self.depth == "leaves"
        limit = 1 if self.depth is None else (0 if leaves else int(self.depth))

        def walk(prefix: str, mod: nn.Module, level: int, out: list[tuple[str, nn.Module]]) -> None:
            for name, child in mod.named_children():
                full = f"{prefix}{name}"
                opens = next(child.children(), None) is not None and (leaves or level < limit)
                if isinstance(child, _CONTAINERS) or opens:
                    walk(full + ".", child, level + (not isinstance(child, _CONTAINERS)), out)
                else:
                    out.append((full, child))

        out: list[tuple[str, nn.Module]] = []
        walk("", self.net, 1, out)
        while self.depth is None and len(out) == 1 and next(out[0][1].children(), None) is not None:
            only, mod = out[0]  # a wrapper: the whole generator is one child, open it
            out = []
            walk(only + ".", mod, 1, out)
        return out

    def build_map(self) -> LayerMap:
        named = self._layer_names()
        entries = [
            LayerInfo(
                name,
                type(mod).__name__.lower(),
                f"depth {d}/{len(named)}",
                Site(name, "output", (), (0,)),
                depth=d,
                per_step=False,
                branched=False,
                role=getattr(mod, "layerscope_role", "layer"),
            )
            for d, (name, mod) in enumerate(named)
        ]
        entries.append(
            LayerInfo(
                "z",
                "latent",
                "input",
                Site("", "input", (0,)),
                per_step=False,
                branched=False,
                is_space=True,
                note="the generator's latent vector",
                role="latent",
            )
        )
        return LayerMap(entries, model=self.spec)

    def trace_inputs(self) -> list[Any]:
        return [None]

    def run_batch(
        self, prompts: Sequence[Any], seeds: Sequence[int], cfg: GenerationConfig
    ) -> tuple[torch.Tensor, dict]:
        param = next(self.net.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None else torch.float32
        z = seeded_noise(seeds, self.latent_shape, device, dtype)
        given = [p for p in prompts if isinstance(p, torch.Tensor)]
        if given:  # explicit latents passed as "prompts"
            if len(given) != len(prompts):
                raise ConfigError("pass either latent tensors for every sample or none")
            z = torch.stack([p.reshape(self.latent_shape) for p in given]).to(device=device, dtype=dtype)
        out = self.net(z)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if isinstance(out, torch.Tensor) and out.ndim == 4 and out.shape[1] == 1:
            out = out.expand(-1, 3, -1, -1)  # grayscale
        if not isinstance(out, torch.Tensor):
            raise GenerationError(f"{self.spec} returned {type(out).__name__}, not a tensor of images")
        lo, hi = self.output_range
        images = (out.float() - lo) / (hi - lo)
        if not torch.isfinite(images).all():  # before clamping turns infinities into white
            images = images.masked_fill(~torch.isfinite(images), float("nan"))  # execute names the samples
        images = images.clamp(0, 1)
        return images, {"timesteps": []}
