"""StyleGAN2 generator and discriminator, forward+backward wall time on the CPU, reference vs compiled ops.

Configurations: `cifar` (32x32, 10 classes, mapping 2 layers, 512 channels, D 'orig': train.py's cifar config) and
`64` (64x64 unconditional, train.py's auto config: channel_base 16384, mapping 2, D 'resnet'). Both networks are in
training mode (unfused modulated convs, as when training), float32 (fp16 layers run in fp32 on the CPU).
Each measurement is the median of --repeats timed calls after one warm-up call.

Run: `python bench/stylegan2.py [--batch 4] [--repeats 3] [--configs cifar,64] [--threads N]`. Prints a table,
then one JSON object as the last line.
"""

import json
import os
import sys

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from timing import median_time  # noqa: E402
from stylegan2 import networks  # noqa: E402
from torch_utils import custom_ops  # noqa: E402
from torch_utils.ops import _plugin  # noqa: E402

CONFIGS = {
    'cifar': dict(res=32, c_dim=10, channel_base=32768, map_layers=2, d_arch='orig', mbstd=4),
    '64': dict(res=64, c_dim=0, channel_base=16384, map_layers=2, d_arch='resnet', mbstd=4),
}


def build(cfg):
    torch.manual_seed(0)
    G = networks.Generator(z_dim=512, c_dim=cfg['c_dim'], w_dim=512, img_resolution=cfg['res'], img_channels=3,
                           mapping_kwargs=dict(num_layers=cfg['map_layers']),
                           synthesis_kwargs=dict(channel_base=cfg['channel_base'], channel_max=512, num_fp16_res=4,
                                                 conv_clamp=256))
    D = networks.Discriminator(c_dim=cfg['c_dim'], img_resolution=cfg['res'], img_channels=3, architecture=cfg['d_arch'],
                               channel_base=cfg['channel_base'], channel_max=512, num_fp16_res=4, conv_clamp=256,
                               epilogue_kwargs=dict(mbstd_group_size=cfg['mbstd']))
    return G.train(), D.train()


def measure(cfg, batch, repeats):
    G, D = build(cfg)
    gen = torch.Generator().manual_seed(1)
    z = torch.randn([batch, 512], generator=gen)
    c = torch.nn.functional.one_hot(torch.arange(batch) % max(cfg['c_dim'], 1), max(cfg['c_dim'], 1)).float()
    c = c[:, :cfg['c_dim']]
    img = torch.randn([batch, 3, cfg['res'], cfg['res']], generator=gen)

    def g_step():
        G.zero_grad(set_to_none=True)
        G(z, c, force_fp32=True).square().mean().backward()

    def d_step():
        D.zero_grad(set_to_none=True)
        D(img, c, force_fp32=True).sum().backward()

    return dict(G=median_time(g_step, repeats), D=median_time(d_step, repeats))


@click.command()
@click.option('--batch', type=click.IntRange(min=1), default=4, show_default=True)
@click.option('--repeats', type=click.IntRange(min=1), default=3, show_default=True)
@click.option('--configs', default='cifar,64', show_default=True, help='Comma-separated: cifar, 64')
@click.option('--threads', type=click.IntRange(min=1), help='torch.set_num_threads')
def main(batch, repeats, configs, threads):
    if threads:
        torch.set_num_threads(threads)
    names = [name.strip() for name in configs.split(',') if name.strip()]
    unknown = [name for name in names if name not in CONFIGS]
    if unknown:
        raise click.BadParameter(f'unknown configs {unknown}; choose from {sorted(CONFIGS)}', param_hint='--configs')
    impls = ['ref']
    if 'cpu' in _plugin.covered_devices(required=False):
        impls.append('compiled')

    results = {}
    for name in names:
        for impl in impls:
            with custom_ops.ops_impl(impl):
                results[f'{name}/{impl}'] = measure(CONFIGS[name], batch, repeats)

    print(f'StyleGAN2 forward+backward, CPU float32, batch {batch}, {torch.get_num_threads()} threads, '
          f'median of {repeats}')
    print(f'{"config":8s} {"ops":9s} {"G (s)":>9s} {"D (s)":>9s} {"G speed-up":>11s} {"D speed-up":>11s}')
    for key, times in results.items():
        name, impl = key.split('/')
        ref = results[f'{name}/ref']
        print(f'{name:8s} {impl:9s} {times["G"]:9.3f} {times["D"]:9.3f} {ref["G"] / times["G"]:11.2f} '
              f'{ref["D"] / times["D"]:11.2f}')
    print(json.dumps(dict(benchmark='stylegan2', batch=batch, repeats=repeats, threads=torch.get_num_threads(),
                          seconds=results)))


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
