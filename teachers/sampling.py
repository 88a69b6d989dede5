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

from torch_utils.images import to_uint8_nhwc

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
# The generalised sampler of EDM's ablations (other discretisations, schedules, scalings and Heun's alpha).


def _vp_functions(beta_d, beta_min):
    """sigma(t), sigma'(t) and sigma^-1 of the variance-preserving SDE with a linear beta(t)."""
    def sigma(t):
        t = torch.as_tensor(t, dtype=torch.float64)
        return ((0.5 * beta_d * (t ** 2) + beta_min * t).exp() - 1).sqrt()

    def sigma_deriv(t):
        t = torch.as_tensor(t, dtype=torch.float64)
        return 0.5 * (beta_min + beta_d * t) * (sigma(t) + 1 / sigma(t))

    def sigma_inv(sig):
        sig = torch.as_tensor(sig, dtype=torch.float64)
        return ((beta_min ** 2 + 2 * beta_d * (sig ** 2 + 1).log()).sqrt() - beta_min) / beta_d
    return sigma, sigma_deriv, sigma_inv


def iddpm_sigmas(M=1000, C_1=0.001, C_2=0.008) -> torch.Tensor:
    """The M+1 noise levels of improved DDPM's cosine schedule, float64 (ratios of alpha-bar in float32, as upstream)."""
    def alpha_bar(j):
        return (0.5 * np.pi * torch.as_tensor(j) / M / (C_2 + 1)).sin() ** 2
    u = torch.zeros(M + 1, dtype=torch.float64)
    for j in range(M, 0, -1):
        u[j - 1] = ((u[j] ** 2 + 1) / (alpha_bar(j - 1) / alpha_bar(j)).clip(min=C_1) - 1).sqrt()
    return u


def ablation_sampler(net, latents: torch.Tensor, class_labels: Optional[torch.Tensor] = None, randn_like=torch.randn_like,
                     num_steps: int = 18, sigma_min: Optional[float] = None, sigma_max: Optional[float] = None,
                     rho: float = 7, solver: str = 'heun', discretization: str = 'edm', schedule: str = 'linear',
                     scaling: str = 'none', epsilon_s: float = 1e-3, C_1: float = 0.001, C_2: float = 0.008,
                     M: int = 1000, alpha: float = 1, S_churn: float = 0, S_min: float = 0, S_max: float = float('inf'),
                     S_noise: float = 1) -> torch.Tensor:
    """EDM's generalised sampler: the time steps of VP / VE / iDDPM / EDM, the sigma(t) schedule and scaling s(t)
    of VP / VE / plain, and a Heun step evaluated at t + alpha*h. Returns float64 samples.

    With the defaults (edm, linear, none, alpha=1) it is the same method as `edm_sampler`.
    """
    if solver not in ('euler', 'heun') or discretization not in ('vp', 've', 'iddpm', 'edm') \
            or schedule not in ('vp', 've', 'linear') or scaling not in ('vp', 'none'):
        raise ValueError(f'unknown sampler setting: solver={solver!r}, discretization={discretization!r}, '
                         f'schedule={schedule!r}, scaling={scaling!r}')
    if num_steps < 2:
        raise ValueError(f'the ablation sampler needs at least 2 steps, got {num_steps}')
    device = latents.device
    vp_default = _vp_functions(19.9, 0.1)[0]
    if sigma_min is None:
        sigma_min = {'vp': float(vp_default(epsilon_s)), 've': 0.02, 'iddpm': 0.002, 'edm': 0.002}[discretization]
    if sigma_max is None:
        sigma_max = {'vp': float(vp_default(1)), 've': 100, 'iddpm': 81, 'edm': 80}[discretization]
    sigma_min = max(sigma_min, net.sigma_min)
    sigma_max = min(sigma_max, net.sigma_max)

    # VP betas refitted so that the VP curve spans [sigma_min, sigma_max] over t in [epsilon_s, 1].
    vp_beta_d = 2 * (np.log(sigma_min ** 2 + 1) / epsilon_s - np.log(sigma_max ** 2 + 1)) / (epsilon_s - 1)
    vp_beta_min = np.log(sigma_max ** 2 + 1) - 0.5 * vp_beta_d
    vp_sigma, vp_sigma_deriv, vp_sigma_inv = _vp_functions(vp_beta_d, vp_beta_min)

    step_indices = torch.arange(num_steps, dtype=torch.float64, device=device)
    frac = step_indices / (num_steps - 1)
    if discretization == 'vp':
        sigma_steps = vp_sigma(1 + frac * (epsilon_s - 1))
    elif discretization == 've':
        sigma_steps = (sigma_max ** 2 * ((sigma_min ** 2 / sigma_max ** 2) ** frac)).sqrt()
    elif discretization == 'iddpm':
        u = iddpm_sigmas(M, C_1, C_2).to(device)
        u = u[(u >= sigma_min) & (u <= sigma_max)]
        sigma_steps = u[((len(u) - 1) * frac).round().to(torch.int64)]
    else:
        sigma_steps = (sigma_max ** (1 / rho) + frac * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho

    if schedule == 'vp':
        sigma, sigma_deriv, sigma_inv = vp_sigma, vp_sigma_deriv, vp_sigma_inv
    elif schedule == 've':
        sigma, sigma_deriv, sigma_inv = (lambda t: t.sqrt()), (lambda t: 0.5 / t.sqrt()), (lambda sig: sig ** 2)
    else:
        sigma, sigma_deriv, sigma_inv = (lambda t: t), (lambda t: 1), (lambda sig: sig)
    if scaling == 'vp':
        def s(t):
            return 1 / (1 + sigma(t) ** 2).sqrt()

        def s_deriv(t):
            return -sigma(t) * sigma_deriv(t) * (s(t) ** 3)
    else:
        def s(t):
            return 1

        def s_deriv(t):
            return 0

    def round_to_t(sig):
        return sigma_inv(torch.as_tensor(net.round_sigma(sig), dtype=torch.float64, device=device))

    def derivative(x, t):
        """dx/dt of the ODE in this schedule and scaling."""
        denoised = _denoise(net, x / s(t), torch.as_tensor(sigma(t), dtype=torch.float64), class_labels)
        return (sigma_deriv(t) / sigma(t) + s_deriv(t) / s(t)) * x - sigma_deriv(t) * s(t) / sigma(t) * denoised

    t_steps = torch.cat([round_to_t(sigma_steps), torch.zeros_like(sigma_steps[:1])])
    x_next = latents.to(torch.float64) * (sigma(t_steps[0]) * s(t_steps[0]))
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= sigma(t_cur) <= S_max else 0
        t_hat = round_to_t(sigma(t_cur) + gamma * sigma(t_cur))
        noise_std = (sigma(t_hat) ** 2 - sigma(t_cur) ** 2).clip(min=0).sqrt() * s(t_hat) * S_noise
        x_hat = s(t_hat) / s(t_cur) * x_cur + noise_std * randn_like(x_cur)

        h = t_next - t_hat
        d_cur = derivative(x_hat, t_hat)
        if solver == 'euler' or i == num_steps - 1:
            x_next = x_hat + h * d_cur
        else:
            t_prime = t_hat + alpha * h
            d_prime = derivative(x_hat + alpha * h * d_cur, t_prime)
            x_next = x_hat + h * ((1 - 1 / (2 * alpha)) * d_cur + 1 / (2 * alpha) * d_prime)
    return x_next

# ----------------------------------------------------------------------------------------------------------------
# Images from seeds.


def _sample_shape(net) -> List[int]:
    """Shape of one sample: `net.data_shape` when the teacher has one (e.g. flat toy mixtures), else [C, R, R]."""
    shape = getattr(net, 'data_shape', None)
    return list(shape) if shape is not None else [net.img_channels, net.img_resolution, net.img_resolution]


def split_seeds(seeds: Sequence[int], max_batch_size: int, rank: int = 0, world_size: int = 1) -> List[List[int]]:
    """This rank's batches of seeds (EDM's split: ceil(n / (batch * world)) * world batches, dealt round-robin)."""
    num_batches = max((len(seeds) - 1) // (max_batch_size * world_size) + 1, 1) * world_size
    all_batches = torch.as_tensor(list(seeds), dtype=torch.int64).tensor_split(num_batches)
    return [batch.tolist() for batch in all_batches[rank::world_size]]


#: Options that select `ablation_sampler` instead of `edm_sampler` (as in EDM's generate.py).
ABLATION_OPTIONS = frozenset(['discretization', 'schedule', 'scaling', 'epsilon_s', 'C_1', 'C_2', 'M', 'alpha'])


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
    sampler = ablation_sampler if ABLATION_OPTIONS.intersection(sampler_kwargs) else edm_sampler
    images = sampler(net, latents, class_labels, randn_like=rnd.randn_like, **sampler_kwargs)
    return images, class_labels


@torch.no_grad()
def generate_images(net, seeds: Sequence[int], class_idx: Optional[int] = None, max_batch_size: int = 64,
                    device=torch.device('cpu'), rank: int = 0, world_size: int = 1,
                    **sampler_kwargs) -> Iterator[Tuple[List[int], np.ndarray]]:
    """Yield (batch_seeds, uint8 NHWC numpy images) for this rank's share of `seeds`.

    `sampler_kwargs` go to `edm_sampler` (num_steps, sigma_min, sigma_max, rho, S_churn, S_min, S_max, S_noise,
    solver), or to `ablation_sampler` when any of ABLATION_OPTIONS (discretization, schedule, scaling, ...) is
    given. The image for a seed does not depend on max_batch_size, rank or world_size.
    """
    for batch_seeds in split_seeds(seeds, max_batch_size, rank, world_size):
        if batch_seeds:
            images, _ = sample_seeds(net, batch_seeds, class_idx=class_idx, device=device, **sampler_kwargs)
            yield batch_seeds, to_uint8_nhwc(images)
