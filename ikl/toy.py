"""Small networks on flat vectors: an MLP generator and an EDM-preconditioned MLP denoiser, the tiny networks the
engine's tests train on the CPU and the base of low-dimensional studies (`experiments/toy2d`).

The denoiser follows the Teacher interface (`D(x, sigma, class_labels=None) -> x0_hat` on `[N, D]` data), so it
can serve as a fake score, as a learned teacher, or (through `OneStepStudentAdapter`) as a one-step student.
"""

import math
from typing import Optional

import torch

from torch_utils import persistence

# ----------------------------------------------------------------------------------------------------------------


ACTIVATIONS = dict(silu=torch.nn.SiLU, relu=torch.nn.ReLU, tanh=torch.nn.Tanh)


def _mlp(in_dim: int, hidden: int, layers: int, out_dim: int, activation: str = 'silu') -> torch.nn.Sequential:
    if activation not in ACTIVATIONS:
        raise ValueError(f'activation: unknown {activation!r}, expected one of {sorted(ACTIVATIONS)}')
    mods, dim = [], in_dim
    for _ in range(layers):
        mods += [torch.nn.Linear(dim, hidden), ACTIVATIONS[activation]()]
        dim = hidden
    mods.append(torch.nn.Linear(dim, out_dim))
    return torch.nn.Sequential(*mods)


@persistence.persistent_class
class MLPGenerator(torch.nn.Module):
    """z [N, z_dim] -> x [N, out_dim]. A continuous map from a Gaussian latent to well-separated modes needs
    steep transitions between them, and every sample on a transition lands between modes. `input_gain` scales z
    so that steep transitions need smaller weights; ReLU layers make sharper ones than SiLU layers, and saturating
    tanh layers make flat plateaus joined by steep steps, the sharpest (experiments/toy2d/toy2d.py).

    With `output_noise`, z also holds `out_dim` noise values added to the output with a learned per-coordinate
    strength (initially `noise_init`), like StyleGAN2's noise inputs: x = MLP(z[:, :latent_dim]) + a * z[:, latent_dim:].
    The MLP could then map each latent cell to a point, which saturating layers do well, and leave the spread to
    the noise. By Stein's lemma the strength's gradient is the strength times the mean derivative, along its
    coordinate, of the update the samples receive: near zero it is mostly noise, and trained under IKL it stays
    there (experiments/toy2d/README.md); experiments/toy2d/toy2d.py holds it fixed instead (at 0.04 by default)."""

    def __init__(self, latent_dim: int = 2, out_dim: int = 2, hidden: int = 128, layers: int = 3, input_gain: float = 1.0,
                 activation: str = 'silu', output_noise: bool = False, noise_init: float = 0.01):
        super().__init__()
        self.latent_dim, self.out_dim, self.input_gain = latent_dim, out_dim, float(input_gain)
        self.z_dim = latent_dim + (out_dim if output_noise else 0)
        self.img_channels, self.img_resolution = out_dim, 1
        self.net = _mlp(latent_dim, hidden, layers, out_dim, activation)
        self.noise_strength = torch.nn.Parameter(torch.full([out_dim], float(noise_init))) if output_noise else None

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.net(z[:, :self.latent_dim] * self.input_gain)
        if self.noise_strength is not None:
            x = x + self.noise_strength * z[:, self.latent_dim:]
        return x


class VectorDenoiser(torch.nn.Module):
    """What the Teacher interface asks of a denoiser of [N, dim] data, shared by the toy denoisers."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.img_channels, self.img_resolution, self.label_dim = dim, 1, 0
        self.data_shape = [dim]
        self.sigma_min, self.sigma_max = 0.0, float('inf')

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    @staticmethod
    def _sigma_column(sigma, x: torch.Tensor) -> torch.Tensor:
        """sigma (a number or one per row) as an [N, 1] float32 column on x's device."""
        return torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1).expand(x.shape[0], 1)


@persistence.persistent_class
class MLPDenoiser(VectorDenoiser):
    """EDM-preconditioned denoiser for [N, D] data: D(x) = c_skip x + c_out F(c_in x, c_noise), c_noise = ln(sigma)/4,
    with c_noise fed through sinusoidal features.

    With `base` (a denoiser, e.g. an analytic teacher), D(x) = base(x) + c_out F(...) with F's last layer zeroed:
    a fake score that starts as an exact copy of a teacher no network can copy exactly. A fake score fitted to
    such a teacher is blurrier than it at small sigma, so the IKL gradient is not zero where the generator matches
    the data (experiments/toy2d/toy2d.py; experiments/toy2d/README.md say what else narrows the generator's modes)."""

    def __init__(self, dim: int = 2, hidden: int = 128, layers: int = 3, sigma_data: float = 0.5, num_freqs: int = 16,
                 base: Optional[torch.nn.Module] = None):
        super().__init__(dim)
        self.base = base
        self.sigma_data = float(sigma_data)
        self.register_buffer('freqs', torch.exp(torch.linspace(0, math.log(100.0), num_freqs)))
        self.net = _mlp(dim + 2 * num_freqs, hidden, layers, dim)
        if base is not None:
            torch.nn.init.zeros_(self.net[-1].weight)
            torch.nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: torch.Tensor, sigma, class_labels=None, **unused_kwargs) -> torch.Tensor:
        x = x.to(torch.float32)
        sigma = self._sigma_column(sigma, x)
        sd2 = self.sigma_data ** 2
        c_skip = sd2 / (sigma ** 2 + sd2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + sd2).sqrt()
        c_in = 1 / (sigma ** 2 + sd2).sqrt()
        angles = (sigma.log() / 4) * self.freqs[None, :]
        features = torch.cat([c_in * x, angles.sin(), angles.cos()], dim=1)
        start = c_skip * x if self.base is None else self.base(x, sigma[:, 0], class_labels).to(torch.float32)
        return start + c_out * self.net(features).to(torch.float32)


# ----------------------------------------------------------------------------------------------------------------
