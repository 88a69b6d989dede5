"""Project an image into a StyleGAN2 generator's W space: find one w (and the noise maps) that reproduces it.

The distance is the standard one when its weights are available: the squared LPIPS distance of NVIDIA's VGG16
TorchScript (`vgg16.pt`, the file upstream's projector and metrics use) on 0-255 images area-downsampled to at
most 256 px. Offline, `PyramidDistance` is the documented fallback: the summed mean squared error over a pyramid of
2x area-downsampled copies (full size down to 8 px), on images scaled to [-1, 1]. It weighs coarse structure as
much as fine detail, which is what projection needs first, but it is not perceptual.

Optimisation (as in StyleGAN2's projector): w starts at the average w (from 10k mapped latents) and is optimised
with Adam together with the noise maps; Gaussian noise of `initial_noise_factor * std(w)` is added to w and
fades out quadratically over the first 75% of the steps; the learning rate warms up linearly over the first 5%
and decays with a half cosine over the last 25%; the noise maps are regularised towards spatially uncorrelated
unit noise at every scale (weight 1e5) and renormalised after each step.
"""

import copy
import math
from typing import Callable, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F

import dnnlib

VGG16_URL = 'https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/vgg16.pt'


class VGG16Distance(torch.nn.Module):
    """Squared LPIPS distance of NVIDIA's VGG16 TorchScript on images in [0, 255] (area-downsampled to 256)."""

    def __init__(self, vgg16: torch.nn.Module):
        super().__init__()
        self.vgg16 = vgg16

    def features(self, img255: torch.Tensor) -> torch.Tensor:
        if img255.shape[1] == 1:
            img255 = img255.repeat(1, 3, 1, 1)
        if img255.shape[2] > 256:
            img255 = F.interpolate(img255, size=(256, 256), mode='area')
        return self.vgg16(img255, resize_images=False, return_lpips=True)

    def forward(self, synth255: torch.Tensor, target_features: torch.Tensor) -> torch.Tensor:
        return (self.features(synth255) - target_features).square().sum()


class PyramidDistance(torch.nn.Module):
    """Fallback distance: sum over scales (full size, /2, ... down to 8 px) of the mean squared error in [-1, 1]."""

    def features(self, img255: torch.Tensor) -> torch.Tensor:
        return img255 / 127.5 - 1

    def forward(self, synth255: torch.Tensor, target_features: torch.Tensor) -> torch.Tensor:
        a, b = self.features(synth255), target_features
        total = 0
        while True:
            total = total + (a - b).square().mean()
            if a.shape[2] <= 8:
                return total
            a, b = F.avg_pool2d(a, 2), F.avg_pool2d(b, 2)


def load_distance(vgg16: Optional[str], device: torch.device, log: Callable[[str], None] = print) -> torch.nn.Module:
    """VGG16Distance from `vgg16` (path or URL; '' or None = the standard URL), or PyramidDistance when that
    file cannot be obtained; `vgg16='pyramid'` asks for the fallback explicitly."""
    if vgg16 == 'pyramid':
        return PyramidDistance()
    source = vgg16 or VGG16_URL
    try:
        with dnnlib.util.open_url(source, verbose=False) as f:
            net = torch.jit.load(f, map_location=device).eval()
        return VGG16Distance(net)
    except (OSError, RuntimeError, ValueError) as err:
        if vgg16:  # An explicitly named file must work.
            raise
        log(f'VGG16 weights unavailable ({type(err).__name__}); using the pyramid MSE distance instead')
        return PyramidDistance()


def noise_regularization(noise_bufs) -> torch.Tensor:
    """Squared autocorrelation at one-pixel shifts, at every scale down to 8x8 (zero for white noise)."""
    reg = 0
    for v in noise_bufs:
        noise = v[None, None, :, :]
        while True:
            reg = reg + (noise * torch.roll(noise, shifts=1, dims=3)).mean().square()
            reg = reg + (noise * torch.roll(noise, shifts=1, dims=2)).mean().square()
            if noise.shape[2] <= 8:
                break
            noise = F.avg_pool2d(noise, kernel_size=2)
    return reg


def learning_rate(progress: float, initial_lr: float, rampup: float = 0.05, rampdown: float = 0.25) -> float:
    """Linear warm-up over the first `rampup` of the run, half-cosine decay over the last `rampdown`."""
    down = min(1.0, (1.0 - progress) / rampdown)
    return initial_lr * (0.5 - 0.5 * math.cos(down * math.pi)) * min(1.0, progress / rampup)


def project(G: torch.nn.Module, target: torch.Tensor, distance: torch.nn.Module, num_steps: int = 1000,
            c: Optional[torch.Tensor] = None, w_avg_samples: int = 10000, initial_lr: float = 0.1,
            initial_noise_factor: float = 0.05, noise_ramp_length: float = 0.75, regularize_noise_weight: float = 1e5,
            seed: int = 303, force_fp32: bool = True) -> Iterator[Tuple[torch.Tensor, float]]:
    """Yield `(w [1, w_dim], loss)` after every step for a uint8-range target `[C, H, W]` at G's resolution.

    G is not modified (a frozen copy is optimised). `c` is the one-hot label for conditional generators.
    """
    device = target.device
    assert target.shape == (G.img_channels, G.img_resolution, G.img_resolution), 'target must match G'
    G = copy.deepcopy(G).eval().requires_grad_(False).to(device)
    rnd = torch.Generator(device=device).manual_seed(seed)
    c = torch.zeros([1, G.c_dim], device=device) if c is None else c.to(device).reshape(1, -1)

    with torch.no_grad():  # Mean and spread of w.
        z = torch.randn([w_avg_samples, G.z_dim], generator=rnd, device=device)
        w = G.mapping(z, c.expand(w_avg_samples, -1))[:, :1, :]
        w_avg = w.mean(dim=0, keepdim=True)
        w_std = float(((w - w_avg).square().sum() / w_avg_samples).sqrt())
        target_features = distance.features(target.unsqueeze(0).to(torch.float32))

    noise_bufs = [buf for name, buf in G.synthesis.named_buffers() if name.endswith('noise_const')]
    w_opt = w_avg.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([w_opt] + noise_bufs, betas=(0.9, 0.999), lr=initial_lr)
    with torch.no_grad():
        for buf in noise_bufs:
            buf.copy_(torch.randn(buf.shape, generator=rnd, device=device))
            buf.requires_grad_(True)

    for step in range(num_steps):
        progress = step / num_steps
        w_noise_scale = w_std * initial_noise_factor * max(0.0, 1.0 - progress / noise_ramp_length) ** 2
        for group in optimizer.param_groups:
            group['lr'] = learning_rate(progress, initial_lr)

        w_noise = torch.randn(w_opt.shape, generator=rnd, device=device) * w_noise_scale
        ws = (w_opt + w_noise).repeat([1, G.num_ws, 1])
        synth = G.synthesis(ws, noise_mode='const', force_fp32=force_fp32)
        synth255 = (synth + 1) * (255 / 2)
        dist = distance(synth255, target_features)
        loss = dist + noise_regularization(noise_bufs) * regularize_noise_weight

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():  # Keep the noise maps at zero mean and unit variance.
            for buf in noise_bufs:
                buf -= buf.mean()
                buf *= buf.square().mean().rsqrt()
        yield w_opt.detach()[0, 0].clone(), float(dist.detach())
