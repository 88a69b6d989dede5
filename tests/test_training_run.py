"""The run layer shared by every trainer: file names, options, counter seeds, EMA, tick cadence and Ctrl-C."""

import json
import os
import signal

import pytest
import torch

from training import run as run_layer
from training.run import Run


def test_kimg_labels_and_latest_state(tmp_path):
    assert run_layer.kimg_label(0) == '000000' and run_layer.kimg_label(123000) == '000123'
    assert run_layer.kimg_label(32) == '000000.032' and run_layer.kimg_label(1500) == '000001.500'
    for nimg in (0, 32, 1500, 123000):  # The label reads back to the kimg it was made from.
        assert run_layer.snapshot_kimg(f'/r/network-snapshot-{run_layer.kimg_label(nimg)}.pkl') == nimg / 1000
    assert run_layer.snapshot_kimg('/r/network-snapshot-best.pkl') is None
    for nimg in (0, 32, 1000, 1500):
        torch.save(dict(nimg=nimg), tmp_path / f'training-state-{run_layer.kimg_label(nimg)}.pt')
    assert run_layer.latest_training_state(str(tmp_path)).endswith('training-state-000001.500.pt')
    os.makedirs(tmp_path / 'empty')
    with pytest.raises(FileNotFoundError, match='no training-state'):
        run_layer.latest_training_state(str(tmp_path / 'empty'), required=True)


def test_options_round_trip_and_new_run_dirs(tmp_path):
    first = run_layer.new_run_dir(str(tmp_path), 'a')
    second = run_layer.new_run_dir(str(tmp_path), 'b')
    assert os.path.basename(first) == '00000-a' and os.path.basename(second) == '00001-b'
    run_layer.save_options(first, dict(batch=32, betas=[0.0, 0.99]))
    assert run_layer.load_options(first) == dict(batch=32, betas=[0.0, 0.99])
    with pytest.raises(ValueError, match='not a run directory'):
        run_layer.load_options(second)


def test_two_runs_started_at_once_get_two_directories(tmp_path):
    """A run names its directory early and creates it later: when another run took the number in between, it
    moves on to the next free one (one process), and never reuses a directory."""
    import dnnlib
    out = str(tmp_path)
    name = dnnlib.util.next_run_dir(out, 'refine-x')
    os.makedirs(name)  # the other run, started at the same moment, created it first
    (tmp_path / os.path.basename(name) / 'log.txt').write_text('theirs')
    mine = dnnlib.util.make_run_dir(name, renumber=True)
    assert mine == os.path.join(out, '00001-refine-x') and os.path.isdir(mine)
    assert (tmp_path / '00000-refine-x' / 'log.txt').read_text() == 'theirs'
    with pytest.raises(dnnlib.util.RunDirError, match='refusing to overwrite'):
        dnnlib.util.make_run_dir(name)  # without renumber (several processes share the name): refuse
    os.makedirs(tmp_path / 'my-own-dir')
    with pytest.raises(dnnlib.util.RunDirError, match='refusing to overwrite'):
        dnnlib.util.make_run_dir(str(tmp_path / 'my-own-dir'), renumber=True)  # not a numbered run: never renamed


def test_counter_seeds_are_functions_of_the_counters():
    assert run_layer.counter_seed(0, 5, 1) == run_layer.counter_seed(0, 5, 1)
    assert len({run_layer.counter_seed(0, i, p) for i in range(20) for p in range(3)}) == 60
    gen = run_layer.counter_generator(torch.device('cpu'), 7, 3)
    a, global_a = torch.randn(4, generator=gen), torch.randn(4)
    gen = run_layer.counter_generator(torch.device('cpu'), 7, 3)
    assert torch.equal(a, torch.randn(4, generator=gen)) and torch.equal(global_a, torch.randn(4))


def test_ema_half_life_and_update():
    # After one half-life of constant beta, the old value's weight is exactly one half.
    beta = run_layer.ema_beta(batch=64, cur_nimg=10 ** 9, halflife_kimg=6.4, rampup_ratio=0.05)
    assert beta ** (6400 / 64) == pytest.approx(0.5)
    # Early on the ramp-up caps the half-life at ratio x images seen.
    assert run_layer.ema_beta(64, 12800, 500, 0.05) == pytest.approx(0.5 ** (64 / 640))
    net, ema = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        net.weight.fill_(2.0)
        net.running_mean.fill_(5.0)
    run_layer.update_ema(ema, net, 0.75)
    assert torch.allclose(ema.weight, torch.full([3], 0.75 * 1.0 + 0.25 * 2.0))
    assert torch.equal(ema.running_mean, net.running_mean)


def test_ticks_snapshots_and_stats(tmp_path):
    run = Run(str(tmp_path), total_kimg=1, kimg_per_tick=0.25, snapshot_ticks=2, batch=50, progress=False)
    events = []
    while not run.done:
        if run.advance(50):
            run.end_tick()
            events.append((run.cur_nimg, run.snapshot_due, run.state_due))
    run.close()
    assert events == [(250, False, False), (500, True, True), (750, False, False), (1000, True, True)]
    lines = [json.loads(line) for line in open(tmp_path / 'stats.jsonl')]
    assert [line['Progress/kimg']['mean'] for line in lines] == [0.25, 0.5, 0.75, 1.0]
    resumed = Run(str(tmp_path), total_kimg=2, kimg_per_tick=0.25, snapshot_ticks=2, batch=50, progress=False)
    resumed.load_state_dict(run.state_dict())
    assert (resumed.cur_nimg, resumed.cur_tick, resumed.done) == (1000, 4, False)
    resumed.close()


@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_ends_the_tick_then_raises_after_saving(tmp_path, signum):
    before = signal.getsignal(signum)
    run = Run(str(tmp_path), total_kimg=10, kimg_per_tick=5, snapshot_ticks=100, batch=10, progress=False)
    assert not run.advance(10)
    os.kill(os.getpid(), signum)  # Handled: the step finishes, the tick ends, everything is due.
    assert run.advance(10) and run.done
    run.end_tick()
    assert run.snapshot_due and run.state_due and run.cur_nimg == 20
    with pytest.raises(KeyboardInterrupt, match='resume with --resume'):
        run.close()
    assert 'Stopped at 0.02 kimg' in open(tmp_path / 'log.txt').read()
    assert signal.getsignal(signum) is before


def test_a_corrupt_newest_state_falls_back_to_the_previous_one(tmp_path, capsys):
    for kimg in ('000001.000', '000002.000', '000003.000'):
        torch.save(dict(weights=torch.arange(4096.0)), tmp_path / f'training-state-{kimg}.pt')  # mostly tensor data
    good = (tmp_path / 'training-state-000003.000.pt').read_bytes()
    (tmp_path / 'training-state-000003.000.pt').write_bytes(good[:len(good) // 2])  # killed mid-write
    corrupt = bytearray((tmp_path / 'training-state-000002.000.pt').read_bytes())
    corrupt[len(corrupt) // 2] ^= 0xFF  # a flipped bit inside the tensor's bytes
    (tmp_path / 'training-state-000002.000.pt').write_bytes(bytes(corrupt))
    assert run_layer.latest_training_state(str(tmp_path)).endswith('training-state-000001.000.pt')
    out = capsys.readouterr().out
    assert 'training-state-000003.000.pt is truncated or corrupt' in out and '000002.000' in out
    (tmp_path / 'training-state-000001.000.pt').write_bytes(b'junk')
    with pytest.raises(FileNotFoundError, match='no readable training-state'):
        run_layer.latest_training_state(str(tmp_path), required=True)
