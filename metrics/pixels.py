"""Pixel statistics of a generator's samples: the cheapest drift detector. A refined generator whose mean
brightness or contrast walks away from the start's (or the data's) is drifting, whatever a distance says."""

from typing import Dict

import torch


@torch.no_grad()
def pixel_statistics(generator, num: int = 2000, batch: int = 250, seed: int = 0) -> Dict[str, float]:
    """Mean and standard deviation of the pixels in [0, 1], and the mean per-image standard deviation (contrast),
    over `num` samples of `generator.sample(batch, torch.Generator)` (images in [-1, 1]) drawn with a fixed seed."""
    gen = torch.Generator(device=generator.device).manual_seed(seed)
    total, total_sq, contrast, count = 0.0, 0.0, 0.0, 0
    for start in range(0, num, batch):
        x, _ = generator.sample(min(batch, num - start), gen)
        x = (x.double().clamp(-1, 1) + 1) / 2
        total += float(x.sum())
        total_sq += float(x.square().sum())
        contrast += float(x.flatten(1).std(dim=1).sum())
        count += x[0].numel() * len(x)
    mean = total / count
    return dict(pixel_mean=mean, pixel_std=max(total_sq / count - mean ** 2, 0.0) ** 0.5, pixel_contrast=contrast / num)
