"""Generate images with any generator this toolkit loads.

Handles StyleGAN2(-ADA) pickles (NVIDIA's PyTorch or TensorFlow files, and ours) and EDM-layout pickles
(`dict(ema=...)`): diffusion models, sampled with the EDM Heun sampler, and distilled one-step students.

Examples:

\b
    # Seeds 0-3 of a StyleGAN2 generator, truncation 0.7, plus a grid of all of them.
    python generate.py --network=refined.pkl --seeds=0-3 --trunc=0.7 --grid --outdir=out

\b
    # A class of a conditional generator.
    python generate.py --network=cifar10.pkl --seeds=0-7 --class=3 --outdir=out

\b
    # Render latents found by projector.py.
    python generate.py --network=refined.pkl --projected-w=out/projected_w.npz --outdir=out

Security: a network pickle contains code, and loading it runs that code. Only load files you trust, or pass
--refuse-unknown-code to refuse any embedded code that is neither this toolkit's nor on the allow-list
(TOOLKIT_TRUSTED_CODE).
"""

import os
import pickle
from typing import Iterator, List, Tuple

import click
import numpy as np
import torch
import tqdm

import dnnlib
import ikl
from dnnlib.cli_types import FINITE_FLOAT, FiniteFloatRange
from pipelines import generators
import teachers.sampling
from stylegan2 import pickles, scripting
from torch_utils import compiling
from torch_utils.images import image_grid, save_png, to_uint8_nhwc

# ----------------------------------------------------------------------------------------------------------------
# What a pickle holds, and how each kind renders seeds.

def render_stylegan2(G, seeds: List[int], opts) -> Iterator[Tuple[List[int], np.ndarray]]:
    """Upstream's latents per seed; batches of `opts.batch`; 'random' noise seeded by each batch's first seed."""
    adapter = generators.StyleGAN2Adapter(G, truncation_psi=opts.trunc, truncation_cutoff=opts.trunc_cutoff,
                                          noise_mode=opts.noise_mode, trainable='none')
    for start in range(0, len(seeds), opts.batch):
        batch_seeds = seeds[start:start + opts.batch]
        z = scripting.seed_latents(batch_seeds, G.z_dim, opts.device)
        c = scripting.class_labels(G, opts.class_idx, len(batch_seeds), opts.device)
        torch.manual_seed(batch_seeds[0])
        yield batch_seeds, to_uint8_nhwc(adapter.synthesize(z, c))


def render_diffusion(net, seeds: List[int], opts) -> Iterator[Tuple[List[int], np.ndarray]]:
    """The EDM sampler with one random stream per seed (an image depends only on its seed)."""
    for batch_seeds, images in teachers.sampling.generate_images(net, seeds, class_idx=opts.class_idx,
                                                                 max_batch_size=opts.batch, device=opts.device,
                                                                 num_steps=opts.steps):
        yield batch_seeds, images


def render_one_step(net, seeds: List[int], opts) -> Iterator[Tuple[List[int], np.ndarray]]:
    """A one-step student x0 = D(sigma z; sigma, c), z from each seed's own stream (then a random class)."""
    student = ikl.OneStepStudentAdapter(net, sigma_init=opts.init_sigma)
    label_dim = int(getattr(net, 'label_dim', 0) or 0)
    if opts.class_idx is not None and not (label_dim and 0 <= opts.class_idx < label_dim):
        raise ValueError(f'--class={opts.class_idx} is out of range for a network with label_dim={label_dim}')
    for start in range(0, len(seeds), opts.batch):
        batch_seeds = seeds[start:start + opts.batch]
        rnd = teachers.sampling.StackedRandomGenerator(opts.device, batch_seeds)
        z = rnd.randn([len(batch_seeds), net.img_channels, net.img_resolution, net.img_resolution],
                      device=opts.device)
        labels = None
        if label_dim:
            idx = rnd.randint(label_dim, size=[len(batch_seeds)], device=opts.device)
            if opts.class_idx is not None:
                idx[:] = opts.class_idx
            labels = torch.eye(label_dim, device=opts.device)[idx]
        yield batch_seeds, to_uint8_nhwc(student.from_latents(z, labels))


def load_renderer(network_pkl: str, opts):
    """(kind, network, render function) for a pickle; a new kind of generator is one more branch here."""
    kind, net, data = generators.load_network(network_pkl, device=opts.device)
    if kind == 'stylegan2':
        return kind, net, render_stylegan2
    if opts.init_sigma is None and kind == 'one-step':
        opts.init_sigma = float(data.get('init_sigma', 1.0))  # official Diff-Instruct pickles: 1.0 (README)
    return kind, net, render_diffusion if opts.init_sigma is None else render_one_step

# ----------------------------------------------------------------------------------------------------------------

def load_projected_w(path: str, G) -> torch.Tensor:
    """`w` [n, num_ws, w_dim] from a projector.py npz, checked against G."""
    try:
        with np.load(path) as f:
            ws = f['w']
    except (OSError, ValueError, KeyError, pickle.UnpicklingError) as err:
        raise click.BadParameter(f'{path}: expected an .npz with array "w" ({err})', param_hint='--projected-w')
    expected = (G.num_ws, G.w_dim)
    if ws.ndim != 3 or tuple(ws.shape[1:]) != expected:
        raise click.BadParameter(f'{path}: w has shape {list(ws.shape)}, this generator needs [n, {expected[0]}, '
                                 f'{expected[1]}]', param_hint='--projected-w')
    return torch.as_tensor(ws, dtype=torch.float32)


@click.command(help=__doc__)
@click.option('--network', 'network_pkl', help='Network pickle (path or URL); loading it runs code inside it',
              metavar='PATH|URL', required=True)
@click.option('--seeds', help='Seeds, e.g. 0-3,7', metavar='RANGE', callback=scripting.range_option)
@click.option('--trunc', 'trunc', help='Truncation psi (StyleGAN2)', type=FINITE_FLOAT, default=1, show_default=True)
@click.option('--trunc-cutoff', help='Truncate only the first N ws (StyleGAN2)', type=click.IntRange(min=1))
@click.option('--class', 'class_idx', help='Class label (conditional networks)', type=click.IntRange(min=0))
@click.option('--noise-mode', help='Noise inputs (StyleGAN2)', type=click.Choice(['const', 'random', 'none']),
              default='const', show_default=True)
@click.option('--projected-w', '--projected_w', 'projected_w', help='Render the ws in this projector.py .npz',
              metavar='FILE')
@click.option('--grid', is_flag=True, help='Also write all images as one grid.png')
@click.option('--batch', help='Images per batch', type=click.IntRange(min=1), default=16, show_default=True)
@click.option('--steps', help='Sampler steps (diffusion networks)', type=click.IntRange(min=1), default=18,
              show_default=True)
@click.option('--init-sigma', help='One-step students: sample x0 = D(sigma z; sigma) at this sigma (default: the '
              "pickle's init_sigma, else 1.0); given for a diffusion model, samples it in one step too",
              type=FiniteFloatRange(min=0, min_open=True), metavar='FLOAT')
@click.option('--device', help='Device (default: cuda if available, else cpu)', metavar='STR')
@click.option('--refuse-unknown-code', is_flag=True, help='Refuse pickles whose code is not on the allow-list')
@click.option('--overwrite', is_flag=True, help='Replace existing images in --outdir')
@click.option('--outdir', help='Where to save the images', metavar='DIR', required=True)
@click.option('--compile', 'compile_net', is_flag=True,
              help='torch.compile the network (eager, with a warning, if compilation fails)')
def main(network_pkl, seeds, trunc, trunc_cutoff, class_idx, noise_mode, projected_w, grid, batch, steps,
         init_sigma, device, refuse_unknown_code, overwrite, outdir, compile_net):
    opts = dnnlib.EasyDict(trunc=trunc, trunc_cutoff=trunc_cutoff, class_idx=class_idx, noise_mode=noise_mode,
                           batch=batch, steps=steps, init_sigma=init_sigma,
                           device=torch.device(device) if device else scripting.default_device())
    if seeds is None and projected_w is None:
        raise click.UsageError('give --seeds (e.g. --seeds=0-7) or --projected-w')
    scripting.set_code_policy(refuse_unknown_code)
    try:
        kind, net, render = load_renderer(network_pkl, opts)
    except pickles.NetworkPickleError as err:
        raise click.BadParameter(str(err), param_hint='--network') from None
    if kind == 'stylegan2' and net.c_dim == 0 and class_idx is not None:
        click.echo('Warning: --class is ignored, the generator is unconditional', err=True)
        opts.class_idx = None
    if kind == 'stylegan2' and net.c_dim > 0 and class_idx is None and projected_w is None:
        raise click.BadParameter(f'the generator is conditional ({net.c_dim} classes): choose one with --class',
                                 param_hint='--class')
    if kind != 'stylegan2' and (trunc != 1 or projected_w is not None):
        raise click.UsageError('--trunc and --projected-w apply to StyleGAN2 generators only')
    if kind == 'stylegan2' and init_sigma is not None:
        raise click.UsageError('--init-sigma applies to one-step students and diffusion models only')

    if projected_w is not None:
        ws = load_projected_w(projected_w, net)
        names = [os.path.join(outdir, f'proj{idx:02d}.png') for idx in range(len(ws))]
    else:
        names = [os.path.join(outdir, f'seed{seed:04d}.png') for seed in seeds]
    try:
        scripting.check_outputs_free(names + ([os.path.join(outdir, 'grid.png')] if grid else []), overwrite)
    except FileExistsError as err:
        raise click.ClickException(str(err)) from None

    if compile_net:  # What renders: G (or its synthesis network for --projected-w), the denoiser, the student.
        target = net.synthesis if projected_w is not None else net
        compiling.compile_module(target, 'network', log=lambda line: click.echo(line, err=True))
    images = []
    with tqdm.tqdm(total=len(names), unit='img', desc='Generating') as progress, torch.no_grad():
        if projected_w is not None:
            for start in range(0, len(ws), batch):
                img = net.synthesis(ws[start:start + batch].to(opts.device), noise_mode=noise_mode,
                                    force_fp32=scripting.use_fp32(opts.device))
                images.append(to_uint8_nhwc(img))
                progress.update(len(img))
        else:
            try:
                for batch_seeds, batch_images in render(net, seeds, opts):
                    images.append(batch_images)
                    progress.update(len(batch_seeds))
            except ValueError as err:
                raise click.ClickException(str(err)) from None
    images = np.concatenate(images)

    os.makedirs(outdir, exist_ok=True)  # Only now: an error above leaves no empty folder behind.
    for image, name in zip(images, names):
        save_png(image, name)
    if grid:
        grid_w = int(np.ceil(np.sqrt(len(images))))
        save_png(image_grid(images, grid_w), os.path.join(outdir, 'grid.png'))
    click.echo(f'Wrote {len(images)} images to {outdir}')


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
