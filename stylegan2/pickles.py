"""StyleGAN2 network pickles in and out: upstream stylegan2-ada-pytorch, ours, and TensorFlow StyleGAN2(-ADA).

`load_network_pkl(path_or_url)` returns `dict(G=..., D=..., G_ema=..., augment_pipe=..., training_set_kwargs=...)`
with whichever networks the file has. `rebuild_network(net)` turns any loaded network (upstream's classes run
from the source embedded in their pickle) into an instance of `stylegan2.networks`, and checks that its outputs
did not change. `save_network_pkl(path, ...)` writes upstream's snapshot layout atomically.

Loading a pickle executes code stored in it: load only files you trust, or call
`torch_utils.persistence.refuse_unknown_sources()` first to refuse any code and any global that is not on the
allow-lists (see `torch_utils.pickle_reader`).
"""

import copy
import io
import os
import pickle
import tempfile
import warnings
from typing import Any, Dict, Optional

import torch

import dnnlib
from stylegan2 import networks
from stylegan2 import tf_convert
from torch_utils import persistence, pickle_reader
from torch_utils.pickle_reader import NetworkPickleError

NETWORK_KEYS = ('G', 'D', 'G_ema')
_GENERATOR_ARGS = ('z_dim', 'c_dim', 'w_dim', 'img_resolution', 'img_channels', 'mapping_kwargs', 'synthesis_kwargs')


TF_SUBSTITUTES = {('dnnlib.tflib.network', 'Network'): tf_convert.TFNetworkStub}  # Read without TensorFlow.


def _describe(path_or_url: Any) -> str:
    return path_or_url if isinstance(path_or_url, str) else getattr(path_or_url, 'name', '<file object>')


def read_pickle(path_or_url: Any) -> Any:
    """Unpickle a local path, URL (cached download) or binary file object, TensorFlow networks included; errors
    become NetworkPickleError (see `torch_utils.pickle_reader`)."""
    return pickle_reader.read_pickle(path_or_url, substitutes=TF_SUBSTITUTES)


def _is_generator(obj: Any) -> bool:
    return isinstance(obj, torch.nn.Module) and all(hasattr(obj, a) for a in ('mapping', 'synthesis', 'z_dim'))


def _is_discriminator(obj: Any) -> bool:
    return isinstance(obj, torch.nn.Module) and all(hasattr(obj, a) for a in ('b4', 'img_resolution', 'c_dim')) \
        and not hasattr(obj, 'synthesis')


def interpret_network_pkl(data: Any, what: str = 'pickle') -> Dict[str, Any]:
    """The network dict for already-unpickled data (upstream/our dict, TF tuple, or a bare generator)."""
    if isinstance(data, tuple) and len(data) == 3 and all(isinstance(n, tf_convert.TFNetworkStub) for n in data):
        tf_G, tf_D, tf_Gs = data
        try:
            data = dict(G=tf_convert.convert_tf_generator(tf_G), D=tf_convert.convert_tf_discriminator(tf_D),
                        G_ema=tf_convert.convert_tf_generator(tf_Gs))
        except tf_convert.TFConversionError as err:
            raise NetworkPickleError(f'{what}: TensorFlow pickle cannot be converted: {err}') from None
    elif isinstance(data, tf_convert.TFNetworkStub):
        try:
            data = dict(G_ema=tf_convert.convert_tf_generator(data))
        except tf_convert.TFConversionError as err:
            raise NetworkPickleError(f'{what}: TensorFlow pickle cannot be converted: {err}') from None
    elif _is_generator(data):
        data = dict(G_ema=data)

    if not isinstance(data, dict):
        raise NetworkPickleError(f'{what}: expected a StyleGAN2 network pickle (a dict with G, D, G_ema), '
                                 f'got {type(data).__name__}')
    data = {key: value for key, value in data.items() if not (key in NETWORK_KEYS and value is None)}
    if not any(key in data for key in NETWORK_KEYS):
        hint = ' (this is an EDM diffusion-model pickle: use it as a teacher)' if 'ema' in data else ''
        raise NetworkPickleError(f'{what}: expected a StyleGAN2 network pickle with G, D or G_ema; found keys '
                                 f'{sorted(map(str, data))}{hint}')
    for key in ('G', 'G_ema'):
        if key in data and not _is_generator(data[key]):
            raise NetworkPickleError(f'{what}: {key} is a {type(data[key]).__name__}, not a StyleGAN2 generator')
    if 'D' in data and not _is_discriminator(data['D']):
        raise NetworkPickleError(f'{what}: D is a {type(data["D"]).__name__}, not a StyleGAN2 discriminator')

    data = dict(data)
    data.setdefault('augment_pipe', None)
    data.setdefault('training_set_kwargs', None)
    return data


def load_network_pkl(path_or_url: Any, force_fp16: bool = False) -> Dict[str, Any]:
    """Load a StyleGAN2(-ADA) pickle (upstream PyTorch, ours, or TensorFlow) as a dict of networks.

    Keys: whichever of `G`, `D`, `G_ema` the file has, plus `augment_pipe` and `training_set_kwargs` (None when
    absent). `force_fp16` rebuilds the networks with 4 fp16 resolutions and conv_clamp 256 (as upstream's
    option does). Raises NetworkPickleError with a one-line message for any unusable file.
    """
    what = _describe(path_or_url)
    data = interpret_network_pkl(read_pickle(path_or_url), what)
    if force_fp16:
        for key in NETWORK_KEYS:
            if data.get(key) is not None:
                data[key] = rebuild_network(data[key], num_fp16_res=4, conv_clamp=256)
    return data

# ----------------------------------------------------------------------------------------------------------------
# Rebuilding as our own classes.

@torch.no_grad()
def _probe_outputs(net: torch.nn.Module, seed: int = 0) -> Optional[torch.Tensor]:
    """Outputs of `net` on fixed random inputs (deterministic modes, float32), or None for other classes."""
    device = next(iter(net.buffers()), next(iter(net.parameters()), torch.empty([]))).device
    rnd = torch.Generator().manual_seed(seed)
    batch = 2
    c_dim = getattr(net, 'c_dim', 0)
    c = torch.eye(max(c_dim, 1))[torch.arange(batch) % max(c_dim, 1)][:, :c_dim].to(device)
    name = type(net).__name__
    if name == 'Generator':
        z = torch.randn([batch, net.z_dim], generator=rnd).to(device)
        psi = 0.7 if hasattr(net.mapping, 'w_avg') else 1  # Exercise w_avg when the network tracks it.
        return net(z, c, truncation_psi=psi, noise_mode='const', force_fp32=True)
    if name == 'Discriminator':
        img = torch.randn([batch, net.img_channels, net.img_resolution, net.img_resolution], generator=rnd)
        return net(img.to(device), c, force_fp32=True)
    if name == 'SynthesisNetwork':
        ws = torch.randn([batch, net.num_ws, net.w_dim], generator=rnd).to(device)
        return net(ws, noise_mode='const', force_fp32=True)
    if name == 'MappingNetwork':
        z = torch.randn([batch, net.z_dim], generator=rnd).to(device) if net.z_dim > 0 else None
        return net(z, c)
    return None


def outputs_agree(net_a: torch.nn.Module, net_b: torch.nn.Module) -> Optional[float]:
    """Max abs difference of the two networks' probe outputs relative to their scale (None: nothing to probe).

    Both networks are probed in eval mode (so no running average moves); their modes are restored after.
    """
    modes = [(m, m.training) for net in (net_a, net_b) for m in net.modules()]
    try:
        net_a.eval()
        net_b.eval()
        out_a, out_b = _probe_outputs(net_a), _probe_outputs(net_b)
    finally:
        for module, training in modes:
            module.training = training
    if out_a is None or out_b is None:
        return None
    scale = max(float(out_a.abs().max()), 1e-3)
    return float((out_a - out_b).abs().max()) / scale


def rebuild_network(net: torch.nn.Module, check: bool = True, rtol: float = 1e-4, **kwarg_overrides) -> torch.nn.Module:
    """Rebuild a loaded network as an instance of `stylegan2.networks`, with the same weights and outputs.

    Upstream pickles (and pickles of older versions of our code) run the class source stored in the file. To
    train with our code and ops, the network is constructed from its recorded `init_kwargs` with our class of
    the same name, then every parameter and buffer is copied by name (both sides must have exactly the same
    names and shapes). With `check`, the outputs on fixed inputs must agree within `rtol` of their scale.
    `kwarg_overrides` change top-level (or `synthesis_kwargs`) constructor arguments, e.g. `num_fp16_res`.
    """
    name = type(net).__name__
    our_class = getattr(networks, name, None)
    if not (isinstance(our_class, type) and issubclass(our_class, torch.nn.Module)):
        raise NetworkPickleError(f'cannot rebuild a {name}: stylegan2.networks has no class of that name')
    if type(net) is our_class and not kwarg_overrides:
        return net
    if not persistence.is_persistent(net):
        raise NetworkPickleError(f'cannot rebuild a {name}: it does not record its constructor arguments')

    init_kwargs = net.init_kwargs
    if name == 'Generator':  # stylegan3's copy of this network takes the synthesis kwargs flattened into G's.
        flattened = [key for key in init_kwargs if key not in _GENERATOR_ARGS]
        if flattened:
            synthesis_kwargs = dnnlib.EasyDict(init_kwargs.get('synthesis_kwargs', {}))
            synthesis_kwargs.update({key: init_kwargs.pop(key) for key in flattened})
            init_kwargs.synthesis_kwargs = synthesis_kwargs
    for key, value in kwarg_overrides.items():
        if name == 'Generator' and key not in _GENERATOR_ARGS:
            init_kwargs.synthesis_kwargs = dnnlib.EasyDict(init_kwargs.get('synthesis_kwargs', {}), **{key: value})
        else:
            init_kwargs[key] = value
    try:
        ours = our_class(*net.init_args, **init_kwargs)
    except (TypeError, ValueError, AssertionError) as err:
        raise NetworkPickleError(f'cannot rebuild {name} from its init_kwargs: {err}') from None

    src = dict(list(net.named_parameters()) + list(net.named_buffers()))
    dst = dict(list(ours.named_parameters()) + list(ours.named_buffers()))
    missing, extra = sorted(set(dst) - set(src)), sorted(set(src) - set(dst))
    if missing or extra:
        raise NetworkPickleError(f'cannot rebuild {name}: tensor names differ (missing {missing[:5]}, '
                                 f'unexpected {extra[:5]})')
    for key, tensor in dst.items():
        if tensor.shape != src[key].shape:
            raise NetworkPickleError(f'cannot rebuild {name}: {key} has shape {list(src[key].shape)}, '
                                     f'expected {list(tensor.shape)}')
    device = next(iter(src.values())).device if src else torch.device('cpu')
    ours = ours.to(device)
    with torch.no_grad():
        for key, tensor in dst.items():
            tensor.copy_(src[key])
    for key, param in ours.named_parameters():
        param.requires_grad_(src[key].requires_grad)
    ours.train(net.training)

    if check and not kwarg_overrides:
        error = outputs_agree(net, ours)
        if error is not None and error > rtol:
            raise NetworkPickleError(f'rebuilt {name} does not reproduce the loaded network (relative difference '
                                     f'{error:.2e} > {rtol:.0e}); its pickled code differs from ours')
    return ours

# ----------------------------------------------------------------------------------------------------------------
# Saving.

def _export_copy(value: Any, what: str) -> Any:
    """An eval-mode, gradient-free CPU deep copy of a module, checked to be loadable by upstream tools."""
    if not isinstance(value, torch.nn.Module):
        return copy.deepcopy(value)
    for name, module in value.named_modules():
        if not persistence.is_persistent(module):
            raise NetworkPickleError(f'cannot export {what}: module {name or "<root>"} ({type(module).__name__}) is '
                                     f'not a persistent class, so other tools could not load it')
    return copy.deepcopy(value).eval().requires_grad_(False).cpu()


def save_network_pkl(path: str, G: Optional[torch.nn.Module] = None, D: Optional[torch.nn.Module] = None,
                     G_ema: Optional[torch.nn.Module] = None, augment_pipe: Any = None,
                     training_set_kwargs: Optional[dict] = None, overwrite: bool = False, **extra: Any) -> None:
    """Write upstream's snapshot layout `dict(G, D, G_ema, augment_pipe, training_set_kwargs)` atomically.

    The file appears complete or not at all (written to a temporary file, then renamed). An existing file is
    kept unless `overwrite`. `extra` adds further keys (upstream tools ignore unknown keys). NVIDIA's loader
    requires all of G, D and G_ema: a missing G is filled with G_ema, and a missing D draws a warning.
    """
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f'{path} already exists; refusing to overwrite it')
    if G is None:
        G = G_ema
    if D is None or G_ema is None:
        warnings.warn(f'{path}: written without {"D" if D is None else "G_ema"}; NVIDIA\'s legacy.load_network_pkl '
                      f'requires G, D and G_ema, so its tools will not load this file')
    data = dict(G=G, D=D, G_ema=G_ema, augment_pipe=augment_pipe, training_set_kwargs=training_set_kwargs, **extra)
    copies = {}  # The same object under two keys is stored once.
    for key, value in data.items():
        if id(value) not in copies:
            copies[id(value)] = _export_copy(value, key)
        data[key] = copies[id(value)]
    buffer = io.BytesIO()
    pickle.dump(data, buffer, protocol=4)

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp', dir=directory)
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
