"""--refuse-unknown-code really refuses: hand-made malicious pickles never run in any script that loads a pickle,
and every genuine pickle kind still loads (torch_utils.pickle_reader, torch_utils.persistence, trust_code.py)."""

import builtins
import io
import os
import pickle
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import calc_metrics  # noqa: E402
import distill  # noqa: E402
import dnnlib  # noqa: E402
import generate  # noqa: E402
import legacy  # noqa: E402
import projector  # noqa: E402
import refine  # noqa: E402
import style_mixing  # noqa: E402
import train_stylegan2  # noqa: E402
import train_teacher  # noqa: E402
import trust_code  # noqa: E402
from stylegan2 import pickles  # noqa: E402
import teachers  # noqa: E402
from torch_utils import persistence  # noqa: E402
from torch_utils.pickle_reader import NetworkPickleError, read_pickle  # noqa: E402

SYSTEM = f'{os.system.__module__}.system'  # posix.system: how the pickle names os.system
EMBEDDED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'embedded')


class _Reduce:
    """Pickles as `func(*args)`: what a malicious file does."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _storage_smuggler(marker):
    """A tensor storage whose torch.save bytes carry a call to os.system (torch.storage._load_from_bytes)."""
    buf = io.BytesIO()
    torch.save(_Reduce(os.system, f'touch {marker}'), buf)
    return _Reduce(torch.storage._load_from_bytes, buf.getvalue())


def malicious_pickles(tmp_path):
    """name -> (path, marker file that appears if the payload runs, the global the refusal must name)."""
    cases = {}
    for name, make, refused in [
        ('os_system', lambda m: _Reduce(os.system, f'touch {m}'), SYSTEM),
        ('exec', lambda m: _Reduce(builtins.exec, f'open({str(m)!r}, "w").close()'), 'builtins.exec'),
        ('nested', lambda m: dict(G_ema=None, D=[dict(deep=(1, _Reduce(os.system, f'touch {m}')))]), 'system'),
        ('unlisted_module', lambda m: _Reduce(subprocess.call, ['touch', str(m)]), 'subprocess.call'),
        ('own_function', lambda m: _Reduce(dnnlib.util.open_url, f'file://{m}'), 'dnnlib.util.open_url'),
        ('storage', _storage_smuggler, 'system'),
    ]:
        marker = tmp_path / f'pwned-{name}'
        path = tmp_path / f'{name}.pkl'
        with open(path, 'wb') as f:
            pickle.dump(make(marker), f)
        cases[name] = (str(path), marker, refused)
    return cases


@pytest.fixture
def refusing():
    persistence.refuse_unknown_sources(True)
    yield
    persistence.refuse_unknown_sources(False)


def test_the_payloads_are_real_without_refusal(tmp_path):
    """Guard for the tests below: each file does run its command when loaded the trusting way."""
    for name, (path, marker, _) in malicious_pickles(tmp_path).items():
        if name == 'own_function':
            continue  # A function of our own that is harmless here, but not a network's building block: refused.
        try:
            read_pickle(path)
        except NetworkPickleError:
            pass
        assert marker.exists(), name


def test_reader_refuses_every_payload_before_it_runs(tmp_path, refusing):
    for name, (path, marker, refused) in malicious_pickles(tmp_path).items():
        with pytest.raises(NetworkPickleError) as info:
            read_pickle(path)
        message = str(info.value)
        assert 'refusing global' in message or 'weights_only' in message.lower(), message
        assert refused in message and path in message and '\n' not in message, message
        assert not marker.exists(), name


def _script_cases(path, tmp_path, data):
    out = str(tmp_path / 'out')
    genuine_teacher = os.path.join(EMBEDDED, 'fmnist-edm.pkl')
    genuine_gan = os.path.join(EMBEDDED, 'fmnist-stylegan2.pkl')
    return {
        'generate': (generate.main, ['--network', path, '--seeds', '0', '--outdir', out, '--refuse-unknown-code']),
        'refine --network --dry-run': (refine.main, ['--network', path, '--teacher', genuine_teacher, '--dry-run',
                                                     '--outdir', out, '--refuse-unknown-code']),
        'refine --teacher': (refine.main, ['--network', genuine_gan, '--teacher', path, '--dry-run', '--outdir', out,
                                           '--refuse-unknown-code']),
        'distill --teacher': (distill.main, ['--teacher', path, '--dry-run', '--outdir', out, '--refuse-unknown-code']),
        'calc_metrics --network': (calc_metrics.main, ['--network', path, '--metrics', 'fid10_full',
                                                       '--refuse-unknown-code']),
        'calc_metrics --ref-network': (calc_metrics.main, ['--network', genuine_gan, '--ref-network', path,
                                                           '--metrics', 'fid10_full', '--refuse-unknown-code']),
        'projector': (projector.main, ['--network', path, '--target', path, '--outdir', out, '--refuse-unknown-code']),
        'style_mixing': (style_mixing.main, ['--network', path, '--rows', '0', '--cols', '1', '--outdir', out,
                                             '--refuse-unknown-code']),
        'legacy': (legacy.main, ['--source', path, '--dest', str(tmp_path / 'converted.pkl'), '--refuse-unknown-code']),
        'trust_code (listing)': (trust_code.main, [path]),
        'train_stylegan2 --init': (train_stylegan2.main, ['--data', data, '--init', path, '--outdir', out,
                                                          '--refuse-unknown-code']),
        'train_teacher --init': (train_teacher.main, ['--data', data, '--init', path, '--outdir', out,
                                                      '--refuse-unknown-code']),
    }


@pytest.mark.parametrize('payload', ['os_system', 'nested', 'storage'])
def test_no_script_runs_a_payload_under_the_flag(tmp_path, payload, dataset_zip):
    path, marker, refused = malicious_pickles(tmp_path)[payload]
    try:
        for name, (command, args) in _script_cases(path, tmp_path, str(dataset_zip)).items():
            result = CliRunner().invoke(command, args)
            assert not marker.exists(), name
            assert result.exit_code != 0, (name, result.output)
            assert refused in result.output and path in result.output, (name, result.output)
            assert 'Traceback' not in result.output, (name, result.output)
    finally:
        persistence.refuse_unknown_sources(False)


def test_environment_variable_refuses_in_a_fresh_process(tmp_path):
    path, marker, _ = malicious_pickles(tmp_path)['os_system']
    env = dict(os.environ, TOOLKIT_REFUSE_UNKNOWN_CODE='1')
    script = os.path.join(os.path.dirname(EMBEDDED), 'calc_metrics.py')
    proc = subprocess.run([sys.executable, script, '--network', path, '--metrics', 'fid10_full'], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and SYSTEM in proc.stderr and not marker.exists(), proc.stderr


def test_every_genuine_kind_loads_under_refusal(refusing):
    for name in ('fmnist-stylegan2.pkl', 'fmnist-stylegan2-240kimg.pkl'):
        data = pickles.load_network_pkl(os.path.join(EMBEDDED, name))
        assert data['G_ema'].img_resolution == 32
    teacher = teachers.load(os.path.join(EMBEDDED, 'fmnist-edm-492kimg.pkl'))
    assert teacher.img_resolution == 32
    student = read_pickle(os.path.join(EMBEDDED, 'fmnist-onestep.pkl'))
    assert 'ema' in student and 'init_sigma' in student
    # Plain torch modules and numpy arrays inside a pickle are on the list as well.
    blob = io.BytesIO()
    pickle.dump(dict(net=torch.nn.Sequential(torch.nn.Linear(2, 3)), arr=__import__('numpy').arange(3.0),
                     dtype=torch.float16, size=torch.Size([2])), blob)
    blob.seek(0)
    data = read_pickle(blob)
    assert isinstance(data['net'][0], torch.nn.Linear) and data['arr'].tolist() == [0.0, 1.0, 2.0]


def test_trust_code_lists_without_running_and_adds_in_one_step(tmp_path, monkeypatch):
    from tests.test_stylegan2_pickles import foreign_networks_module
    import uuid
    _, src = foreign_networks_module('unused')
    unseen = src + f'\n# {uuid.uuid4().hex}\n'
    meta = dict(type='class', version=6, module_src=unseen, class_name='Generator', state={})
    path = str(tmp_path / 'foreign.pkl')
    with open(path, 'wb') as f:
        pickle.dump(dict(G_ema=_Reduce(persistence._reconstruct_persistent_obj, meta)), f)
    trust_file = tmp_path / 'trusted.txt'
    monkeypatch.setenv('TOOLKIT_TRUSTED_CODE', str(trust_file))
    digest = persistence.source_sha256(unseen)
    result = CliRunner().invoke(trust_code.main, [path])
    assert result.exit_code == 0 and digest in result.output and 'trusted=no' in result.output, result.output
    assert unseen not in persistence._src_to_module_dict  # listed, never executed
    persistence.refuse_unknown_sources(True)
    try:
        with pytest.raises(NetworkPickleError, match='trust_code.py --add'):
            read_pickle(path)
        result = CliRunner().invoke(trust_code.main, ['--add', path])
        assert result.exit_code == 0 and digest in trust_file.read_text(), result.output
        assert 'trusted=yes' in CliRunner().invoke(trust_code.main, [path]).output
        read_pickle(path)  # now trusted: loads under refusal
    finally:
        persistence.refuse_unknown_sources(False)


def test_earlier_versions_of_our_modules_are_trusted_and_nothing_near_them():
    """Pickles from an earlier toolkit version embed that version's module source: the shipped list trusts
    exactly the committed versions (kept current with git history), not an edit of one of them."""
    root = os.path.dirname(EMBEDDED)
    check = subprocess.run([sys.executable, os.path.join(root, 'tools', 'released_sources.py'), '--check'],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    listed = [line.split() for line in open(os.path.join(root, 'torch_utils', 'released_sources.txt'))
              if line.strip() and not line.startswith('#')]
    digest, where = next((d, w) for d, w in listed if w.startswith('teachers/networks.py@'))
    path, commit = where.split('@')
    old = subprocess.run(['git', '-C', root, 'show', f'{commit}:{path}'], capture_output=True, check=True,
                         text=True).stdout
    assert persistence.source_sha256(old) == digest and persistence.is_source_trusted(old)
    assert not persistence.is_source_trusted(old.replace('import torch', 'import torch, os', 1))
