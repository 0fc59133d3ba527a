"""Torch generators used by the tests through ``torch:toy_generators:<factory>`` specs."""

import torch
from torch import nn


class ToyGAN(nn.Module):
    latent_dim = 8

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 16 * 4 * 4)
        self.main = nn.Sequential(
            nn.ConvTranspose2d(16, 8, 4, 2, 1), nn.ReLU(), nn.ConvTranspose2d(8, 3, 4, 2, 1), nn.Tanh()
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.main(self.fc(z).view(-1, 16, 4, 4))


def make_gan() -> nn.Module:
    torch.manual_seed(0)
    return ToyGAN()


def make_unsized() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 12))
