"""Fused multiply-add `a * b + c` with broadcasting (used to add scaled noise in StyleGAN2's modulated conv)."""

import torch


def fma(a, b, c):
    """Return `a * b + c`; gradients flow to all three inputs, summed back over broadcast dimensions."""
    return torch.addcmul(c, a, b)
