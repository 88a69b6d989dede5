"""StyleGAN2 pickles: upstream layout, TensorFlow (synthetic, per spec §4), ours; rebuild; export; errors."""

import os
import pickle
import pickletools
import sys
import types
import uuid

import numpy as np
import pytest
import torch

from stylegan2 import networks
from stylegan2.pickles import NetworkPickleError, load_network_pkl, rebuild_network, save_network_pkl
from torch_utils import persistence

G_KWARGS = dict(z_dim=8, c_dim=3, w_dim=8, img_resolution=16, img_channels=3,
                mapping_kwargs=dict(num_layers=2),
                synthesis_kwargs=dict(channel_base=128, channel_max=16, architecture='skip'))
D_KWARGS = dict(c_dim=3, img_resolution=16, img_channels=3, architecture='resnet', channel_base=128, channel_max=16,
                mapping_kwargs=dict(num_layers=1))


def randomized(net, seed=0):
    """Random values in every tensor that starts constant (biases, noise strengths, w_avg), so mappings show."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(net.named_parameters()) + list(net.named_buffers()):
            if name.endswith(('bias', 'noise_strength', 'w_avg')):
                t.add_(torch.randn(t.shape, generator=gen) * 0.3)
    return net.eval()


def probe_G(G, c_dim=3):
    gen = torch.Generator().manual_seed(1)
    z = torch.randn([4, G.z_dim], generator=gen)
    c = torch.eye(max(c_dim, 1))[[0, 1, 2, 0]][:, :c_dim]
    return G(z, c, truncation_psi=0.8, noise_mode='const', force_fp32=True)


def probe_D(D, c_dim=3):
    gen = torch.Generator().manual_seed(2)
    img = torch.randn([4, 3, 16, 16], generator=gen)
    c = torch.eye(max(c_dim, 1))[[0, 1, 2, 0]][:, :c_dim]
    return D(img, c, force_fp32=True)


def foreign_networks_module(marker):
    """Our network source run as a pickle's embedded module (as upstream pickles are), with upstream's numpy
    float64 gains; `marker` makes the source text unique so it is a module this process has never seen."""
    src = networks.Generator._orig_module_src
    src = src.replace('float(bias_act.activation_funcs[activation].def_gain)',
                      'bias_act.activation_funcs[activation].def_gain')
    src = src.replace('self.weight_gain = float(', 'self.weight_gain = (')
    return persistence._src_to_module(src + f'\n# {marker}\n'), src + f'\n# {marker}\n'


def globals_in_stream(data: bytes):
    names, strings = set(), []
    for op, arg, _ in pickletools.genops(data):
        if op.name in ('SHORT_BINUNICODE', 'BINUNICODE', 'UNICODE'):
            strings.append(arg)
        if op.name == 'STACK_GLOBAL':
            names.add(f'{strings[-2]}.{strings[-1]}')
        if op.name == 'GLOBAL':
            names.add(arg.replace(' ', '.'))
    return names

# ----------------------------------------------------------------------------------------------------------------
# Upstream layout and our own pickles.

def test_upstream_layout_pickle_loads_and_rebuilds_as_ours(tmp_path):
    module, _ = foreign_networks_module(uuid.uuid4().hex)
    torch.manual_seed(0)
    G_up = randomized(module.Generator(**G_KWARGS)).requires_grad_(False)  # as upstream snapshots are
    D_up = randomized(module.Discriminator(**D_KWARGS), seed=1).requires_grad_(False)
    assert isinstance(G_up.synthesis.b4.conv1.act_gain, np.floating)  # as in NVIDIA's pickles
    data = dict(G=G_up, D=D_up, G_ema=G_up, augment_pipe=None,
                training_set_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path='x.zip'))
    path = tmp_path / 'network-snapshot-000000.pkl'
    with open(path, 'wb') as f:
        pickle.dump(data, f, protocol=3)

    loaded = load_network_pkl(str(path))
    assert set(loaded) == {'G', 'D', 'G_ema', 'augment_pipe', 'training_set_kwargs'}
    assert loaded['training_set_kwargs']['path'] == 'x.zip'
    assert type(loaded['G_ema']) is not networks.Generator  # the pickle's own code

    # A network built directly with our classes and the same weights is the reference.
    G_direct = networks.Generator(**G_KWARGS).eval()
    G_direct.load_state_dict(G_up.state_dict())
    D_direct = networks.Discriminator(**D_KWARGS).eval()
    D_direct.load_state_dict(D_up.state_dict())
    assert torch.allclose(probe_G(loaded['G_ema']), probe_G(G_direct), atol=1e-6)

    G_ours = rebuild_network(loaded['G_ema'])
    D_ours = rebuild_network(loaded['D'])
    assert type(G_ours) is networks.Generator and type(D_ours) is networks.Discriminator
    assert torch.equal(probe_G(G_ours), probe_G(G_direct))
    assert torch.equal(probe_D(D_ours), probe_D(D_direct))
    assert not any(p.requires_grad for p in G_ours.parameters())  # kept from the loaded network

    # Exporting the loaded (foreign-code) networks keeps their code and outputs.
    again = str(tmp_path / 'again.pkl')
    save_network_pkl(again, **loaded)
    reloaded = load_network_pkl(again)
    assert type(reloaded['G_ema']).__module__ == type(G_up).__module__
    assert reloaded['training_set_kwargs'] == loaded['training_set_kwargs']
    assert torch.equal(probe_G(reloaded['G_ema']), probe_G(G_direct))


def test_rebuild_accepts_stylegan3_style_flattened_synthesis_kwargs():
    _, src = foreign_networks_module(uuid.uuid4().hex)
    old = 'img_channels, mapping_kwargs={}, synthesis_kwargs={}):'
    assert old in src
    module = persistence._src_to_module(src.replace(old, 'img_channels, mapping_kwargs={}, **synthesis_kwargs):'))
    flat = dict(G_KWARGS, **G_KWARGS['synthesis_kwargs'])
    del flat['synthesis_kwargs']
    G = randomized(module.Generator(**flat))
    G_ours = rebuild_network(G)
    assert G_ours.init_kwargs.synthesis_kwargs.channel_base == 128
    assert torch.equal(probe_G(G_ours), probe_G(G))


def test_rebuild_detects_code_that_behaves_differently():
    module, src = foreign_networks_module(uuid.uuid4().hex)
    changed = src.replace('return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()',
                          'return 2 * x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()')
    assert changed != src
    module = persistence._src_to_module(changed)
    G = randomized(module.Generator(**G_KWARGS))
    with pytest.raises(NetworkPickleError, match='does not reproduce'):
        rebuild_network(G)


def test_export_reload_round_trip(tmp_path):
    torch.manual_seed(0)
    G = randomized(networks.Generator(**G_KWARGS))
    D = randomized(networks.Discriminator(**D_KWARGS), seed=1)
    path = str(tmp_path / 'out.pkl')
    save_network_pkl(path, G=G, D=D, G_ema=G, training_set_kwargs=dict(path='data.zip'))
    assert os.listdir(tmp_path) == ['out.pkl']  # no temporary file left behind
    with open(path, 'rb') as f:
        raw = f.read()
    names = globals_in_stream(raw)
    assert 'torch_utils.persistence._reconstruct_persistent_obj' in names
    assert not any(n.startswith(('numpy', 'stylegan2')) for n in names), names  # loadable under numpy 1 / upstream
    assert raw.count(b'class MappingNetwork') == 1  # the source is stored once

    loaded = load_network_pkl(path)
    assert loaded['augment_pipe'] is None and loaded['training_set_kwargs'] == dict(path='data.zip')
    assert not loaded['G'].training and not any(p.requires_grad for p in loaded['G'].parameters())
    assert torch.equal(probe_G(loaded['G_ema']), probe_G(G))
    assert torch.equal(probe_D(loaded['D']), probe_D(D))
    assert rebuild_network(loaded['G_ema']) is loaded['G_ema']  # same source: already our class

    bare = str(tmp_path / 'bare.pkl')  # a generator pickled on its own counts as G_ema
    with open(bare, 'wb') as f:
        pickle.dump(G, f)
    assert set(load_network_pkl(bare)) == {'G_ema', 'augment_pipe', 'training_set_kwargs'}

    with pytest.raises(FileExistsError):
        save_network_pkl(path, G_ema=G, D=D)
    with pytest.raises(NetworkPickleError, match='not a persistent class'):
        save_network_pkl(str(tmp_path / 'bad.pkl'), G_ema=G, D=torch.nn.Linear(2, 2))


def test_force_fp16_rebuilds_with_fp16_resolutions(tmp_path):
    G = randomized(networks.Generator(**G_KWARGS))
    path = str(tmp_path / 'g.pkl')
    with pytest.warns(UserWarning, match='without D'):  # upstream's loader needs D too
        save_network_pkl(path, G_ema=G)
    data = load_network_pkl(path, force_fp16=True)
    assert 'D' not in data and torch.equal(probe_G(data['G']), probe_G(G))  # G filled with G_ema
    G16 = data['G_ema']
    assert G16.init_kwargs.synthesis_kwargs.num_fp16_res == 4 and G16.synthesis.b16.use_fp16
    assert G16.synthesis.b16.conv1.conv_clamp == 256
    assert torch.allclose(probe_G(G16), probe_G(G), atol=1e-6)  # on CPU fp16 blocks run in fp32


def test_refuse_unknown_code(tmp_path):
    _, src = foreign_networks_module('unused')
    unseen = src + f'\n# {uuid.uuid4().hex}\n'
    meta = dict(type='class', version=6, module_src=unseen, class_name='Generator', state={})

    class Stub:
        def __reduce__(self):
            return (persistence._reconstruct_persistent_obj, (meta,))
    path = tmp_path / 'evil.pkl'
    with open(path, 'wb') as f:
        pickle.dump(dict(G_ema=Stub()), f)
    persistence.refuse_unknown_sources(True)
    try:
        with pytest.raises(NetworkPickleError, match='allow-list'):
            load_network_pkl(str(path))
    finally:
        persistence.refuse_unknown_sources(False)


def test_errors_are_one_line_and_name_the_file(tmp_path):
    cases = {}
    cases['missing.pkl'] = None
    (tmp_path / 'garbage.pkl').write_bytes(b'not a pickle at all')
    cases['garbage.pkl'] = 'not a loadable network pickle'
    torch.save({'weight': torch.zeros(2)}, tmp_path / 'state.pt')
    cases['state.pt'] = 'torch.save'
    with open(tmp_path / 'edm.pkl', 'wb') as f:
        pickle.dump(dict(ema=None, loss_fn=None), f)
    cases['edm.pkl'] = 'EDM'
    with open(tmp_path / 'list.pkl', 'wb') as f:
        pickle.dump([1, 2], f)
    cases['list.pkl'] = 'expected a StyleGAN2 network pickle'
    with open(tmp_path / 'wrongG.pkl', 'wb') as f:
        pickle.dump(dict(G=3), f)
    cases['wrongG.pkl'] = 'not a StyleGAN2 generator'
    for name, fragment in cases.items():
        path = str(tmp_path / name)
        with pytest.raises(NetworkPickleError) as info:
            load_network_pkl(path)
        message = str(info.value)
        assert '\n' not in message and path in message
        assert fragment is None or fragment in message, message

# ----------------------------------------------------------------------------------------------------------------
# TensorFlow pickles, fabricated per spec §4 (TF Network state: version, name, static_kwargs, components,
# build_module_src, build_func_name, variables).

class FakeTFNetwork:
    """Pickles like dnnlib.tflib.network.Network (registered under that name while the test writes the file)."""

    def __init__(self, name, static_kwargs, variables, components=None, version=4):
        self.state = dict(version=version, name=name, static_kwargs=static_kwargs, components=components or {},
                          build_module_src='', build_func_name=f'training.networks.{name}', variables=variables)

    def __getstate__(self):
        return self.state


@pytest.fixture
def tf_module(monkeypatch):
    tflib = types.ModuleType('dnnlib.tflib')
    network = types.ModuleType('dnnlib.tflib.network')
    FakeTFNetwork.__module__ = 'dnnlib.tflib.network'
    FakeTFNetwork.__qualname__ = 'Network'
    network.Network = FakeTFNetwork
    monkeypatch.setitem(sys.modules, 'dnnlib.tflib', tflib)
    monkeypatch.setitem(sys.modules, 'dnnlib.tflib.network', network)
    yield
    FakeTFNetwork.__module__ = __name__
    FakeTFNetwork.__qualname__ = 'FakeTFNetwork'


def np_(t):
    return t.detach().numpy().astype(np.float32)


def tf_conv(w, flip=False):
    out = np_(w).transpose(2, 3, 1, 0)  # [out, in, kh, kw] -> [kh, kw, in, out]
    return np.ascontiguousarray(out[::-1, ::-1] if flip else out)


def tf_generator(G, static_kwargs, lod_names=False):
    """Our G as a TF generator (the inverse of spec §4.3)."""
    sd = G.state_dict()
    mapping = [(f'Dense{i}/weight', np_(sd[f'mapping.fc{i}.weight']).T.copy()) for i in range(2)]
    mapping += [(f'Dense{i}/bias', np_(sd[f'mapping.fc{i}.bias'])) for i in range(2)]
    if G.c_dim:
        mapping += [('LabelEmbed/weight', np_(sd['mapping.embed.weight']).T.copy()),
                    ('LabelEmbed/bias', np_(sd['mapping.embed.bias']))]
    synthesis = [('4x4/Const/const', np_(sd['synthesis.b4.const'])[None])]
    for res in G.synthesis.block_resolutions:
        log2 = int(np.log2(res))
        layers = [('conv1', 'Conv' if res == 4 else 'Conv1', 2 * log2 - 4)]
        if res > 4:
            layers.insert(0, ('conv0', 'Conv0_up', 2 * log2 - 5))
        for ours, tf_name, noise_idx in layers:
            p = f'synthesis.b{res}.{ours}.'
            synthesis += [(f'{res}x{res}/{tf_name}/weight', tf_conv(sd[p + 'weight'], flip=(ours == 'conv0'))),
                          (f'{res}x{res}/{tf_name}/bias', np_(sd[p + 'bias'])),
                          (f'{res}x{res}/{tf_name}/noise_strength', np_(sd[p + 'noise_strength'])),
                          (f'{res}x{res}/{tf_name}/mod_weight', np_(sd[p + 'affine.weight']).T.copy()),
                          (f'{res}x{res}/{tf_name}/mod_bias', np_(sd[p + 'affine.bias']) - 1),
                          (f'noise{noise_idx}', np_(sd[p + 'noise_const'])[None, None])]
        p = f'synthesis.b{res}.torgb.'
        if p + 'weight' in sd:
            name = f'ToRGB_lod{int(np.log2(G.img_resolution // res))}' if lod_names else f'{res}x{res}/ToRGB'
            synthesis += [(f'{name}/weight', tf_conv(sd[p + 'weight'])), (f'{name}/bias', np_(sd[p + 'bias'])),
                          (f'{name}/mod_weight', np_(sd[p + 'affine.weight']).T.copy()),
                          (f'{name}/mod_bias', np_(sd[p + 'affine.bias']) - 1)]
    return FakeTFNetwork('G', static_kwargs, [('dlatent_avg', np_(sd['mapping.w_avg']))], components=dict(
        mapping=FakeTFNetwork('G_mapping', {}, mapping), synthesis=FakeTFNetwork('G_synthesis', {}, synthesis)))


def tf_discriminator(D, static_kwargs):
    sd = D.state_dict()
    variables = []
    for key, t in sd.items():
        parts = key.split('.')
        if parts[-1] == 'resample_filter':
            continue
        if parts[0] == 'mapping':
            layer = 'LabelEmbed' if parts[1] == 'embed' else f'Mapping{parts[1][2:]}'
            variables.append((f'{layer}/{parts[2]}', np_(t).T.copy() if parts[2] == 'weight' else np_(t)))
            continue
        res = int(parts[0][1:])
        if parts[1] in ('fc', 'out'):
            name = 'Output' if parts[1] == 'out' else f'{res}x{res}/Dense0'
            variables.append((f'{name}/{parts[2]}', np_(t).T.copy() if parts[2] == 'weight' else np_(t)))
            continue
        layer = dict(fromrgb='FromRGB', conv0='Conv0', conv1='Conv1_down', skip='Skip', conv='Conv')[parts[1]]
        variables.append((f'{res}x{res}/{layer}/{parts[2]}', tf_conv(t) if parts[2] == 'weight' else np_(t)))
    return FakeTFNetwork('D', static_kwargs, variables)


TF_G_STATIC = dict(latent_size=8, label_size=3, dlatent_size=8, resolution=16, num_channels=3, mapping_layers=2,
                   fmap_base=64, fmap_max=16, architecture='skip', truncation_psi=0.5)
TF_D_STATIC = dict(label_size=3, resolution=16, num_channels=3, architecture='resnet', fmap_base=64, fmap_max=16,
                   mapping_layers=1, mbstd_group_size=2)


def write_tf_pickle(path, *networks_):
    with open(path, 'wb') as f:
        pickle.dump(tuple(networks_) if len(networks_) > 1 else networks_[0], f, protocol=3)


def test_tf_pickle_converts_to_equal_networks(tmp_path, tf_module):
    torch.manual_seed(0)
    G = randomized(networks.Generator(**G_KWARGS))
    D_kwargs = dict(D_KWARGS, mapping_kwargs=dict(num_layers=1, lr_multiplier=0.1),
                    epilogue_kwargs=dict(mbstd_group_size=2))
    D = randomized(networks.Discriminator(**D_kwargs), seed=1)
    G_tf, D_tf = tf_generator(G, TF_G_STATIC), tf_discriminator(D, TF_D_STATIC)
    path = str(tmp_path / 'tf.pkl')
    write_tf_pickle(path, G_tf, D_tf, G_tf)
    with pytest.raises(ModuleNotFoundError):  # plain pickle needs TensorFlow's dnnlib
        sys.modules.pop('dnnlib.tflib.network')
        sys.modules.pop('dnnlib.tflib')
        with open(path, 'rb') as f:
            pickle.load(f)

    loaded = load_network_pkl(path)
    assert loaded['augment_pipe'] is None and loaded['training_set_kwargs'] is None
    for key in ('G', 'G_ema'):
        assert type(loaded[key]) is networks.Generator
        sd = loaded[key].state_dict()
        for name, t in G.state_dict().items():
            assert torch.allclose(sd[name], t, atol=1e-6), name
        assert torch.allclose(probe_G(loaded[key]), probe_G(G), atol=1e-5)
    assert loaded['D'].init_kwargs.mapping_kwargs.lr_multiplier == 0.1
    assert torch.allclose(probe_D(loaded['D']), probe_D(D), atol=1e-5)


def test_tf_generator_with_tolod_names_becomes_orig_architecture(tmp_path, tf_module):
    """Upstream crashes on these files; the layer must map to the last block's torgb of an 'orig' generator."""
    torch.manual_seed(3)
    kwargs = dict(G_KWARGS, synthesis_kwargs=dict(G_KWARGS['synthesis_kwargs'], architecture='orig'))
    G = randomized(networks.Generator(**kwargs))
    static = dict(TF_G_STATIC)
    del static['architecture']  # the file does not say 'orig'; the lod names imply it
    static['dlatent_avg_beta'] = 0.99  # TF StyleGAN2's name for w_avg_beta
    path = str(tmp_path / 'lod.pkl')
    write_tf_pickle(path, tf_generator(G, static, lod_names=True))
    G_loaded = load_network_pkl(path)['G_ema']
    assert G_loaded.synthesis.b16.architecture == 'orig' and not hasattr(G_loaded.synthesis.b8, 'torgb')
    assert G_loaded.mapping.w_avg_beta == 0.99
    assert torch.allclose(probe_G(G_loaded), probe_G(G), atol=1e-5)


def test_tf_pickle_errors(tmp_path, tf_module):
    G = randomized(networks.Generator(**G_KWARGS))
    old = tf_generator(G, TF_G_STATIC)
    old.state['version'] = 3
    write_tf_pickle(tmp_path / 'old.pkl', old)
    with pytest.raises(NetworkPickleError, match='version 3 is too low'):
        load_network_pkl(str(tmp_path / 'old.pkl'))
    write_tf_pickle(tmp_path / 'kw.pkl', tf_generator(G, dict(TF_G_STATIC, fmap_decay=0.5)))
    with pytest.raises(NetworkPickleError, match='fmap_decay'):
        load_network_pkl(str(tmp_path / 'kw.pkl'))
    broken = tf_generator(G, TF_G_STATIC)
    broken.state['components']['synthesis'].state['variables'].pop(0)
    write_tf_pickle(tmp_path / 'missing.pkl', broken)
    with pytest.raises(NetworkPickleError, match='synthesis/4x4/Const/const'):
        load_network_pkl(str(tmp_path / 'missing.pkl'))
