"""Refinement at image scale (issue 23): does refine.py make the shipped Fashion-MNIST GANs better, and keep them so?

For each GAN (by default the shipped weak 40-kimg and well-trained 240-kimg StyleGAN2; `gamma1`: the R1-gamma-1 one) and each seed, `refine.py`
runs as a user would run it, with the recipe given by `--recipe` (by default refine.py's own defaults) and the
distance to the data measured by refine.py's own `--metrics` (`fd_fmnist`, `--num` samples, at the start and at every
snapshot). Reported per GAN, as mean and spread over the seeds: the start, the best point (and where), the end, end /
start, end / best, the share of the gap to the teacher closed at the end, (start - end) / (start - teacher), and,
with `--pixels-data`, the plain pixel statistics of the start and the end against the data: mean brightness, its
spread over images, and the Frechet distance of 8x8-pooled pixels. The teacher's own distance is measured once, on a
cached bank of `--num` of its Heun-18 samples, the bank `--adv --adv-bank=<num>` would train against (drawn on first
use).
The targets of issue 23 are printed beside the results. A table, then one JSON object as the last line.

    python bench/fmnist.py --gans=weak,well-trained,gamma1 --seeds=0,1,2 --pixels-data=datasets/fmnist-32x32.zip \\
        --outdir=bench-out/fmnist      # refine.py's default recipe; --recipe="--recipe=official" for the release's
"""

import glob
import json
import os
import shlex
import subprocess
import sys
import time
from typing import Dict, List

import click
import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from metrics import compute_metrics  # noqa: E402
from metrics.metric_main import fid_full_name  # noqa: E402
from metrics.pixels import dataset_pixels, pixel_summary  # noqa: E402
import teachers  # noqa: E402
from pipelines import generators  # noqa: E402
from pipelines.critic import teacher_bank  # noqa: E402
from training.plots import record_kimg  # noqa: E402
from training.run import load_options  # noqa: E402

GANS = {'weak': 'embedded/fmnist-stylegan2.pkl', 'well-trained': 'embedded/fmnist-stylegan2-240kimg.pkl',
        'gamma1': 'embedded/fmnist-stylegan2-gamma1-160kimg.pkl'}
TARGETS = {'weak': 0.5, 'well-trained': 0.75, 'gamma1': 0.75}  # Issue 23: the end at most this times the start...
END_OVER_BEST = 1.05                             # ...and at most this times the run's best.


def read_curve(run_dir: str) -> List[Dict]:
    """The run's distance at the start and at every snapshot, from refine.py's metric-fd_*.jsonl:
    [{kimg, fd, snapshot}] in order (kimg 0 for the start)."""
    paths = glob.glob(os.path.join(run_dir, 'metric-fd_*.jsonl'))
    if len(paths) != 1:
        raise click.ClickException(f'{run_dir}: expected one metric-fd_*.jsonl, found {len(paths)}')
    curve = []
    with open(paths[0], encoding='utf-8') as f:
        for line in f:
            record = json.loads(line)
            snapshot = record.get('snapshot_pkl')
            kimg = record_kimg(snapshot)
            if kimg is not None:
                curve.append(dict(kimg=kimg, fd=float(next(iter(record['results'].values()))), snapshot=snapshot))
    return sorted(curve, key=lambda point: point['kimg'])


def summarise(curve: List[Dict], teacher_fd: float) -> Dict:
    """Start, best, end and the ratios issue 23 asks for, from one run's curve."""
    start, end = curve[0]['fd'], curve[-1]['fd']
    best = min(curve, key=lambda point: point['fd'])
    return dict(start=start, best=best['fd'], best_kimg=best['kimg'], end=end, end_kimg=curve[-1]['kimg'],
                end_over_start=end / start, end_over_best=end / best['fd'],
                gap_closed=(start - end) / (start - teacher_fd))


def mean_spread(values: List[float]) -> str:
    values = np.asarray(values, dtype=np.float64)
    return f'{values.mean():.3f}' + (f' ± {values.std(ddof=1):.3f}' if len(values) > 1 else '')


class BankSamples:
    """Stored samples seen as a generator adapter (`sample` hands them out in order), for `compute_metrics`."""

    def __init__(self, images: torch.Tensor):
        self.images, self.next = images, 0

    def sample(self, batch_size: int, generator=None):
        if self.next + batch_size > len(self.images):
            raise ValueError(f'only {len(self.images)} stored samples')
        self.next += batch_size
        return self.images[self.next - batch_size:self.next].float(), None


def finished_runs(outdir: str) -> Dict[int, str]:
    """seed -> run directory of the runs in `outdir` whose last snapshot reached their --kimg (the newest per seed)."""
    found = {}
    for run_dir in sorted(glob.glob(os.path.join(outdir, '*'))):
        try:
            options = load_options(run_dir)
            curve = read_curve(run_dir)
        except (ValueError, click.ClickException):
            continue
        if curve[-1]['kimg'] >= options.kimg:
            found[int(options.seed)] = run_dir
    return found


def refine(gan: str, teacher: str, data: str, num: int, kimg: float, seed: int, recipe: List[str], outdir: str) -> str:
    """One refine.py run as a user would start it; returns its run directory (found by its seed, so benchmarks of
    other seeds may run beside it in the same --outdir)."""
    subprocess.run([sys.executable, os.path.join(ROOT, 'refine.py'), '--network', gan, '--teacher', teacher,
                    '--outdir', outdir, '--kimg', str(kimg), '--seed', str(seed), '--tick', '1', '--snap', '2',
                    '--metrics', fid_full_name(num), '--metrics-ref', data, '--detector', 'fmnist', '--no-progress'] + recipe,
                   check=True, cwd=ROOT)
    return finished_runs(outdir)[seed]


@click.command()
@click.option('--gans', default='weak,well-trained', show_default=True,
              help=f'Comma-separated names ({", ".join(GANS)}) or NAME=PKL pairs')
@click.option('--teacher', default='embedded/fmnist-edm-492kimg.pkl', show_default=True, help='EDM teacher pickle')
@click.option('--data', default='embedded/fmnist-32x32-fmnist.npz', show_default=True,
              help='Reference of the distance: statistics .npz (calc_ref.py) or dataset ZIP')
@click.option('--pixels-data', type=click.Path(exists=True), help='Dataset ZIP for the pixel statistics (skipped without)')
@click.option('--num', type=click.IntRange(min=2), default=5000, show_default=True, help='Samples per distance')
@click.option('--kimg', type=click.FloatRange(min=0, min_open=True), default=20, show_default=True, help='Refinement length')
@click.option('--seeds', default='0,1,2', show_default=True, help='Comma-separated refinement seeds')
@click.option('--recipe', default='', show_default=True, help='Further refine.py options, e.g. "--adv=1 --batch=128"')
@click.option('--outdir', default='bench-out/fmnist', show_default=True)
@click.option('--existing', is_flag=True, help='Report the finished runs already in --outdir/<GAN>/ (those of --seeds) '
              'instead of starting new ones, e.g. after an interruption')
@click.option('--device', default='cpu', show_default=True)
def main(gans, teacher, data, pixels_data, num, kimg, seeds, recipe, outdir, existing, device):
    """Refine the shipped GANs with several seeds; start, best, end, gap closed and pixel statistics."""
    device = torch.device(device)
    pairs = [g.split('=', 1) if '=' in g else (g, GANS.get(g)) for g in gans.split(',')]
    for name, path in pairs:
        if path is None:
            raise click.BadParameter(f'unknown GAN name {name!r}; expected one of {sorted(GANS)} or NAME=PKL', param_hint='--gans')
    seeds = [int(s) for s in seeds.split(',')]
    recipe = shlex.split(recipe) + ['--device', str(device)]
    teacher, data, outdir = (os.path.abspath(p) for p in (teacher, data, outdir))
    os.makedirs(outdir, exist_ok=True)

    bank, _ = teacher_bank(teacher, teachers.load(teacher, device=device), num)  # Cached; --adv-bank=<num> uses the same.
    teacher_fd = float(next(iter(compute_metrics([fid_full_name(num)], BankSamples(bank.to(device)), data, detector='fmnist',
                                                 device=device)[0]['results'].values())))
    print(f'teacher (Heun 18): fd_fmnist {teacher_fd:.3f} with {num} samples', flush=True)
    data_pixels = None
    if pixels_data:
        data_pixels = dataset_pixels(pixels_data, max(num, 10000))

    results = {}
    for name, gan in pairs:
        runs = []
        finished = finished_runs(os.path.join(outdir, name)) if existing else {}
        for seed in seeds:
            start_time = time.time()
            if existing:
                if seed not in finished:
                    continue
                run_dir, seconds = finished[seed], None
            else:
                run_dir = refine(os.path.abspath(gan), teacher, data, num, kimg, seed, recipe, os.path.join(outdir, name))
                seconds = time.time() - start_time
            row = dict(seed=seed, run_dir=run_dir, seconds=seconds, curve=read_curve(run_dir))
            row.update(summarise(row['curve'], teacher_fd))
            if data_pixels is not None:
                final = row['curve'][-1]['snapshot']
                for when, path in (('start', os.path.abspath(gan)), ('end', os.path.join(run_dir, os.path.basename(final)))):
                    row[f'pixels_{when}'] = pixel_summary(generators.load_generator(path, device), num, data_pixels)
            runs.append(row)
            print(f'{name} seed {seed}: start {row["start"]:.3f}  best {row["best"]:.3f} at {row["best_kimg"]:g} kimg  '
                  f'end {row["end"]:.3f}  end/start {row["end_over_start"]:.3f}  end/best {row["end_over_best"]:.3f}  '
                  + ('' if seconds is None else f'({seconds:.0f} s)'), flush=True)
        if not runs:
            raise click.ClickException(f'{name}: no finished run of seeds {seeds} in {os.path.join(outdir, name)}')
        results[name] = runs

    print()
    print(f'{"GAN":<13} {"start":>14} {"best":>14} {"end":>14} {"end/start":>14} {"end/best":>14} {"gap closed":>14}  target')
    for name, runs in results.items():
        cells = [mean_spread([r[k] for r in runs]) for k in ('start', 'best', 'end', 'end_over_start', 'end_over_best', 'gap_closed')]
        target = TARGETS.get(name)
        goal = '' if target is None else f'end/start <= {target}, end/best <= {END_OVER_BEST}'
        print(f'{name:<13} ' + ' '.join(f'{c:>14}' for c in cells) + f'  {goal}')
    if data_pixels is not None:
        print(f'\npixel statistics (data: brightness {float(data_pixels.mean()):.3f}, its spread over images '
              f'{float(data_pixels.mean(1).std()):.3f}; the 8x8 pixel distance of the data to itself is ~0)')
        for name, runs in results.items():
            for key in ('brightness', 'brightness_spread', 'fd_pixels'):
                print(f'{name:<13} {key:<17} start {mean_spread([r["pixels_start"][key] for r in runs]):>16}   '
                      f'end {mean_spread([r["pixels_end"][key] for r in runs]):>16}')
    print(json.dumps(dict(benchmark='fmnist_refine', num=num, kimg=kimg, seeds=seeds, recipe=recipe, teacher_fd=teacher_fd,
                          targets=TARGETS, results=results)))


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
