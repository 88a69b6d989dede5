"""bench/fmnist.py: the summary issue 23 reports (start, best, end, ratios, gap closed) from a run's own metric file,
and one real end-to-end run on the shipped models (tiny counts: seconds, not the benchmark's minutes)."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'bench'))

from fmnist import finished_runs, mean_spread, read_curve, summarise  # noqa: E402


def _write_metric_file(run_dir, values):
    with open(run_dir / 'metric-fd_fmnist5k_full.jsonl', 'w', encoding='utf-8') as f:
        for kimg, value in values:
            snapshot = None if kimg is None else str(run_dir / f'network-snapshot-{kimg}.pkl')
            f.write(json.dumps(dict(results={'fd_fmnist5k_full': value}, snapshot_pkl=snapshot)) + '\n')


def test_summary_of_a_curve(tmp_path):
    _write_metric_file(tmp_path, [(None, 10.0), ('000002.048', 7.0), ('000004.096', 6.0), ('000006.016', 6.3)])
    curve = read_curve(str(tmp_path))
    assert [p['kimg'] for p in curve] == [0.0, 2.048, 4.096, 6.016]
    row = summarise(curve, teacher_fd=1.0)
    assert (row['start'], row['best'], row['best_kimg'], row['end'], row['end_kimg']) == (10.0, 6.0, 4.096, 6.3, 6.016)
    assert row['end_over_start'] == pytest.approx(0.63) and row['end_over_best'] == pytest.approx(1.05)
    assert row['gap_closed'] == pytest.approx((10.0 - 6.3) / (10.0 - 1.0))


def test_finished_runs_are_those_that_reached_their_kimg(tmp_path):
    for name, seed, last in (('00000-a', 0, '000020.096'), ('00001-b', 1, '000012.288'), ('00002-c', 0, '000020.480')):
        run_dir = tmp_path / name
        run_dir.mkdir()
        (run_dir / 'training_options.json').write_text(json.dumps(dict(seed=seed, kimg=20.0)))
        _write_metric_file(run_dir, [(None, 5.0), (last, 4.0)])
    (tmp_path / 'not-a-run').mkdir()
    assert finished_runs(str(tmp_path)) == {0: str(tmp_path / '00002-c')}  # seed 1 stopped early; the newest seed 0


def test_summary_of_a_run_that_got_worse():
    row = summarise([dict(kimg=0.0, fd=4.0, snapshot=None), dict(kimg=2.0, fd=5.0, snapshot='s.pkl')], teacher_fd=2.0)
    assert row['best'] == 4.0 and row['best_kimg'] == 0.0 and row['gap_closed'] == pytest.approx(-0.5)


def test_mean_and_spread_over_seeds():
    assert mean_spread([1.0]) == '1.000'
    assert mean_spread([1.0, 2.0, 3.0]) == '2.000 ± 1.000'  # the sample standard deviation


def test_bench_runs_refine_per_seed_and_reports(tmp_path):
    env = dict(os.environ, DNNLIB_CACHE_DIR=str(tmp_path / 'cache'), TOOLKIT_OPS_IMPL='ref')  # No ops build.
    cmd = [sys.executable, os.path.join(REPO, 'bench', 'fmnist.py'), '--gans', 'weak', '--num', '40', '--kimg', '0.032',
           '--seeds', '0,1', '--recipe', '--recipe=official --batch=16 --grid=0', '--outdir', str(tmp_path / 'out')]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True, env=env, cwd=REPO).stdout
    result = json.loads(out.strip().splitlines()[-1])
    runs = result['results']['weak']
    assert result['benchmark'] == 'fmnist_refine' and [r['seed'] for r in runs] == [0, 1]
    assert result['teacher_fd'] > 0
    for run in runs:
        assert os.path.isdir(run['run_dir']) and len(run['curve']) == 2  # the start and the final snapshot
        assert run['end'] == run['curve'][-1]['fd'] and run['best'] == min(p['fd'] for p in run['curve'])
    assert 'weak' in out and 'end/start <= 0.5' in out
    again = subprocess.run(cmd + ['--existing', '--seeds', '1,2'], capture_output=True, text=True, timeout=600,
                           check=True, env=env, cwd=REPO).stdout
    reported = json.loads(again.strip().splitlines()[-1])['results']['weak']
    assert [r['seed'] for r in reported] == [1] and reported[0]['run_dir'] == runs[1]['run_dir']  # no new run
    assert reported[0]['end'] == runs[1]['end'] and reported[0]['seconds'] is None
