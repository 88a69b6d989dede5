"""Images out of the toolkit: the one float -> uint8 conversion, grids, and PNG files.

Every script and trainer writes pictures through these, so a seed's image, a grid tile and what a metric sees
are converted identically: `x * 127.5 + 128`, clamped to [0, 255], truncated (upstream StyleGAN2-ADA and EDM).
"""

import math
from typing import Optional

import numpy as np
import PIL.Image
import torch


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float NCHW -> uint8 NCHW on the same device."""
    return (images.detach().to(torch.float32) * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def to_uint8_nhwc(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] float NCHW -> uint8 NHWC numpy, ready for PNG files."""
    return to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()


def image_grid(images: np.ndarray, grid_w: int) -> np.ndarray:
    """Tile uint8 NHWC images into one HWC image, `grid_w` per row (missing tiles stay black)."""
    n, h, w, c = images.shape
    grid_h = (n - 1) // grid_w + 1
    canvas = np.zeros([grid_h * h, grid_w * w, c], dtype=np.uint8)
    for i in range(n):
        row, col = divmod(i, grid_w)
        canvas[row * h:(row + 1) * h, col * w:(col + 1) * w] = images[i]
    return canvas


def save_png(image: np.ndarray, path: str) -> None:
    """Save one uint8 HWC image with 1 or 3 channels."""
    PIL.Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image, 'L' if image.shape[2] == 1 else 'RGB').save(path)


def save_image_grid(images: torch.Tensor, path: str, grid_w: Optional[int] = None) -> None:
    """A PNG grid of [-1, 1] float NCHW images (1 or 3 channels), square unless `grid_w` is given."""
    grid_w = grid_w or math.ceil(math.sqrt(images.shape[0]))
    save_png(image_grid(to_uint8_nhwc(images), grid_w), path)
