"""Wall time of one Diff-Instruct iteration: our schedule vs the official one, on the same networks and batch.

- `ours`: one generator forward+backward; the fake score's forward in the generator step is kept and reused
  for its DSM loss, so one backward serves both (`schedule='reuse', fake_forward='shared'`).
- `ours-separate`: the same order, but DSM runs its own fake forward (`fake_forward='separate'`).
- `official`: upstream's order: a no-grad generator pass and a DSM step on it, then the generator step on fresh
  samples (`schedule='official'`).
- `unavoidable`: the passes no schedule can skip, timed alone and summed: generator forward+backward, teacher
  forward (no grad), fake forward+backward (DSM), and the two Adam steps.

Networks: a tiny EDM-preconditioned SongUNet (teachers.networks) as teacher, fake score (a copy) and one-step
student (another copy), like distillation. Schedules are timed interleaved (A B C A B C ...) so a shared, noisy
CPU slows them alike; medians are reported. Prints a table, then one JSON object as its last line.
"""

import copy
import json
import os
import statistics
import sys
import tempfile
import time

import click

from dnnlib.cli_types import FINITE_FLOAT
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ikl  # noqa: E402
from ikl.divergences import edm_dsm_loss  # noqa: E402
from teachers.networks import EDMPrecond  # noqa: E402


def tiny_edm(resolution: int, channels: int, dropout: float) -> torch.nn.Module:
    torch.manual_seed(0)
    return EDMPrecond(img_resolution=resolution, img_channels=3, model_type='SongUNet', model_channels=channels,
                      channel_mult=[1, 2], num_blocks=1, attn_resolutions=[resolution // 2], dropout=dropout).eval()


def make_trainer(teacher, opts, run_dir):
    adapter = ikl.OneStepStudentAdapter.from_teacher(teacher, sigma_init=1.0)
    return ikl.Trainer(adapter, teacher, copy.deepcopy(teacher), opts, run_dir, device='cpu')


def time_unavoidable(teacher, batch: int) -> dict:
    """Each unavoidable pass alone, in seconds."""
    adapter = ikl.OneStepStudentAdapter.from_teacher(teacher).train()
    fake = copy.deepcopy(teacher).train().requires_grad_(True)
    g_opt = torch.optim.Adam(adapter.parameters(), 1e-5, betas=(0.0, 0.999))
    f_opt = torch.optim.Adam(fake.parameters(), 1e-5, betas=(0.0, 0.999))
    gen = torch.Generator().manual_seed(0)
    x0, _ = adapter.sample(batch, gen)
    sigma = torch.full([batch, 1, 1, 1], 0.3)
    x_t = x0.detach() + sigma * torch.randn(x0.shape, generator=gen)
    out = {}
    t = time.perf_counter()
    x0, _ = adapter.sample(batch, gen)
    (x0 * x_t).sum().backward()
    out['generator_fwd_bwd'] = time.perf_counter() - t
    t = time.perf_counter()
    with torch.no_grad():
        teacher(x_t, sigma)
    out['teacher_fwd'] = time.perf_counter() - t
    t = time.perf_counter()
    edm_dsm_loss(fake, x0.detach(), None, ikl.LogNormal(), gen).sum().backward()
    out['fake_fwd_bwd'] = time.perf_counter() - t
    t = time.perf_counter()
    g_opt.step()
    f_opt.step()
    out['adam_steps'] = time.perf_counter() - t
    return out


@click.command()
@click.option('--batch', type=int, default=16, show_default=True)
@click.option('--resolution', type=int, default=32, show_default=True)
@click.option('--channels', type=int, default=32, show_default=True, help='SongUNet model_channels.')
@click.option('--dropout', type=FINITE_FLOAT, default=0.1, show_default=True)
@click.option('--iters', type=int, default=12, show_default=True, help='Timed iterations per schedule.')
@click.option('--threads', type=int, default=1, show_default=True)
def main(batch, resolution, channels, dropout, iters, threads):
    torch.set_num_threads(threads)
    teacher = tiny_edm(resolution, channels, dropout)
    base = dict(batch=batch, total_kimg=1e6, progress=False, tensorboard=False, grid_size=0, g_lr=1e-5, fake_lr=1e-5)
    schedules = {'ours': dict(schedule='reuse', fake_forward='shared'),
                 'ours-separate': dict(schedule='reuse', fake_forward='separate'),
                 'official': dict(schedule='official', fake_forward='separate')}
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {name: make_trainer(teacher, dict(base, **kw), tmp) for name, kw in schedules.items()}
        times = {name: [] for name in schedules}
        unavoidable = []
        for i in range(iters + 2):  # two warm-up rounds
            for name, trainer in trainers.items():
                t = time.perf_counter()
                trainer.step()
                if i >= 2:
                    times[name].append(time.perf_counter() - t)
            if i >= 2:
                unavoidable.append(time_unavoidable(teacher, batch))
    med = {name: statistics.median(v) for name, v in times.items()}
    parts = {k: statistics.median(u[k] for u in unavoidable) for k in unavoidable[0]}
    floor = sum(parts.values())
    print(f'batch {batch}, {resolution}x{resolution}, SongUNet model_channels {channels}, {threads} thread(s), median of {iters}')
    print(f'{"schedule":<15} {"ms/iter":>9} {"vs official":>12} {"vs unavoidable":>15}')
    for name, t in med.items():
        print(f'{name:<15} {1e3 * t:>9.1f} {t / med["official"]:>12.3f} {t / floor:>15.3f}')
    print(f'{"unavoidable":<15} {1e3 * floor:>9.1f}   ' + ', '.join(f'{k} {1e3 * v:.1f}' for k, v in parts.items()))
    result = dict(benchmark='ikl_step', batch=batch, resolution=resolution, channels=channels, threads=threads,
                  iters=iters, ms_per_iter={k: round(1e3 * v, 2) for k, v in med.items()},
                  unavoidable_ms={k: round(1e3 * v, 2) for k, v in parts.items()}, unavoidable_total_ms=round(1e3 * floor, 2),
                  ours_vs_official=round(med['ours'] / med['official'], 3), ours_vs_unavoidable=round(med['ours'] / floor, 3),
                  targets=dict(ours_vs_official='<= 0.8', ours_vs_unavoidable='<= 1.1'))
    print(json.dumps(result))


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
