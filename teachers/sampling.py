"""Sampling a teacher: EDM's Heun sampler (deterministic or stochastic with S_churn), Euler, and per-seed RNG.

`edm_sampler` integrates the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma from sigma_max to 0 on
the EDM time steps sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, in float64.
`generate_images` is what `generate.py` calls: one independent random stream per seed (as EDM's generate.py),
so an image depends only on its seed, never on the batching.
"""

import math
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

# ----------------------------------------------------------------------------------------------------------------


class StackedRandomGenerator:
    """One torch.Generator per seed; draws stack one sample per generator along the batch dimension."""

    def __init__(self, device, seeds: Sequence[int]):
        self.generators = [torch.Generator(device).manual_seed(int(seed) % (1 << 32)) for seed in seeds]

    def randn(self, size, **kwargs) -> torch.Tensor:
        assert size[0] == len(self.generators)
        return torch.stack([torch.randn(size[1:], generator=gen, **kwargs) for gen in self.generators])

    def randn_like(self, input: torch.Tensor) -> torch.Tensor:
        return self.randn(input.shape, dtype=input.dtype, layout=input.layout, device=input.device)

    def randint(self, *args, size, **kwargs) -> torch.Tensor:
        assert size[0] == len(self.generators)
        return torch.stack([torch.randint(*args, size=size[1:], generator=gen, **kwargs) for gen in self.generators])


def edm_time_steps(net, num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80, rho: float = 7,
                   device=None) -> torch.Tensor:
    """The N noise levels of the EDM discretisation (clipped to the net's range, rounded by it), then 0; float64."""
    sigma_min = max(sigma_min, net.sigma_min)
    sigma_max = min(sigma_max, net.sigma_max)
    if num_steps < 1:
        raise ValueError(f'num_steps must be at least 1, got {num_steps}')
    step_indices = torch.arange(num_steps, dtype=torch.float64, device=device)
    frac = step_indices / (num_steps - 1) if num_steps > 1 else step_indices  # One step: from sigma_max straight to 0.
    t_steps = (sigma_max ** (1 / rho) + frac * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([torch.as_tensor(net.round_sigma(t_steps), dtype=torch.float64, device=device),
                      torch.zeros_like(t_steps[:1])])


def _denoise(net, x: torch.Tensor, sigma: torch.Tensor, class_labels) -> torch.Tensor:
    """D(x; sigma) in float64, calling the net with float32 inputs as the Teacher interface specifies."""
    return net(x.to(torch.float32), sigma.to(torch.float32), class_labels).to(torch.float64)


def edm_sampler(net, latents: torch.Tensor, class_labels: Optional[torch.Tensor] = None, randn_like=torch.randn_like,
                num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80, rho: float = 7,
                S_churn: float = 0, S_min: float = 0, S_max: float = float('inf'), S_noise: float = 1,
                solver: str = 'heun') -> torch.Tensor:
    """EDM Algorithm 2: Heun (2N-1 evaluations) or Euler (N), with optional churn; returns float64 samples.

    `latents` are unit Gaussian noise shaped like the data. `randn_like` supplies the churn noise, drawn at every
    step (also when the churn is zero) so that the random streams match EDM's generate.py.
    """
    if solver not in ('heun', 'euler'):
        raise ValueError(f'solver must be "heun" or "euler", got {solver!r}')
    t_steps = edm_time_steps(net, num_steps, sigma_min, sigma_max, rho, device=latents.device)

    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        # Churn: raise the noise level from t_cur to t_hat by adding fresh noise.
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        t_hat = torch.as_tensor(net.round_sigma(t_cur + gamma * t_cur), dtype=torch.float64, device=latents.device)
        x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)

        d_cur = (x_hat - _denoise(net, x_hat, t_hat, class_labels)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if solver == 'heun' and i < num_steps - 1:  # The last step, to sigma = 0, stays Euler.
            d_prime = (x_next - _denoise(net, x_next, t_next, class_labels)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next

# ----------------------------------------------------------------------------------------------------------------
# Images from seeds.


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] NCHW -> uint8 NHWC on the CPU, EDM's conversion (scale, clip, truncate)."""
    return (images * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


def _sample_shape(net) -> List[int]:
    """Shape of one sample: `net.data_shape` when the teacher has one (e.g. flat toy mixtures), else [C, R, R]."""
    shape = getattr(net, 'data_shape', None)
    return list(shape) if shape is not None else [net.img_channels, net.img_resolution, net.img_resolution]


def split_seeds(seeds: Sequence[int], max_batch_size: int, rank: int = 0, world_size: int = 1) -> List[List[int]]:
    """This rank's batches of seeds (EDM's split: ceil(n / (batch * world)) * world batches, dealt round-robin)."""
    num_batches = max((len(seeds) - 1) // (max_batch_size * world_size) + 1, 1) * world_size
    all_batches = torch.as_tensor(list(seeds), dtype=torch.int64).tensor_split(num_batches)
    return [batch.tolist() for batch in all_batches[rank::world_size]]


def sample_seeds(net, seeds: Sequence[int], class_idx: Optional[int] = None, device=torch.device('cpu'),
                 **sampler_kwargs) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Samples for one batch of seeds (float64, the teacher's space) and their one-hot labels (or None).

    Per seed: latents, then a random class (conditional teachers), then the sampler's noise, all from that seed's
    generator. `class_idx` overrides the class after the random draw, so the stream is the same either way.
    """
    label_dim = int(getattr(net, 'label_dim', 0) or 0)
    if class_idx is not None and not (label_dim and 0 <= class_idx < label_dim):
        raise ValueError(f'class {class_idx} is out of range for a teacher with label_dim={label_dim}')
    rnd = StackedRandomGenerator(device, seeds)
    latents = rnd.randn([len(seeds)] + _sample_shape(net), device=device)
    class_labels = None
    if label_dim:
        class_labels = torch.eye(label_dim, device=device)[rnd.randint(label_dim, size=[len(seeds)], device=device)]
        if class_idx is not None:
            class_labels[:, :] = 0
            class_labels[:, class_idx] = 1
    images = edm_sampler(net, latents, class_labels, randn_like=rnd.randn_like, **sampler_kwargs)
    return images, class_labels


@torch.no_grad()
def generate_images(net, seeds: Sequence[int], class_idx: Optional[int] = None, max_batch_size: int = 64,
                    device=torch.device('cpu'), rank: int = 0, world_size: int = 1,
                    **sampler_kwargs) -> Iterator[Tuple[List[int], torch.Tensor]]:
    """Yield (batch_seeds, uint8 NHWC images on the CPU) for this rank's share of `seeds`.

    `sampler_kwargs` go to `edm_sampler` (num_steps, sigma_min, sigma_max, rho, S_churn, S_min, S_max, S_noise,
    solver). The image for a seed does not depend on max_batch_size, rank or world_size.
    """
    for batch_seeds in split_seeds(seeds, max_batch_size, rank, world_size):
        if batch_seeds:
            images, _ = sample_seeds(net, batch_seeds, class_idx=class_idx, device=device, **sampler_kwargs)
            yield batch_seeds, to_uint8(images)


def image_grid(images: np.ndarray, grid_w: int) -> np.ndarray:
    """Tile uint8 NHWC images into one HWC grid image, `grid_w` per row (missing tiles stay black)."""
    n, h, w, c = images.shape
    grid_h = (n - 1) // grid_w + 1
    canvas = np.zeros([grid_h * h, grid_w * w, c], dtype=np.uint8)
    for i in range(n):
        row, col = divmod(i, grid_w)
        canvas[row * h:(row + 1) * h, col * w:(col + 1) * w] = images[i]
    return canvas
