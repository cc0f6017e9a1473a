"""Drawing layouts: signed-distance shapes with one-pixel anti-aliasing on textured backgrounds.

:func:`render_layout` is a pure function of the layout, the resolution and the device (the same
layout looks the same at 64 or 512 px); :func:`render_scenes` samples and draws in one call.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from nulltext.data import check_resolution
from nulltext.scenes.layouts import (
    CENTRE_TABLE,
    COLOUR_TABLE,
    MAX_OBJECTS,
    SIZE_RADII,
    SIZES,
    TONE_TABLE,
    Scene,
    SceneLayout,
    sample_layout,
)

# Background pattern scales, fractions of the image side.
_STRIPE_PERIOD = 0.15
_CHECKER_CELL = 0.125
_RADII = torch.tensor([SIZE_RADII[s] for s in SIZES], dtype=torch.float64)

# --------------------------------------------------------------------------------------------
# Shapes as signed distance functions
# --------------------------------------------------------------------------------------------
# Unit coordinates: the object's centre at 0, its half-extent r at 1, y pointing down. Each
# function returns the signed distance in the same units (negative inside), exact (or, for
# the cross, exact outside), so distance * r * resolution is in pixels.

_SQRT3 = math.sqrt(3.0)


def _sd_box(x: torch.Tensor, y: torch.Tensor, hx: float, hy: float) -> torch.Tensor:
    qx = x.abs() - hx
    qy = y.abs() - hy
    outside = torch.hypot(qx.clamp(min=0), qy.clamp(min=0))
    return outside + torch.maximum(qx, qy).clamp(max=0)


def _sd_circle(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.hypot(x, y) - 0.95


def _sd_square(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return _sd_box(x, y, 0.85, 0.85)


def _sd_triangle(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # Equilateral, side 2, pointing up, bounding box centred at 0 (Inigo Quilez's formula, in
    # y-up coordinates whose origin is the centroid, which lies 1/(2 sqrt 3) below the centre).
    px = x.abs() - 1.0
    py = -y + 1.0 / (2 * _SQRT3) + 1.0 / _SQRT3
    fold = px + _SQRT3 * py > 0
    qx = torch.where(fold, (px - _SQRT3 * py) / 2, px)
    qy = torch.where(fold, (-_SQRT3 * px - py) / 2, py)
    qx = qx - qx.clamp(-2.0, 0.0)
    return -torch.hypot(qx, qy) * torch.sign(qy)


def _sd_diamond(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    a, b = 0.8, 1.0  # half-diagonals: width 1.6, height 2 (a tall rhombus)
    qx, qy = x.abs(), y.abs()
    h = (((a - 2 * qx) * a - (b - 2 * qy) * b) / (a * a + b * b)).clamp(-1.0, 1.0)
    d = torch.hypot(qx - 0.5 * a * (1 - h), qy - 0.5 * b * (1 + h))
    return d * torch.sign(qx * b + qy * a - a * b)


def _sd_cross(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.minimum(_sd_box(x, y, 1.0, 0.3), _sd_box(x, y, 0.3, 1.0))


def _sd_ring(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (torch.hypot(x, y) - 0.75).abs() - 0.22


_SDFS = (_sd_circle, _sd_square, _sd_triangle, _sd_diamond, _sd_cross, _sd_ring)  # SHAPES order


def coverage(
    shape: torch.Tensor,
    cx: torch.Tensor,
    cy: torch.Tensor,
    radius: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    resolution: int,
) -> torch.Tensor:
    """Anti-aliased coverage in [0, 1], ``[N, H, W]``, of N shapes (``shape``, centre ``cx,
    cy`` and half-extent ``radius``, all ``[N]``, fractions of the image side) sampled at the
    points ``x, y`` (``[1 or N, H, W]``, fractions). Coverage is ``clamp(0.5 - d, 0, 1)`` with
    ``d`` the signed distance in pixels: a one-pixel box filter across the edge."""
    n = shape.shape[0]
    out = torch.zeros((n, *x.shape[1:]), dtype=x.dtype, device=x.device)
    for s, sdf in enumerate(_SDFS):
        sel = (shape == s).nonzero().squeeze(1)
        if sel.numel() == 0:
            continue
        xs = x if x.shape[0] == 1 else x[sel]
        ys = y if y.shape[0] == 1 else y[sel]
        r = radius[sel, None, None]
        d = sdf((xs - cx[sel, None, None]) / r, (ys - cy[sel, None, None]) / r)
        out[sel] = (0.5 - d * (r * resolution)).clamp(0.0, 1.0)
    return out


def _pixel_grid(resolution: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates as fractions, ``x`` and ``y`` each ``[1, R, R]``."""
    t = (torch.arange(resolution, device=device, dtype=torch.float32) + 0.5) / resolution
    return t[None, None, :].expand(1, resolution, resolution), t[None, :, None].expand(
        1, resolution, resolution
    )


def _edge(distance_px: torch.Tensor) -> torch.Tensor:
    return (distance_px + 0.5).clamp(0.0, 1.0)


def _background(layout: SceneLayout, resolution: int, device: torch.device) -> torch.Tensor:
    """float ``[n, 3, R, R]`` in [0, 255]: a per-pixel mix ``t`` of each colour's two tones."""
    res = resolution
    x, y = _pixel_grid(res, device)  # [1, R, R]
    kind = layout.kind.to(device)[:, None, None]
    # gradient along a random direction, spanning the whole image
    angle = layout.angle.to(device=device, dtype=torch.float32)
    dx, dy = angle.cos()[:, None, None], angle.sin()[:, None, None]
    extent = 0.5 * (dx.abs() + dy.abs())
    t_grad = (0.5 + 0.5 * ((x - 0.5) * dx + (y - 0.5) * dy) / extent).clamp(0.0, 1.0)
    # stripes: a square wave along x, y or a diagonal, anti-aliased
    phase = layout.phase.to(device=device, dtype=torch.float32)
    orient = layout.orientation.to(device)[:, None, None]
    diag = (x + y) / math.sqrt(2.0)
    anti = (x - y) / math.sqrt(2.0)
    coord = torch.where(
        orient == 0, x, torch.where(orient == 1, y, torch.where(orient == 2, diag, anti))
    )
    u = torch.frac(coord / _STRIPE_PERIOD + phase[:, 0, None, None])
    t_stripes = _edge(((u - 0.5).abs() - 0.25) * _STRIPE_PERIOD * res)
    # checker: XOR of two square waves
    period = 2 * _CHECKER_CELL
    px, py = phase[:, 0, None, None], phase[:, 1, None, None]
    ax = _edge(((torch.frac(x / period + px) - 0.5).abs() - 0.25) * period * res)
    ay = _edge(((torch.frac(y / period + py) - 0.5).abs() - 0.25) * period * res)
    t_checker = ax * (1 - ay) + (1 - ax) * ay
    # smooth value noise
    grid = layout.noise.to(device)[:, None]
    t_noise = F.interpolate(grid, size=(res, res), mode="bicubic", align_corners=False)[:, 0]
    t_noise = ((t_noise - 0.5) * 1.6 + 0.5).clamp(0.0, 1.0)

    zero = torch.zeros((), device=device)
    t = torch.where(kind == 0, zero, t_grad)
    t = torch.where(kind == 2, t_stripes, t)
    t = torch.where(kind == 3, t_checker, t)
    t = torch.where(kind == 4, t_noise, t)
    t = torch.where(layout.swap.to(device)[:, None, None], 1 - t, t)

    tones = TONE_TABLE.to(device)[layout.background.to(device)]  # [n, 2, 3]
    a, b = tones[:, 0, :, None, None], tones[:, 1, :, None, None]
    return a + (b - a) * t[:, None]


def object_coverage(
    layout: SceneLayout, resolution: int = 64, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Each object's anti-aliased coverage, float ``[n, MAX_OBJECTS, R, R]`` in [0, 1] on
    ``device`` (0 for unused slots): what :func:`render_layout` blends the object colours with,
    and the exact masks of grounding losses."""
    resolution = check_resolution(resolution)
    device = torch.device(device)
    out = torch.zeros((len(layout), MAX_OBJECTS, resolution, resolution), device=device)
    x, y = _pixel_grid(resolution, device)
    valid = layout.valid
    centres = CENTRE_TABLE[layout.position] + layout.offset  # [n, 3, 2] float64
    radius = _RADII[layout.size]  # [n, 3]
    for j in range(MAX_OBJECTS):
        rows = valid[:, j].nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        out[rows.to(device), j] = coverage(
            layout.shape[rows, j].to(device),
            centres[rows, j, 0].to(device=device, dtype=torch.float32),
            centres[rows, j, 1].to(device=device, dtype=torch.float32),
            radius[rows, j].to(device=device, dtype=torch.float32),
            x,
            y,
            resolution,
        )
    return out


def render_layout(
    layout: SceneLayout, resolution: int = 64, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Draw a layout: uint8 ``[n, 3, R, R]`` on ``device``. Deterministic (no random draws)."""
    resolution = check_resolution(resolution)
    device = torch.device(device)
    n = len(layout)
    image = _background(layout, resolution, device)
    if n == 0:
        return image.round().to(torch.uint8)
    alphas = object_coverage(layout, resolution, device)
    colours = COLOUR_TABLE.to(device)
    for j in range(MAX_OBJECTS):
        rows = layout.valid[:, j].nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        rows_d = rows.to(device)
        alpha = alphas[rows_d, j][:, None]  # [k, 1, R, R]
        colour = colours[layout.colour[rows, j].to(device)][:, :, None, None]
        image[rows_d] = image[rows_d] * (1 - alpha) + colour * alpha
    return image.round_().clamp_(0, 255).to(torch.uint8)


class RenderedScenes(NamedTuple):
    images: torch.Tensor  # uint8 [n, 3, R, R] on the requested device
    captions: list[str]
    scenes: list[Scene]


def render_scenes(
    n: int,
    seed: int,
    resolution: int = 64,
    split: str = "train",
    device: str | torch.device = "cpu",
) -> RenderedScenes:
    """Sample (:func:`sample_layout`) and draw (:func:`render_layout`) ``n`` scenes.

    Returns ``(images, captions, scenes)``: uint8 ``[n, 3, R, R]`` on ``device``, ``n``
    captions, ``n`` :class:`Scene` records. Deterministic for a seed, whatever the device."""
    layout = sample_layout(n, seed, split)
    images = render_layout(layout, resolution, device)
    return RenderedScenes(images, layout.captions(), layout.scenes())
