"""Image-scale benchmark on Fashion-MNIST: does a real StyleGAN2 generator get better when an EDM teacher instructs it?

Given a StyleGAN2 generator and an EDM teacher (by default the ones shipped in `embedded/`), it measures the
Fréchet distance in the offline Fashion-MNIST detector's features (`fd_fmnist`, not Inception FID) against a
dataset (by default the shipped statistics of the training set), for: the GAN before refinement, the GAN after
`refine.py`, the teacher with 18- and 35-step Heun sampling, and a one-step student from `distill.py`; with the
wall time of each. Refinement and distillation run through the real command-line tools into --outdir. Prints a
table, then one JSON object as its last line.

Targets (issue 9): refined <= 0.7x the original GAN's distance; the one-step student within 1.5x of the teacher's
35-step distance.
"""

import glob
import json
import os
import subprocess
import sys
import time

import click

from dnnlib.cli_types import FINITE_FLOAT
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from pipelines import generators
from metrics import compute_metrics  # noqa: E402


def frechet_distance(generator, reference: str, num: int, batch: int, device: torch.device) -> float:
    records = compute_metrics([f'fid{num}_full'], generator, reference, detector='fmnist', device=device,
                              num_gen=num, batch_size=batch)
    return float(next(iter(records[0]['results'].values())))


def run_tool(script: str, args: list, outdir: str) -> str:
    """Run refine.py / distill.py as a user would; return the newest snapshot of the run it made."""
    before = set(glob.glob(os.path.join(outdir, '*')))
    subprocess.run([sys.executable, os.path.join(ROOT, script), '--outdir', outdir, '--no-progress'] + args,
                   check=True, cwd=ROOT)
    run_dir, = set(glob.glob(os.path.join(outdir, '*'))) - before
    return sorted(glob.glob(os.path.join(run_dir, 'network-snapshot-*.pkl')))[-1]


@click.command()
@click.option('--gan', default='embedded/fmnist-stylegan2.pkl', show_default=True, help='StyleGAN2 pickle (train_stylegan2.py)')
@click.option('--teacher', default='embedded/fmnist-edm.pkl', show_default=True, help='EDM teacher pickle (train_teacher.py)')
@click.option('--data', default='embedded/fmnist-32x32-fmnist.npz', show_default=True,
              help='Reference: dataset ZIP (dataset_tool.py) or statistics .npz (calc_ref.py)')
@click.option('--num', type=click.IntRange(min=2), default=2000, show_default=True, help='Samples per distance')
@click.option('--refine-kimg', type=FINITE_FLOAT, default=2, show_default=True, help='Refinement length, fake warm-up included')
@click.option('--fake-warmup', type=FINITE_FLOAT, default=1, show_default=True, help='Refinement: fake-score warm-up, kimg')
@click.option('--p-mean', type=FINITE_FLOAT, default=-2.3, show_default=True, help='Refinement: mean of ln(sigma)')
@click.option('--p-std', type=FINITE_FLOAT, default=0.3, show_default=True, help='Refinement: std of ln(sigma)')
@click.option('--distill-kimg', type=FINITE_FLOAT, default=20, show_default=True)
@click.option('--batch', type=int, default=32, show_default=True)
@click.option('--glr', type=FINITE_FLOAT, default=1e-4, show_default=True, help='Generator lr for refine and distill')
@click.option('--lr', type=FINITE_FLOAT, default=1e-4, show_default=True, help='Fake-score lr for refine and distill')
@click.option('--outdir', default='bench-out/fmnist', show_default=True)
@click.option('--device', default='cpu', show_default=True)
def main(gan, teacher, data, num, refine_kimg, fake_warmup, p_mean, p_std, distill_kimg, batch, glr, lr, outdir, device):
    """Fréchet distance (offline detector) of GAN, refined GAN, teacher and one-step student."""
    device = torch.device(device)
    gan, teacher, data, outdir = (os.path.abspath(p) for p in (gan, teacher, data, outdir))  # tools run in ROOT
    os.makedirs(outdir, exist_ok=True)
    common = ['--batch', str(batch), '--glr', str(glr), '--lr', str(lr), '--device', str(device),
              '--tick', '1', '--snap', '1000']
    rows = {}

    def measure(name, make_generator, seconds_before=0.0):
        start = time.time()
        generator = make_generator()
        fd = frechet_distance(generator, data, num, batch, device)
        rows[name] = dict(fd=fd, seconds=seconds_before + time.time() - start)
        print(f'{name:<22} fd_fmnist {fd:9.3f}   {rows[name]["seconds"]:8.1f} s', flush=True)

    measure('gan', lambda: generators.load_generator(gan, device))
    start = time.time()
    refined = run_tool('refine.py', ['--network', gan, '--teacher', teacher, '--kimg', str(refine_kimg),
                                    '--fake-warmup', str(fake_warmup), '--p-mean', str(p_mean), '--p-std', str(p_std)]
                      + common, outdir)
    measure('gan_refined', lambda: generators.load_generator(refined, device), time.time() - start)
    for steps in (18, 35):
        measure(f'teacher_heun{steps}', lambda: generators.load_generator(teacher, device, num_steps=steps))
    start = time.time()
    student = run_tool('distill.py', ['--teacher', teacher, '--kimg', str(distill_kimg)] + common, outdir)
    measure('student_one_step', lambda: generators.load_generator(student, device), time.time() - start)

    ratios = dict(refined_over_gan=rows['gan_refined']['fd'] / rows['gan']['fd'],
                  student_over_teacher35=rows['student_one_step']['fd'] / rows['teacher_heun35']['fd'])
    print()
    print(f'{"generator":<22} {"fd_fmnist":>10} {"seconds":>9}')
    for name, row in rows.items():
        print(f'{name:<22} {row["fd"]:10.3f} {row["seconds"]:9.1f}')
    print(f'refined / GAN = {ratios["refined_over_gan"]:.3f} (target <= 0.7); '
          f'student / teacher-35 = {ratios["student_over_teacher35"]:.3f} (target <= 1.5)')
    print(json.dumps(dict(benchmark='fmnist', num=num, refine_kimg=refine_kimg, fake_warmup=fake_warmup, p_mean=p_mean,
                          p_std=p_std, distill_kimg=distill_kimg, results=rows, ratios=ratios)))


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
