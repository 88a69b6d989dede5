"""bench/speed.py runs and reports what docs/benchmarks.md quotes: a table, then one JSON object as its last line
with a ratio per variant and the goals (small configuration, eager variants only: seconds, not minutes)."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_speed_bench_table_and_json():
    cmd = [sys.executable, os.path.join(REPO, 'bench', 'speed.py'), '--sections', 'g', '--configs', 'small',
           '--batch', '2', '--repeats', '1', '--compiled', 'none', '--threads', '1', '--device', 'cpu']
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True).stdout.strip().splitlines()
    result = json.loads(out[-1])
    assert result['bench'] == 'speed' and result['device'] == 'cpu'
    variants = [r['variant'] for r in result['results']]
    assert variants == ['reference ops, fp32', 'compiled ops, fp32', 'compiled ops, bf16']
    ref = result['results'][0]
    assert ref['reference'] and ref['speedup'] == 1.0
    assert all(r['median_sec'] > 0 and abs(r['speedup'] * r['time_ratio'] - 1) < 1e-9 for r in result['results'])
    assert result['goals']['g/small']['goal'] == '>= 1.5'
    assert any('reference ops, fp32' in line for line in out[:-1])


def test_speed_bench_refuses_unknown_sections():
    cmd = [sys.executable, os.path.join(REPO, 'bench', 'speed.py'), '--sections', 'nope']
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and 'choose from' in proc.stderr
