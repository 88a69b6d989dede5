"""PNG previews of generator samples: image grids for NCHW data, scatter plots for 2-D points (PIL only)."""

import math
from typing import Optional, Sequence, Tuple

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch


def save_image_grid(images: torch.Tensor, path: str, drange: Tuple[float, float] = (-1, 1),
                    grid_size: Optional[Tuple[int, int]] = None) -> None:
    """Tile `[N, C, H, W]` images (C = 1 or 3) into one PNG, mapping `drange` to [0, 255]."""
    n, c, h, w = images.shape
    gw, gh = grid_size if grid_size is not None else (math.ceil(math.sqrt(n)), math.ceil(n / math.ceil(math.sqrt(n))))
    lo, hi = drange
    img = ((images.detach().float().cpu().numpy() - lo) * (255 / (hi - lo))).round().clip(0, 255).astype(np.uint8)
    canvas = np.zeros([gh * h, gw * w, c], dtype=np.uint8)
    for i in range(min(n, gw * gh)):
        y, x = divmod(i, gw)
        canvas[y * h:(y + 1) * h, x * w:(x + 1) * w] = img[i].transpose(1, 2, 0)
    PIL.Image.fromarray(canvas[:, :, 0] if c == 1 else canvas, 'L' if c == 1 else 'RGB').save(path)


def save_scatter(points: torch.Tensor, path: str, extent: float = 5.0, size: int = 512,
                 centres: Optional[Sequence[Sequence[float]]] = None) -> None:
    """Plot `[N, 2]` points on a square [-extent, extent]^2 canvas; optional reference centres as red crosses."""
    img = PIL.Image.new('RGB', (size, size), 'white')
    draw = PIL.ImageDraw.Draw(img)
    to_px = lambda v: (float(v) + extent) / (2 * extent) * (size - 1)
    for x, y in points.detach().float().cpu().tolist():
        px, py = to_px(x), size - 1 - to_px(y)
        draw.ellipse([px - 1, py - 1, px + 1, py + 1], fill=(30, 80, 200))
    for x, y in (centres or []):
        px, py = to_px(x), size - 1 - to_px(y)
        draw.line([px - 5, py, px + 5, py], fill=(220, 0, 0), width=2)
        draw.line([px, py - 5, px, py + 5], fill=(220, 0, 0), width=2)
    img.save(path)


def save_preview(samples: torch.Tensor, path: str) -> bool:
    """A grid for NCHW samples, a scatter plot for 2-D points; returns False for shapes it cannot show."""
    if samples.ndim == 4 and samples.shape[1] in (1, 3):
        save_image_grid(samples, path)
        return True
    if samples.ndim == 2 and samples.shape[1] == 2:
        save_scatter(samples, path, extent=max(1.0, float(samples.abs().max()) * 1.1))
        return True
    return False
