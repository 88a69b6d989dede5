"""Wiring between network families and the Diff-Instruct engine: generator adapters for StyleGAN2, and one loader
that turns any generator pickle this toolkit reads into something that samples images.

`ikl/` knows only the adapter interface (`ikl.GeneratorAdapter`); this module is where StyleGAN2 meets it, so the
core never imports `stylegan2/`. Scripts (`refine.py`, `distill.py`, `generate.py`, `calc_metrics.py`) use it.
"""

import copy
from typing import Optional

import torch

import ikl


def resize_images(img: torch.Tensor, resolution: int) -> torch.Tensor:
    """Differentiable resize of NCHW images to `resolution`: antialiased bilinear going down, bicubic going up.

    Going down, the bilinear kernel is widened by the scale factor (antialias=True), so a 1024 px generator seen by
    a 32 px teacher is low-pass filtered rather than aliased; going up, bicubic interpolation is smooth.
    """
    if img.shape[-1] == resolution and img.shape[-2] == resolution:
        return img
    shrinking = resolution < img.shape[-1]
    return torch.nn.functional.interpolate(img, size=(resolution, resolution), mode='bilinear' if shrinking else 'bicubic',
                                           align_corners=False, antialias=shrinking)


class StyleGAN2Adapter(ikl.GeneratorAdapter):
    """A StyleGAN2 generator seen through a teacher's eyes: z ~ N(0, I), labels uniform over G's classes,
    G(z, c) resized to the teacher's resolution.

    `label_dim` is what the teacher is given: G's one-hot labels when the teacher is conditional too (the two must
    have the same number of classes), 0 when the teacher is unconditional (G still gets random labels).
    `trainable` picks the parameters that train: 'all', 'synthesis' or 'mapping'.
    """

    TRAINABLE = ('all', 'synthesis', 'mapping')

    def __init__(self, G: torch.nn.Module, resolution: Optional[int] = None, label_dim: Optional[int] = None,
                 truncation_psi: float = 1.0, truncation_cutoff: Optional[int] = None, noise_mode: str = 'random',
                 trainable: str = 'all'):
        super().__init__()
        if trainable not in self.TRAINABLE:
            raise ValueError(f'trainable={trainable!r}, expected one of {list(self.TRAINABLE)}')
        if noise_mode not in ('random', 'const', 'none'):
            raise ValueError(f"noise_mode={noise_mode!r}, expected 'random', 'const' or 'none'")
        self.G = G
        self.img_resolution = int(resolution or G.img_resolution)
        self.img_channels = int(G.img_channels)
        self.label_dim = int(G.c_dim if label_dim is None else label_dim)
        if self.label_dim not in (0, G.c_dim):
            raise ValueError(f'labels: the generator has {G.c_dim} classes but {self.label_dim} were asked for')
        self.truncation_psi = float(truncation_psi)
        self.truncation_cutoff = truncation_cutoff
        self.noise_mode = noise_mode
        self.trainable = trainable
        G.requires_grad_(False)
        (G if trainable == 'all' else getattr(G, trainable)).requires_grad_(True)

    def generator_labels(self, batch_size: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Uniform one-hot labels for G ([N, 0] for an unconditional G, as upstream passes)."""
        if self.G.c_dim == 0:
            return torch.zeros([batch_size, 0], device=self.device)
        idx = torch.randint(self.G.c_dim, [batch_size], generator=generator, device=self.device)
        return torch.nn.functional.one_hot(idx, self.G.c_dim).to(torch.float32)

    def synthesize(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """G(z, c) at G's own resolution, in float32 (fp16 layers run in fp32 off CUDA)."""
        img = self.G(z, c, truncation_psi=self.truncation_psi, truncation_cutoff=self.truncation_cutoff,
                     noise_mode=self.noise_mode, force_fp32=(z.device.type != 'cuda'))
        return img.to(torch.float32)

    def sample(self, batch_size, generator=None):
        z = torch.randn([batch_size, self.G.z_dim], generator=generator, device=self.device)
        c = self.generator_labels(batch_size, generator)
        img = resize_images(self.synthesize(z, c), self.img_resolution)
        return img, (c if self.label_dim > 0 else None)

    def export(self):
        return dict(G_ema=copy.deepcopy(self.G).eval().requires_grad_(False).cpu())
