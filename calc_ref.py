"""Compute a dataset's reference statistics for one detector, once, and save them as an .npz.

The file stands in for the dataset wherever a reference is asked for (`calc_metrics.py --ref`, `refine.py` and
`distill.py --metrics-ref`), so metrics can be computed on machines without the data; the shipped
`embedded/fmnist-32x32-fmnist.npz` was made this way. It records the detector's identity, and using it with
another detector is refused.

Examples:

    # Mean and covariance (enough for FID / fd_fmnist) of Fashion-MNIST in the offline detector's features.
    python calc_ref.py --data=datasets/fmnist-32x32.zip --detector=fmnist --dest=embedded/fmnist-32x32-fmnist.npz

    # Inception statistics with every feature kept (KID and precision/recall need them too).
    python calc_ref.py --data=datasets/cifar10-32x32.zip --detector=inception --features --dest=cifar10-inception.npz
"""

import os

import click
import torch

from metrics.detectors import load_detector
from metrics.references import DatasetReference, StatsRequest


@click.command()
@click.option('--data', help='Dataset: ZIP or folder in the upstream layout', metavar='ZIP|DIR', required=True)
@click.option('--dest', help='Statistics file to write (.npz; never overwritten)', metavar='NPZ', required=True)
@click.option('--detector', help='inception, vgg16, fmnist, or a detector file', default='inception', show_default=True)
@click.option('--features', is_flag=True, help='Also keep every feature vector (for KID and precision/recall)')
@click.option('--mirror', help='Add x-flipped images', type=bool, default=False, show_default=True)
@click.option('--batch', 'batch_size', help='Batch size', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--workers', help='Data-loading processes', type=click.IntRange(min=0), default=2, show_default=True)
@click.option('--device', help='Torch device', default='cuda' if torch.cuda.is_available() else 'cpu',
              show_default=True)
def main(data, dest, detector, features, mirror, batch_size, workers, device):
    """Save the reference statistics of --data in --detector's features to --dest."""
    if not dest.lower().endswith('.npz'):
        raise click.BadParameter(f'{dest}: expected a file name ending in .npz', param_hint='--dest')
    if os.path.exists(dest):
        raise click.BadParameter(f'{dest} already exists; remove it or choose another name', param_hint='--dest')
    if not os.path.exists(data):
        raise click.BadParameter(f'{data} does not exist', param_hint='--data')
    device = torch.device(device)
    try:
        net = load_detector(detector, device)
        reference = DatasetReference(data, mirror=mirror, cache=False, batch_size=batch_size, num_workers=workers)
    except (OSError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    request = StatsRequest(capture_all=features, capture_mean_cov=True, max_items=None)
    stats = reference.get_stats(net, [request], device, progress=True)[request]
    stats.save(dest, detector=net.identity, source=reference.description)
    print(f'{dest}: {stats.num_items} images of {data}, {stats.num_features} {net.name} features')


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
