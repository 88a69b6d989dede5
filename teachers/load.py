"""Loading teachers: NVIDIA's official EDM pickles by short name, any upstream-layout pickle by path or URL, or a
diffusers model (a folder written by `save_pretrained`, or a Hub id in the local cache: see `diffusers_load`).

An EDM snapshot is `dict(ema=<denoiser>, loss_fn=..., augment_pipe=..., dataset_kwargs=...)`; the `ema` network
is a teacher as it is (its embedded source runs against our `torch_utils`). `rebuild_teacher` re-creates it as
our own class from its `init_kwargs` and checks that the outputs agree.
"""

import os
from typing import Any, Dict, Optional

import torch

import dnnlib
from torch_utils.pickle_reader import NetworkPickleError, read_pickle

from . import networks
from .diffusers_load import DiffusersLoadError, is_diffusers_source, load_diffusers_teacher
from .interface import missing_teacher_attributes

EDM_PRETRAINED = 'https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/'

_EDM_PICKLES = [f'edm-cifar10-32x32-{cond}-{arch}' for cond in ('cond', 'uncond') for arch in ('vp', 've')] + \
               [f'edm-{data}-64x64-uncond-{arch}' for data in ('ffhq', 'afhqv2') for arch in ('vp', 've')] + \
               ['edm-imagenet-64x64-cond-adm']
_BASELINE_PICKLES = ['baseline-cifar10-32x32-uncond-vp', 'baseline-cifar10-32x32-uncond-ve', 'baseline-imagenet-64x64-cond-adm']
_ALIASES = {
    'cifar10-uncond': 'edm-cifar10-32x32-uncond-vp',
    'cifar10-cond': 'edm-cifar10-32x32-cond-vp',
    'ffhq64': 'edm-ffhq-64x64-uncond-vp',
    'afhqv2-64': 'edm-afhqv2-64x64-uncond-vp',
    'afhq64-v2': 'edm-afhqv2-64x64-uncond-vp',
    'imagenet64-cond': 'edm-imagenet-64x64-cond-adm',
}

#: Short name -> URL of every official teacher pickle.
OFFICIAL: Dict[str, str] = {
    **{name: f'{EDM_PRETRAINED}{name}.pkl' for name in _EDM_PICKLES},
    **{name: f'{EDM_PRETRAINED}baseline/{name}.pkl' for name in _BASELINE_PICKLES},
    **{alias: f'{EDM_PRETRAINED}{target}.pkl' for alias, target in _ALIASES.items()},
}


def resolve(name_or_path_or_url: str) -> str:
    """The URL of an official short name (with or without `.pkl`), otherwise the argument unchanged."""
    key = name_or_path_or_url[:-4] if name_or_path_or_url.endswith('.pkl') else name_or_path_or_url
    return OFFICIAL.get(key, name_or_path_or_url)


def _one_line(err: Exception, limit: int = 400) -> str:
    """An exception's message on one line (unpickling errors can span several), cut to `limit` characters."""
    return ' '.join(str(err).split())[:limit] or type(err).__name__


def load_pickle(name_or_path_or_url: str, cache_dir: Optional[str] = None, verbose: bool = True) -> Any:
    """Unpickle a file, URL (through the download cache) or official short name, with one-line errors."""
    source = resolve(str(name_or_path_or_url))
    if not dnnlib.util.is_url(source, allow_file_urls=True) and not os.path.exists(source):
        names = ', '.join(sorted(OFFICIAL))
        raise NetworkPickleError(f'{source}: no such file (official teacher names: {names})')
    return read_pickle(source, cache_dir=cache_dir, verbose=verbose)


def teacher_from_pickle_data(data: Any, source: str = 'pickle') -> torch.nn.Module:
    """The teacher inside unpickled data: `data['ema']` for EDM snapshots, or the object itself."""
    if isinstance(data, dict):
        if 'ema' in data:
            net = data['ema']
        elif 'G_ema' in data or 'G' in data:
            raise NetworkPickleError(f'{source}: this is a StyleGAN2 generator pickle (keys G/D/G_ema), '
                                   f'not an EDM teacher (expected key "ema")')
        else:
            raise NetworkPickleError(f'{source}: the pickled dict has keys {sorted(map(str, data))}, '
                                   f'expected an EDM snapshot with key "ema"')
    else:
        net = data
    missing = missing_teacher_attributes(net)
    if missing:
        raise NetworkPickleError(f'{source}: the pickled {type(net).__name__} is not a denoiser '
                               f'(missing {", ".join(missing)})')
    return net


def load(name_or_path_or_url: str, device='cpu', rebuild: bool = False, cache_dir: Optional[str] = None,
         verbose: bool = True) -> torch.nn.Module:
    """A teacher in eval mode on `device`, without gradients, from an official short name, path or URL, or a
    diffusers folder or cached Hub id (a `DiffusersTeacher`).

    Official names: see `OFFICIAL` (e.g. `cifar10-uncond`, `edm-ffhq-64x64-uncond-vp`). With `rebuild=True`
    the upstream network is re-created as our own class (see `rebuild_teacher`).
    """
    source = str(name_or_path_or_url)
    if is_diffusers_source(source):
        if rebuild:
            raise DiffusersLoadError(f'{source}: rebuild applies to EDM pickles, not to diffusers models')
        return load_diffusers_teacher(source).eval().requires_grad_(False).to(device)
    net = teacher_from_pickle_data(load_pickle(source, cache_dir=cache_dir, verbose=verbose), source=resolve(source))
    if rebuild:
        net = rebuild_teacher(net)
    return net.eval().requires_grad_(False).to(device)

# ----------------------------------------------------------------------------------------------------------------
# Re-creating an upstream network as our class.


def _reference_inputs(net, batch_size: int = 2):
    """Fixed inputs for comparing two denoisers: noisy images at a low and a high noise level, and labels."""
    gen = torch.Generator().manual_seed(0)
    shape = [batch_size, net.img_channels, net.img_resolution, net.img_resolution]
    x = torch.randn(shape, generator=gen)
    sigma_lo = max(float(net.sigma_min), 0.02)
    sigma_hi = min(float(net.sigma_max), 20.0)
    sigma = torch.tensor([sigma_lo, sigma_hi][:batch_size] + [1.0] * max(batch_size - 2, 0))
    x = x * (1 + sigma.reshape(-1, 1, 1, 1))
    labels = None
    if net.label_dim:
        labels = torch.eye(net.label_dim)[torch.randint(net.label_dim, [batch_size], generator=gen)]
    return x, sigma, labels


@torch.no_grad()
def max_output_difference(net_a, net_b, batch_size: int = 2) -> float:
    """Largest |D_a - D_b| on fixed inputs (float32, on each net's device)."""
    x, sigma, labels = _reference_inputs(net_a, batch_size)
    dev_a = next(net_a.parameters()).device
    dev_b = next(net_b.parameters()).device
    lab = (lambda d: labels.to(d)) if labels is not None else (lambda d: None)
    out_a = net_a(x.to(dev_a), sigma.to(dev_a), lab(dev_a), force_fp32=True).cpu()
    out_b = net_b(x.to(dev_b), sigma.to(dev_b), lab(dev_b), force_fp32=True).cpu()
    return float((out_a - out_b).abs().max())


def rebuild_teacher(net: torch.nn.Module, check: bool = True, atol: float = 1e-4) -> torch.nn.Module:
    """Our own class built from an (upstream) EDM network's `init_kwargs`, holding its parameters and buffers.

    The new network is in the old one's training mode and on the CPU. With `check`, it raises NetworkPickleError
    unless both give the same D(x) (max abs difference <= atol) on fixed inputs.
    """
    class_name = type(net).__name__
    our_class = getattr(networks, class_name, None)
    if our_class is None or not hasattr(net, 'init_kwargs'):
        raise NetworkPickleError(f'rebuild_teacher: {class_name} is not one of the EDM preconditioners '
                               f'(EDMPrecond, VPPrecond, VEPrecond, iDDPMPrecond)')
    with torch.random.fork_rng(devices=[]):  # The throw-away initial weights must not disturb the caller's RNG.
        ours = our_class(*net.init_args, **net.init_kwargs)
    state = {name: tensor.detach().cpu() for name, tensor in net.state_dict().items()}
    try:
        ours.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise NetworkPickleError(f'rebuild_teacher: the {class_name} state does not map onto ours '
                               f'({_one_line(err)})') from None
    ours.train(net.training)
    if check:
        was_training = net.training
        net.eval()
        ours.eval()
        diff = max_output_difference(net, ours)
        net.train(was_training)
        ours.train(was_training)
        if not diff <= atol:
            raise NetworkPickleError(f'rebuild_teacher: {class_name} rebuilt as ours differs by {diff:.3g} > {atol:g}')
    return ours
