"""Speed of teacher training and sampling on this machine, for planning CPU runs of train_teacher.py.

Run: `python bench/teachers.py [--cbase 32] [--cres 1,2,2] [--blocks 2] [--batch 64] [--threads 2] [--iters 3]`.
Builds the DDPM++ teacher that train_teacher.py would build for 32x32 grayscale, 10 classes (EDM
preconditioning and loss), then times one training step (forward, backward, Adam, EMA) and one denoiser
evaluation at the sampling batch size; prints a table, the implied kimg/hour and images/hour of 18-step Heun
sampling, and one JSON object as the last line. Times are the best of `--iters` (the CPU may be shared).
"""

import copy
import json
import os
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from teachers.loss import EDMLoss  # noqa: E402
from teachers.networks import EDMPrecond  # noqa: E402


def best_time(fn, iters):
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


@click.command()
@click.option('--cbase', type=int, default=32, show_default=True)
@click.option('--cres', type=str, default='1,2,2', show_default=True)
@click.option('--blocks', type=int, default=2, show_default=True)
@click.option('--res', type=int, default=32, show_default=True)
@click.option('--batch', type=int, default=64, show_default=True)
@click.option('--threads', type=int, default=torch.get_num_threads(), show_default=True)
@click.option('--iters', type=int, default=3, show_default=True)
def main(cbase, cres, blocks, res, batch, threads, iters):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = EDMPrecond(img_resolution=res, img_channels=1, label_dim=10, model_type='SongUNet', model_channels=cbase,
                     channel_mult=[int(c) for c in cres.split(',')], num_blocks=blocks, dropout=0.13).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    loss_fn = EDMLoss()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    images = torch.rand(batch, 1, res, res) * 2 - 1
    labels = torch.eye(10)[torch.arange(batch) % 10]
    num_params = sum(p.numel() for p in net.parameters())

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn(net, images, labels).sum().div(batch).backward()
        optimizer.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), net.parameters()):
                p_ema.lerp_(p, 0.01)

    @torch.no_grad()
    def denoise():
        ema(images, torch.full([batch], 2.0), labels)

    train_step()  # Warm-up (allocator, oneDNN kernels).
    step_sec = best_time(train_step, iters)
    nfe_sec = best_time(denoise, iters)
    kimg_per_hour = batch * 3600 / step_sec / 1000
    heun_images_per_hour = batch * 3600 / (nfe_sec * 35)

    print(f'DDPM++ teacher {res}x{res}x1, cbase {cbase}, cres {cres}, {blocks} blocks: {num_params:,} parameters, '
          f'{threads} thread(s)')
    print(f'{"measure":<34}{"value":>12}')
    print(f'{"train step, batch " + str(batch) + " (s)":<34}{step_sec:>12.3f}')
    print(f'{"training speed (kimg/hour)":<34}{kimg_per_hour:>12.1f}')
    print(f'{"denoiser call, batch " + str(batch) + " (s)":<34}{nfe_sec:>12.3f}')
    print(f'{"Heun 18 steps (images/hour)":<34}{heun_images_per_hour:>12.0f}')
    print(json.dumps(dict(bench='teachers', params=num_params, res=res, cbase=cbase, cres=cres, blocks=blocks,
                          batch=batch, threads=threads, train_step_sec=step_sec, kimg_per_hour=kimg_per_hour,
                          denoise_sec=nfe_sec, heun18_images_per_hour=heun_images_per_hour,
                          load_average=os.getloadavg()[0])))


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
