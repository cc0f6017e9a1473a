"""Labelled image grids (PIL, default font) for edit results and attention maps."""

from __future__ import annotations

import re
from typing import Sequence

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

PAD = 2


def to_pil(image: Tensor) -> Image.Image:
    """uint8 [3,H,W] -> RGB PIL image."""
    return Image.fromarray(image.permute(1, 2, 0).cpu().numpy())


def slug(text: str, limit: int = 48) -> str:
    """A file-name-safe short form of a prompt."""
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:limit] or "edit"


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "..", font=font) > width:
        text = text[:-1]
    return text + ".."


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # scalable when Pillow has FreeType
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def labelled(image: Image.Image, label: str) -> Image.Image:
    """``image`` with ``label`` written on a white strip underneath (shortened to fit)."""
    size = max(10, min(20, image.width // 16))
    font = _font(size)
    strip = size + 6
    out = Image.new("RGB", (image.width, image.height + strip), "white")
    out.paste(image.convert("RGB"), (0, 0))
    draw = ImageDraw.Draw(out)
    draw.text((PAD, image.height + 2), _fit(draw, label, font, image.width - 2 * PAD), fill="black", font=font)
    return out


def enlarge(image: Image.Image, min_side: int) -> Image.Image:
    """Nearest-neighbour upscale by an integer factor so small (e.g. 64 px test) images stay readable in grids."""
    factor = max(1, -(-min_side // max(image.width, image.height)))
    return image if factor == 1 else image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def grid(tiles: Sequence[Image.Image], labels: Sequence[str] | None = None, columns: int | None = None) -> Image.Image:
    """Tiles (same size) in rows of ``columns`` (all in one row by default), each labelled if labels are given."""
    if labels is not None:
        tiles = [labelled(t, label) for t, label in zip(tiles, labels)]
    columns = max(1, min(columns or len(tiles), len(tiles)))
    rows = -(-len(tiles) // columns)
    w, h = tiles[0].size
    out = Image.new("RGB", (columns * w + (columns - 1) * PAD, rows * h + (rows - 1) * PAD), "white")
    for k, tile in enumerate(tiles):
        out.paste(tile, ((k % columns) * (w + PAD), (k // columns) * (h + PAD)))
    return out


def attention_tile(attention: Tensor, size: int) -> Image.Image:
    """A [h, w] map, divided by its maximum, as a grey ``size`` x ``size`` RGB image (bicubic, as the official view)."""
    peak = attention.max().clamp_min(torch.finfo(attention.dtype).tiny)
    gray = (255 * attention / peak).clamp(0, 255).to(torch.uint8).cpu().numpy()
    return Image.fromarray(gray).resize((size, size), Image.Resampling.BICUBIC).convert("RGB")
