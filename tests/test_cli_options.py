"""Float options refuse nan and inf where the user typed them, before anything is loaded or created."""

import os
import sys

import pytest
from click.testing import CliRunner

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import distill  # noqa: E402
import generate  # noqa: E402
import refine  # noqa: E402
import style_mixing  # noqa: E402
import train_stylegan2  # noqa: E402
import train_teacher  # noqa: E402
from dnnlib.cli_types import FiniteFloatRange  # noqa: E402

CASES = [
    (refine.main, ['--network=g.pkl', '--teacher=t.pkl'], ['--glr', '--kimg', '--p-mean', '--lr', '--ema']),
    (distill.main, ['--teacher=t.pkl'], ['--glr', '--kimg', '--p-mean']),
    (generate.main, ['--network=g.pkl', '--seeds=0'], ['--trunc']),
    (style_mixing.main, ['--network=g.pkl', '--rows=0', '--cols=1'], ['--trunc']),
    (train_teacher.main, ['--data=d.zip'], ['--lr', '--duration']),
    (train_stylegan2.main, ['--data=d.zip'], ['--glr', '--gamma']),
]


@pytest.mark.parametrize('command, base, options', CASES, ids=[c[0].callback.__module__ for c in CASES])
@pytest.mark.parametrize('value', ['nan', 'inf', '-inf'])
def test_non_finite_floats_are_rejected_at_parse_time(tmp_path, monkeypatch, command, base, options, value):
    monkeypatch.chdir(tmp_path)
    for name in ('g.pkl', 't.pkl', 'd.zip'):  # Inputs exist, so only the float can be what is refused.
        (tmp_path / name).write_bytes(b'')
    for option in options:
        args = base + [f'{option}={value}', f'--outdir={tmp_path / "out"}']
        result = CliRunner().invoke(command, args)
        assert result.exit_code == 2, (option, result.output)
        assert f"Invalid value for '{option}'" in result.output and 'not a finite number' in result.output, result.output
        assert not (tmp_path / 'out').exists()


def test_finite_range_keeps_its_bounds():
    kind = FiniteFloatRange(min=0, min_open=True)
    assert kind.convert('0.5', None, None) == 0.5
    with pytest.raises(Exception, match='not a finite number'):
        kind.convert('nan', None, None)
    with pytest.raises(Exception, match='0'):
        kind.convert('0', None, None)
