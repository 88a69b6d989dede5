"""Convert TensorFlow StyleGAN2 / StyleGAN2-ADA networks (already unpickled as stubs) into our PyTorch networks.

A TF pickle holds `dnnlib.tflib.network.Network` objects. Unpickled with `TFNetworkStub` standing in for that
class, each is a plain attribute bag: `version`, `name`, `static_kwargs` (constructor arguments),
`components` (sub-networks, e.g. G's `mapping` and `synthesis`) and `variables` (a list of `(name, ndarray)`).
No TensorFlow is needed. The converter maps the kwargs to our constructor arguments, builds the network and
fills every parameter and buffer from a TF variable; a tensor without a source is an error, never left random.
"""

import re
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import torch

import dnnlib
from stylegan2 import networks


class TFNetworkStub(dnnlib.EasyDict):
    """Stands in for `dnnlib.tflib.network.Network` while unpickling; its state lands in `__dict__`."""


class TFConversionError(ValueError):
    """The TF network cannot be converted (unsupported version, unknown kwargs, missing or misshapen variables)."""


# ----------------------------------------------------------------------------------------------------------------
# Static kwargs.

class _KwargReader:
    """Reads TF static kwargs with defaults and remembers which it used, so unknown ones can be reported."""

    def __init__(self, static_kwargs: dict, ignored: Tuple[str, ...]):
        self.kwargs = dict(static_kwargs)
        self.used = set(ignored)

    def __call__(self, tf_name: str, default: Any = None, none: Any = None) -> Any:
        self.used.add(tf_name)
        value = self.kwargs.get(tf_name, default)
        return none if (value is None and none is not None) else value

    def check_all_known(self, what: str) -> None:
        unknown = sorted(set(self.kwargs) - self.used)
        if unknown:
            raise TFConversionError(f'unknown TensorFlow {what} kwarg(s) {unknown}; only StyleGAN2 config-E/F '
                                    f'and StyleGAN2-ADA networks are supported')


def _check_version(tf_net: TFNetworkStub, what: str) -> None:
    version = getattr(tf_net, 'version', None)
    if not isinstance(version, int) or version < 4:
        raise TFConversionError(f'TensorFlow {what} network pickle version {version} is too low (need >= 4)')


def _flatten_variables(tf_net: TFNetworkStub, prefix: str = '') -> Dict[str, np.ndarray]:
    """All variables of a TF network and its components, named `<component>/<variable>` recursively."""
    tensors = {prefix + name: np.asarray(value) for name, value in tf_net.variables}
    for comp_name, comp in getattr(tf_net, 'components', {}).items():
        tensors.update(_flatten_variables(comp, prefix + comp_name + '/'))
    return tensors


def _rename_lod(tensors: Dict[str, np.ndarray], pattern: str, fmt: str, resolution: int) -> bool:
    """Rename progressive-growing `..._lod{n}` layers to their `{r}x{r}` names; True if any existed."""
    found = False
    for name in list(tensors):
        match = re.fullmatch(pattern, name)
        if match:
            r = resolution >> int(match.group('lod'))
            tensors[fmt.format(r=r, rest=match.group('rest'))] = tensors.pop(name)
            found = True
    return found

# ----------------------------------------------------------------------------------------------------------------
# Weight layouts.

def _conv(w: np.ndarray) -> np.ndarray:
    """TF conv [kh, kw, in, out] -> PyTorch [out, in, kh, kw]."""
    return w.transpose(3, 2, 0, 1)


def _conv_flipped(w: np.ndarray) -> np.ndarray:
    """TF transposed-conv weight -> PyTorch true-convolution weight (spatially flipped)."""
    return w[::-1, ::-1].transpose(3, 2, 0, 1)


def _dense(w: np.ndarray) -> np.ndarray:
    """TF dense [in, out] -> PyTorch [out, in]."""
    return w.T


def _same(w: np.ndarray) -> np.ndarray:
    return w


def _no_source(name: str) -> TFConversionError:
    return TFConversionError(f'no TensorFlow variable corresponds to {name}; this network layout is not supported')


def _fill(net: torch.nn.Module, tensors: Dict[str, np.ndarray],
          source_of: Callable[[str], Optional[Tuple[str, Callable[[np.ndarray], np.ndarray]]]]) -> None:
    """Copy into every parameter/buffer of `net` the TF variable that `source_of(name)` names (transformed).

    `source_of` returns None for tensors kept from the constructor (the resampling filters).
    """
    with torch.no_grad():
        for name, tensor in list(net.named_parameters()) + list(net.named_buffers()):
            source = source_of(name)
            if source is None:
                continue
            tf_name, transform = source
            if tf_name not in tensors:
                raise TFConversionError(f'the TensorFlow pickle has no variable {tf_name!r} for {name} '
                                        f'{list(tensor.shape)}')
            value = np.array(transform(tensors[tf_name]), dtype=np.float32, order='C')  # keeps 0-d scalars 0-d
            if tuple(value.shape) != tuple(tensor.shape):
                raise TFConversionError(f'TensorFlow variable {tf_name!r} has shape {list(value.shape)} after '
                                        f'conversion, but {name} needs {list(tensor.shape)}')
            tensor.copy_(torch.from_numpy(value))

# ----------------------------------------------------------------------------------------------------------------
# Generator.

# Inference defaults and training-only switches: they do not change the weights or the architecture.
_G_IGNORED = ('truncation_psi', 'truncation_cutoff', 'truncation_psi_val', 'truncation_cutoff_val',
              'style_mixing_prob', 'structure', 'conditioning', 'fused_modconv')


def generator_kwargs(static_kwargs: dict, architecture: Optional[str] = None) -> dnnlib.EasyDict:
    """Our `Generator` constructor arguments for a TF generator's static kwargs."""
    kw = _KwargReader(static_kwargs, _G_IGNORED)
    kwargs = dnnlib.EasyDict(
        z_dim=kw('latent_size', 512),
        c_dim=kw('label_size', 0),
        w_dim=kw('dlatent_size', 512),
        img_resolution=kw('resolution', 1024),
        img_channels=kw('num_channels', 3),
        mapping_kwargs=dnnlib.EasyDict(
            num_layers=kw('mapping_layers', 8),
            embed_features=kw('label_fmaps', None),
            layer_features=kw('mapping_fmaps', None),
            activation=kw('mapping_nonlinearity', 'lrelu'),
            lr_multiplier=kw('mapping_lrmul', 0.01),
            # StyleGAN2 (TF) calls it dlatent_avg_beta, StyleGAN2-ADA (TF) w_avg_beta.
            w_avg_beta=kw('w_avg_beta', kw('dlatent_avg_beta', 0.995, none=1), none=1),
        ),
        synthesis_kwargs=dnnlib.EasyDict(
            channel_base=kw('fmap_base', 16384) * 2,
            channel_max=kw('fmap_max', 512),
            num_fp16_res=kw('num_fp16_res', 0),
            conv_clamp=kw('conv_clamp', None),
            architecture=kw('architecture', 'skip'),
            resample_filter=kw('resample_kernel', [1, 3, 3, 1]),
            use_noise=kw('use_noise', True),
            activation=kw('nonlinearity', 'lrelu'),
        ),
    )
    kw.check_all_known('generator')
    if architecture is not None:
        kwargs.synthesis_kwargs.architecture = architecture
    return kwargs


def _generator_source(name: str):
    """TF variable (and transform) for a parameter/buffer name of our Generator."""
    if name.endswith('resample_filter'):
        return None
    if name == 'mapping.w_avg':
        return 'dlatent_avg', _same
    match = re.fullmatch(r'mapping\.(embed|fc(\d+))\.(weight|bias)', name)
    if match:
        layer = 'LabelEmbed' if match.group(1) == 'embed' else f'Dense{match.group(2)}'
        return f'mapping/{layer}/{match.group(3)}', (_dense if match.group(3) == 'weight' else _same)
    match = re.fullmatch(r'synthesis\.b(\d+)\.(.+)', name)
    if not match:
        raise _no_source(name)
    res, rest = int(match.group(1)), match.group(2)
    block = f'synthesis/{res}x{res}'
    if rest == 'const':
        return f'{block}/Const/const', lambda w: w[0]
    if rest == 'skip.weight':
        return f'{block}/Skip/weight', _conv_flipped
    match = re.fullmatch(r'(conv0|conv1|torgb)\.(weight|bias|noise_strength|noise_const|affine\.weight|affine\.bias)',
                         rest)
    if not match:
        raise _no_source(name)
    layer, field = match.groups()
    log2 = int(np.log2(res))
    tf_layer = {'conv0': 'Conv0_up', 'conv1': 'Conv' if res == 4 else 'Conv1', 'torgb': 'ToRGB'}[layer]
    if field == 'noise_const':
        return f'synthesis/noise{2 * log2 - (5 if layer == "conv0" else 4)}', lambda w: w[0, 0]
    if field == 'weight':
        return f'{block}/{tf_layer}/weight', (_conv_flipped if layer == 'conv0' else _conv)
    if field == 'affine.weight':
        return f'{block}/{tf_layer}/mod_weight', _dense
    if field == 'affine.bias':
        return f'{block}/{tf_layer}/mod_bias', lambda w: w + 1  # TF adds the 1 at run time; ours is in the bias.
    return f'{block}/{tf_layer}/{field}', _same


def convert_tf_generator(tf_G: TFNetworkStub) -> torch.nn.Module:
    """Our `Generator` with the weights of a TF StyleGAN2(-ADA) generator."""
    _check_version(tf_G, 'generator')
    tensors = _flatten_variables(tf_G)
    resolution = tf_G.static_kwargs.get('resolution', 1024)
    # Progressive-growing names: the output layer of an 'orig' generator, stored as synthesis/ToRGB_lod{n}.
    has_lod = _rename_lod(tensors, r'(?:synthesis/)?ToRGB_lod(?P<lod>\d+)/(?P<rest>.+)', 'synthesis/{r}x{r}/ToRGB/{rest}',
                          resolution)
    kwargs = generator_kwargs(tf_G.static_kwargs, architecture='orig' if has_lod else None)
    G = networks.Generator(**kwargs)
    _fill(G, tensors, _generator_source)
    return G.eval().requires_grad_(False)

# ----------------------------------------------------------------------------------------------------------------
# Discriminator.

def discriminator_kwargs(static_kwargs: dict, architecture: Optional[str] = None) -> dnnlib.EasyDict:
    """Our `Discriminator` constructor arguments for a TF discriminator's static kwargs."""
    kw = _KwargReader(static_kwargs, ('structure',))
    kwargs = dnnlib.EasyDict(
        c_dim=kw('label_size', 0),
        img_resolution=kw('resolution', 1024),
        img_channels=kw('num_channels', 3),
        architecture=kw('architecture', 'resnet'),
        channel_base=kw('fmap_base', 16384) * 2,
        channel_max=kw('fmap_max', 512),
        num_fp16_res=kw('num_fp16_res', 0),
        conv_clamp=kw('conv_clamp', None),
        cmap_dim=kw('mapping_fmaps', None),
        block_kwargs=dnnlib.EasyDict(
            activation=kw('nonlinearity', 'lrelu'),
            resample_filter=kw('resample_kernel', [1, 3, 3, 1]),
            freeze_layers=kw('freeze_layers', 0),
        ),
        mapping_kwargs=dnnlib.EasyDict(
            num_layers=kw('mapping_layers', 0),
            embed_features=kw('mapping_fmaps', None),
            layer_features=kw('mapping_fmaps', None),
            activation=kw('mapping_nonlinearity', 'lrelu'),
            lr_multiplier=kw('mapping_lrmul', 0.1),
        ),
        epilogue_kwargs=dnnlib.EasyDict(
            mbstd_group_size=kw('mbstd_group_size', None),
            mbstd_num_channels=kw('mbstd_num_features', 1),
            activation=kw('nonlinearity', 'lrelu'),
        ),
    )
    kw.check_all_known('discriminator')
    if architecture is not None:
        kwargs.architecture = architecture
    return kwargs


def _discriminator_source(name: str):
    """TF variable (and transform) for a parameter/buffer name of our Discriminator."""
    if name.endswith('resample_filter'):
        return None
    match = re.fullmatch(r'mapping\.(embed|fc(\d+))\.(weight|bias)', name)
    if match:
        layer = 'LabelEmbed' if match.group(1) == 'embed' else f'Mapping{match.group(2)}'
        return f'{layer}/{match.group(3)}', (_dense if match.group(3) == 'weight' else _same)
    match = re.fullmatch(r'b(\d+)\.(fromrgb|conv0|conv1|skip|conv|fc|out)\.(weight|bias)', name)
    if not match:
        raise _no_source(name)
    res, layer, field = int(match.group(1)), match.group(2), match.group(3)
    if layer == 'out':
        return f'Output/{field}', (_dense if field == 'weight' else _same)
    if layer == 'fc':
        return f'{res}x{res}/Dense0/{field}', (_dense if field == 'weight' else _same)
    tf_layer = {'fromrgb': 'FromRGB', 'conv0': 'Conv0', 'conv1': 'Conv1_down', 'skip': 'Skip', 'conv': 'Conv'}[layer]
    return f'{res}x{res}/{tf_layer}/{field}', (_conv if field == 'weight' else _same)


def convert_tf_discriminator(tf_D: TFNetworkStub) -> torch.nn.Module:
    """Our `Discriminator` with the weights of a TF StyleGAN2(-ADA) discriminator."""
    _check_version(tf_D, 'discriminator')
    tensors = _flatten_variables(tf_D)
    resolution = tf_D.static_kwargs.get('resolution', 1024)
    has_lod = _rename_lod(tensors, r'FromRGB_lod(?P<lod>\d+)/(?P<rest>.+)', '{r}x{r}/FromRGB/{rest}', resolution)
    kwargs = discriminator_kwargs(tf_D.static_kwargs, architecture='orig' if has_lod else None)
    D = networks.Discriminator(**kwargs)
    _fill(D, tensors, _discriminator_source)
    return D.eval().requires_grad_(False)
