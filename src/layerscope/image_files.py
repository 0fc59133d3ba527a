"""Image helpers: tile a batch into a grid, save it as PNG (nearest-neighbour upscaling for small images)."""

from __future__ import annotations

from pathlib import Path

import torch


def to_grid(images: torch.Tensor, nrow: int = 8, pad: int = 1, fill: float = 1.0) -> torch.Tensor:
    """Tile images (n, 3, H, W) in [0, 1] into one image (3, rows*(H+pad)+pad, nrow*(W+pad)+pad)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape (n, 3, H, W), got {tuple(images.shape)}")
    n, c, h, w = images.shape
    nrow = max(1, min(nrow, n))
    rows = (n + nrow - 1) // nrow
    out = torch.full((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), fill, dtype=torch.float32)
    for i in range(n):
        r, k = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + k * (w + pad)
        out[:, y : y + h, x : x + w] = images[i].float().clamp(0, 1)
    return out


def save_png(images: torch.Tensor, path: str | Path, nrow: int = 8, scale: int = 1) -> Path:
    """Save a batch (n, 3, H, W) or one image (3, H, W) in [0, 1] as a PNG grid, upscaled ``scale`` times."""
    from PIL import Image

    img = images if images.ndim == 3 else to_grid(images, nrow)
    arr = (img.permute(1, 2, 0).clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy()
    pil = Image.fromarray(arr)
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pil.save(path)
    return path
