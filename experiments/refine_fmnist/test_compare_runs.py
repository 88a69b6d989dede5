"""compare_runs.py reads a run's metric files in kimg order and draws them."""

import json
import os
import sys

from click.testing import CliRunner

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from compare_runs import curve, main  # noqa: E402


def _fake_run(path, values):
    os.makedirs(path)
    for name, key in [('fd_fmnist2k_full', 'fd_fmnist2k_full'), ('pixels', 'pixel_mean')]:
        with open(os.path.join(path, f'metric-{name}.jsonl'), 'w') as f:
            for snap, v in values:
                f.write(json.dumps(dict(results={key: v}, snapshot_pkl=snap)) + '\n')


def test_points_in_kimg_order_start_at_zero_best_skipped(tmp_path):
    run = str(tmp_path / 'run')
    _fake_run(run, [(None, 5.0), (f'{run}/network-snapshot-000010.240.pkl', 3.0),
                    (f'{run}/network-snapshot-000002.048.pkl', 4.0), (f'{run}/network-snapshot-best.pkl', 3.0)])
    assert curve(run, 'fd_fmnist2k_full', 'fd_fmnist2k_full') == [(0.0, 5.0), (2.048, 4.0), (10.24, 3.0)]
    out = tmp_path / 'cmp.png'
    result = CliRunner().invoke(main, ['--run', f'a={run}', '--data-mean', '0.22', '--out', str(out)])
    assert result.exit_code == 0, result.output
    assert 'a: 0: 5.000, 2.048: 4.000, 10.24: 3.000' in result.output
    assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_a_bad_run_spec_is_one_line(tmp_path):
    result = CliRunner().invoke(main, ['--run', str(tmp_path), '--out', str(tmp_path / 'x.png')])
    assert result.exit_code != 0 and 'LABEL=RUN_DIR' in result.output
    result = CliRunner().invoke(main, ['--run', f'x={tmp_path}', '--out', str(tmp_path / 'x.png')])
    assert result.exit_code != 0 and 'no metric-fd_fmnist2k_full.jsonl' in result.output
