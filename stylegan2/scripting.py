"""Small helpers shared by the StyleGAN2 command-line scripts (`generate.py`, `projector.py`, `style_mixing.py`)."""

import os
import re
from typing import Iterable, List, Optional

import click
import numpy as np
import torch

from torch_utils import persistence


def parse_range(text: str) -> List[int]:
    """'0-3,7,10-11' -> [0, 1, 2, 3, 7, 10, 11]; raises ValueError with what was wrong."""
    values = []
    for part in str(text).split(','):
        part = part.strip()
        match = re.fullmatch(r'(\d+)\s*-\s*(\d+)', part)
        if match:
            lo, hi = int(match.group(1)), int(match.group(2))
            if hi < lo:
                raise ValueError(f'range {part!r} runs backwards')
            values.extend(range(lo, hi + 1))
        elif re.fullmatch(r'\d+', part):
            values.append(int(part))
        else:
            raise ValueError(f'{part!r} is not a non-negative integer or a range like 0-7')
    return values


def range_option(ctx, param, value) -> Optional[List[int]]:
    """click callback for options like --seeds=0-3,7: a list of ints, or a one-line usage error."""
    if value is None:
        return None
    try:
        return parse_range(value)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None


def default_device() -> torch.device:
    return torch.device('cuda' if torch.cuda.is_available() else 'cpu')


def use_fp32(device: torch.device) -> bool:
    """fp16 layers run in float32 except on CUDA (CPU half precision is slow and inexact)."""
    return device.type != 'cuda'


def set_code_policy(refuse_unknown_code: bool) -> None:
    """Refuse pickles whose embedded code is not ours or on the allow-list (see torch_utils.persistence)."""
    if refuse_unknown_code:
        persistence.refuse_unknown_sources(True)


def class_labels(G: torch.nn.Module, class_idx: Optional[int], batch_size: int, device: torch.device) -> torch.Tensor:
    """One-hot labels [N, c_dim] for `class_idx` ([N, 0] for unconditional G); raises ValueError when invalid."""
    c = torch.zeros([batch_size, G.c_dim], device=device)
    if G.c_dim == 0:
        return c
    if class_idx is None:
        raise ValueError(f'this generator is conditional ({G.c_dim} classes): choose one with --class')
    if not 0 <= class_idx < G.c_dim:
        raise ValueError(f'--class={class_idx} is out of range: the generator has classes 0..{G.c_dim - 1}')
    c[:, class_idx] = 1
    return c


def seed_latents(seeds: Iterable[int], z_dim: int, device: torch.device) -> torch.Tensor:
    """Upstream's per-seed latents (`RandomState(seed).randn(z_dim)`), so a seed gives the same image as
    NVIDIA's generate.py; float32 (MPS has no float64)."""
    z = np.stack([np.random.RandomState(seed).randn(z_dim) for seed in seeds])
    return torch.from_numpy(z).to(device=device, dtype=torch.float32)


def check_outputs_free(paths: Iterable[str], overwrite: bool) -> None:
    """Raise FileExistsError naming the first output that exists, unless overwriting was asked for."""
    if overwrite:
        return
    for path in paths:
        if os.path.exists(path):
            raise FileExistsError(f'{path} already exists; pass --overwrite or choose another --outdir')
