"""What refine.py's data-free adversarial term (`--adv`, `ikl.critic`) needs: the GAN's discriminator as a critic,
and a fixed bank of teacher samples as its "real" side.

Sampling a teacher costs tens of network evaluations per image, so a bank is drawn once and cached on disk under
the teacher file's content hash and the sampler settings; every run with the same teacher reuses it. Classes
are balanced (sample i has class i mod label_dim), and each batch has its own seed, so the bank is a function of
(teacher, num, num_steps, seed) alone. A bank can also ship beside its teacher file (`export_bank`, as 8-bit images,
a quarter of the cache's size): drawing 10k samples takes most of an hour on one CPU core.
"""

import os
from typing import Optional, Tuple

import numpy as np
import torch
import tqdm

import dnnlib
from teachers.sampling import edm_sampler
from torch_utils.images import to_uint8
from training.run import atomic_write, counter_seed

from .generators import network_identity, resize_images


class DiscriminatorCritic(torch.nn.Module):
    """A StyleGAN2 discriminator seen by `ikl.TeacherSampleCritic`: images at the teacher's resolution are resized
    to D's, labels are dropped for an unconditional D, and fp16 layers run in fp32 off CUDA."""

    def __init__(self, D: torch.nn.Module):
        super().__init__()
        self.D = D

    def forward(self, img: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        img = resize_images(img, self.D.img_resolution)
        if self.D.c_dim == 0:
            labels = torch.zeros([img.shape[0], 0], device=img.device)
        return self.D(img, labels, force_fp32=(img.device.type != 'cuda'))


def bank_cache_path(teacher_path: str, num: int, num_steps: int, seed: int) -> str:
    name = f'{network_identity(teacher_path)[:20]}-n{num}-heun{num_steps}-seed{seed}.pt'
    return dnnlib.make_cache_dir_path('teacher-banks', name)


@torch.no_grad()
def draw_bank(teacher: torch.nn.Module, num: int, num_steps: int = 18, seed: int = 0, batch_size: int = 64,
              progress: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """`num` teacher samples (float16, [-1, 1] nominal) and their one-hot labels (None if unconditional)."""
    device = next(teacher.parameters()).device
    shape = [teacher.img_channels, teacher.img_resolution, teacher.img_resolution]
    images, labels = [], []
    starts = range(0, num, batch_size)
    for i, start in enumerate(tqdm.tqdm(starts, desc='teacher bank', unit='batch', disable=not progress)):
        n = min(batch_size, num - start)
        gen = torch.Generator(device=device).manual_seed(counter_seed(seed, i, 0, 0))
        latents = torch.randn([n, *shape], generator=gen, device=device)
        onehot = None
        if teacher.label_dim:
            classes = torch.arange(start, start + n, device=device) % teacher.label_dim
            onehot = torch.nn.functional.one_hot(classes, teacher.label_dim).to(torch.float32)
            labels.append(onehot.cpu())
        randn_like = lambda x: torch.randn(x.shape, generator=gen, dtype=x.dtype, device=x.device)
        x = edm_sampler(teacher, latents, onehot, randn_like=randn_like, num_steps=num_steps)
        images.append(x.to(torch.float16).cpu())
    return torch.cat(images), (torch.cat(labels) if labels else None)


def shipped_bank_path(teacher_path: str, num: int, num_steps: int, seed: int) -> Optional[str]:
    """Where a bank shipped beside a local teacher file lies (None for a teacher named by URL, name or folder)."""
    if not os.path.isfile(teacher_path):
        return None
    return f'{os.path.splitext(teacher_path)[0]}-bank-n{num}-heun{num_steps}-seed{seed}.npz'


def export_bank(path: str, teacher_path: str, images: torch.Tensor, labels: Optional[torch.Tensor]) -> None:
    """Write a bank as 8-bit images, class indices and the teacher's content hash (checked on loading)."""
    pixels = to_uint8(images).cpu().numpy()
    arrays = dict(images=pixels, teacher=np.array(network_identity(teacher_path)))
    if labels is not None:
        arrays['labels'] = labels.argmax(1).numpy().astype(np.int64)
    atomic_write(path, lambda f: np.savez_compressed(f, **arrays))


def load_shipped_bank(path: str, teacher_path: str, num: int, label_dim: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A bank written by `export_bank`, refused unless it was drawn from this very teacher file."""
    with np.load(path, allow_pickle=False) as saved:
        if str(saved['teacher']) != network_identity(teacher_path):
            raise ValueError(f'{path} holds samples of another teacher than {teacher_path} (content hashes differ)')
        images = saved['images']
        labels = saved['labels'] if 'labels' in saved else None
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) != num or (labels is None) != (label_dim == 0):
        raise ValueError(f'{path}: expected {num} 8-bit [N, C, H, W] images{" with labels" if label_dim else ""}')
    onehot = None if labels is None else torch.nn.functional.one_hot(torch.from_numpy(labels), label_dim).to(torch.float32)
    return (torch.from_numpy(images).to(torch.float32) / 127.5 - 1).to(torch.float16), onehot


def teacher_bank(teacher_path: str, teacher: torch.nn.Module, num: int, num_steps: int = 18, seed: int = 0,
                 batch_size: int = 64, progress: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The bank of `teacher` (loaded from `teacher_path`): cached, else shipped beside the teacher file, else drawn
    and cached."""
    path = bank_cache_path(teacher_path, num, num_steps, seed)
    if os.path.isfile(path):
        saved = torch.load(path, weights_only=True)
        return saved['images'], saved['labels']
    shipped = shipped_bank_path(teacher_path, num, num_steps, seed)
    if shipped is not None and os.path.isfile(shipped):
        return load_shipped_bank(shipped, teacher_path, num, teacher.label_dim)
    print(f'Drawing {num} teacher samples for the adversarial term (once; cached at {path})', flush=True)
    images, labels = draw_bank(teacher, num, num_steps, seed, batch_size, progress)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, lambda f: torch.save(dict(images=images, labels=labels), f))
    return images, labels
