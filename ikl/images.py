"""PNG previews of generator samples: image grids for NCHW data, scatter plots for 2-D points (PIL only)."""

from typing import Optional, Sequence

import PIL.Image
import PIL.ImageDraw
import torch

from torch_utils.images import save_image_grid


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
