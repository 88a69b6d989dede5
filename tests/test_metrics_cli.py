"""calc_metrics.py end to end, with a stand-in for the root `generators.load_generator`."""

import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import calc_metrics
import calc_ref
import dnnlib
from metrics.detectors import FMNIST_FORMAT
from metrics.fmnist_net import FashionFeatureNet
from test_metrics_pipeline import DATA, NoiseAdapter, write_dataset_zip


@pytest.fixture()
def setup(tmp_path, monkeypatch):
    loaded = []

    def load_generator(path, device):
        loaded.append((path, device))
        adapter = NoiseAdapter(offset=0.2 if 'other' in path else 0.0)
        if 'with-data' in path:  # Like an upstream pickle that records its training set.
            adapter.training_set_kwargs = dict(path=str(tmp_path / 'data.zip'))
        return adapter

    monkeypatch.setattr(calc_metrics.generators, 'load_generator', load_generator)
    dnnlib.util.set_cache_dir(str(tmp_path / 'cache'))
    with np.load(DATA) as data:
        write_dataset_zip(tmp_path / 'data.zip', data['images'][:40])
    torch.manual_seed(0)
    detector_path = tmp_path / 'random-detector.pt'
    torch.save(dict(state_dict=FashionFeatureNet().state_dict(), meta=dict(format=FMNIST_FORMAT)), detector_path)
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    (run_dir / 'training_options.json').write_text('{}')
    yield tmp_path, loaded
    dnnlib.util.set_cache_dir(None)


def test_calc_metrics_writes_results(setup):
    tmp_path, loaded = setup
    network = str(tmp_path / 'run' / 'network-snapshot-000100.pkl')
    args = [f'--network={network}', '--metrics=fid50k_full,kid50k_full', '--num=40', f'--data={tmp_path}/data.zip',
            f'--detector={tmp_path}/random-detector.pt', '--batch=20', '--workers=0', '--device=cpu', '--quiet',
            f'--jsonl={tmp_path}/all.jsonl']
    result = CliRunner().invoke(calc_metrics.main, args)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.strip().splitlines()]
    assert [line['metric'] for line in lines] == ['fd_random-detector40_full', 'kd_random-detector40_full']
    assert loaded == [(network, torch.device('cpu'))]
    assert lines[0]['results']['fd_random-detector40_full'] > 0
    assert json.loads((tmp_path / 'run' / 'metric-fd_random-detector40_full.jsonl').read_text()) == lines[0]
    assert len((tmp_path / 'all.jsonl').read_text().splitlines()) == 2



def test_calc_metrics_fid_to_teacher_samples(setup):
    """--ref-network: the reference is the other network's samples (seed 1); equal seeds give equal sets."""
    tmp_path, loaded = setup
    teacher = tmp_path / 'teacher.pkl'
    teacher.write_bytes(b'stand-in')  # Hashed for the cache key; the stand-in loader ignores its content.
    common = ['--network=net.pkl', '--metrics=fid40', f'--ref-network={teacher}', '--ref-num=40', '--quiet',
              f'--detector={tmp_path}/random-detector.pt', '--batch=20']
    same = CliRunner().invoke(calc_metrics.main, common + ['--seed=1'])
    other = CliRunner().invoke(calc_metrics.main, common + ['--seed=0'])
    assert same.exit_code == 0 and other.exit_code == 0, same.output + other.output
    same, other = (json.loads(r.output)['results']['fd_random-detector40'] for r in (same, other))
    assert other > 0 and abs(same) < 1e-6 * other
    assert [path for path, _ in loaded] == ['net.pkl', str(teacher)] * 2


@pytest.mark.parametrize('args, message', [
    (['--metrics=fid'], "unknown metric 'fid'"),
    (['--metrics=fid1k_full'], 'need a reference'),
    (['--metrics=fid1k_full', '--data=/nonexistent.zip'], '/nonexistent.zip does not exist'),
    (['--metrics=fid1k_full', '--data=x', '--ref=y.npz'], 'only one of'),
    (['--detector=inception=a,foo=b'], 'inception=PATH'),
])
def test_calc_metrics_reports_bad_input_in_one_line(setup, args, message):
    result = CliRunner().invoke(calc_metrics.main, ['--network=net.pkl', '--quiet', *args])
    assert result.exit_code != 0
    assert message in result.output and 'Traceback' not in result.output


def test_calc_metrics_defaults_to_the_recorded_training_data(setup):
    tmp_path, _ = setup
    args = ['--metrics=fid40_full', f'--detector={tmp_path}/random-detector.pt', '--quiet', '--workers=0']
    with_data = CliRunner().invoke(calc_metrics.main, ['--network=with-data.pkl', *args])
    assert with_data.exit_code == 0, with_data.output
    assert json.loads(with_data.output)['reference'] == str(tmp_path / 'data.zip')
    without = CliRunner().invoke(calc_metrics.main, ['--network=plain.pkl', *args])
    assert without.exit_code != 0 and 'need a reference' in without.output


def test_calc_ref_file_stands_in_for_the_dataset(setup):
    """The saved statistics give exactly the dataset's distance; the file is never overwritten; the detector is checked."""
    tmp_path, _ = setup
    dest = str(tmp_path / 'ref.npz')
    detector = f'--detector={tmp_path}/random-detector.pt'
    made = CliRunner().invoke(calc_ref.main, [f'--data={tmp_path}/data.zip', f'--dest={dest}', detector, '--workers=0',
                                              '--device=cpu'])
    assert made.exit_code == 0, made.output
    common = ['--network=net.pkl', '--metrics=fid40', detector, '--quiet', '--workers=0']
    via_data = CliRunner().invoke(calc_metrics.main, common + [f'--data={tmp_path}/data.zip'])
    via_file = CliRunner().invoke(calc_metrics.main, common + [f'--ref={dest}'])
    assert via_data.exit_code == 0 and via_file.exit_code == 0, via_data.output + via_file.output
    fd_data, fd_file = (json.loads(r.output)['results']['fd_random-detector40'] for r in (via_data, via_file))
    assert fd_data > 0 and fd_file == pytest.approx(fd_data, rel=1e-9)

    stamp = os.path.getmtime(dest)
    again = CliRunner().invoke(calc_ref.main, [f'--data={tmp_path}/data.zip', f'--dest={dest}', detector])
    assert again.exit_code != 0 and 'already exists' in again.output and os.path.getmtime(dest) == stamp
    torch.manual_seed(1)
    torch.save(dict(state_dict=FashionFeatureNet().state_dict(), meta=dict(format=FMNIST_FORMAT)), tmp_path / 'other.pt')
    wrong = CliRunner().invoke(calc_metrics.main, ['--network=net.pkl', '--metrics=fid40', f'--ref={dest}', '--quiet',
                                                   f'--detector={tmp_path}/other.pt'])
    assert wrong.exit_code != 0 and 'another detector' in wrong.output and 'Traceback' not in wrong.output
