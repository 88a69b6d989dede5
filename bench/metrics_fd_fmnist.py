"""Scale of the offline Fréchet distance (`fd_fmnist`): what real-vs-real and degraded-vs-real give, and speed.

Run: `python bench/metrics_fd_fmnist.py [--data /usr/share/datasets/fashion-mnist] [--num 5000] [--threads 1]`.
Prints a table of FD / KD in the shipped Fashion-MNIST detector's features between the training images and:
held-out test images (the floor), noisy, blurred and shuffled-pixel versions, and pure noise; then the
detector's throughput and the time of one 2048-d Fréchet distance (the Inception size); last line JSON.
"""

import json
import os
import sys
import time

import click
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from metrics import formulas, load_detector  # noqa: E402
from metrics.feature_stats import FeatureStats  # noqa: E402
from training.dataset import IDX_FILES, read_idx  # noqa: E402


def _features(detector, images, batch=500):
    return np.concatenate([detector.features(images[i:i + batch]).numpy() for i in range(0, len(images), batch)])


def _degrade(images, kind, gen):
    x = images.to(torch.float32)
    if kind == 'noise 0.1':
        x = x + 0.1 * 255 * torch.randn(x.shape, generator=gen)
    elif kind == 'noise 0.3':
        x = x + 0.3 * 255 * torch.randn(x.shape, generator=gen)
    elif kind == 'blur 3x3':
        x = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode='replicate'), 3, stride=1)
    elif kind == 'pixels shuffled':
        x = x.flatten(1)[:, torch.randperm(x[0].numel(), generator=gen)].view_as(x)
    elif kind == 'uniform noise':
        x = torch.rand(x.shape, generator=gen) * 255
    return x.round().clamp(0, 255).to(torch.uint8)


@click.command()
@click.option('--data', 'data_dir', default='/usr/share/datasets/fashion-mnist', show_default=True)
@click.option('--num', type=click.IntRange(min=100), default=5000, show_default=True)
@click.option('--threads', type=click.IntRange(min=1), default=1, show_default=True)
def main(data_dir, num, threads):
    torch.set_num_threads(threads)
    train = torch.from_numpy(read_idx(os.path.join(data_dir, IDX_FILES['train'][0]))[:num, None].copy())
    test = torch.from_numpy(read_idx(os.path.join(data_dir, IDX_FILES['test'][0]))[:num, None].copy())
    detector = load_detector('fmnist')
    gen = torch.Generator().manual_seed(0)

    start = time.time()
    real = _features(detector, train)
    throughput = num / (time.time() - start)
    mu_r, sigma_r = FeatureStats.from_features(real, capture_all=False).get_mean_cov()

    rows = []
    candidates = [('test split', test)] + [(kind, _degrade(train if kind == 'uniform noise' else test, kind, gen))
                                            for kind in ('noise 0.1', 'noise 0.3', 'blur 3x3', 'pixels shuffled',
                                                         'uniform noise')]
    for name, images in candidates:
        feats = _features(detector, images)
        mu, sigma = FeatureStats.from_features(feats, capture_all=False).get_mean_cov()
        fd = formulas.frechet_distance(mu, sigma, mu_r, sigma_r)
        kd = formulas.kernel_inception_distance(real, feats, num_subsets=20)
        rows.append(dict(versus=name, fd=round(fd, 4), kd=round(kd, 5)))

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((4096, 2048)), rng.standard_normal((4096, 2048)) + 0.1
    sig_a, sig_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    start = time.time()
    formulas.frechet_distance(a.mean(0), sig_a, b.mean(0), sig_b)
    fd_2048_seconds = time.time() - start

    print(f'{num} Fashion-MNIST training images vs ... (features of the shipped fmnist detector)')
    print(f'{"versus":<18}{"fd_fmnist":>12}{"kd_fmnist":>12}')
    for row in rows:
        print(f'{row["versus"]:<18}{row["fd"]:>12.4f}{row["kd"]:>12.5f}')
    print(f'detector throughput: {throughput:.0f} img/s ({threads} thread(s)); '
          f'one 2048-d Fréchet distance: {fd_2048_seconds:.1f} s')
    print(json.dumps(dict(bench='metrics_fd_fmnist', num=num, threads=threads, rows=rows,
                          detector_img_per_s=round(throughput), fd_2048_seconds=round(fd_2048_seconds, 2))))


if __name__ == '__main__':
    main()
