"""The six generative factors of the Shapes world, on the value grids of DeepMind's Shapes3D.

A scene is six integer indices, one per factor, in Shapes3D's order; the 480,000 combinations are numbered in
mixed radix (floor hue slowest, orientation fastest), as the images of ``3dshapes.h5`` are.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

FACTORS: tuple[str, ...] = ("floor_hue", "wall_hue", "object_hue", "scale", "shape", "orientation")
SIZES: dict[str, int] = {"floor_hue": 10, "wall_hue": 10, "object_hue": 10, "scale": 8, "shape": 4, "orientation": 15}
SHAPES: tuple[str, ...] = ("cube", "cylinder", "sphere", "capsule")
#: the value each index stands for (hues in [0, 1), scale factor, shape index, orientation in degrees)
VALUES: dict[str, np.ndarray] = {
    "floor_hue": np.linspace(0.0, 0.9, 10),
    "wall_hue": np.linspace(0.0, 0.9, 10),
    "object_hue": np.linspace(0.0, 0.9, 10),
    "scale": np.linspace(0.75, 1.25, 8),
    "shape": np.arange(4, dtype=np.float64),
    "orientation": np.linspace(-30.0, 30.0, 15),
}
#: the factor groups of the injection experiment
GROUPS: dict[str, tuple[str, ...]] = {
    "structure": ("scale", "orientation"),
    "content": ("shape",),
    "surface": ("object_hue", "floor_hue", "wall_hue"),
}
N_COMBINATIONS = int(np.prod([SIZES[f] for f in FACTORS]))  # 480,000
_RADIX = np.array([int(np.prod([SIZES[g] for g in FACTORS[i + 1 :]])) for i in range(len(FACTORS))], dtype=np.int64)


def to_index(factors: np.ndarray | torch.Tensor | Sequence[Sequence[int]]) -> np.ndarray:
    """Combination numbers (n,) of factor indices (n, 6)."""
    f = check_factors(factors)
    return (f * _RADIX).sum(axis=1)


def from_index(index: np.ndarray | Sequence[int] | int) -> np.ndarray:
    """Factor indices (n, 6) of combination numbers."""
    idx = np.atleast_1d(np.asarray(index, dtype=np.int64))
    if idx.size and (idx.min() < 0 or idx.max() >= N_COMBINATIONS):
        raise ValueError(f"combination numbers must lie in [0, {N_COMBINATIONS}), got {idx.min()}..{idx.max()}")
    sizes = np.array([SIZES[f] for f in FACTORS])
    return (idx[:, None] // _RADIX[None, :]) % sizes[None, :]


def check_factors(factors: np.ndarray | torch.Tensor | Sequence[Sequence[int]]) -> np.ndarray:
    """Validate factor indices and return them as an int64 array (n, 6)."""
    if isinstance(factors, torch.Tensor):
        factors = factors.cpu().numpy()
    f = np.asarray(factors, dtype=np.int64)
    if f.ndim == 1:
        f = f[None]
    if f.ndim != 2 or f.shape[1] != len(FACTORS):
        raise ValueError(f"factors must have shape (n, {len(FACTORS)}) in the order {FACTORS}, got {f.shape}")
    sizes = np.array([SIZES[n] for n in FACTORS])
    bad = (f < 0) | (f >= sizes[None])
    if bad.any():
        col = int(np.nonzero(bad.any(axis=0))[0][0])
        raise ValueError(f"{FACTORS[col]} index out of range [0, {sizes[col]}): {f[bad.any(axis=1)][0].tolist()}")
    return f


def is_held_out(index: np.ndarray | Sequence[int]) -> np.ndarray:
    """The fixed held-out split: one combination in ten, chosen by a hash of its number (never trained on)."""
    idx = np.asarray(index, dtype=np.uint64)
    h = (idx * np.uint64(2654435761) + np.uint64(97)) % np.uint64(1000003)
    return (h % np.uint64(10)) == 0


def sample_factors(n: int, seed: int | np.random.Generator = 0, split: str = "all") -> np.ndarray:
    """``n`` factor combinations drawn uniformly from ``split`` ('all', 'train' or 'test', the held-out tenth)."""
    if split not in ("all", "train", "test"):
        raise ValueError(f"split must be 'all', 'train' or 'test', got {split!r}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    out: list[np.ndarray] = []
    need = n
    while need > 0:
        idx = rng.integers(0, N_COMBINATIONS, size=max(need * (12 if split == "test" else 2), 16))
        if split != "all":
            held = is_held_out(idx)
            idx = idx[held] if split == "test" else idx[~held]
        out.append(idx[:need])
        need -= len(out[-1])
    return from_index(np.concatenate(out))
