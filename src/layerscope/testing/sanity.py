"""Sanity generators built to fail the latent-space property scorecard in known ways (z -> 32x32 image).

Load one as ``torch:layerscope.testing.sanity:<factory>`` (``ignores_latent``, ``hash_of_latent``,
``linear_decoder``); ``layerscope.experiments.properties.SANITY`` says what the scorecard must find on each (the
main job runs them as its sanity jobs).
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn


class _Sanity(nn.Module):
    latent_dim = 16
    output_range = (0.0, 1.0)
    size = 32

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("pattern", torch.rand(3, self.size, self.size, generator=g))
        self.body = nn.Linear(self.latent_dim, 3 * self.size * self.size, bias=False)
        with torch.no_grad():
            self.body.weight.copy_(torch.randn(self.body.weight.shape, generator=g) * 0.15 / math.sqrt(self.latent_dim))


class IgnoresLatent(_Sanity):
    """The same image whatever the latent: relevance must be ~0."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.pattern.expand(len(z), -1, -1, -1) + 0 * self.body(z).view(len(z), 3, self.size, self.size)


class HashOfLatent(_Sanity):
    """An unrelated random image for every distinct latent: smoothness and organization must be ~0."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = []
        for row in z.detach().float().cpu():
            g = torch.Generator().manual_seed(zlib.crc32(row.numpy().tobytes()))
            out.append(torch.rand(3, self.size, self.size, generator=g))
        return torch.stack(out).to(z.device) + 0 * self.body(z).view(len(z), 3, self.size, self.size)


class LinearDecoder(_Sanity):
    """image = 0.5 + W z: all four properties must be high."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return 0.5 + self.body(z).view(len(z), 3, self.size, self.size)


def ignores_latent() -> nn.Module:
    return IgnoresLatent()


def hash_of_latent() -> nn.Module:
    return HashOfLatent()


def linear_decoder() -> nn.Module:
    return LinearDecoder()
