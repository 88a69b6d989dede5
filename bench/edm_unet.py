"""EDM U-Net forward: the einsum attention (the reference, written out here) vs SDPA, float32 vs bf16 autocast.

Run: `python bench/edm_unet.py [--configs small,cifar10] [--batch 8] [--repeats 5] [--threads 1] [--backward]`.

Configurations (EDMPrecond around a SongUNet, eval mode, no gradients):
- `small`: 32x32x3, model_channels 64, channel_mult [1,2,2], 2 blocks per level, attention at 16x16.
- `cifar10`: the official CIFAR-10 DDPM++ teacher (model_channels 128, channel_mult [2,2,2], 4 blocks, attention at
  16x16, 10 classes, augment_dim 9): about 56 M parameters.

Variants, timed interleaved (A B C D A B C D ...) so a shared CPU slows them alike; the median of `--repeats`:
- `einsum fp32`: attention as explicit float32 logits + softmax + einsum (the code before SDPA), float32.
- `sdpa fp32`: torch.nn.functional.scaled_dot_product_attention (the networks' code now), float32.
- `einsum bf16`, `sdpa bf16`: the same under torch.autocast(device, bfloat16).
Ratios are reference time / variant time (above 1 is faster). `--backward` also times forward+backward of the
input gradient. Prints a table, then one JSON object as the last line.
"""

import json
import os
import statistics
import sys
import time

import click
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from teachers import networks  # noqa: E402

CONFIGS = dict(
    small=dict(img_resolution=32, img_channels=3, label_dim=0, model_type='SongUNet', model_channels=64,
               channel_mult=[1, 2, 2], num_blocks=2, attn_resolutions=[16]),
    cifar10=dict(img_resolution=32, img_channels=3, label_dim=10, model_type='SongUNet', model_channels=128,
                 channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16], augment_dim=9, dropout=0.13,
                 embedding_type='positional', encoder_type='standard', decoder_type='standard',
                 channel_mult_noise=1, resample_filter=[1, 1]),
)


def einsum_attend(q, k, v):
    """The reference: weights from float32 logits and softmax, cast back to q's dtype, then the weighted sum."""
    k = k / np.sqrt(k.shape[1])
    w = torch.einsum('bcq,bck->bqk', q.to(torch.float32), k.to(torch.float32)).softmax(dim=2).to(q.dtype)
    return torch.einsum('bqk,bck->bcq', w, v)


SDPA_ATTEND = networks.attend
ATTEND = dict(einsum=einsum_attend, sdpa=SDPA_ATTEND)


def make_call(net, x, sigma, labels, attention, amp, backward):
    def call():
        networks.attend = ATTEND[attention]
        try:
            ctx = torch.autocast('cpu', dtype=torch.bfloat16) if amp else torch.autocast('cpu', enabled=False)
            if backward:
                xi = x.detach().requires_grad_(True)
                with ctx:
                    out = net(xi, sigma, labels)
                out.square().sum().backward()
            else:
                with torch.no_grad(), ctx:
                    net(x, sigma, labels)
        finally:
            networks.attend = SDPA_ATTEND
    return call


@click.command()
@click.option('--configs', default='small,cifar10', show_default=True)
@click.option('--batch', type=int, default=8, show_default=True)
@click.option('--repeats', type=int, default=5, show_default=True)
@click.option('--threads', type=int, default=torch.get_num_threads(), show_default=True)
@click.option('--backward', is_flag=True, help='Also time forward+backward (input gradient)')
def main(configs, batch, repeats, threads, backward):
    torch.set_num_threads(threads)
    variants = [(a, amp) for amp in (False, True) for a in ('einsum', 'sdpa')]
    modes = ['forward'] + (['forward+backward'] if backward else [])
    results = []
    for name in configs.split(','):
        torch.manual_seed(0)
        net = networks.EDMPrecond(**CONFIGS[name]).eval().requires_grad_(False)
        params = sum(p.numel() for p in net.parameters())
        res, ch = net.img_resolution, net.img_channels
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(batch, ch, res, res, generator=gen)
        sigma = torch.exp(torch.randn(batch, generator=gen) * 1.2 - 1.2)
        labels = torch.eye(net.label_dim)[torch.arange(batch) % net.label_dim] if net.label_dim else None
        for mode in modes:
            calls = {v: make_call(net, x, sigma, labels, v[0], v[1], mode != 'forward') for v in variants}
            times = {v: [] for v in variants}
            for call in calls.values():  # Warm-up (allocator, oneDNN primitives).
                call()
            for _ in range(repeats):
                for v, call in calls.items():
                    start = time.perf_counter()
                    call()
                    times[v].append(time.perf_counter() - start)
            ref = statistics.median(times[('einsum', False)])
            for (attention, amp), t in times.items():
                med = statistics.median(t)
                results.append(dict(config=name, params=params, batch=batch, mode=mode, attention=attention,
                                    precision='bf16' if amp else 'fp32', median_sec=med, speedup=ref / med))

    print(f'EDM U-Net, batch {batch}, {threads} thread(s), median of {repeats} (interleaved)')
    print(f'{"config":<10}{"params":>12}  {"mode":<18}{"variant":<14}{"sec":>9}{"vs einsum fp32":>16}')
    for r in results:
        variant = f'{r["attention"]} {r["precision"]}'
        print(f'{r["config"]:<10}{r["params"]:>12,}  {r["mode"]:<18}{variant:<14}{r["median_sec"]:>9.3f}'
              f'{r["speedup"]:>15.2f}x')
    print(json.dumps(dict(bench='edm_unet', batch=batch, threads=threads, repeats=repeats, torch=torch.__version__,
                          results=results)))


if __name__ == '__main__':
    main()
