"""torch_utils.persistence: the upstream version-6 pickle format, both directions."""

import collections
import os
import pickle
import pickletools
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import dnnlib
from torch_utils import misc, persistence

from persistence_fixture_nets import TinyNet, TinyPair

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _globals_in(data: bytes):
    """(module, name) of every GLOBAL / STACK_GLOBAL in a pickle stream."""
    found, strings = [], []
    for op, arg, _ in pickletools.genops(data):
        if op.name in ('SHORT_BINUNICODE', 'BINUNICODE', 'UNICODE'):
            strings.append(arg)
        if op.name == 'GLOBAL':
            found.append(tuple(arg.split(' ')))
        if op.name == 'STACK_GLOBAL':
            found.append((strings[-2], strings[-1]))
    return found


def _meta_of(obj):
    fn, args = obj.__reduce__()[:2]
    assert fn is persistence._reconstruct_persistent_obj
    return args[0]


def test_meta_layout_and_stream_globals():
    torch.manual_seed(0)
    net = TinyPair(3)
    meta = _meta_of(net)
    assert set(meta) == {'type', 'version', 'module_src', 'class_name', 'state'}
    assert meta['type'] == 'class' and meta['version'] == 6 and meta['class_name'] == 'TinyPair'
    assert 'class TinyPair' in meta['module_src']
    data = pickle.dumps(net, protocol=3)
    names = set(_globals_in(data))
    assert ('torch_utils.persistence', '_reconstruct_persistent_obj') in names
    assert ('dnnlib.util', 'EasyDict') in names
    # Both classes share one module source string; pickle memoizes it, so it is stored once.
    assert data.count(b'class TinyPair') == 1


def test_roundtrip_in_process_and_init_kwargs():
    torch.manual_seed(0)
    net = TinyPair(4)
    x = torch.randn(5, 4)
    clone = pickle.loads(pickle.dumps(net))
    assert type(clone).__name__ == 'TinyPair'
    assert torch.equal(clone(x), net(x))
    assert isinstance(clone.a.init_kwargs, dnnlib.EasyDict)
    assert clone.a.init_kwargs.gain == 2.0 and clone.a.init_kwargs.kwargs_dict.x == 1
    rebuilt = type(clone)(*clone.init_args, **clone.init_kwargs)
    misc.copy_params_and_buffers(clone, rebuilt, require_all=True)
    assert torch.equal(rebuilt(x), net(x))
    assert torch.equal(__import__('copy').deepcopy(net)(x), net(x))


def test_roundtrip_in_fresh_interpreter(tmp_path):
    torch.manual_seed(1)
    net = TinyPair(3)
    x = torch.randn(2, 3)
    pkl = tmp_path / 'net.pkl'
    with open(pkl, 'wb') as f:
        pickle.dump(dict(net=net, x=x, y=net(x).detach()), f)
    # The fresh interpreter cannot import this test module: the class must come from the embedded source.
    code = textwrap.dedent(f'''
        import pickle, torch
        with open({str(pkl)!r}, 'rb') as f:
            d = pickle.load(f)
        assert type(d['net']).__module__.startswith('_imported_module_'), type(d['net']).__module__
        assert torch.equal(d['net'](d['x']), d['y'])
        print('OK', type(d['net']).__name__)
    ''')
    out = subprocess.run([sys.executable, '-c', code], cwd=str(tmp_path), capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=REPO))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == 'OK TinyPair'


# A network module as another project would write it: never on disk, exists only inside the pickle.
FOREIGN_SRC = textwrap.dedent('''
    import numpy as np
    import torch
    from torch_utils import misc, persistence

    @persistence.persistent_class
    class Affine(torch.nn.Module):
        def __init__(self, features):
            super().__init__()
            self.features = features
            self.weight = torch.nn.Parameter(torch.ones([features]))
            self.scale = np.float64(np.sqrt(2))

        @misc.profiled_function
        def forward(self, x):
            misc.assert_shape(x, [None, self.features])
            return x * self.weight * self.scale
''')


class _Reduce:
    """Pickles as `_reconstruct_persistent_obj(meta)`, exactly as an upstream writer's object would."""

    def __init__(self, meta):
        self.meta = meta

    def __reduce__(self):
        return persistence._reconstruct_persistent_obj, (self.meta,)


def _old_torch_module_state(weight, **attrs):
    """The `__dict__` of an nn.Module as torch 1.7 pickled it: none of the hook dicts torch 2 added."""
    OD = collections.OrderedDict
    state = dict(training=False, _parameters=OD(weight=torch.nn.Parameter(weight)), _buffers=OD(),
                 _non_persistent_buffers_set=set(), _backward_hooks=OD(), _forward_hooks=OD(),
                 _forward_pre_hooks=OD(), _state_dict_hooks=OD(), _load_state_dict_pre_hooks=OD(),
                 _modules=OD())
    state.update(attrs)
    return state


def _hand_built_pickle(src=FOREIGN_SRC, weight=None):
    weight = torch.tensor([1.0, 2.0, 3.0]) if weight is None else weight
    state = _old_torch_module_state(weight, features=3, scale=np.float64(np.sqrt(2)),
                                    _init_args=(), _init_kwargs=dnnlib.EasyDict(features=3))
    meta = dict(type='class', version=6, module_src=src, class_name='Affine', state=state)
    return pickle.dumps(dict(G_ema=_Reduce(meta), training_set_kwargs=None), protocol=3)


def test_hand_built_upstream_pickle_without_new_hook_dicts_loads_and_runs():
    data = _hand_built_pickle()
    net = pickle.loads(data)['G_ema']
    assert type(net).__name__ == 'Affine'
    assert persistence.is_persistent(net)
    # __setstate__ back-filled what old torch did not write; the module is callable and hooks work.
    assert hasattr(net, '_backward_pre_hooks') and hasattr(net, '_forward_hooks_with_kwargs')
    y = net(torch.ones(2, 3))
    assert torch.allclose(y, torch.tensor([[1.0, 2.0, 3.0]] * 2) * np.sqrt(2))
    assert net.init_kwargs == dict(features=3)
    # Identical source shares one module across pickles, so isinstance works across files.
    other = pickle.loads(data)['G_ema']
    assert type(other) is type(net)


def test_modern_state_with_hook_dicts_stripped_loads():
    torch.manual_seed(2)
    net = TinyNet(3)
    meta = _meta_of(net)
    new_keys = [k for k in meta['state'] if k.endswith('hooks_with_kwargs') or k in (
        '_backward_pre_hooks', '_forward_hooks_always_called', '_state_dict_pre_hooks',
        '_load_state_dict_post_hooks', '_is_full_backward_hook')]
    assert new_keys, 'torch should write newer hook dicts'
    for key in new_keys:
        del meta['state'][key]
    clone = pickle.loads(pickle.dumps(_Reduce(meta)))
    x = torch.randn(4, 3)
    assert torch.equal(clone(x), net(x))


def test_import_hook_patches_source():
    src = FOREIGN_SRC.replace('return x * self.weight * self.scale', 'return x * self.weight * self.scale + OLD_API')
    data = _hand_built_pickle(src)

    def hook(meta):
        if 'OLD_API' in meta.module_src:
            meta.module_src = meta.module_src.replace('OLD_API', '100.0')
        return meta

    persistence.import_hook(hook)
    try:
        net = pickle.loads(data)['G_ema']
    finally:
        persistence._import_hooks.remove(hook)
    y = net(torch.zeros(1, 3))
    assert torch.allclose(y, torch.full([1, 3], 100.0))


def test_unsupported_version_is_a_clear_error():
    meta = _meta_of(TinyNet(2))
    meta['version'] = 5
    with pytest.raises(pickle.UnpicklingError, match='version 5'):
        pickle.loads(pickle.dumps(_Reduce(meta)))


def test_allow_list_refuses_unknown_source_and_accepts_trusted():
    src = FOREIGN_SRC + '\n# a variant no other test loaded\n'
    data = _hand_built_pickle(src)
    persistence.refuse_unknown_sources(True)
    try:
        with pytest.raises(pickle.UnpicklingError, match=r'refusing class Affine.*sha256 [0-9a-f]{64}'):
            pickle.loads(data)
        # Our own code is always trusted.
        own = pickle.loads(pickle.dumps(TinyNet(2)))
        assert type(own).__name__ == 'TinyNet'
        persistence.trust_source_hash(persistence.source_sha256(src))
        assert type(pickle.loads(data)['G_ema']).__name__ == 'Affine'
    finally:
        persistence.refuse_unknown_sources(False)
        persistence._trusted_hashes.clear()


def test_allow_list_file_from_environment(tmp_path):
    src = FOREIGN_SRC + '\n# trusted by file\n'
    pkl = tmp_path / 'foreign.pkl'
    pkl.write_bytes(_hand_built_pickle(src))
    code = f'import pickle; print(type(pickle.load(open({str(pkl)!r}, "rb"))["G_ema"]).__name__)'
    env = dict(os.environ, PYTHONPATH=REPO, TOOLKIT_REFUSE_UNKNOWN_CODE='1')
    refused = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env)
    assert refused.returncode != 0 and 'refusing class Affine' in refused.stderr
    allow = tmp_path / 'trusted.txt'
    allow.write_text(f'# known sources\n{persistence.source_sha256(src)}  # foreign Affine\n')
    accepted = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                              env=dict(env, TOOLKIT_TRUSTED_CODE=str(allow)))
    assert accepted.returncode == 0, accepted.stderr
    assert accepted.stdout.strip() == 'Affine'


def test_easydict_semantics_and_pickle_form():
    d = dnnlib.EasyDict(a=1)
    assert dnnlib.EasyDict is dnnlib.util.EasyDict
    d.b = 2
    assert d['b'] == 2 and d.a == 1
    with pytest.raises(AttributeError):
        _ = d.missing
    assert getattr(d, '__setstate__', None) is None
    del d.a
    assert 'a' not in d
    with pytest.raises(AttributeError):
        del d.a
    data = pickle.dumps(d, protocol=3)
    assert ('dnnlib.util', 'EasyDict') in _globals_in(data)
    assert pickle.loads(data) == {'b': 2}
