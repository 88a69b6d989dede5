"""Denoising score-matching losses of EDM (VP, VE and EDM noise distributions and weightings).

Each returns the per-element weighted loss `lambda(sigma) * (D(y + n; sigma) - y)^2`, shape like the images.
They are persistent plain classes (stored as `loss_fn` in upstream-layout snapshots), so this file too may import
only torch, numpy and `torch_utils`. Noise levels and noise come from the global torch RNG, which the training
script seeds and checkpoints.
"""

import torch

from torch_utils import persistence


def _weighted_error(net, images, labels, augment_pipe, sigma, weight):
    """weight * (D(y + sigma * n; sigma) - y)^2 for (optionally augmented) clean images y."""
    y, augment_labels = augment_pipe(images) if augment_pipe is not None else (images, None)
    n = torch.randn_like(y) * sigma
    D_yn = net(y + n, sigma, labels, augment_labels=augment_labels)
    return weight * ((D_yn - y) ** 2)


@persistence.persistent_class
class VPLoss:
    """sigma = sigma_VP(t) with t uniform on [epsilon_t, 1]; weight 1 / sigma^2."""

    def __init__(self, beta_d=19.9, beta_min=0.1, epsilon_t=1e-5):
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.epsilon_t = epsilon_t

    def __call__(self, net, images, labels=None, augment_pipe=None):
        rnd_uniform = torch.rand([images.shape[0], 1, 1, 1], device=images.device)
        sigma = self.sigma(1 + rnd_uniform * (self.epsilon_t - 1))
        weight = 1 / sigma ** 2
        return _weighted_error(net, images, labels, augment_pipe, sigma, weight)

    def sigma(self, t):
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * (t ** 2) + self.beta_min * t).exp() - 1).sqrt()


@persistence.persistent_class
class VELoss:
    """sigma log-uniform on [sigma_min, sigma_max]; weight 1 / sigma^2."""

    def __init__(self, sigma_min=0.02, sigma_max=100):
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def __call__(self, net, images, labels=None, augment_pipe=None):
        rnd_uniform = torch.rand([images.shape[0], 1, 1, 1], device=images.device)
        sigma = self.sigma_min * ((self.sigma_max / self.sigma_min) ** rnd_uniform)
        weight = 1 / sigma ** 2
        return _weighted_error(net, images, labels, augment_pipe, sigma, weight)


@persistence.persistent_class
class EDMLoss:
    """ln(sigma) ~ N(P_mean, P_std^2); weight (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2 (unit effective weight)."""

    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5):
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data

    def __call__(self, net, images, labels=None, augment_pipe=None):
        rnd_normal = torch.randn([images.shape[0], 1, 1, 1], device=images.device)
        sigma = (rnd_normal * self.P_std + self.P_mean).exp()
        weight = (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2
        return _weighted_error(net, images, labels, augment_pipe, sigma, weight)
