"""Noise-level distributions and weightings: which sigmas the divergence looks at, and how much each counts.

The IKL is an integral over noise levels, IKL(q, p) = int w(sigma) KL(q_sigma || p_sigma) dsigma. We estimate its
gradient by drawing sigma from a distribution p(sigma) and putting a factor lam(sigma) on the *denoiser* difference
(D_fake - D_teacher) = sigma^2 (s_fake - s_teacher). The implied integrand weight is therefore

    w(sigma) = lam(sigma) * sigma^2 * p(sigma),

which `implied_weight()` returns and the closed-form tests integrate. Names:

- distributions: `lognormal` (EDM's training law, exp(N(P_mean, P_std)); the official default (-1.2, 1.2)),
  `karras` (uniform over the indices of an N-step Karras rho-schedule, optionally a sub-range [t_min, t_max] of
  it, as DMD (all of it) and SiD (t in [0, 0.8]) do), `fixed` (a single sigma: with a small sigma this is the t=0
  limit of the IKL, i.e. the plain KL gradient of Corollary 3.5).
- weightings: `denoiser` (lam = 1: unit weight on the denoiser difference; the official code), `score`
  (lam = 1 / sigma^2: unit weight on the score difference, i.e. the paper's eq. 3.2 read literally with w = 1
  relative to the sampling law; the paper's own w(t) could not be read, so this is our settled reading).
"""

from typing import Callable, Dict, Tuple

import numpy as np
import torch

# ----------------------------------------------------------------------------------------------------------------


class SigmaDistribution:
    """Draws per-sample noise levels; `expect(f)` integrates f(sigma) against the law (for closed-form checks)."""

    name = ''

    def sample(self, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        raise NotImplementedError

    def quadrature(self) -> Tuple[np.ndarray, np.ndarray]:
        """Nodes and weights (float64, weights summing to one) that integrate smooth f(sigma) against the law."""
        raise NotImplementedError


class LogNormal(SigmaDistribution):
    name = 'lognormal'

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2):
        if not P_std > 0:
            raise ValueError(f'lognormal sigma: P_std must be positive, got {P_std}')
        self.P_mean, self.P_std = float(P_mean), float(P_std)

    def sample(self, n, generator, device):
        z = torch.randn([n], generator=generator, device=device)
        return (z * self.P_std + self.P_mean).exp()

    def quadrature(self, order: int = 120):
        nodes, weights = np.polynomial.hermite_e.hermegauss(order)  # probabilists' Hermite: weight exp(-z^2/2)
        return np.exp(self.P_mean + self.P_std * nodes), weights / weights.sum()


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float) -> np.ndarray:
    """EDM's rho-schedule from sigma_max (index 0) down to sigma_min (index N-1), float64."""
    i = np.arange(num_steps, dtype=np.float64) / max(num_steps - 1, 1)
    return (sigma_max ** (1 / rho) + i * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


class Karras(SigmaDistribution):
    name = 'karras'

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, num_steps: int = 1000,
                 t_min: float = 0.0, t_max: float = 1.0):
        if not (0 < sigma_min < sigma_max and num_steps >= 2 and 0 <= t_min <= t_max <= 1):
            raise ValueError('karras sigma: need 0 < sigma_min < sigma_max, num_steps >= 2, 0 <= t_min <= t_max <= 1; '
                             f'got {sigma_min}, {sigma_max}, {num_steps}, {t_min}, {t_max}')
        self.sigma_min, self.sigma_max, self.rho, self.num_steps = float(sigma_min), float(sigma_max), float(rho), int(num_steps)
        self.t_min, self.t_max = float(t_min), float(t_max)

    def _atoms(self) -> np.ndarray:
        # SiD's convention: t = 0 at sigma_min, t = 1 at sigma_max, so its t in [0, 0.8] is sigma in [0.002, 24.2].
        sig = karras_sigmas(self.num_steps, self.sigma_min, self.sigma_max, self.rho)[::-1].copy()
        lo, hi = round(self.t_min * (self.num_steps - 1)), round(self.t_max * (self.num_steps - 1))
        return sig[lo:hi + 1]

    def sample(self, n, generator, device):
        atoms = torch.as_tensor(self._atoms(), dtype=torch.float32, device=device)
        return atoms[torch.randint(len(atoms), [n], generator=generator, device=device)]

    def quadrature(self):
        atoms = self._atoms()
        return atoms, np.full(len(atoms), 1 / len(atoms))


class Fixed(SigmaDistribution):
    name = 'fixed'

    def __init__(self, sigma: float = 0.002):
        if not sigma > 0:
            raise ValueError(f'fixed sigma: must be positive, got {sigma}')
        self.sigma = float(sigma)

    def sample(self, n, generator, device):
        return torch.full([n], self.sigma, device=device)

    def quadrature(self):
        return np.array([self.sigma]), np.array([1.0])


SIGMA_DISTRIBUTIONS = dict(lognormal=LogNormal, karras=Karras, fixed=Fixed)


def make_sigma_distribution(name: str, **kwargs) -> SigmaDistribution:
    if name not in SIGMA_DISTRIBUTIONS:
        raise ValueError(f'sigma distribution: unknown name {name!r}, expected one of {sorted(SIGMA_DISTRIBUTIONS)}')
    return SIGMA_DISTRIBUTIONS[name](**kwargs)

# ----------------------------------------------------------------------------------------------------------------
# Weightings lam(sigma) on the denoiser difference. They take and return tensors (or float64 arrays).

WEIGHTINGS: Dict[str, Callable] = dict(
    denoiser=lambda sigma: sigma * 0 + 1,
    score=lambda sigma: 1 / sigma ** 2,
)


def get_weighting(name: str) -> Callable:
    if name not in WEIGHTINGS:
        raise ValueError(f'weighting: unknown name {name!r}, expected one of {sorted(WEIGHTINGS)}')
    return WEIGHTINGS[name]


def implied_weight(weighting: str, sigma: np.ndarray) -> np.ndarray:
    """w(sigma) / p(sigma) = lam(sigma) * sigma^2: the factor on KL(q_sigma || p_sigma) under the sampling law."""
    return get_weighting(weighting)(sigma) * sigma ** 2

# ----------------------------------------------------------------------------------------------------------------
