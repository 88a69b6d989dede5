"""`--compile` (issue 22): torch.compile of the engine's networks in place, equal to eager within tolerance, with a
one-warning fallback to eager when compilation fails, and compiled modules that copy and pickle as eager ones.

When no C++ compiler is installed, inductor cannot compile on the CPU: then the fallback is what users get, and the
tests that compile assert exactly that instead of comparing compiled results."""

import copy
import os
import pickle
import shutil
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ikl  # noqa: E402
from ikl.toy import MLPDenoiser, MLPGenerator  # noqa: E402
from teachers.analytic import ring8  # noqa: E402
from torch_utils import compiling  # noqa: E402

HAVE_CXX = any(shutil.which(name) for name in (os.environ.get('CXX', 'g++'), 'g++', 'c++', 'clang++'))


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(6, 16)
        self.b = torch.nn.Linear(16, 3)

    def forward(self, x):
        return self.b(torch.nn.functional.silu(self.a(x))) * 2.0


def _run(net, x):
    xi = x.clone().requires_grad_(True)
    out = net(xi)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad(set_to_none=True)
    return out.detach(), xi.grad, grads


def _assert_close(a, b, tol=1e-5):
    a, b = a.detach(), b.detach()
    scale = max(float(b.abs().max()), 1e-6)
    assert float((a - b).abs().max()) <= tol * scale


def _failing_backend(gm, example_inputs):
    raise RuntimeError('no C++ compiler here\nsecond line of a long compiler log')


def test_compiled_module_matches_eager_and_copies_as_eager():
    torch.manual_seed(0)
    net = Tiny()
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    ref = _run(net, x)
    lines = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        compiling.compile_module(net, 'tiny', log=lines.append)
        got = _run(net, x)
    call = compiling.compiled_call(net)
    if HAVE_CXX:
        assert call.failure is None, call.failure
        assert call.first_call_sec > 0 and lines == [f'compile: tiny: first call {call.first_call_sec:.1f} s (compilation included)']
    else:  # Honest about what users get without a compiler: the one-line fallback, eager results.
        assert call.failure is not None and len([w for w in caught if 'runs eager' in str(w.message)]) == 1
    _assert_close(got[0], ref[0])
    _assert_close(got[1], ref[1])
    for g, r in zip(got[2], ref[2]):
        _assert_close(g, r)
    # Copies and pickles are plain eager modules with the same state.
    for clone in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        assert compiling.compiled_call(clone) is None
        assert clone.state_dict().keys() == net.state_dict().keys()
        _assert_close(clone(x), ref[0])
    compiling.uncompile(net)
    assert compiling.compiled_call(net) is None and torch.equal(net(x), ref[0])


def test_failed_compilation_warns_once_and_runs_eager(monkeypatch):
    monkeypatch.setattr(compiling, 'BACKEND', _failing_backend)
    torch.manual_seed(0)
    net = Tiny()
    x = torch.randn(4, 6)
    ref = _run(net, x)
    compiling.compile_module(net, 'tiny', log=lambda line: pytest.fail(f'no compile time for a failure: {line}'))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        first, second = _run(net, x), _run(net, x * 2)
    messages = [str(w.message) for w in caught if 'compile:' in str(w.message)]
    assert len(messages) == 1 and '\n' not in messages[0], messages
    assert messages[0].startswith('compile: tiny could not be compiled, it runs eager (') and 'no C++ compiler here' in messages[0]
    assert torch.equal(first[0], ref[0]) and torch.equal(first[1], ref[1])
    assert compiling.compiled_call(net).failure is not None and second[0].shape == (4, 3)


def test_a_genuine_error_of_the_call_still_raises():
    net = compiling.compile_module(Tiny(), 'tiny', log=lambda line: None)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        with pytest.raises(RuntimeError):
            net(torch.randn(2, 5))  # Wrong width: eager raises it too.


def _trainer(tmp_path, **extra):
    torch.manual_seed(0)
    opts = dict(total_kimg=0.032, batch=16, batch_gpu=8, g_lr=1e-3, fake_lr=1e-3, sigma_data=1.0, tick_kimg=0.016,
                snapshot_ticks=None, image_ticks=None, grid_size=0, progress=False, tensorboard=False, seed=3, **extra)
    adapter = ikl.ModuleAdapter(MLPGenerator(2, 2, 32, 2), [2])
    return ikl.Trainer(adapter, ring8(), MLPDenoiser(2, 32, 2, sigma_data=1.0), opts, str(tmp_path / str(len(extra))))


def _weights(trainer):
    return [p.detach().clone() for p in list(trainer.adapter.parameters()) + list(trainer.fake_score.parameters())]


def _two_steps_each(eager, compiled):
    """Two engine steps of each trainer; the compile-failure warnings they raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        for _ in range(2):
            eager.step()
            compiled.step()
    return [str(w.message) for w in caught if 'could not be compiled' in str(w.message)]


def test_engine_compile_equals_eager(tmp_path, capsys):
    eager = _trainer(tmp_path)
    compiled = _trainer(tmp_path, compile=True)
    names = sorted(c.name for c in map(compiling.compiled_call, [*compiled.adapter.children(), compiled.teacher,
                                                                  compiled.fake_score]) if c is not None)
    assert names == ['fake score', 'generator (G)', 'teacher']
    assert compiling.compiled_call(compiled.ema.G) is None  # the EMA copy (previews, snapshots) stays eager
    failed = _two_steps_each(eager, compiled)
    if HAVE_CXX:
        assert not failed, failed
        out = capsys.readouterr().out
        assert 'compile: generator (G): first call' in out and 'compile: fake score: first call' in out
    for a, b in zip(_weights(compiled), _weights(eager)):
        _assert_close(a, b, tol=1e-4)


def test_engine_falls_back_when_compilation_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(compiling, 'BACKEND', _failing_backend)
    eager = _trainer(tmp_path)
    compiled = _trainer(tmp_path, compile=True)
    failed = _two_steps_each(eager, compiled)
    assert len(failed) == 3  # one each for the generator, the teacher and the fake score, once
    for a, b in zip(_weights(compiled), _weights(eager)):
        assert torch.equal(a, b)  # eager is eager: bit for bit


def test_options_without_compile_still_load():
    """Runs saved before `compile` existed resume with it off; it is saved with the other options."""
    from pipelines import cli
    opts = ikl.TrainingOptions.from_dict(dict(batch=8))
    assert opts.compile is False and opts.to_dict()['compile'] is False
    assert ikl.TrainingOptions.from_dict(opts.to_dict()).compile is False
    c = dict(kimg=1, batch=8, batch_gpu=None, divergence='ikl', sigma='lognormal', p_mean=-1.2, p_std=1.2,
             weighting='denoiser', normalize=False, fake_steps=1, glr=1e-5, lr=1e-5, warmup=0, ema=500,
             ema_rampup=0.05, schedule='reuse', precision='fp32', seed=0, tick=4, snap=10, grid=64, no_progress=True)
    import dnnlib
    assert cli.training_options(dnnlib.EasyDict(c)).compile is False
    assert cli.training_options(dnnlib.EasyDict(c, compile=True)).compile is True


def test_generate_compile_flag_renders_what_eager_renders(tmp_path, monkeypatch):
    """generate.py --compile with compilation failing: one warning, and the very images of an eager run."""
    from click.testing import CliRunner
    import generate
    from stylegan2 import networks
    from stylegan2.pickles import save_network_pkl
    torch.manual_seed(0)
    G = networks.Generator(z_dim=8, c_dim=0, w_dim=8, img_resolution=16, img_channels=3,
                           mapping_kwargs=dict(num_layers=2), synthesis_kwargs=dict(channel_base=128, channel_max=16))
    pkl = str(tmp_path / 'g.pkl')
    D = networks.Discriminator(c_dim=0, img_resolution=16, img_channels=3, channel_base=128, channel_max=16)
    save_network_pkl(pkl, G=G, D=D, G_ema=G)
    monkeypatch.setattr(compiling, 'BACKEND', _failing_backend)
    outs = {}
    for flag in ([], ['--compile']):
        out = str(tmp_path / f'out{len(flag)}')
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            result = CliRunner().invoke(generate.main, ['--network', pkl, '--seeds', '0-2', '--outdir', out,
                                                        '--device', 'cpu', *flag], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert len([w for w in caught if 'network could not be compiled' in str(w.message)]) == len(flag)
        outs[len(flag)] = {name: open(os.path.join(out, name), 'rb').read() for name in os.listdir(out)}
    assert outs[0] == outs[1] and len(outs[0]) == 3


def test_distill_dry_run_resolves_compile():
    import json
    from click.testing import CliRunner
    import distill
    teacher = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'embedded', 'fmnist-edm.pkl')
    for flag, expected in (([], False), (['--compile'], True)):
        result = CliRunner().invoke(distill.main, ['--teacher', teacher, '--dry-run', '--device', 'cpu', *flag])
        assert result.exit_code == 0, result.output
        assert json.loads(result.output[result.output.index('{'):])['resolved']['ikl']['compile'] is expected


def test_tracer_warning_filter_is_left_alone_under_compile(monkeypatch):
    """StyleGAN2's shape checks silence TracerWarnings with a warnings filter; under torch.compile that filter
    would split the graph at every block (measured: 13 graphs for a small G, 1 without), so it is skipped there."""
    from torch_utils import misc
    entered, original = [], warnings.catch_warnings
    monkeypatch.setattr(misc.warnings, 'catch_warnings', lambda *a, **k: entered.append(1) or original(*a, **k))
    with misc.suppress_tracer_warnings():
        pass
    assert entered == [1]
    monkeypatch.setattr(torch.compiler, 'is_compiling', lambda: True)
    with misc.suppress_tracer_warnings():
        pass
    assert entered == [1]


def test_a_backward_that_cannot_compile_falls_back_at_the_forward(monkeypatch):
    """The backward graph is compiled with the forward, so its failure is caught where the fallback can act (a lazy
    backward compile would raise later, inside loss.backward(), beyond any fallback)."""
    from torch._dynamo.backends.common import aot_autograd

    def no_backward(gm, example_inputs):
        raise RuntimeError('backward compiler unavailable')

    monkeypatch.setattr(compiling, 'BACKEND', aot_autograd(fw_compiler=lambda gm, example_inputs: gm,
                                                           bw_compiler=no_backward))
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = Tiny()
    x = torch.randn(3, 6)
    ref = _run(net, x)
    compiling.compile_module(net, 'tiny', log=lambda line: None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        got = _run(net, x)
    assert [str(w.message) for w in caught if 'could not be compiled' in str(w.message) and
            'backward compiler unavailable' in str(w.message)]
    assert torch.equal(got[0], ref[0]) and all(torch.equal(a, b) for a, b in zip(got[2], ref[2]))


class Noisy(torch.nn.Module):
    """Draws inside its forward, like StyleGAN2's noise inputs and EDM's dropout."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(6, 16)
        self.drop = torch.nn.Dropout(0.3)

    def forward(self, x):
        h = self.a(x)
        return self.drop(h + torch.randn_like(h) * 0.5)


def test_random_draws_inside_a_compiled_network_are_eager_draws():
    """Same seed, same numbers: what counter-seeded randomness, shared dropout masks and exact resume rely on."""
    torch.manual_seed(0)
    net = Noisy().train()
    x = torch.randn(4, 6)
    torch.manual_seed(7)
    ref = _run(net, x)
    compiling.compile_module(net, 'noisy', log=lambda line: None)
    torch.manual_seed(7)
    got = _run(net, x)
    if HAVE_CXX:
        assert compiling.compiled_call(net).failure is None
    _assert_close(got[0], ref[0])
    for g, r in zip(got[2], ref[2]):
        _assert_close(g, r)
