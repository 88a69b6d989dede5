"""teachers.load: upstream-layout EDM pickles (our source and foreign source) load in a fresh process with equal
outputs, rebuild as our classes, come from the download cache by short name, and fail with one-line errors."""

import ast
import hashlib
import importlib.util
import io
import os
import pickle
import subprocess
import sys
import textwrap
import uuid

import numpy as np
import pytest
import torch

import teachers
from teachers import networks
from teachers.load import NetworkPickleError
from teachers.loss import EDMLoss
from torch_utils import persistence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NET_KWARGS = dict(img_resolution=16, img_channels=3, label_dim=3, augment_dim=9, model_type='SongUNet',
                  model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0.13)


def randomized(net, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return net.eval()


def snapshot(net):
    """An EDM training snapshot in the upstream layout."""
    return dict(ema=net, loss_fn=EDMLoss(), augment_pipe=None,
                dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path='data.zip', use_labels=True,
                                    xflip=False, cache=True, resolution=16, max_size=100))


def reference_inputs():
    gen = torch.Generator().manual_seed(5)
    return torch.randn(2, 3, 16, 16, generator=gen), torch.tensor([0.4, 7.0]), torch.eye(3)[[0, 2]]


def load_in_fresh_process(pkl_path, out_path):
    """Unpickle and teachers.load in a new interpreter; returns the outputs and where the classes came from."""
    code = textwrap.dedent(f'''
        import pickle, torch
        torch.set_num_threads(1)
        with open({pkl_path!r}, 'rb') as f:  # Before importing teachers: only the embedded source defines classes.
            raw_module = type(pickle.load(f)['ema']).__module__
        import teachers
        net = teachers.load({pkl_path!r})
        gen = torch.Generator().manual_seed(5)
        x, sigma, labels = torch.randn(2, 3, 16, 16, generator=gen), torch.tensor([0.4, 7.0]), torch.eye(3)[[0, 2]]
        ours = teachers.rebuild_teacher(net)
        with torch.no_grad():
            torch.save(dict(out=net(x, sigma, labels), rebuilt=ours.eval()(x, sigma, labels), module=raw_module,
                            ours_module=type(ours).__module__, training=net.training,
                            grads=any(p.requires_grad for p in net.parameters())), {out_path!r})
    ''')
    subprocess.run([sys.executable, '-c', code], cwd=ROOT, check=True, timeout=120,
                   env=dict(os.environ, PYTHONPATH=ROOT))
    return torch.load(out_path)


def test_our_upstream_layout_pickle_loads_in_fresh_process_with_equal_outputs(tmp_path):
    torch.manual_seed(0)
    net = randomized(networks.EDMPrecond(**NET_KWARGS))
    path = str(tmp_path / 'network-snapshot.pkl')
    with open(path, 'wb') as f:
        pickle.dump(snapshot(net), f)
    with open(path, 'rb') as f:
        raw = f.read()
    assert b'torch_utils.persistence' in raw and b'_reconstruct_persistent_obj' in raw

    # Every persistent object is stored as _reconstruct_persistent_obj(meta) with the upstream meta layout.
    metas = []

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) == ('torch_utils.persistence', '_reconstruct_persistent_obj'):
                return lambda meta: metas.append(meta) or meta
            return super().find_class(module, name)
    top = Recorder(io.BytesIO(raw)).load()
    assert set(top) == {'ema', 'loss_fn', 'augment_pipe', 'dataset_kwargs'}
    assert all(set(m) == {'type', 'version', 'module_src', 'class_name', 'state'} and m['version'] == 6 for m in metas)
    assert top['ema']['class_name'] == 'EDMPrecond' and top['loss_fn']['class_name'] == 'EDMLoss'
    assert 'class EDMPrecond' in top['ema']['module_src'] and top['ema']['state']['_init_kwargs']['model_type'] == 'SongUNet'

    x, sigma, labels = reference_inputs()
    with torch.no_grad():
        expected = net(x, sigma, labels)
    result = load_in_fresh_process(path, str(tmp_path / 'out.pt'))
    assert result['module'].startswith('_imported_module_')  # Built from the embedded source, not our files.
    assert result['ours_module'] == 'teachers.networks'
    assert not result['training'] and not result['grads']
    assert torch.equal(result['out'], expected)
    assert torch.equal(result['rebuilt'], expected)


def test_foreign_source_pickle_loads_and_rebuilds_as_ours(tmp_path):
    """A pickle whose embedded source is not a file of ours (a rewritten variant) maps onto our classes."""
    with open(os.path.join(ROOT, 'teachers', 'networks.py'), encoding='utf-8') as f:
        src = f.read()
    src = ('# A third-party EDM network module.\n' + src).replace('_Precond', '_DenoiserBase') \
        .replace('attention_weights', 'attn_softmax').replace('_drop_labels', 'drop_label_rows')
    module_name = f'foreign_edm_{uuid.uuid4().hex}'
    (tmp_path / f'{module_name}.py').write_text(src, encoding='utf-8')
    spec = importlib.util.spec_from_file_location(module_name, tmp_path / f'{module_name}.py')
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
        torch.manual_seed(1)
        foreign = randomized(module.EDMPrecond(**NET_KWARGS))
        path = str(tmp_path / 'foreign.pkl')
        with open(path, 'wb') as f:
            pickle.dump(snapshot(foreign), f)
    finally:
        del sys.modules[module_name]
    assert persistence.source_sha256(src) not in persistence._own_source_hashes()

    x, sigma, labels = reference_inputs()
    with torch.no_grad():
        expected = foreign(x, sigma, labels)
    result = load_in_fresh_process(path, str(tmp_path / 'out.pt'))
    assert result['module'].startswith('_imported_module_')
    assert torch.equal(result['out'], expected)
    assert torch.equal(result['rebuilt'], expected)

    # In this process too, with rebuild: our class, eval mode, no gradients, same outputs.
    ours = teachers.load(path, rebuild=True)
    assert type(ours) is networks.EDMPrecond and not ours.training
    assert not any(p.requires_grad for p in ours.parameters())
    with torch.no_grad():
        assert torch.equal(ours(x, sigma, labels), expected)


def test_network_sources_import_only_what_upstream_edm_provides():
    """Our pickled sources must run under EDM's own torch_utils: torch, numpy, torch_utils.persistence only."""
    for rel in ('teachers/networks.py', 'teachers/loss.py'):
        with open(os.path.join(ROOT, rel), encoding='utf-8') as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or '.']
            else:
                continue
            for name in names:
                assert name.split('.')[0] in ('torch', 'numpy', 'torch_utils', 'dnnlib'), f'{rel} imports {name}'
                if name.startswith('torch_utils'):
                    assert node.names[0].name in ('persistence', 'misc'), f'{rel} imports {name}'


def test_official_names_and_download_cache(tmp_path):
    base = 'https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/'
    assert teachers.resolve('cifar10-uncond') == base + 'edm-cifar10-32x32-uncond-vp.pkl'
    assert teachers.resolve('cifar10-cond') == base + 'edm-cifar10-32x32-cond-vp.pkl'
    assert teachers.resolve('edm-imagenet-64x64-cond-adm') == base + 'edm-imagenet-64x64-cond-adm.pkl'
    assert teachers.resolve('ffhq64') == base + 'edm-ffhq-64x64-uncond-vp.pkl'
    assert teachers.resolve('afhqv2-64') == base + 'edm-afhqv2-64x64-uncond-vp.pkl'
    assert teachers.resolve('/some/file.pkl') == '/some/file.pkl'

    # A pickle already in the download cache is used without any network access.
    url = teachers.resolve('cifar10-uncond')
    cache = tmp_path / 'cache'
    cache.mkdir()
    torch.manual_seed(2)
    net = randomized(networks.EDMPrecond(**dict(NET_KWARGS, label_dim=0)))
    with open(cache / f'{hashlib.md5(url.encode()).hexdigest()}_edm-cifar10-32x32-uncond-vp.pkl', 'wb') as f:
        pickle.dump(snapshot(net), f)
    loaded = teachers.load('cifar10-uncond', cache_dir=str(cache))
    x = reference_inputs()[0]
    with torch.no_grad():
        assert torch.equal(loaded(x, torch.tensor([1.0, 2.0])), net(x, torch.tensor([1.0, 2.0])))


def one_line_error(source, **kwargs):
    with pytest.raises(NetworkPickleError) as info:
        teachers.load(source, **kwargs)
    message = str(info.value)
    assert '\n' not in message
    return message


def test_bad_sources_give_one_line_errors(tmp_path):
    assert 'no such file' in one_line_error(str(tmp_path / 'missing.pkl'))

    corrupt = tmp_path / 'corrupt.pkl'
    # Fixed bytes: about 1 in 700 random ones asks the unpickler for a huge buffer, a MemoryError it passes on.
    corrupt.write_bytes(np.random.default_rng(0).bytes(256))
    assert 'not a loadable network pickle' in one_line_error(str(corrupt))
    persistent_id = tmp_path / 'persistent_id.pkl'  # the unpickler's message for this opcode spans two lines
    persistent_id.write_bytes(b'\x80\x02X\x01\x00\x00\x00aQ.')
    assert 'not a loadable network pickle' in one_line_error(str(persistent_id))

    torch.manual_seed(3)
    good = pickle.dumps(snapshot(networks.EDMPrecond(**NET_KWARGS)))
    truncated = tmp_path / 'truncated.pkl'
    truncated.write_bytes(good[:len(good) // 2])
    assert str(truncated) in one_line_error(str(truncated))

    gan = tmp_path / 'gan.pkl'
    gan.write_bytes(pickle.dumps(dict(G=torch.nn.Linear(1, 1), D=None, G_ema=torch.nn.Linear(1, 1))))
    assert 'StyleGAN2' in one_line_error(str(gan))

    other = tmp_path / 'other.pkl'
    other.write_bytes(pickle.dumps(dict(weights=[1, 2])))
    assert 'expected an EDM snapshot' in one_line_error(str(other))

    not_denoiser = tmp_path / 'linear.pkl'
    not_denoiser.write_bytes(pickle.dumps(dict(ema=torch.nn.Linear(2, 2))))
    assert 'not a denoiser' in one_line_error(str(not_denoiser))

    assert 'is a directory' in one_line_error(str(tmp_path))
    npz = tmp_path / 'stats.npz'
    np.savez(npz, mu=np.zeros(2))
    assert 'numpy .npz archive' in one_line_error(str(npz))

    offline = one_line_error('http://127.0.0.1:9/edm-model.pkl', cache_dir=str(tmp_path / 'cache'), verbose=False)
    assert 'http://127.0.0.1:9/edm-model.pkl' in offline


def test_rebuild_refuses_what_does_not_map():
    from teachers.analytic import GaussianMixture
    with pytest.raises(NetworkPickleError, match='not one of the EDM preconditioners'):
        teachers.rebuild_teacher(GaussianMixture(torch.zeros(2, 3), 1.0))
    torch.manual_seed(4)
    net = networks.EDMPrecond(**NET_KWARGS)
    net._init_kwargs = dict(net._init_kwargs, model_channels=8)  # Recorded kwargs that do not fit the weights.
    with pytest.raises(NetworkPickleError, match='does not map onto ours'):
        teachers.rebuild_teacher(net)
