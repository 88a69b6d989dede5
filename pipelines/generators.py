"""Wiring between network families and the Diff-Instruct engine: generator adapters for StyleGAN2, and one loader
that turns any generator pickle this toolkit reads into something that samples images.

`ikl/` knows only the adapter interface (`ikl.GeneratorAdapter`); this module is where StyleGAN2 meets it, so the
core never imports `stylegan2/`. Scripts (`refine.py`, `distill.py`, `generate.py`, `calc_metrics.py`) use it.
"""

import copy
import hashlib
import os
from typing import Any, NamedTuple, Optional, Tuple

import torch

import dnnlib
import ikl
from metrics.detectors import file_identity
from metrics.references import GeneratorReference
from stylegan2 import pickles
from teachers import diffusers_load
from teachers.load import load as load_teacher
from teachers.load import resolve as resolve_teacher
from teachers.load import teacher_from_pickle_data
from teachers.sampling import edm_sampler


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
    `trainable` picks the parameters that train: 'all', 'synthesis', 'mapping' or 'none' (sampling only).
    `train_noise_strength=False` keeps the per-layer noise strengths fixed. They are near zero in a trained G, where
    the first-order effect of injected noise on the distribution vanishes, so the IKL gradient on them is pure
    Monte-Carlo noise; Adam's normalised steps then turn it into a random walk that adds speckle (measured on
    Fashion-MNIST: strengths grew 10-30x in 12 kimg and the Frechet distance doubled).
    """

    TRAINABLE = ('all', 'synthesis', 'mapping', 'none')

    def __init__(self, G: torch.nn.Module, resolution: Optional[int] = None, label_dim: Optional[int] = None,
                 truncation_psi: float = 1.0, truncation_cutoff: Optional[int] = None, noise_mode: str = 'random',
                 trainable: str = 'all', train_noise_strength: bool = False):
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
        if trainable != 'none':
            (G if trainable == 'all' else getattr(G, trainable)).requires_grad_(True)
            if not train_noise_strength:
                for name, param in G.named_parameters():
                    if name.endswith('noise_strength'):
                        param.requires_grad_(False)

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

    def preview(self, batch_size, generator=None):
        """Grids show G at its own resolution, not the teacher's view of it."""
        z = torch.randn([batch_size, self.G.z_dim], generator=generator, device=self.device)
        c = self.generator_labels(batch_size, generator)
        return self.synthesize(z, c), (c if self.label_dim > 0 else None)


class TeacherSamplerAdapter(ikl.GeneratorAdapter):
    """A diffusion model as a (multi-step, gradient-free) generator: EDM's Heun sampler from its own noise.
    Used to measure a teacher, or to compare a generator against teacher samples ("FID to teacher")."""

    def __init__(self, net: torch.nn.Module, num_steps: int = 18, **sampler_kwargs: Any):
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.img_resolution = int(net.img_resolution)
        self.img_channels = int(net.img_channels)
        self.label_dim = int(net.label_dim)
        self.sampler_kwargs = dict(sampler_kwargs, num_steps=int(num_steps))

    @property
    def device(self) -> torch.device:
        return next(iter(self.net.parameters()), torch.empty([])).device

    @torch.no_grad()
    def sample(self, batch_size, generator=None):
        shape = [batch_size, self.img_channels, self.img_resolution, self.img_resolution]
        latents = torch.randn(shape, generator=generator, device=self.device)
        labels = self.random_labels(batch_size, generator)
        randn_like = lambda x: torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        images = edm_sampler(self.net, latents, labels, randn_like=randn_like, **self.sampler_kwargs)
        return images.to(torch.float32), labels

    def export(self):
        return dict(ema=copy.deepcopy(self.net).cpu())


#: The kinds of generator pickle this toolkit reads, as named by `pickle_kind`.
PICKLE_KINDS = ('stylegan2', 'one-step', 'diffusion')


def pickle_kind(data: Any) -> str:
    """'stylegan2' (G/D/G_ema, also TensorFlow), 'one-step' (a distilled student: `ema` with `init_sigma` or the
    official Diff-Instruct `Sg`) or 'diffusion' (an EDM snapshot, `ema` alone) for unpickled data."""
    if isinstance(data, dict) and 'ema' in data and not any(k in data for k in pickles.NETWORK_KEYS):
        return 'one-step' if ('init_sigma' in data or 'Sg' in data) else 'diffusion'
    return 'stylegan2'


class LoadedNetwork(NamedTuple):
    """A generator pickle as read: its kind (`PICKLE_KINDS`), the network that makes images (StyleGAN2's G_ema,
    else G; the denoiser of a student or diffusion model), and the unpickled data (for what else it holds)."""
    kind: str
    net: torch.nn.Module
    data: Any


def load_network(path_or_url: str, kinds: Tuple[str, ...] = PICKLE_KINDS, device: Any = 'cpu') -> LoadedNetwork:
    """The one reader of generator pickles for every script: the network in eval mode, without gradients, on
    `device`. Raises NetworkPickleError (one line) for unusable files and for a kind not in `kinds`.
    Where 'diffusion' is wanted, a diffusers folder or cached Hub id is one too (its data an empty dict)."""
    diffusers_model = 'diffusion' in kinds and diffusers_load.is_diffusers_source(path_or_url)
    data = {} if diffusers_model else pickles.read_pickle(path_or_url)
    kind = 'diffusion' if diffusers_model else pickle_kind(data)
    if kind not in kinds:
        wanted = ' or '.join(kinds)
        raise pickles.NetworkPickleError(f'{path_or_url}: this is a {kind} pickle; expected {wanted}')
    if diffusers_model:
        net = load_teacher(path_or_url)
    elif kind == 'stylegan2':
        data = pickles.interpret_network_pkl(data, str(path_or_url))
        net = data.get('G_ema') if data.get('G_ema') is not None else data.get('G')
        if net is None:
            raise pickles.NetworkPickleError(f'{path_or_url}: the pickle holds no generator (G_ema or G)')
    else:
        net = teacher_from_pickle_data(data, source=str(path_or_url))
    return LoadedNetwork(kind, net.eval().requires_grad_(False).to(torch.device(device)), data)


def load_generator(path_or_url: str, device: Any = 'cpu', init_sigma: Optional[float] = None,
                   num_steps: int = 18) -> ikl.GeneratorAdapter:
    """Any generator pickle as an adapter that samples at the generator's own resolution, in eval mode.

    StyleGAN2 pickles give their G_ema (else G); distilled students sample in one step at their `init_sigma`
    (stored by distill.py; `init_sigma` overrides it, and is needed for official Diff-Instruct pickles, which do
    not store it: 1.0 is assumed as in their README); diffusion models sample with `num_steps` Heun steps.
    The adapter also carries `training_set_kwargs` when the pickle names its training data.
    Raises `NetworkPickleError` with a one-line message for unusable files.
    """
    kind, net, data = load_network(path_or_url, device=device)
    if kind == 'stylegan2':
        adapter = StyleGAN2Adapter(net, trainable='none')  # noise 'random', as upstream metrics
        adapter.training_set_kwargs = data.get('training_set_kwargs')
        return adapter.to(device)
    if kind == 'one-step':
        sigma = init_sigma if init_sigma is not None else float(data.get('init_sigma', 1.0))
        adapter = ikl.OneStepStudentAdapter(net, sigma_init=sigma).eval()
    else:
        adapter = TeacherSamplerAdapter(net, num_steps=num_steps)
    adapter.training_set_kwargs = data.get('dataset_kwargs')
    return adapter.to(device)


def sample_reference(path_or_url: str, adapter: ikl.GeneratorAdapter, num: int, batch_size: int = 64) -> GeneratorReference:
    """Reference statistics from samples of a network file (e.g. the teacher: "FID to teacher", data-free), cached
    under one key, the file's content hash and the sampler settings, whichever script asks (refine.py, distill.py,
    calc_metrics.py share the cache)."""
    key = f'{network_identity(path_or_url)}:{getattr(adapter, "sampler_kwargs", None)!r}'
    return GeneratorReference(adapter, num=num, batch_size=batch_size, cache_key=key)


def network_identity(path_or_url: str) -> str:
    """The content hash of a network file, or of a diffusers model's files (by name within their folders)."""
    if not diffusers_load.is_diffusers_source(path_or_url):
        return file_identity(dnnlib.util.open_url(resolve_teacher(path_or_url), return_filename=True))
    digest = hashlib.sha1()
    for path in diffusers_load.model_files(path_or_url):
        digest.update(f'{os.path.basename(path)}:{file_identity(path)}\n'.encode())
    return digest.hexdigest()
