"""Style mixing: the coarse/middle/fine styles of column seeds applied to row seeds.

For every row seed r and column seed c writes `{r}-{c}.png`: r's ws with the layers in --styles taken from c.
Each source seed also gets `{s}-{s}.png`, and `grid.png` shows them all (top row: column seeds, left column:
row seeds).

Example:

\b
    python style_mixing.py --network=refined.pkl --rows=85,100,75 --cols=55,821,1789 --styles=0-6 --outdir=out

Security: a network pickle contains code, and loading it runs that code. Only load files you trust, or pass
--refuse-unknown-code.
"""

import os

import click

from dnnlib.cli_types import FINITE_FLOAT
import numpy as np
import torch

from pipelines import generators
from stylegan2 import pickles, scripting
from torch_utils.images import image_grid, save_png, to_uint8_nhwc


@click.command(help=__doc__)
@click.option('--network', 'network_pkl', help='StyleGAN2 network pickle; loading it runs code inside it',
              metavar='PATH|URL', required=True)
@click.option('--rows', 'row_seeds', help='Row seeds, e.g. 0-3', metavar='RANGE', required=True,
              callback=scripting.range_option)
@click.option('--cols', 'col_seeds', help='Column seeds, e.g. 10,20', metavar='RANGE', required=True,
              callback=scripting.range_option)
@click.option('--styles', 'col_styles', help='Layers (ws indices) taken from the column seed', metavar='RANGE',
              default='0-6', show_default=True, callback=scripting.range_option)
@click.option('--trunc', 'trunc', help='Truncation psi', type=FINITE_FLOAT, default=1, show_default=True)
@click.option('--class', 'class_idx', help='Class label (conditional generators)', type=click.IntRange(min=0))
@click.option('--noise-mode', help='Noise inputs', type=click.Choice(['const', 'random', 'none']), default='const',
              show_default=True)
@click.option('--device', help='Device (default: cuda if available, else cpu)', metavar='STR')
@click.option('--refuse-unknown-code', is_flag=True, help='Refuse pickles whose code is not on the allow-list')
@click.option('--overwrite', is_flag=True, help='Replace existing images in --outdir')
@click.option('--outdir', help='Where to save the images', metavar='DIR', required=True)
def main(network_pkl, row_seeds, col_seeds, col_styles, trunc, class_idx, noise_mode, device, refuse_unknown_code,
         overwrite, outdir):
    device = torch.device(device) if device else scripting.default_device()
    scripting.set_code_policy(refuse_unknown_code)
    try:
        G = generators.load_network(network_pkl, kinds=('stylegan2',), device=device).net
    except pickles.NetworkPickleError as err:
        raise click.BadParameter(str(err), param_hint='--network') from None
    bad = [s for s in col_styles if s >= G.num_ws]
    if bad:
        raise click.BadParameter(f'layers {bad} do not exist: the generator has ws 0..{G.num_ws - 1}',
                                 param_hint='--styles')
    seeds = list(dict.fromkeys(row_seeds + col_seeds))
    try:
        c = scripting.class_labels(G, class_idx, len(seeds), device)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint='--class') from None

    names = {(r, col): os.path.join(outdir, f'{r}-{col}.png') for r in row_seeds for col in col_seeds}
    names.update({(s, s): os.path.join(outdir, f'{s}-{s}.png') for s in seeds})
    try:
        scripting.check_outputs_free(list(names.values()) + [os.path.join(outdir, 'grid.png')], overwrite)
    except FileExistsError as err:
        raise click.ClickException(str(err)) from None
    os.makedirs(outdir, exist_ok=True)

    force_fp32 = scripting.use_fp32(device)
    with torch.no_grad():
        z = scripting.seed_latents(seeds, G.z_dim, device)
        all_ws = dict(zip(seeds, G.mapping(z, c, truncation_psi=trunc)))
        mixes = {}
        for (r, col) in names:
            ws = all_ws[r].clone()
            if r != col:
                ws[col_styles] = all_ws[col][col_styles]
            mixes[(r, col)] = ws
        keys = list(mixes)
        images = to_uint8_nhwc(G.synthesis(torch.stack([mixes[k] for k in keys]), noise_mode=noise_mode,
                                                force_fp32=force_fp32))
    images = dict(zip(keys, images))
    for key, name in names.items():
        save_png(images[key], name)

    blank = np.zeros_like(images[keys[0]])
    tiles = [blank] + [images[(col, col)] for col in col_seeds]
    for r in row_seeds:
        tiles += [images[(r, r)]] + [images[(r, col)] for col in col_seeds]
    grid = image_grid(np.stack(tiles), grid_w=len(col_seeds) + 1)
    save_png(grid, os.path.join(outdir, 'grid.png'))
    click.echo(f'Wrote {len(names)} images and grid.png to {outdir}')


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
