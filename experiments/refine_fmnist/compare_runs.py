"""Curves of several refinement runs on one figure: a distance and the pixel mean against kimg.

Each run is given as LABEL=RUN_DIR; the values come from the run's `metric-<name>.jsonl` and `metric-pixels.jsonl`
(written by `refine.py --metrics`), the start (no snapshot) at kimg 0. A table of every point goes to stdout.

    python experiments/refine_fmnist/compare_runs.py --out=docs/figures/x.png \
        --run="IKL=runs/00003-refine-..." --run="IKL + adv=runs/00000-refine-..." [--data-mean=0.22]
"""

import os
import sys
from typing import List, Tuple

import click

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from training.plots import metric_curves  # noqa: E402


def curve(run_dir: str, metric: str, key: str) -> List[Tuple[float, float]]:
    """(kimg, value) of `key` in `metric-<metric>.jsonl`, in kimg order; the start is kimg 0."""
    if not os.path.isfile(os.path.join(run_dir, f'metric-{metric}.jsonl')):
        raise click.ClickException(f'{run_dir}: no metric-{metric}.jsonl (was the run made with --metrics?)')
    return metric_curves(run_dir)[key]


@click.command()
@click.option('--run', 'runs', multiple=True, required=True, metavar='LABEL=DIR', help='A run to draw (repeatable).')
@click.option('--metric', default='fd_fmnist2k_full', show_default=True, help='The distance to draw.')
@click.option('--data-mean', type=float, help="The data's pixel mean, drawn as a line.")
@click.option('--out', required=True, type=click.Path(dir_okay=False), help='PNG to write.')
def main(runs, metric, data_mean, out):
    """Draw the distance and the pixel mean of several runs against kimg."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, (ax_d, ax_p) = plt.subplots(1, 2, figsize=(11, 4))
    for spec in runs:
        label, sep, run_dir = spec.rpartition('=')  # Labels may hold '=' (option values).
        if not sep or not os.path.isdir(run_dir):
            raise click.BadParameter(f'{spec!r}: expected LABEL=RUN_DIR with an existing directory', param_hint='--run')
        dist, pix = curve(run_dir, metric, metric), curve(run_dir, 'pixels', 'pixel_mean')
        ax_d.plot(*zip(*dist), marker='o', label=label)
        ax_p.plot(*zip(*pix), marker='o', label=label)
        print(label + ': ' + ', '.join(f'{k:g}: {v:.3f}' for k, v in dist))
    if data_mean is not None:
        ax_p.axhline(data_mean, color='k', linestyle='--', label='data')
    ax_d.set(xlabel='kimg', ylabel=metric, title=metric)
    ax_p.set(xlabel='kimg', ylabel='pixel mean', title='mean brightness')
    for ax in (ax_d, ax_p):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    print(f'wrote {out}')


if __name__ == '__main__':
    main()
