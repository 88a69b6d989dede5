"""Compiled kernels (torch.ops.toolkit_ops) vs the reference ops, and the build system's failure/caching policy.

The first test to need the kernels builds them once (into the default cache, shared with every other test and
process); later tests and processes reuse that build.
"""

import itertools
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch

from torch_utils import custom_ops
from torch_utils.ops import _plugin, bias_act, conv2d_resample, upfirdn2d

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module', autouse=True)
def compiled_kernels():
    assert 'cpu' in _plugin.covered_devices(required=True)  # Builds (or loads) once; raises if the build fails.


def _random(shape, dtype, seed, low=0.05):
    """Values with |v| >= low, keeping piecewise activations and clamps away from their kinks."""
    gen = torch.Generator().manual_seed(seed)
    magnitude = torch.rand(shape, generator=gen, dtype=torch.float64) * 2 + low
    sign = torch.randint(0, 2, shape, generator=gen).to(torch.float64) * 2 - 1
    return (magnitude * sign).to(dtype)


def _grads(fn, inputs, create_graph):
    out = fn(*inputs)
    weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    return torch.autograd.grad((out * weight).sum(), inputs, create_graph=create_graph, allow_unused=True)


def _compare_orders(fn_ref, fn_cmp, inputs, rtol, atol, second_order=True):
    """Forward, first and second derivatives of two implementations agree."""
    torch.testing.assert_close(fn_cmp(*inputs), fn_ref(*inputs), rtol=rtol, atol=atol)
    g_ref = _grads(fn_ref, inputs, create_graph=second_order)
    g_cmp = _grads(fn_cmp, inputs, create_graph=second_order)
    for a, b in zip(g_cmp, g_ref):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    if second_order:
        norm = lambda grads: sum((g.square().sum() for g in grads if g is not None and g.requires_grad),
                                 torch.zeros([], dtype=inputs[0].dtype))
        second = lambda n: (torch.autograd.grad(n, inputs, allow_unused=True) if n.requires_grad  # else: no path
                            else [None] * len(inputs))                                      # to x, i.e. zero
        for a, b, x in zip(second(norm(g_cmp)), second(norm(g_ref)), inputs):  # None = not reached = zero.
            zeros = torch.zeros_like(x)
            torch.testing.assert_close(zeros if a is None else a, zeros if b is None else b, rtol=rtol, atol=atol)

#----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('act', sorted(bias_act.activation_funcs))
def test_bias_act_compiled_matches_ref(act, dtype):
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-11)
    cases = itertools.product([[2, 3, 4, 5], [3, 7]], [None, 0.5], [None, 0.8], [None, 0.1], [True, False])
    for i, (shape, gain, clamp, alpha, with_bias) in enumerate(cases):
        x = _random(shape, dtype, seed=i).requires_grad_()
        b = (_random([shape[1]], dtype, seed=100 + i) * 0.01).requires_grad_() if with_bias else None
        inputs = [x, b] if with_bias else [x]
        kwargs = dict(act=act, gain=gain, clamp=clamp, alpha=alpha)
        fn = lambda impl: (lambda x, b=None: bias_act.bias_act(x, b, **kwargs, impl=impl))
        _compare_orders(fn('ref'), fn('compiled'), inputs, **tol)


def test_bias_act_compiled_layouts_dims_and_half():
    x = _random([2, 5, 3, 4], torch.float64, seed=1)
    b = _random([5], torch.float64, seed=2)
    ref = bias_act.bias_act(x, b, act='lrelu', clamp=1.0, impl='ref')
    torch.testing.assert_close(bias_act.bias_act(x.to(memory_format=torch.channels_last), b, act='lrelu', clamp=1.0,
                                                 impl='compiled'), ref)
    sliced = torch.cat([x, x], dim=3)[..., ::2]  # Non-dense input: copied to a dense layout first.
    torch.testing.assert_close(bias_act.bias_act(sliced, b, act='lrelu', clamp=1.0, impl='compiled'),
                               bias_act.bias_act(sliced, b, act='lrelu', clamp=1.0, impl='ref'))
    b3 = _random([3], torch.float64, seed=3)
    torch.testing.assert_close(bias_act.bias_act(x, b3, dim=2, act='swish', impl='compiled'),
                               bias_act.bias_act(x, b3, dim=2, act='swish', impl='ref'))
    half = bias_act.bias_act(x.half(), b.half(), act='lrelu', impl='compiled')
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.double(), bias_act.bias_act(x.half().double(), b.half().double(), act='lrelu'),
                               rtol=1e-3, atol=1e-3)


def test_bias_act_compiled_gradcheck():
    for act, clamp in [('lrelu', 0.9), ('tanh', None), ('swish', 1.2), ('elu', None)]:
        x = _random([2, 3, 3], torch.float64, seed=4).requires_grad_()
        b = (_random([3], torch.float64, seed=5) * 0.01).requires_grad_()
        fn = lambda x, b: bias_act.bias_act(x, b, act=act, clamp=clamp, impl='compiled')
        assert torch.autograd.gradcheck(fn, [x, b])
        assert torch.autograd.gradgradcheck(fn, [x, b])


def test_bias_act_third_derivative_is_refused_not_wrong():
    x = _random([4], torch.float64, seed=6).requires_grad_()
    (g,) = torch.autograd.grad(bias_act.bias_act(x, act='tanh', impl='compiled').sum(), [x], create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), [x], create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(h.sum(), [x])

#----------------------------------------------------------------------------------------------------------------

UPFIRDN_FILTERS = {'4x4': ([1, 3, 3, 1], None), '2x3': ([[1, 2, 0], [3, 5, 4]], None), '1-D 8': (np.arange(1., 9), True),
                   'none': (None, None)}


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('filter_name', sorted(UPFIRDN_FILTERS))
def test_upfirdn2d_compiled_matches_ref(filter_name, dtype):
    taps, separable = UPFIRDN_FILTERS[filter_name]
    f = upfirdn2d.setup_filter(taps, separable=separable) if taps is not None else None
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-11)
    checked = 0
    cases = itertools.product([1, 2, [3, 1]], [1, 2, [1, 3]], [0, [2, 1], [3, -1, 0, 2]], [False, True])
    for i, (up, down, padding, flip) in enumerate(cases):
        x = _random([1, 2, 9, 8], dtype, seed=i).requires_grad_()
        fn = lambda impl: (lambda x: upfirdn2d.upfirdn2d(x, f, up=up, down=down, padding=padding, flip_filter=flip,
                                                         gain=1.5, impl=impl))
        try:
            fn('ref')(x)
        except ValueError:
            continue  # Empty output for this configuration.
        _compare_orders(fn('ref'), fn('compiled'), [x], second_order=(i % 8 == 0), **tol)
        checked += 1
    assert checked > 50


def test_upfirdn2d_compiled_gradcheck_and_half():
    f = upfirdn2d.setup_filter([1, 3, 3, 1])
    x = _random([1, 2, 4, 5], torch.float64, seed=7).requires_grad_()
    for up, down, padding in [(2, 1, [2, 1]), (1, 2, 1), ([1, 2], [3, 1], [0, 2, 1, -1])]:
        fn = lambda x: upfirdn2d.upfirdn2d(x, f, up=up, down=down, padding=padding, impl='compiled')
        assert torch.autograd.gradcheck(fn, [x])
        assert torch.autograd.gradgradcheck(fn, [x])
    xh = _random([2, 3, 8, 8], torch.float16, seed=8)
    out = upfirdn2d.upsample2d(xh, f, impl='compiled')
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.double(), upfirdn2d.upsample2d(xh.double(), f, impl='ref'), rtol=2e-3, atol=2e-3)


def test_default_dispatch_follows_env_switch(monkeypatch):
    # Large enough for the default dispatch to want the kernels where they are faster (resampling), not for the
    # pure filtering inside conv2d_resample's fast paths; TOOLKIT_OPS_IMPL forces either way. Results agree.
    gen = torch.Generator().manual_seed(9)
    f = upfirdn2d.setup_filter([1, 3, 3, 1])
    x = torch.randn([2, 16, 48, 48], dtype=torch.float64, generator=gen)
    w = torch.randn([8, 16, 3, 3], dtype=torch.float64, generator=gen)
    results, counts = {}, {}
    for mode in ('ref', 'auto', 'compiled'):
        monkeypatch.setenv(custom_ops.IMPL_ENV, mode)
        calls = []
        monkeypatch.setattr(torch.ops.toolkit_ops, 'upfirdn2d', _counting(torch.ops.toolkit_ops.upfirdn2d, calls))
        results[mode] = [conv2d_resample.conv2d_resample(x, w, f, up=2, padding=1, flip_weight=False),
                         conv2d_resample.conv2d_resample(x, w, f, down=2, padding=1),
                         upfirdn2d.upsample2d(x, f), upfirdn2d.downsample2d(x, f)]
        counts[mode] = len(calls)
    assert counts['ref'] == 0 < counts['auto'] < counts['compiled']
    for mode in ('auto', 'compiled'):
        for got, want in zip(results[mode], results['ref']):
            torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-11)


def _counting(op, calls):
    def wrapper(*args):
        calls.append(1)
        return op(*args)
    return wrapper

#----------------------------------------------------------------------------------------------------------------
# Build system.

def test_env_switch_validation(monkeypatch):
    monkeypatch.setenv(custom_ops.IMPL_ENV, 'fast')
    with pytest.raises(ValueError, match=custom_ops.IMPL_ENV):
        custom_ops.impl_mode()
    monkeypatch.setenv(custom_ops.IMPL_ENV, 'Ref')
    assert custom_ops.impl_mode() == 'ref'


def test_failed_build_warns_once_is_cached_and_not_retried(tmp_path, monkeypatch):
    monkeypatch.setenv(custom_ops.BUILD_DIR_ENV, str(tmp_path / 'cache'))
    monkeypatch.delenv(custom_ops.IMPL_ENV, raising=False)
    (tmp_path / 'broken.cpp').write_text('#error forced build failure\n')
    with pytest.warns(RuntimeWarning, match='build failed') as record:
        assert custom_ops.try_get_plugin('broken_ext', ['broken.cpp'], source_dir=str(tmp_path)) is None
    assert len(record) == 1
    logs = list((tmp_path / 'cache').glob('broken_ext-*.failed.log'))
    assert len(logs) == 1 and str(logs[0]) in str(record[0].message)
    assert 'forced build failure' in logs[0].read_text()  # The compiler's own message is kept for the user.

    import torch.utils.cpp_extension as cpp_extension
    monkeypatch.setattr(cpp_extension, 'load', lambda *a, **k: pytest.fail('a failed build was retried'))
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # No second warning in this process.
        assert custom_ops.try_get_plugin('broken_ext', ['broken.cpp'], source_dir=str(tmp_path)) is None
    monkeypatch.setattr(custom_ops, '_results', {})  # As a new process would start: the failure is on disk.
    with pytest.raises(custom_ops.BuildError, match='earlier build failed') as error:
        custom_ops.get_plugin('broken_ext', ['broken.cpp'], source_dir=str(tmp_path))
    assert error.value.log_path == str(logs[0])


def test_ops_fall_back_to_ref_after_failed_build(tmp_path, monkeypatch):
    broken_dir = tmp_path / 'csrc'
    broken_dir.mkdir()
    for name in _plugin.HEADERS + _plugin.CPU_SOURCES:
        text = open(os.path.join(_plugin.SOURCE_DIR, name)).read()
        (broken_dir / name).write_text(('#include "forced_build_failure.h"\n' if name.endswith('.cpp') else '') + text)
    real_kwargs = _plugin.build_kwargs
    monkeypatch.setattr(_plugin, 'build_kwargs', lambda kind: dict(real_kwargs('cpu'), source_dir=str(broken_dir)))
    monkeypatch.setattr(_plugin, '_covered_devices', None)
    monkeypatch.setenv(custom_ops.BUILD_DIR_ENV, str(tmp_path / 'cache'))
    monkeypatch.delenv(custom_ops.IMPL_ENV, raising=False)
    x = _random([4, 64, 16, 16], torch.float32, seed=10)  # Large enough for the default dispatch to want kernels.
    b = _random([64], torch.float32, seed=11)
    with pytest.warns(RuntimeWarning, match='Falling back') as record:
        y = bias_act.bias_act(x, b, act='lrelu')
    assert len(record) == 1
    torch.testing.assert_close(y, bias_act.bias_act(x, b, act='lrelu', impl='ref'))
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        torch.testing.assert_close(upfirdn2d.downsample2d(x, upfirdn2d.setup_filter([1, 3, 3, 1])),
                                   upfirdn2d.downsample2d(x, upfirdn2d.setup_filter([1, 3, 3, 1]), impl='ref'))
    with pytest.raises(RuntimeError):
        bias_act.bias_act(x, b, act='lrelu', impl='compiled')  # An explicit request does not fall back silently.


def test_second_process_reuses_cache():
    script = textwrap.dedent('''
        import torch
        from torch_utils import custom_ops
        from torch_utils.ops import bias_act
        custom_ops.verbosity = 'brief'
        x = torch.linspace(-2, 2, 70000)
        y = bias_act.bias_act(x, act='lrelu', impl='compiled')
        assert torch.allclose(y, bias_act.bias_act(x, act='lrelu', impl='ref'))
        print('ok')
    ''')
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
    result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == 'ok'
    assert 'building once' not in result.stderr  # Loaded from the cache: no compiler run.


def test_uncovered_dtype_falls_back_to_ref():
    x = _random([4, 64, 16, 16], torch.float32, seed=12).to(torch.bfloat16)
    b = _random([64], torch.float32, seed=13).to(torch.bfloat16)
    torch.testing.assert_close(bias_act.bias_act(x, b, act='lrelu'), bias_act.bias_act(x, b, act='lrelu', impl='ref'))
    with pytest.raises(RuntimeError, match='No compiled kernel'):
        bias_act.bias_act(x, b, act='lrelu', impl='compiled')


_TINY_SOURCE = 'extern "C" int toolkit_tiny_answer() { return 42; }\n'  # No torch headers: builds in a second.

_BUILDER = textwrap.dedent('''
    import sys
    from torch_utils import custom_ops
    custom_ops.get_plugin('tiny_ext', ['tiny.cpp'], source_dir=sys.argv[1], is_python_module=False)
    print('ok')
''')


def test_concurrent_processes_build_once(tmp_path):
    (tmp_path / 'tiny.cpp').write_text(_TINY_SOURCE)
    env = dict(os.environ, PYTHONPATH=REPO, **{custom_ops.BUILD_DIR_ENV: str(tmp_path / 'cache')})
    procs = [subprocess.Popen([sys.executable, '-c', _BUILDER, str(tmp_path)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(3)]
    outputs = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert all(out.strip() == 'ok' for out, _ in outputs)
    assert sum('building once' in err for _, err in outputs) == 1, outputs  # The others waited, then loaded it.
    builds = [d for d in os.listdir(tmp_path / 'cache') if not d.endswith('.lock')]
    assert len(builds) == 1 and not builds[0].startswith('.')  # One finished directory, no temporary leftovers.


@pytest.mark.skipif(os.name == 'nt', reason='uses a POSIX signal to kill the lock holder')
def test_build_lock_times_out_and_never_goes_stale(tmp_path):
    lock = str(tmp_path / 'ext.lock')
    holder_code = ('import sys, time\nfrom torch_utils import custom_ops\n'
                   'with custom_ops._file_lock(sys.argv[1], 5, "holder"):\n    print("locked", flush=True)\n'
                   '    time.sleep(120)\n')
    holder = subprocess.Popen([sys.executable, '-c', holder_code, lock], env=dict(os.environ, PYTHONPATH=REPO),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'locked'
        with pytest.raises(custom_ops.BuildError, match='gave up after waiting'):
            with custom_ops._file_lock(lock, 0.5, 'test'):
                pass
    finally:
        holder.kill()  # Dies holding the lock, like a Ctrl-C'd build.
        holder.wait()
    with custom_ops._file_lock(lock, 5, 'test'):  # The OS released it: no stale lock to delete by hand.
        pass
