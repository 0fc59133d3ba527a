"""The procedural Shapes renderer: a floor, a two-faced back wall meeting in a corner, one shaded solid.

Everything is computed per pixel on whole batches with torch (analytic anti-aliasing from signed distances), so
it is deterministic, works at any resolution and renders thousands of 32x32 images per second on one core.

Geometry (image coordinates in [0, 1], y down), with ``t = orientation / 30`` in [-1, 1]:

- the camera turns around the scene: the wall corner sits at ``x = 0.5 - 0.3 t``; the floor/wall boundary rises
  towards it (``y = 0.45 + 0.25 |x - corner|``); the left wall face is lit ``0.78 + 0.17 t``, the right face
  ``0.78 - 0.17 t``; the light on the object turns with the camera;
- the object stands at the centre, base at ``y = 0.86``, height ``0.46 * scale``: a cube (lit top, two faces split
  by the orientation), a cylinder (elliptic caps), a sphere, a capsule (a stadium), each with Lambert shading, and
  a soft contact shadow on the floor;
- colours are HSV: hue from the factor, saturation 0.75 (floor, wall) and 0.9 (object), value from the shading.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .factors import FACTORS, VALUES, check_factors

_VALUE_T = {name: torch.tensor(VALUES[name], dtype=torch.float32) for name in FACTORS}
BASE_Y = 0.86
HEIGHT = 0.46
CHUNK = 4096


def hsv_rgb(hue: torch.Tensor, sat: float) -> torch.Tensor:
    """RGB (n, 3) of hues (n,) at value 1 (scale by a value to shade: HSV is linear in V)."""
    n = torch.tensor([5.0, 3.0, 1.0], dtype=hue.dtype, device=hue.device)
    k = (n[None] + hue[:, None] * 6.0) % 6.0
    return 1.0 - sat * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)


def _coverage(sdf: torch.Tensor, res: float) -> torch.Tensor:
    # signed distance in image units -> pixel coverage (a one-pixel linear ramp)
    return torch.clamp(0.5 - sdf * res, 0.0, 1.0)


def render(
    factors: np.ndarray | torch.Tensor | Sequence[Sequence[int]],
    size: int | tuple[int, int] = 32,
    *,
    device: str | torch.device = "cpu",
    uint8: bool = False,
) -> torch.Tensor:
    """Images (n, 3, H, W) in [0, 1] (or uint8 with ``uint8=True``) of factor indices (n, 6) in :data:`FACTORS` order."""
    f = check_factors(factors)
    h, w = (size, size) if isinstance(size, int) else size
    if h < 8 or w < 8:
        raise ValueError(f"render size must be at least 8x8, got {h}x{w}")
    out = torch.empty((len(f), 3, h, w), dtype=torch.uint8 if uint8 else torch.float32, device=device)
    ft = torch.as_tensor(f, device=device)
    with torch.no_grad():
        for s in range(0, len(f), CHUNK):
            img = _render_chunk(ft[s : s + CHUNK], h, w, torch.device(device))
            out[s : s + CHUNK] = (img * 255.0 + 0.5).to(torch.uint8) if uint8 else img
    return out


def _render_chunk(f: torch.Tensor, h: int, w: int, device: torch.device) -> torch.Tensor:
    vals = {name: _VALUE_T[name].to(device)[f[:, i]] for i, name in enumerate(FACTORS)}
    n = len(f)
    res = float(min(h, w))
    u = ((torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w).view(1, 1, w)
    v = ((torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h).view(1, h, 1)
    t = (vals["orientation"] / 30.0).view(n, 1, 1)

    # -- room: floor below a boundary rising to the corner, two wall faces lit by the camera angle -------------
    corner = 0.5 - 0.3 * t
    dxc = u - corner  # (n, 1, w)
    boundary = 0.45 + 0.25 * dxc.abs()
    floor = _coverage(boundary - v, res)  # (n, h, w): 1 on the floor
    right = _coverage(-dxc, res)  # (n, 1, w): 1 on the right wall face
    wall_v = (0.78 + 0.17 * t) - (0.34 * t) * right  # (n, 1, w)
    floor_v = 0.55 + 0.45 * torch.clamp((v - 0.4) / 0.6, 0.0, 1.0)  # (1, h, 1)

    # -- object ----------------------------------------------------------------------------------------------------
    height = (HEIGHT * vals["scale"]).view(n, 1, 1)
    cy = BASE_Y - height / 2
    dx = u - 0.5  # (1, 1, w)
    dy = v - cy  # (n, h, 1)
    # light direction turns with the camera: from the upper left at t = 0
    lx = -0.45 + 0.3 * t
    lz = torch.sqrt(torch.clamp(0.75 - lx * lx, min=0.05))
    shape = f[:, 4]
    obj_cov = torch.zeros((n, h, w), device=device)
    obj_v = torch.zeros((n, h, w), device=device)
    for k in range(4):
        idx = torch.nonzero(shape == k).flatten()
        if len(idx) == 0:
            continue
        hk, dyk, lxk, lzk, tk = height[idx], dy[idx], lx[idx], lz[idx], t[idx]
        half = hk / 2
        if k == 0:  # cube: two faces split by the orientation, a lit top band
            sdf = torch.maximum(dx.abs() - half, dyk.abs() - half)
            split = -0.45 * half * tk
            face = torch.where(dx < split, 0.92 + 0.0 * tk, 0.62 + 0.0 * tk)
            shade = torch.where(dyk < -0.62 * half, torch.ones_like(face), face)
        elif k == 1:  # cylinder: a box with elliptic caps, lit top cap
            a = 0.38 * hk
            ry = 0.32 * a
            body = half - ry
            box = torch.maximum(dx.abs() - a, dyk.abs() - body)
            ex = (dx / a) ** 2
            bottom = (torch.sqrt(ex + ((dyk - body) / ry) ** 2) - 1.0) * ry
            top = (torch.sqrt(ex + ((dyk + body) / ry) ** 2) - 1.0) * ry
            sdf = torch.minimum(torch.minimum(box, bottom), top)
            nx = torch.clamp(dx / a, -1.0, 1.0)
            side = 0.4 + 0.6 * torch.clamp(lxk * nx + lzk * torch.sqrt(1.0 - nx * nx), 0.0, 1.0)
            shade = torch.where(top < 0, torch.ones_like(side), side)
        elif k == 2:  # sphere
            r = half
            d2 = dx * dx + dyk * dyk
            sdf = torch.sqrt(d2) - r
            nz = torch.sqrt(torch.clamp(1.0 - d2 / (r * r), 0.0, 1.0))
            shade = 0.3 + 0.7 * torch.clamp((lxk * dx - 0.5 * dyk) / r + lzk * nz, 0.0, 1.0)
        else:  # capsule: a stadium
            a = 0.3 * hk
            seg = half - a
            ey = torch.clamp(dyk.abs() - seg, min=0.0)
            sdf = torch.sqrt(dx * dx + ey * ey) - a
            nx = torch.clamp(dx / a, -1.0, 1.0)
            ny = torch.clamp(torch.where(dyk.abs() > seg, torch.sign(dyk) * ey / a, 0.0 * dyk), -1.0, 1.0)
            nz = torch.sqrt(torch.clamp(1.0 - nx * nx - ny * ny, 0.0, 1.0))
            shade = 0.35 + 0.65 * torch.clamp(lxk * nx - 0.5 * ny + lzk * nz, 0.0, 1.0)
        obj_cov[idx] = _coverage(sdf, res)
        obj_v[idx] = shade.expand(len(idx), h, w)

    # soft contact shadow around the object's base
    sh = torch.clamp(1.0 - (dx / (0.75 * height)) ** 2 - ((v - BASE_Y) / 0.06) ** 2, 0.0, 1.0)
    floor_v = floor_v * (1.0 - 0.45 * sh)

    floor_rgb = hsv_rgb(vals["floor_hue"], 0.75).view(n, 3, 1, 1)
    wall_rgb = hsv_rgb(vals["wall_hue"], 0.75).view(n, 3, 1, 1)
    obj_rgb = hsv_rgb(vals["object_hue"], 0.9).view(n, 3, 1, 1)
    oc = obj_cov.unsqueeze(1)
    room = floor_rgb * (floor_v * floor).unsqueeze(1) + wall_rgb * (wall_v * (1.0 - floor)).unsqueeze(1)
    return room * (1.0 - oc) + obj_rgb * (obj_v * obj_cov).unsqueeze(1)
