"""train_teacher.py: a few steps lower the denoising loss, snapshots are upstream-layout teachers, an interrupted
run resumes to bit-identical weights, run directories are never reused, and bad input fails in one line."""

import glob
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import torch
from click.testing import CliRunner

import teachers
import train_teacher
from teachers.loss import EDMLoss
from training.dataset import ImageFolderDataset
from training.run import latest_training_state


TINY = ['--cond=1', '--arch=ddpmpp', '--cbase=8', '--cres=1,1', '--blocks=1', '--attn=4', '--batch=16', '--lr=1e-2',
        '--dropout=0', '--ema=0.001', '--lr-rampup=0', '--no-progress', '--threads=1']


def train(outdir, data, *args):
    result = CliRunner().invoke(train_teacher.main, [f'--outdir={outdir}', f'--data={data}', *TINY, *args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return sorted(glob.glob(os.path.join(outdir, '*')))[-1]


def final_state(run_dir):
    state = torch.load(latest_training_state(run_dir), weights_only=True)
    return dict(state, cur_nimg=state['run']['cur_nimg'])


@torch.no_grad()
def fixed_noise_loss(net, data):
    images, labels = ImageFolderDataset(data, use_labels=True).load_all()
    images = torch.from_numpy(images).float() / 127.5 - 1
    torch.manual_seed(123)
    return float(EDMLoss()(net, images.repeat(4, 1, 1, 1), torch.from_numpy(labels).repeat(4, 1)).mean())


def test_training_lowers_loss_and_writes_a_run_directory(tmp_path, dataset_zip):
    run = train(tmp_path, dataset_zip, '--kimg=0.32', '--tick=0.16', '--snap=1', '--grid=4', '--grid-steps=2')
    assert os.path.basename(run).startswith('00000-squares-cond-ddpmpp-edm-batch16')
    names = set(os.listdir(run))
    assert {'training_options.json', 'log.txt', 'stats.jsonl', 'reals.png', 'network-snapshot-000000.pkl',
            'network-snapshot-000000.320.pkl', 'training-state-000000.320.pt', 'fakes000000.320.png'} <= names

    options = json.load(open(os.path.join(run, 'training_options.json')))
    assert options['network_kwargs']['channel_mult'] == [1, 1] and options['batch_size'] == 16
    assert options['dataset_kwargs']['class_name'] == 'training.dataset.ImageFolderDataset'
    stats = [json.loads(line) for line in open(os.path.join(run, 'stats.jsonl'))]
    assert len(stats) == 2 and stats[0]['Loss/loss']['num'] == 10 * 16 * 64 and 'Timing/sec_per_kimg' in stats[0]

    # The snapshots are upstream-layout teachers; the trained one denoises better than the initial one.
    with open(os.path.join(run, 'network-snapshot-000000.320.pkl'), 'rb') as f:
        data = pickle.load(f)
    assert set(data) == {'ema', 'loss_fn', 'augment_pipe', 'dataset_kwargs'} and data['augment_pipe'] is None
    initial = teachers.load(os.path.join(run, 'network-snapshot-000000.pkl'))
    trained = teachers.load(os.path.join(run, 'network-snapshot-000000.320.pkl'))
    assert trained.label_dim == 4 and trained.img_resolution == 8 and trained.img_channels == 1
    before, after = fixed_noise_loss(initial, dataset_zip), fixed_noise_loss(trained, dataset_zip)
    assert after < 0.7 * before, (before, after)

    # A second run gets the next number, never the same directory.
    again = train(tmp_path, dataset_zip, '--kimg=0.016', '--tick=1', '--grid=0', '--desc=second')
    assert os.path.basename(again) == '00001-squares-cond-ddpmpp-edm-batch16-second'


def test_interrupted_run_resumes_to_the_same_weights(tmp_path, dataset_zip):
    common = ['--tick=0.064', '--snap=1', '--grid=0', '--xflip=1', '--ema-rampup=0.5', '--dropout=0.2']
    full = train(tmp_path / 'a', dataset_zip, '--kimg=0.128', *common)
    stopped = train(tmp_path / 'b', dataset_zip, '--kimg=0.064', *common)
    resumed = train(tmp_path / 'c', dataset_zip, '--kimg=0.128', f'--resume={stopped}', *common)
    a, c = final_state(full), final_state(resumed)
    assert a['cur_nimg'] == c['cur_nimg'] == 128
    for key in ('net', 'ema'):
        assert a[key].keys() == c[key].keys()
        assert all(torch.equal(a[key][k], c[key][k]) for k in a[key])
    b = final_state(stopped)
    assert not all(torch.equal(a['net'][k], b['net'][k]) for k in a['net'])  # It did train further.
    # Resuming from the full run's own intermediate state gives the same result too.
    middle = os.path.join(full, 'training-state-000000.064.pt')
    again = final_state(train(tmp_path / 'd', dataset_zip, '--kimg=0.128', f'--resume={middle}', *common))
    assert all(torch.equal(a['ema'][k], again['ema'][k]) for k in a['ema'])


def test_dry_run_and_bad_input(tmp_path, dataset_zip):
    runner = CliRunner()
    result = runner.invoke(train_teacher.main, [f'--outdir={tmp_path / "dry"}', f'--data={dataset_zip}', *TINY, '--dry-run'])
    assert result.exit_code == 0 and 'parameters' in result.output and not os.path.exists(tmp_path / 'dry')

    def error_of(*args):
        result = runner.invoke(train_teacher.main, [f'--outdir={tmp_path / "bad"}', *TINY, *args])
        assert result.exit_code != 0 and 'Traceback' not in result.output
        errors = [line for line in result.output.splitlines() if line.startswith('Error')]
        assert len(errors) == 1, result.output
        return errors[0]

    assert 'no such directory' in error_of(f'--data={tmp_path / "missing.zip"}')
    assert 'expected comma-separated integers' in error_of(f'--data={dataset_zip}', '--cres=1,x')
    assert 'either --duration' in error_of(f'--data={dataset_zip}', '--kimg=1', '--duration=1')
    assert 'no training-state' in error_of(f'--data={dataset_zip}', f'--resume={tmp_path}')
    run = train(tmp_path / 'small', dataset_zip, '--kimg=0.016', '--tick=1', '--grid=0')
    assert 'does not match' in error_of(f'--data={dataset_zip}', '--kimg=0.032', '--cbase=12', f'--resume={run}')
    assert not os.path.exists(tmp_path / 'bad')  # Nothing was created for runs that could not start.


def test_ctrl_c_saves_state_that_resumes_exactly(tmp_path, dataset_zip):
    """A real SIGINT mid-run: the step finishes, state is saved, exit code 130; resuming matches a straight run."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    outdir = tmp_path / 'interrupted'
    cmd = [sys.executable, os.path.join(root, 'train_teacher.py'), f'--outdir={outdir}', f'--data={dataset_zip}',
           *TINY, '--kimg=1000', '--tick=0.016', '--snap=0', '--grid=0']
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=dict(os.environ, PYTHONPATH=root))
    deadline = time.time() + 60
    stats = None
    while time.time() < deadline and proc.poll() is None:
        stats = glob.glob(str(outdir / '*' / 'stats.jsonl'))
        if stats and len(open(stats[0]).readlines()) >= 2:  # A couple of steps are done.
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()[-2000:]
    run = os.path.dirname(stats[0])
    stopped = final_state(run)
    assert stopped['cur_nimg'] >= 32 and 'Stopped at' in open(os.path.join(run, 'log.txt')).read()
    assert os.path.exists(os.path.join(run, f'network-snapshot-{stopped["cur_nimg"] / 1000:010.3f}.pkl'))

    total = (stopped['cur_nimg'] + 32) / 1000
    resumed = final_state(train(tmp_path / 'r', dataset_zip, f'--kimg={total}', '--tick=1', '--snap=0', '--grid=0',
                                f'--resume={run}'))
    straight = final_state(train(tmp_path / 's', dataset_zip, f'--kimg={total}', '--tick=1', '--snap=0', '--grid=0'))
    assert resumed['cur_nimg'] == straight['cur_nimg']
    assert all(torch.equal(resumed['ema'][k], straight['ema'][k]) for k in straight['ema'])


def test_init_starts_a_new_run_from_a_snapshot(tmp_path, dataset_zip):
    source = train(tmp_path / 'a', dataset_zip, '--kimg=0.032', '--tick=1', '--grid=0')
    snapshot = os.path.join(source, 'network-snapshot-000000.032.pkl')
    run = train(tmp_path / 'b', dataset_zip, '--kimg=0.016', '--tick=1', '--snap=1', '--grid=0', f'--init={snapshot}')
    start = teachers.load(os.path.join(run, 'network-snapshot-000000.pkl')).state_dict()
    expected = teachers.load(snapshot).state_dict()
    assert all(torch.equal(start[k], expected[k]) for k in expected)
    assert json.load(open(os.path.join(run, 'training_options.json')))['init_pkl'] == os.path.abspath(snapshot)
    result = CliRunner().invoke(train_teacher.main, [f'--outdir={tmp_path / "c"}', f'--data={dataset_zip}', *TINY,
                                                     '--cbase=12', f'--init={snapshot}'])
    assert result.exit_code != 0 and 'does not fit the network' in result.output and 'Traceback' not in result.output
    assert not os.path.exists(tmp_path / 'c')
