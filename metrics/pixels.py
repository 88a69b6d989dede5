"""Pixel statistics of a generator's samples: the cheapest drift detector. A refined generator whose mean
brightness or contrast walks away from the start's (or the data's) is drifting, whatever a distance says."""

from typing import Dict

import numpy as np
import torch

from . import formulas
from .images import generator_output_to_uint8
from training.dataset import ImageFolderDataset


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


def pooled_pixels(images_uint8: torch.Tensor, size: int = 8) -> np.ndarray:
    """NCHW uint8 images average-pooled to `size` x `size`, flattened, in [0, 1] (float64): the space of the pixel
    Frechet distance, coarse enough that 64 dimensions are estimated well from a few thousand samples."""
    return torch.nn.functional.adaptive_avg_pool2d(images_uint8.float() / 255, size).flatten(1).numpy().astype(np.float64)


def pixel_frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between two sets of pooled pixels ([N, D] each)."""
    return formulas.frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


@torch.no_grad()
def pixel_summary(generator, num: int, data_pixels: np.ndarray, batch: int = 250, seed: int = 0) -> Dict[str, float]:
    """Mean brightness in [0, 1], its spread over images (the standard deviation of per-image brightness: how much
    of the frame the objects fill varies; a generator that makes them more alike lowers it) and the pooled-pixel
    Frechet distance to `data_pixels` (`pooled_pixels` of real images) of `num` samples of `generator` drawn with a
    fixed seed, as 8-bit images like every metric sees them."""
    gen = torch.Generator(device=generator.device).manual_seed(seed)
    images = torch.cat([generator_output_to_uint8(generator.sample(min(batch, num - start), gen)[0]).cpu()
                        for start in range(0, num, batch)])
    per_image = images.double().flatten(1).mean(1) / 255
    return dict(brightness=float(per_image.mean()), brightness_spread=float(per_image.std(unbiased=False)),
                fd_pixels=pixel_frechet_distance(pooled_pixels(images), data_pixels))


def dataset_pixels(path: str, num: int = 10000, seed: int = 0) -> np.ndarray:
    """`pooled_pixels` of `num` images of the dataset at `path` picked at random with a fixed seed."""
    images, _ = ImageFolderDataset(path).load_all()
    return pooled_pixels(torch.from_numpy(images[np.random.default_rng(seed).permutation(len(images))[:num]]))
