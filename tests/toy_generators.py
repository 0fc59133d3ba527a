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


class Block(nn.Module):
    """A custom (non-container) module with parts of its own."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose2d(c, c, 4, 2, 1)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


class Inner(nn.Module):
    latent_dim = 8

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8 * 4 * 4)
        self.block = Block(8)
        self.to_rgb = nn.Conv2d(8, 3, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.to_rgb(self.block(self.fc(z).view(-1, 8, 4, 4))))


class Wrapped(nn.Module):
    """A generator inside a wrapper module (a user's own class, not nn.Sequential)."""

    latent_dim = 8

    def __init__(self) -> None:
        super().__init__()
        self.net = Inner()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


def make_wrapped() -> nn.Module:
    torch.manual_seed(0)
    return Wrapped()


class Doubler(nn.Module):
    """Writes its result into its input and does not say so."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul_(2)


def make_sneaky() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3 * 2 * 2), Doubler(), nn.Unflatten(1, (3, 2, 2)), nn.Tanh())
    net.latent_dim = 4
    return net


def make_inplace() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3 * 2 * 2), nn.ReLU(inplace=True), nn.Unflatten(1, (3, 2, 2)), nn.Tanh())
    net.latent_dim = 4
    return net


class Broken(nn.Module):
    """Returns what it is told to: a wrong shape, NaN or infinity."""

    latent_dim = 4

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.fc = nn.Linear(4, 3 * 2 * 2)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.fc(z)
        if self.kind == "flat":
            return x
        x = x.view(-1, 3, 2, 2).clone()
        if self.kind in ("nan", "inf"):
            x[0, 0, 0, 0] = float(self.kind)
        return x


def make_flat() -> nn.Module:
    return Broken("flat")


def make_nan() -> nn.Module:
    return Broken("nan")


def make_inf() -> nn.Module:
    return Broken("inf")


def make_raises() -> nn.Module:
    raise RuntimeError("weights file missing")


def make_needs(path: str) -> nn.Module:
    return ToyGAN()
