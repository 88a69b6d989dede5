"""Generator adapters: the one door through which the engine sees a generator.

An adapter is a `torch.nn.Module` holding the generator's trainable parts, with

- `sample(batch_size, generator) -> (images, labels)`: float32 samples in the teacher's space (`[N, C, H, W]`, or
  `[N, D]` for toy data) that carry gradient to the trainable parameters, and one-hot labels `[N, label_dim]` or
  None. Every random draw comes from `generator` (a `torch.Generator` on the adapter's device).
- `parameters()`: the usual Module parameters; the engine trains those with `requires_grad`.
- `export()`: a dict of picklable objects a snapshot of this adapter should hold. The engine exports the EMA copy.
- attributes `img_resolution`, `img_channels`, `label_dim`.

The engine keeps its EMA copy with `copy.deepcopy(adapter)`, so adapters must be deep-copyable. Adapters for
specific network families (StyleGAN2) live with the code that wires them (`pipelines/generators.py`); the ones here
need nothing but torch.
"""

import copy
from typing import Dict, Optional, Sequence, Tuple

import torch

# ----------------------------------------------------------------------------------------------------------------


class GeneratorAdapter(torch.nn.Module):
    """Base class. Subclasses implement `sample()` and, if the snapshot layout differs, `export()`."""

    img_resolution: int = 1
    img_channels: int = 1
    label_dim: int = 0

    def sample(self, batch_size: int, generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        raise NotImplementedError

    def export(self) -> Dict[str, object]:
        raise NotImplementedError

    def preview(self, batch_size: int, generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Samples for the image grids: what `sample` gives, unless the generator has a native look of its own."""
        return self.sample(batch_size, generator)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def random_labels(self, batch_size: int, generator: Optional[torch.Generator]) -> Optional[torch.Tensor]:
        """Uniform one-hot class labels (None for unconditional generators)."""
        if self.label_dim == 0:
            return None
        idx = torch.randint(self.label_dim, [batch_size], generator=generator, device=self.device)
        return torch.nn.functional.one_hot(idx, self.label_dim).to(torch.float32)


def _frozen_copy(module: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(module).eval().requires_grad_(False).cpu()


class ModuleAdapter(GeneratorAdapter):
    """A plain network `G(z)` or `G(z, c)` fed with standard normal latents of `latent_shape` (toy MLPs and the like).
    Snapshots hold it under `export_key`."""

    def __init__(self, G: torch.nn.Module, latent_shape: Sequence[int], label_dim: int = 0, export_key: str = 'G_ema'):
        super().__init__()
        self.G = G
        self.latent_shape = [int(s) for s in latent_shape]
        self.label_dim = int(label_dim)
        self.export_key = export_key
        self.img_channels = int(getattr(G, 'img_channels', 1))
        self.img_resolution = int(getattr(G, 'img_resolution', 1))

    def sample(self, batch_size, generator=None):
        z = torch.randn([batch_size, *self.latent_shape], generator=generator, device=self.device)
        c = self.random_labels(batch_size, generator)
        x = self.G(z) if c is None else self.G(z, c)
        return x.to(torch.float32), c

    def export(self):
        return {self.export_key: _frozen_copy(self.G)}


class OneStepStudentAdapter(GeneratorAdapter):
    """The official distillation student: x0 = D(sigma_init * z, sigma_init, c) with z ~ N(0, I) of image shape,
    i.e. a teacher-like denoiser evaluated once on pure noise (diff-instruct.md §1.2). Snapshots hold it as `ema`,
    the key of official Diff-Instruct and EDM pickles."""

    def __init__(self, net: torch.nn.Module, sigma_init: float = 1.0):
        super().__init__()
        if not sigma_init > 0:
            raise ValueError(f'one-step student: sigma_init must be positive, got {sigma_init}')
        self.net = net
        self.sigma_init = float(sigma_init)
        self.img_resolution = int(net.img_resolution)
        self.img_channels = int(net.img_channels)
        self.label_dim = int(net.label_dim)
        self.data_shape = list(getattr(net, 'data_shape', [self.img_channels, self.img_resolution, self.img_resolution]))

    @classmethod
    def from_teacher(cls, teacher: torch.nn.Module, sigma_init: float = 1.0) -> 'OneStepStudentAdapter':
        """Start from a trainable copy of the teacher, as the official code does."""
        return cls(copy.deepcopy(teacher).train().requires_grad_(True), sigma_init)

    def sample(self, batch_size, generator=None):
        z = torch.randn([batch_size, *self.data_shape], generator=generator, device=self.device)
        c = self.random_labels(batch_size, generator)
        return self.from_latents(z, c), c

    def from_latents(self, z: torch.Tensor, c: Optional[torch.Tensor]) -> torch.Tensor:
        """x0 = D(sigma_init z; sigma_init, c) for given latents (generate.py draws them per seed)."""
        sigma = torch.full([z.shape[0]] + [1] * len(self.data_shape), self.sigma_init, device=z.device)
        return self.net(z * self.sigma_init, sigma, c).to(torch.float32)

    def export(self):
        return dict(ema=_frozen_copy(self.net))

# ----------------------------------------------------------------------------------------------------------------
