"""Image conversions between generators, datasets and detectors.

Every image source is first brought to the canonical form the upstream metrics use: uint8 NCHW with 1 or 3
channels, generator output mapped as `(x * 127.5 + 128).clamp(0, 255)`. Each detector then declares the input it
wants (`InputSpec`) and `adapt_images` converts the canonical images to exactly that.
"""

from dataclasses import dataclass
from typing import Optional

import torch

from torch_utils.images import to_uint8
import torch.nn.functional as F

# ITU-R BT.601 luma weights, as PIL's RGB -> L conversion uses.
_LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class InputSpec:
    """What a detector consumes.

    channels: 1 or 3 (grayscale is repeated to RGB; RGB is reduced to luma).
    resolution: square size it needs, or None if it resizes internally (the upstream TorchScript detectors do).
    value_range: 'uint8' (a uint8 tensor in 0..255) or 'pm1' (float32 in [-1, 1]).
    pad_from: a smaller size that is zero-padded (centred) rather than resized, e.g. Fashion-MNIST's 28 -> 32.
    """
    channels: int = 3
    resolution: Optional[int] = None
    value_range: str = 'uint8'
    pad_from: Optional[int] = None

    def __post_init__(self):
        if self.channels not in (1, 3):
            raise ValueError(f'InputSpec.channels must be 1 or 3, got {self.channels}')
        if self.value_range not in ('uint8', 'pm1'):
            raise ValueError(f"InputSpec.value_range must be 'uint8' or 'pm1', got {self.value_range!r}")


def generator_output_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] (NCHW) -> uint8, the rounding StyleGAN2-ADA and EDM both use."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f'metrics need image batches [N, 1 or 3, H, W], got shape {tuple(images.shape)}')
    return to_uint8(images)


def adapt_images(images: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """Canonical uint8 NCHW images -> the detector's declared input."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f'expected uint8 images [N, 1 or 3, H, W], got {images.dtype} {tuple(images.shape)}')
    x = images
    if x.shape[1] != spec.channels:
        if spec.channels == 3:
            x = x.repeat(1, 3, 1, 1)
        else:
            weights = torch.tensor(_LUMA, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
            x = (x.to(torch.float32) * weights).sum(dim=1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    size = x.shape[2]
    if x.shape[2] != x.shape[3]:
        raise ValueError(f'metrics need square images, got {x.shape[2]}x{x.shape[3]}')
    if spec.resolution is not None and size != spec.resolution:
        if spec.pad_from == size:
            pad = (spec.resolution - size) // 2
            x = F.pad(x, (pad, spec.resolution - size - pad) * 2)
        else:
            resized = F.interpolate(x.to(torch.float32), size=(spec.resolution, spec.resolution), mode='bilinear',
                                    align_corners=False, antialias=size > spec.resolution)
            x = resized.round().clamp(0, 255).to(torch.uint8)
    if spec.value_range == 'pm1':
        return x.to(torch.float32) / 127.5 - 1
    return x
