"""Per-class distances, precision/recall and brightness of every snapshot of a class-conditional refinement run.

Issue #23 asks whether refinement's erosion is a loss of diversity (mode seeking) or a drift of some classes. For
the starting network and each `network-snapshot-<kimg>.pkl` of a run directory this draws `--num` samples per
class (the same latents for every network), embeds them with the offline Fashion-MNIST detector and reports, against
the real images of the same class: the Frechet distance per class, precision and recall (k = 3) over all classes,
and the mean brightness per class, a pixel-space Frechet distance over all classes (images average-pooled to 8x8,
so 64 dimensions: plain pixel statistics that the detector cannot hide), and the within-class spread per class (the
8x8 pixels' standard deviation across the class's samples, averaged over pixels, relative to the real images': 1
for as varied as the data, near 0 for a class collapsed to one image). One JSON object per network goes to `along_run.jsonl` in the run directory, a
table to stdout, and the curves to `along_run.png`.

    python experiments/refine_fmnist/along_run.py --run=runs/00000-refine-... \
        --start=embedded/fmnist-stylegan2.pkl --data=datasets/fmnist-32x32.zip
"""

import json
import os
import sys

import click
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from metrics import formulas  # noqa: E402
from metrics.detectors import load_detector  # noqa: E402
from metrics.pixels import pixel_frechet_distance, pooled_pixels  # noqa: E402
from pipelines.generators import load_generator  # noqa: E402
from teachers.load import load as load_teacher  # noqa: E402
from teachers.sampling import edm_sampler  # noqa: E402
from training.dataset import ImageFolderDataset  # noqa: E402
from training.run import kimg_files  # noqa: E402

CLASSES = ['T-shirt', 'trouser', 'pullover', 'dress', 'coat', 'sandal', 'shirt', 'sneaker', 'bag', 'boot']


def _uint8(images: torch.Tensor) -> torch.Tensor:
    return (images * 127.5 + 128).clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def _features(detector, images_uint8: torch.Tensor, batch: int = 500) -> np.ndarray:
    return torch.cat([detector.features(images_uint8[i:i + batch]) for i in range(0, len(images_uint8), batch)]).numpy()


def _stats(features: np.ndarray):
    return features.mean(0), np.cov(features, rowvar=False)


def real_by_class(data: str, per_class: int, detector, seed: int):
    """Features and brightness of up to `per_class` random real images of every class."""
    dataset = ImageFolderDataset(data, use_labels=True)
    images, labels = dataset.load_all()
    classes = labels.argmax(1)
    rng = np.random.default_rng(seed)
    out = []
    for c in range(labels.shape[1]):
        idx = rng.permutation(np.flatnonzero(classes == c))[:per_class]
        imgs = torch.from_numpy(images[idx])
        out.append((_features(detector, imgs), float(imgs.float().mean() / 255), pooled_pixels(imgs)))
    return out


@torch.no_grad()
def generated_by_class(adapter, num: int, num_classes: int, detector, seed: int):
    out = []
    for c in range(num_classes):
        g = torch.Generator().manual_seed(seed * 1000 + c)
        z = torch.randn(num, adapter.G.z_dim, generator=g)
        labels = torch.nn.functional.one_hot(torch.full([num], c), num_classes).float()
        imgs = _uint8(torch.cat([adapter.synthesize(z[i:i + 250], labels[i:i + 250]) for i in range(0, num, 250)]))
        out.append((_features(detector, imgs), float(imgs.float().mean() / 255), pooled_pixels(imgs)))
    return out


@torch.no_grad()
def teacher_by_class(net, num: int, num_classes: int, detector, seed: int, num_steps: int = 18):
    """The teacher's own samples (Heun, `num_steps`), the same count per class: the row refinement aims at."""
    out = []
    for c in range(num_classes):
        g = torch.Generator().manual_seed(seed * 1000 + c)
        latents = torch.randn(num, net.img_channels, net.img_resolution, net.img_resolution, generator=g)
        labels = torch.nn.functional.one_hot(torch.full([num], c), num_classes).float()
        imgs = torch.cat([edm_sampler(net, latents[i:i + 250], labels[i:i + 250], num_steps=num_steps)
                          for i in range(0, num, 250)])
        imgs = _uint8(imgs.float())
        out.append((_features(detector, imgs), float(imgs.float().mean() / 255), pooled_pixels(imgs)))
    return out


def evaluate(gen, real) -> dict:
    """`gen`, `real`: per class (detector features, mean brightness, pooled pixels)."""
    per_class = [formulas.frechet_distance(*_stats(g[0]), *_stats(r[0])) for g, r in zip(gen, real)]
    all_gen, all_real = np.concatenate([g[0] for g in gen]), np.concatenate([r[0] for r in real])
    precision, recall = formulas.precision_recall(all_real, all_gen, k=3)
    pix_gen, pix_real = np.concatenate([g[2] for g in gen]), np.concatenate([r[2] for r in real])
    spread = [float(g[2].std(0).mean() / r[2].std(0).mean()) for g, r in zip(gen, real)]
    return dict(fd_all=formulas.frechet_distance(*_stats(all_gen), *_stats(all_real)),
                fd_class_mean=float(np.mean(per_class)), fd_class=[round(v, 3) for v in per_class],
                precision=float(precision), recall=float(recall),
                brightness=[round(g[1], 4) for g in gen],
                fd_pixels=pixel_frechet_distance(pix_gen, pix_real),
                spread=[round(v, 4) for v in spread], spread_mean=float(np.mean(spread)))


def snapshots(run: str):
    """(kimg, path) of the run's numbered snapshots, oldest first."""
    return kimg_files(run, 'network-snapshot', 'pkl')


def plot(rows, real_brightness, path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    kimg = [r['kimg'] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for c, name in enumerate(CLASSES):
        axes[0].plot(kimg, [r['fd_class'][c] for r in rows], marker='o', label=name)
        line, = axes[2].plot(kimg, [r['brightness'][c] for r in rows], marker='o', label=name)
        axes[2].axhline(real_brightness[c], color=line.get_color(), linestyle=':', linewidth=1)
    axes[0].set(title='Frechet distance per class', xlabel='kimg')
    axes[0].legend(fontsize=7, ncol=2)
    axes[1].plot(kimg, [r['precision'] for r in rows], marker='o', label='precision')
    axes[1].plot(kimg, [r['recall'] for r in rows], marker='o', label='recall')
    axes[1].set(title='precision / recall (k=3)', xlabel='kimg')
    axes[1].legend()
    axes[2].set(title='mean brightness per class (dotted: the data)', xlabel='kimg')
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


@click.command()
@click.option('--run', 'run', required=True, type=click.Path(exists=True, file_okay=False), help='Refinement run directory.')
@click.option('--start', required=True, type=click.Path(exists=True, dir_okay=False), help='The network the run started from.')
@click.option('--data', required=True, type=click.Path(exists=True), help='The labelled Fashion-MNIST dataset (zip).')
@click.option('--num', type=click.IntRange(min=10), default=500, show_default=True, help='Samples per class and network.')
@click.option('--teacher', type=click.Path(exists=True, dir_okay=False), help='Also measure this teacher\'s samples '
              '(printed, and stored with kimg null).')
@click.option('--seed', type=int, default=0, show_default=True)
def main(run, start, data, num, teacher, seed):
    torch.set_grad_enabled(False)
    detector = load_detector('fmnist')
    real = real_by_class(data, 2 * num, detector, seed)
    rows = []
    out_path = os.path.join(run, 'along_run.jsonl')
    with open(out_path, 'w', encoding='utf-8') as out:
        jobs = ([(None, teacher)] if teacher else []) + [(0.0, start)] + snapshots(run)
        for kimg, path in jobs:
            if kimg is None:
                gen = teacher_by_class(load_teacher(path, verbose=False), num, len(real), detector, seed)
            else:
                gen = generated_by_class(load_generator(path), num, len(real), detector, seed)
            row = dict(kimg=kimg, network=path, **evaluate(gen, real))
            rows.append(row)
            out.write(json.dumps(row) + '\n')
            out.flush()
            print(f"{'teacher' if kimg is None else f'{kimg:7.2f}':>7}  fd {row['fd_all']:6.2f}  class-mean {row['fd_class_mean']:6.2f}  "
                  f"P {row['precision']:.3f}  R {row['recall']:.3f}  pix {row['fd_pixels']:.4f}  spread {row['spread_mean']:.3f}  "
                  + ' '.join(f'{v:5.1f}' for v in row['fd_class']), flush=True)
    print('data brightness per class: ' + ' '.join(f'{r[1]:.3f}' for r in real))
    plot([r for r in rows if r['kimg'] is not None], [r[1] for r in real], os.path.join(run, 'along_run.png'))
    print(f'wrote {out_path} and along_run.png')


if __name__ == '__main__':
    main()
