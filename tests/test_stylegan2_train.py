"""train_stylegan2.py on a tiny dataset: snapshots, exact resume, and starting from a pickle."""

import glob
import json
import os

import torch
from click.testing import CliRunner

import train_stylegan2
from stylegan2.pickles import load_network_pkl
from training.run import latest_training_state

TINY = ['--cond=1', '--batch=8', '--z-dim=8', '--map=1', '--cbase=64', '--cmax=8', '--mbstd=2', '--gamma=0.1',
        '--grid=4', '--threads=1']


def train(outdir, data, *args):
    result = CliRunner().invoke(train_stylegan2.main, [f'--outdir={outdir}', f'--data={data}', *TINY, *args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return sorted(glob.glob(os.path.join(outdir, '*')))[-1]


def test_resume_matches_a_straight_run(tmp_path, dataset_zip):
    full = train(tmp_path / 'a', dataset_zip, '--kimg=0.032', '--tick=0.016', '--snap=1')
    stopped = train(tmp_path / 'b', dataset_zip, '--kimg=0.016', '--tick=0.016', '--snap=1')
    result = CliRunner().invoke(train_stylegan2.main, [f'--resume={stopped}', '--kimg=0.032'])
    assert result.exit_code == 0, result.output
    state = lambda run: torch.load(latest_training_state(run), weights_only=True)
    a, b = state(full), state(stopped)
    assert a['run']['cur_nimg'] == b['run']['cur_nimg'] == 32
    for key in ('G', 'D', 'G_ema'):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key


def test_init_copies_every_network_and_refuses_a_different_architecture(tmp_path, dataset_zip):
    source = train(tmp_path / 'a', dataset_zip, '--kimg=0.016', '--tick=0.016', '--snap=1')
    snapshot = os.path.join(source, 'network-snapshot-000000.016.pkl')
    run = train(tmp_path / 'b', dataset_zip, '--kimg=0.008', '--tick=0.008', '--snap=1', f'--init={snapshot}')
    start, expected = load_network_pkl(os.path.join(run, 'network-snapshot-000000.pkl')), load_network_pkl(snapshot)
    for key in ('G', 'D', 'G_ema'):
        ours, theirs = start[key].state_dict(), expected[key].state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), key
    assert json.load(open(os.path.join(run, 'training_options.json')))['init'] == os.path.abspath(snapshot)

    result = CliRunner().invoke(train_stylegan2.main, [f'--outdir={tmp_path / "c"}', f'--data={dataset_zip}', *TINY,
                                                       '--cmax=16', f'--init={snapshot}'])
    errors = [line for line in result.output.splitlines() if line.startswith('Error')]
    assert result.exit_code != 0 and len(errors) == 1 and 'does not match the architecture' in errors[0], result.output
    assert not os.path.exists(tmp_path / 'c')
