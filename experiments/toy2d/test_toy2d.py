"""experiments/toy2d/toy2d.py: its coverage metric against the closed form and under collapsed modes; its snapshot trajectory;
its --output-noise option."""

import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from toy2d import coverage  # noqa: E402


def test_coverage_of_two_samples_of_one_law_matches_the_closed_form():
    # A real point is uncovered when its k nearest neighbours in the pooled N-1 real + M fake points are all real.
    n, k = 3000, 5
    expected = 1 - math.prod((n - 1 - j) / (2 * n - 1 - j) for j in range(k))
    gen = torch.Generator().manual_seed(0)
    values = [coverage(torch.randn(n, 2, generator=gen), torch.randn(n, 2, generator=gen), k) for _ in range(4)]
    assert abs(sum(values) / len(values) - expected) < 0.006, (values, expected)


def test_coverage_falls_when_the_modes_collapse():
    gen = torch.Generator().manual_seed(1)
    centres = torch.tensor([[-2.0, 0.0], [2.0, 0.0]])
    real = centres[torch.randint(2, (2000,), generator=gen)] + 0.05 * torch.randn(2000, 2, generator=gen)
    narrow = centres[torch.randint(2, (2000,), generator=gen)] + 0.005 * torch.randn(2000, 2, generator=gen)
    same = centres[torch.randint(2, (2000,), generator=gen)] + 0.05 * torch.randn(2000, 2, generator=gen)
    assert coverage(real, narrow) < 0.2 < 0.9 < coverage(real, same)


def test_snapshots_report_a_trajectory_that_ends_at_the_final_generator_and_a_fixed_noise_strength_stays(tmp_path):
    from click.testing import CliRunner
    from toy2d import main
    args = ['--outdir', str(tmp_path), '--kimg', '2', '--start-kimg', '0.5', '--fake-init-steps', '2', '--g-width', '16',
            '--g-depth', '1', '--fake-width', '16', '--fake-depth', '1', '--output-noise', '0.03',
            '--fake-init', 'empirical', '--snapshots', '2', '--methods', 'none,ikl']
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    results = json.loads(result.output.strip().splitlines()[-1])['results']
    ikl_result = results['ikl']
    points = ikl_result.pop('trajectory')
    assert results['none']['noise_strength'] != [0.03, 0.03]  # the start keeps its trained strength...
    assert all(p['noise_strength'] == [0.03, 0.03] for p in points)  # ...the refinement has the fixed one throughout
    assert [round(p['kimg']) for p in points] == [1, 2]
    final = {k: v for k, v in ikl_result.items() if k != 'seconds'}
    assert points[-1] == dict(kimg=points[-1]['kimg'], **final)  # the last snapshot is the generator reported
    assert points[0] != dict(kimg=points[0]['kimg'], **final)
    assert len(list((tmp_path / 'start').glob('network-snapshot-*.pkl'))) == 1  # the start keeps no snapshots


def test_output_noise_option_refuses_what_is_not_off_trained_or_a_strength():
    from click.testing import CliRunner
    from toy2d import main
    for bad in ['on', '-0.1', 'nan']:
        result = CliRunner().invoke(main, ['--output-noise', bad])
        assert result.exit_code == 2, (bad, result.output)
        assert f"expected off, trained or a strength >= 0, got '{bad}'" in result.output
