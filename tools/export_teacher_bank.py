"""Ship a teacher's bank of samples for refine.py's `--adv` beside the teacher file.

Drawing the bank is the one slow step of a first `--adv` run on a CPU (10k Heun-18 samples of the shipped
Fashion-MNIST teacher take most of an hour on one core). This draws it (or takes it from the cache) and writes
`<teacher>-bank-n<num>-heun<steps>-seed<seed>.npz` next to the teacher file, where refine.py finds it:

    python tools/export_teacher_bank.py --teacher=embedded/fmnist-edm-492kimg.pkl --num=10000
"""

import os
import sys

import click

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import teachers  # noqa: E402
from pipelines.critic import export_bank, shipped_bank_path, teacher_bank  # noqa: E402


@click.command()
@click.option('--teacher', required=True, type=click.Path(exists=True, dir_okay=False), help='EDM teacher pickle')
@click.option('--num', type=click.IntRange(min=4), default=10000, show_default=True, help='Samples (refine.py --adv-bank)')
@click.option('--device', default='cpu', show_default=True)
def main(teacher: str, num: int, device: str) -> None:
    """Write the teacher's sample bank beside the teacher file."""
    path = shipped_bank_path(teacher, num, num_steps=18, seed=0)
    if os.path.exists(path):
        raise click.ClickException(f'{path} exists; remove it first to write it anew')
    images, labels = teacher_bank(teacher, teachers.load(teacher, device=device), num)
    export_bank(path, teacher, images, labels)
    print(f'{path}: {num} samples, {os.path.getsize(path) / 2**20:.1f} MiB')


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
