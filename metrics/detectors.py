"""Feature detectors behind one registry: the standard Inception-v3 and VGG16, the offline Fashion-MNIST
network, and any detector given as a module or a file.

A detector takes canonical uint8 NCHW images (any size, 1 or 3 channels); its `input_spec` says how
`adapt_images` converts them. Its `identity` (a content hash) keys cached reference statistics, so statistics are
recomputed whenever the detector's weights change.
"""

import hashlib
import inspect
import os
import warnings
import zipfile
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import nn

import dnnlib
from torch_utils import pickle_reader
from .fmnist_net import FashionFeatureNet, INPUT_CHANNELS, INPUT_RESOLUTION
from .images import InputSpec, adapt_images

INCEPTION_URL = 'https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt'
VGG16_URL = 'https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/vgg16.pt'
FMNIST_WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'weights', 'fmnist-features-v1.pt')
FMNIST_FORMAT = 'fmnist-features-v1'

# Registered names -> where their weights come from. The file stems map back to the names, so a local copy of
# the standard file (e.g. `--detector=/data/inception-2015-12-05.pt`) still counts as the standard detector.
REGISTRY: Dict[str, str] = {
    'inception': INCEPTION_URL,
    'vgg16': VGG16_URL,
    'fmnist': FMNIST_WEIGHTS,
}
_STANDARD_STEMS = {'inception-2015-12-05': 'inception', 'vgg16': 'vgg16'}


class Detector(nn.Module):
    """Common interface: `features(images)` and, when `has_probs`, `probabilities(images)` (for IS)."""

    has_probs: bool = False

    def __init__(self, name: str, identity: Optional[str], input_spec: InputSpec):
        super().__init__()
        self.name = name
        self._file_identity = identity
        self.input_spec = input_spec

    @property
    def identity(self) -> str:
        """Hash of the weights (the file's content, or the module's current weights) and of how it is fed."""
        weights = self._file_identity if self._file_identity is not None else state_dict_identity(self)
        feeding = f'{type(self).__qualname__}|{self.input_spec}|{sorted(getattr(self, "call_kwargs", {}).items())}'
        return hashlib.sha1(f'{weights}|{feeding}'.encode()).hexdigest()

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        return adapt_images(images, self.input_spec)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW -> float32 [N, D]."""
        return self._features(self.prepare(images)).to(torch.float32)

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW -> class probabilities [N, C] (rows sum to 1)."""
        if not self.has_probs:
            raise ValueError(f'detector {self.name} gives no class probabilities (needed for IS)')
        return self._probabilities(self.prepare(images)).to(torch.float32)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _probabilities(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _as_probabilities(out: torch.Tensor) -> torch.Tensor:
    """The upstream Inception already returns softmax outputs; other modules may return logits."""
    out = out.to(torch.float32)
    if out.min() >= 0 and torch.allclose(out.sum(dim=1), torch.ones_like(out[:, 0]), atol=1e-3):
        return out
    return out.softmax(dim=1)


class UpstreamDetector(Detector):
    """A TorchScript or pickled detector with the upstream calling convention.

    `net(uint8 images, return_features=True)` gives features; the Inception net called with
    `no_output_bias=True` gives the class probabilities that StyleGAN2-ADA's IS uses.
    """

    def __init__(self, net: nn.Module, name: str, identity: Optional[str] = None):
        super().__init__(name, identity, InputSpec(channels=3, resolution=None, value_range='uint8'))
        self.net = net
        self.has_probs = name == 'inception'

    def _features(self, x):
        return self.net(x, return_features=True)

    def _probabilities(self, x):
        return _as_probabilities(self.net(x, no_output_bias=True))


class FashionDetector(Detector):
    """The project's offline detector (metrics/fmnist_net.py); not Inception, so its results are named `fd_...`."""

    has_probs = True

    def __init__(self, net: FashionFeatureNet, identity: Optional[str] = None, name: str = 'fmnist'):
        spec = InputSpec(channels=INPUT_CHANNELS, resolution=INPUT_RESOLUTION, value_range='pm1', pad_from=28)
        super().__init__(name, identity, spec)
        self.net = net.eval().requires_grad_(False)

    def _features(self, x):
        return self.net.features(x)

    def _probabilities(self, x):
        return self.net(x).softmax(dim=1)


class ModuleDetector(Detector):
    """Any module: `module(prepared, **call_kwargs) -> [N, D]` features, with the input it declares
    (by default RGB floats in [-1, 1] at the images' own size)."""

    def __init__(self, module: nn.Module, name: str = 'custom', input_spec: InputSpec = InputSpec(value_range='pm1'),
                 call_kwargs: Optional[dict] = None, identity: Optional[str] = None):
        super().__init__(name, identity, input_spec)
        self.module = module.eval().requires_grad_(False)
        self.call_kwargs = dict(call_kwargs or {})

    def _features(self, x):
        out = self.module(x, **self.call_kwargs)
        return out.flatten(1)


def state_dict_identity(module: nn.Module) -> str:
    """Hash of the class name and every parameter/buffer: changes whenever the weights change."""
    digest = hashlib.sha1(type(module).__qualname__.encode())
    for key, tensor in module.state_dict().items():
        digest.update(key.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


_file_hashes: Dict[Tuple[str, int, int], str] = {}


def file_identity(path: str) -> str:
    """sha1 of the file's content (memoised per path, size and mtime)."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _file_hashes:
        digest = hashlib.sha1()
        with open(path, 'rb') as f:
            for chunk in iter(lambda: f.read(1 << 20), b''):
                digest.update(chunk)
        _file_hashes[key] = digest.hexdigest()
    return _file_hashes[key]


def _is_torchscript(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(name.endswith('constants.pkl') or '/code/' in name for name in zf.namelist())


def load_fmnist_detector(path: str = FMNIST_WEIGHTS, device: Union[str, torch.device] = 'cpu',
                         name: str = 'fmnist') -> FashionDetector:
    """Load the shipped (or a retrained) offline detector; weights only, no code is executed."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'offline detector weights not found: {path} (train them with train_detector.py)')
    blob = torch.load(path, map_location='cpu', weights_only=True)
    if not isinstance(blob, dict) or blob.get('meta', {}).get('format') != FMNIST_FORMAT:
        raise ValueError(f'{path}: not a {FMNIST_FORMAT} weights file')
    net = FashionFeatureNet()
    net.load_state_dict(blob['state_dict'])
    return FashionDetector(net, identity=file_identity(path), name=name).to(device)


def _load_file(path: str, name: Optional[str], device: torch.device) -> Detector:
    stem = os.path.splitext(os.path.basename(path))[0]
    name = name or _STANDARD_STEMS.get(stem, stem)
    if not _is_torchscript(path) and zipfile.is_zipfile(path):
        try:
            blob = torch.load(path, map_location='cpu', weights_only=True)
        except Exception as err:  # noqa: BLE001 -- reported below as one clear line.
            raise ValueError(f'detector file {path}: not TorchScript, a pickle or {FMNIST_FORMAT} ({err})') from None
        if isinstance(blob, dict) and blob.get('meta', {}).get('format') == FMNIST_FORMAT:
            return load_fmnist_detector(path, device, name)
        raise ValueError(f'detector file {path}: unrecognised weights file (expected TorchScript, a pickled '
                         f'detector or {FMNIST_FORMAT})')
    if _is_torchscript(path):
        with warnings.catch_warnings():  # TorchScript is deprecated, but it is the format the standard files use.
            warnings.filterwarnings('ignore', category=DeprecationWarning)
            net = torch.jit.load(path, map_location=device).eval()
    else:
        try:  # Upstream EDM/StyleGAN3 .pkl detectors; pickles run code: the one reader applies --refuse-unknown-code.
            net = pickle_reader.read_pickle(path)
        except pickle_reader.NetworkPickleError as err:
            raise ValueError(f'detector file {err}') from None
        if not isinstance(net, nn.Module):
            raise ValueError(f'detector file {path}: the pickle holds {type(net).__name__}, not a module')
        net = net.eval().to(device)
    return UpstreamDetector(net, name, identity=file_identity(path)).to(device)


_loaded: Dict[Tuple[str, str], Detector] = {}


def load_detector(detector: Any, device: Union[str, torch.device] = 'cpu') -> Detector:
    """A registered name ('inception', 'vgg16', 'fmnist'), a path or URL, a Detector, or any nn.Module
    (called with uint8 images and `return_features=True` if its forward has that argument, as upstream's are).

    Standard detectors are downloaded once into the dnnlib cache; offline, pass a local copy's path.
    Loaded files are kept per (file, device), as upstream does.
    """
    device = torch.device(device)
    if isinstance(detector, Detector):
        return detector.to(device)
    if isinstance(detector, nn.Module):
        scripted = isinstance(detector, torch.jit.ScriptModule)
        if scripted or 'return_features' in inspect.signature(detector.forward).parameters:
            return UpstreamDetector(detector.eval(), name='custom').to(device)  # uint8 in, upstream convention.
        return ModuleDetector(detector).to(device)
    if not isinstance(detector, str):
        raise TypeError(f'detector: expected a name, path, URL or module, got {type(detector).__name__}')
    key = (detector, str(device))
    if key not in _loaded:
        name = detector if detector in REGISTRY else None
        location = REGISTRY.get(detector, detector)
        if name == 'fmnist':
            _loaded[key] = load_fmnist_detector(location, device)
        else:
            if not dnnlib.util.is_url(location, allow_file_urls=True) and not os.path.isfile(location):
                known = ', '.join(REGISTRY)
                raise ValueError(f'detector: {detector!r} is neither a registered name ({known}) nor a file')
            path = dnnlib.util.open_url(location, return_filename=True, verbose=True)
            _loaded[key] = _load_file(path, name, device)
    return _loaded[key]


def standard_detector(kind: str) -> str:
    """The detector each metric uses in StyleGAN2-ADA: VGG16 for precision/recall, Inception otherwise."""
    return 'vgg16' if kind == 'pr' else 'inception'
