"""Click parameter types shared by the scripts: floats that must be finite.

`click.FloatRange` and `type=float` accept `nan` and `inf`, which then travel into a run as garbage (every step
skipped, NaN networks, black images). These reject them where the user typed them, in click's one-line format.
"""

import math

import click


class FiniteFloatRange(click.FloatRange):
    """`click.FloatRange` (bounds optional) that also refuses nan and +-inf."""

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f'{value!r} is not a finite number', param, ctx)
        return super().convert(number, param, ctx)


FINITE_FLOAT = FiniteFloatRange()
