"""Post-hoc averaging of a run's snapshots: what a longer generator EMA would have given, without a rerun.

The snapshots a refinement writes every few kimg are its short-EMA generator at those points. Their parameters
averaged uniformly (buffers too) approximate an EMA over that stretch of the run. The distance of the average next
to the distance of the last snapshot tells whether the swings between snapshots are noise around a better mean
(the average wins) or a trend (the average lags).

    python experiments/refine_fmnist/average_snapshots.py --run=bench-out/fmnist-gan10/gamma1/00000-... \
        --from-kimg=12 --num=5000 --pixels-data=datasets/fmnist-32x32.zip
"""

import os
import sys

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from metrics import compute_metrics  # noqa: E402
from metrics.metric_main import fid_full_name  # noqa: E402
from metrics.pixels import dataset_pixels, pixel_summary  # noqa: E402
from pipelines import generators  # noqa: E402
from training.run import kimg_files  # noqa: E402


def snapshots(run_dir: str, from_kimg: float):
    """(kimg, path) of the run's numbered snapshots at or after `from_kimg`, in kimg order."""
    return [(kimg, path) for kimg, path in kimg_files(run_dir, 'network-snapshot', 'pkl') if kimg >= from_kimg]


@torch.no_grad()
def average_into(adapter, paths) -> None:
    """Set `adapter`'s generator to the uniform average of the generators in `paths` (floating tensors only)."""
    nets = [generators.load_generator(p).G for p in paths]
    for name, tensor in adapter.G.state_dict().items():
        if tensor.is_floating_point():
            tensor.copy_(torch.stack([n.state_dict()[name].float() for n in nets]).mean(0).to(tensor.dtype))


@click.command()
@click.option('--run', 'run_dir', required=True, type=click.Path(exists=True, file_okay=False), help='Run directory.')
@click.option('--from-kimg', type=float, required=True, help='Average the snapshots from this kimg on.')
@click.option('--num', type=int, default=5000, show_default=True, help='Samples per distance.')
@click.option('--data', default='embedded/fmnist-32x32-fmnist.npz', show_default=True, help='Reference statistics.')
@click.option('--pixels-data', type=click.Path(exists=True), help='Dataset ZIP for the 8x8 pixel distance.')
def main(run_dir, from_kimg, num, data, pixels_data):
    """Distance of the last snapshot and of the average of the snapshots from --from-kimg on."""
    found = snapshots(run_dir, from_kimg)
    if len(found) < 2:
        raise click.ClickException(f'{run_dir}: fewer than two snapshots at or after {from_kimg} kimg')
    metric = fid_full_name(num)  # Named fd_fmnist* in its results.
    data_pixels = dataset_pixels(pixels_data) if pixels_data else None
    rows = [('last', f'{found[-1][0]:g}', [found[-1][1]]),
            ('average', ','.join(f'{k:g}' for k, _ in found), [p for _, p in found])]
    for label, kimgs, paths in rows:
        adapter = generators.load_generator(paths[0])
        average_into(adapter, paths)
        fd = next(iter(compute_metrics([metric], adapter, data, detector='fmnist')[0]['results'].values()))
        line = f'{label:<8} kimg {kimgs:<40} fd {fd:.3f}'
        if data_pixels is not None:
            line += f"   fd_pixels {pixel_summary(adapter, num, data_pixels)['fd_pixels']:.4f}"
        print(line, flush=True)


if __name__ == '__main__':
    main()
