"""Train a small StyleGAN2 generator on a dataset ZIP: non-saturating loss, lazy R1, EMA, our Discriminator.

A compact trainer for the generators this toolkit refines (e.g. the shipped Fashion-MNIST model), on CPU or one
GPU. Snapshots are upstream-layout pickles `dict(G, D, G_ema, augment_pipe, training_set_kwargs)` that upstream
stylegan2-ada-pytorch tools load; `--resume=<run dir>` continues exactly where the run stopped.
"""

import copy
import json
import os
import sys

import click
import numpy as np
import torch

import dnnlib
from torch_utils import persistence
from dnnlib.cli_types import FiniteFloatRange
from stylegan2 import networks
from stylegan2.loss import StyleGAN2Loss
from stylegan2.pickles import NetworkPickleError, load_network_pkl, save_network_pkl
from torch_utils.images import save_image_grid
from torch_utils import misc
from torch_utils.misc import EpochSampler
from training.run import (Run, atomic_write, counter_generator, ema_beta, kimg_label, latest_training_state,
                          load_options, new_run_dir, save_options, update_ema)

G_REG_INTERVAL = 4    # Lazy path-length regularisation (upstream default).
D_REG_INTERVAL = 16   # Lazy R1 (upstream default).

# ----------------------------------------------------------------------------------------------------------------


def build_networks(c: dnnlib.EasyDict, resolution: int, channels: int, c_dim: int):
    """G and D of the configured size; kwargs mirror upstream's so `init_kwargs` rebuild them anywhere."""
    G = networks.Generator(z_dim=c.z_dim, c_dim=c_dim, w_dim=c.z_dim, img_resolution=resolution, img_channels=channels,
                           mapping_kwargs=dict(num_layers=c.map),
                           synthesis_kwargs=dict(channel_base=c.cbase, channel_max=c.cmax, num_fp16_res=0,
                                                 conv_clamp=None, architecture='skip'))
    D = networks.Discriminator(c_dim=c_dim, img_resolution=resolution, img_channels=channels, architecture=c.d_arch,
                               channel_base=c.cbase, channel_max=c.cmax, num_fp16_res=0, conv_clamp=None,
                               epilogue_kwargs=dict(mbstd_group_size=c.mbstd))
    return G, D


def phase_optimizer(module: torch.nn.Module, lr: float, reg_interval: int) -> torch.optim.Adam:
    """Adam with upstream's lazy-regularisation correction: lr and betas rescaled by I/(I+1)."""
    ratio = reg_interval / (reg_interval + 1)
    return misc.make_adam(module.parameters(), lr=lr * ratio, betas=(0 ** ratio, 0.99 ** ratio), eps=1e-8)


def init_weights(path: str, modules: dict) -> None:
    """Copy a network pickle's weights into freshly built networks: training continues from them with new
    optimizers and a new schedule. The architecture options must match the pickle's."""
    try:
        data = load_network_pkl(path)
    except NetworkPickleError as err:
        raise click.ClickException(f'--init: {err}') from None
    for name, module in modules.items():
        if data.get(name) is None:
            raise click.ClickException(f'--init={path}: the pickle has no {name}')
        try:
            module.load_state_dict(data[name].state_dict())
        except RuntimeError as err:
            first = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
            raise click.ClickException(f'--init={path}: {name} does not match the architecture options '
                                       f'(--z-dim/--map/--cbase/--cmax/--d-arch/--cond): {first}') from None


def training_loop(run_dir: str, c: dnnlib.EasyDict, resume_state: str = None) -> None:
    device = torch.device(c.device)
    run = Run(run_dir, c.kimg, c.tick, c.snap, c.batch, progress=c.progress, desc='train_stylegan2')
    dataset = dnnlib.util.construct_class_by_name(**c.training_set_kwargs)
    images_u8, labels_np = dataset.load_all()
    images_u8 = torch.from_numpy(images_u8).to(device)
    c_dim = dataset.label_dim if c.cond else 0
    labels = torch.from_numpy(labels_np).to(device) if c_dim else torch.zeros([len(dataset), 0], device=device)

    torch.manual_seed(c.seed)  # The initial weights (and noise_const buffers) follow --seed.
    G, D = build_networks(c, dataset.resolution, dataset.num_channels, c_dim)
    G, D = G.to(device).train(), D.to(device).train()
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    loss = StyleGAN2Loss(G, D, r1_gamma=c.gamma, pl_weight=c.pl_weight, style_mixing_prob=c.style_mixing,
                         device=device)
    phases = [('G', 'Gmain', 1), ('G', 'Greg', G_REG_INTERVAL), ('D', 'Dmain', 1), ('D', 'Dreg', D_REG_INTERVAL)]
    if c.pl_weight == 0:
        phases = [p for p in phases if p[1] != 'Greg']
    opts = dict(G=phase_optimizer(G, c.glr, G_REG_INTERVAL), D=phase_optimizer(D, c.dlr, D_REG_INTERVAL))
    sampler = EpochSampler(len(dataset), c.batch, seed=c.seed, device=device)

    if c.get('init') and resume_state is None:
        init_weights(c.init, dict(G=G, D=D, G_ema=G_ema))
        run.log(f'Initialised G, D and G_ema from {c.init}')
    if resume_state is not None:
        state = torch.load(resume_state, map_location=device, weights_only=True)
        for name, module in dict(G=G, D=D, G_ema=G_ema).items():
            module.load_state_dict(state[name])
        for name, opt in opts.items():
            opt.load_state_dict(state[f'opt_{name}'])
        sampler.load_state_dict(state['sampler'])
        loss.pl_mean.copy_(state['pl_mean'])
        run.load_state_dict(state['run'])
        run.log(f'Resumed from {resume_state} at {run.cur_nimg / 1000:g} kimg')

    # Fixed latents for the grids, so successive grids show the same samples.
    grid_gen = torch.Generator(device=device).manual_seed(c.seed + 12345)
    grid_z = torch.randn([c.grid, G.z_dim], generator=grid_gen, device=device)
    grid_c = labels[torch.randint(len(dataset), [c.grid], generator=grid_gen, device=device)]
    grid_w = int(np.ceil(np.sqrt(c.grid)))

    def save_snapshot():
        label = kimg_label(run.cur_nimg)
        save_network_pkl(os.path.join(run_dir, f'network-snapshot-{label}.pkl'), G=G, D=D, G_ema=G_ema,
                         training_set_kwargs=dict(c.training_set_kwargs), overwrite=True)
        with torch.no_grad():
            fakes = G_ema(grid_z, grid_c, noise_mode='const', force_fp32=True)
        save_image_grid(fakes, os.path.join(run_dir, f'fakes{label}.png'), grid_w)
        state = dict(G=G.state_dict(), D=D.state_dict(), G_ema=G_ema.state_dict(), sampler=sampler.state_dict(),
                     pl_mean=loss.pl_mean, run=run.state_dict(),
                     **{f'opt_{name}': opt.state_dict() for name, opt in opts.items()})
        atomic_write(os.path.join(run_dir, f'training-state-{label}.pt'), lambda f: torch.save(state, f))

    if resume_state is None:
        save_image_grid(images_u8[:c.grid].float() / 127.5 - 1, os.path.join(run_dir, 'reals.png'), grid_w)
        save_snapshot()

    try:
        while not run.done:
            iteration = run.cur_nimg // c.batch
            gen = counter_generator(device, c.seed, iteration)
            idx = sampler.next_batch()
            real_img = images_u8[idx].to(torch.float32) / 127.5 - 1
            real_c = labels[idx]
            for net_name, phase, interval in phases:
                if iteration % interval != 0:
                    continue
                G.requires_grad_(net_name == 'G')
                D.requires_grad_(net_name == 'D')
                module, opt = (G if net_name == 'G' else D), opts[net_name]
                opt.zero_grad(set_to_none=True)
                gen_z = torch.randn([c.batch, G.z_dim], generator=gen, device=device)
                gen_c = labels[torch.randint(len(dataset), [c.batch], generator=gen, device=device)]
                loss.accumulate_gradients(phase, real_img, real_c, gen_z, gen_c, gain=interval, generator=gen)
                for param in module.parameters():
                    if param.grad is not None:
                        torch.nan_to_num(param.grad, nan=0, posinf=1e5, neginf=-1e5, out=param.grad)
                opt.step()
            update_ema(G_ema, G, ema_beta(c.batch, run.cur_nimg, c.ema_kimg, c.ema_rampup))

            if not run.advance(c.batch):
                continue
            stats = run.end_tick()
            run.log(f'tick {run.cur_tick - 1:<4d} kimg {run.cur_nimg / 1000:<8.2f} G {stats["Loss/G/loss"].mean:.3f} '
                    f'D {stats["Loss/D/loss"].mean:.3f} time {dnnlib.util.format_time(run.elapsed())}')
            if run.snapshot_due:
                save_snapshot()
    finally:
        run.close()

# ----------------------------------------------------------------------------------------------------------------


@click.command(epilog='''\b
Examples:
  # A small class-conditional Fashion-MNIST generator (32x32) on the CPU:
  python train_stylegan2.py --data=fmnist-32x32.zip --outdir=runs --cond=1 --kimg=300 --gamma=0.01
  # Continue a stopped run exactly:
  python train_stylegan2.py --resume=runs/00000-fmnist-32x32-cond''')
@click.option('--data', type=click.Path(exists=True, dir_okay=True), help='Dataset ZIP or folder (dataset_tool.py)')
@click.option('--outdir', type=click.Path(file_okay=False), default='runs', show_default=True, help='Where run directories go')
@click.option('--resume', type=click.Path(exists=True), help='Run directory (or training-state file) to continue; --kimg may extend it')
@click.option('--init', type=click.Path(exists=True, dir_okay=False), help='Start from this network pickle\'s weights')
@click.option('--cond', type=bool, default=False, show_default=True, help='Class-conditional (needs dataset labels)')
@click.option('--kimg', type=FiniteFloatRange(min=0, min_open=True), default=150, show_default=True, help='Training duration')
@click.option('--batch', type=click.IntRange(min=1), default=32, show_default=True, help='Batch size')
@click.option('--glr', type=FiniteFloatRange(min=0, min_open=True), default=0.0025, show_default=True, help='G learning rate')
@click.option('--dlr', type=FiniteFloatRange(min=0, min_open=True), default=0.0025, show_default=True, help='D learning rate')
@click.option('--gamma', type=FiniteFloatRange(min=0), default=0.1, show_default=True, help='R1 weight')
@click.option('--pl-weight', type=FiniteFloatRange(min=0), default=0.0, show_default=True, help='Path-length weight')
@click.option('--style-mixing', type=FiniteFloatRange(min=0, max=1), default=0.0, show_default=True, help='Style-mixing probability')
@click.option('--ema-kimg', type=FiniteFloatRange(min=0), default=10.0, show_default=True, help='EMA half-life of G_ema')
@click.option('--ema-rampup', type=FiniteFloatRange(min=0), default=0.05, show_default=True, help='EMA ramp-up ratio')
@click.option('--z-dim', type=click.IntRange(min=1), default=64, show_default=True, help='Latent size (also w size)')
@click.option('--map', type=click.IntRange(min=1), default=2, show_default=True, help='Mapping layers')
@click.option('--cbase', type=click.IntRange(min=1), default=2048, show_default=True, help='Channel base')
@click.option('--cmax', type=click.IntRange(min=1), default=64, show_default=True, help='Max channels per layer')
@click.option('--d-arch', type=click.Choice(['orig', 'skip', 'resnet']), default='resnet', show_default=True, help='D architecture')
@click.option('--mbstd', type=click.IntRange(min=1), default=4, show_default=True, help='Minibatch-std group size')
@click.option('--tick', type=FiniteFloatRange(min=0, min_open=True), default=4, show_default=True, help='kimg per tick')
@click.option('--snap', type=click.IntRange(min=1), default=10, show_default=True, help='Ticks per snapshot')
@click.option('--grid', type=click.IntRange(min=1), default=64, show_default=True, help='Images in the sample grids')
@click.option('--seed', type=int, default=0, show_default=True, help='Random seed')
@click.option('--device', type=str, default='cuda' if torch.cuda.is_available() else 'cpu', show_default=True)
@click.option('--threads', type=click.IntRange(min=0), default=0, help='CPU threads (0: torch default)')
@click.option('--dry-run', is_flag=True, help='Print the options and exit')
@click.option('--refuse-unknown-code', is_flag=True, help='Refuse an --init pickle whose code or globals are not on the allow-lists')
def main(data, outdir, resume, dry_run, threads, refuse_unknown_code, **kwargs):
    """Train a StyleGAN2 generator (and discriminator) on a dataset made by dataset_tool.py."""
    if refuse_unknown_code:
        persistence.refuse_unknown_sources(True)
    if resume:
        run_dir = resume if os.path.isdir(resume) else os.path.dirname(resume)
        try:
            c = load_options(run_dir)
            resume_state = latest_training_state(resume, required=True)
        except (ValueError, FileNotFoundError) as err:
            raise click.ClickException(f'--resume {err}' if isinstance(err, ValueError) else str(err)) from None
        if click.get_current_context().get_parameter_source('kimg') == click.core.ParameterSource.COMMANDLINE:
            c.kimg = kwargs['kimg']  # Extends (or shortens) the run; recorded in its options.
            if not dry_run:
                save_options(run_dir, c)
    else:
        if data is None:
            raise click.UsageError('--data is required (or --resume to continue a run)')
        c = dnnlib.EasyDict(kwargs)
        if c.init:
            c.init = os.path.abspath(c.init)
        c.training_set_kwargs = dict(class_name='training.dataset.ImageFolderDataset', path=os.path.abspath(data),
                                     use_labels=kwargs['cond'], max_size=None, xflip=False)
        c.progress = True
        resume_state = None
    print(json.dumps(c, indent=2))
    if dry_run:
        return
    if threads:
        torch.set_num_threads(threads)
    if resume_state is None and c.init:  # Refuse a pickle that does not fit before making a run directory.
        dataset = dnnlib.util.construct_class_by_name(**c.training_set_kwargs)
        G, D = build_networks(c, dataset.resolution, dataset.num_channels, dataset.label_dim if c.cond else 0)
        init_weights(c.init, dict(G=G, D=D, G_ema=copy.deepcopy(G)))
    if resume_state is None:
        desc = os.path.splitext(os.path.basename(os.path.normpath(data)))[0] + ('-cond' if c.cond else '')
        try:
            run_dir = new_run_dir(outdir, desc)
        except dnnlib.util.RunDirError as err:
            raise click.ClickException(f'--outdir: {err}') from None
        save_options(run_dir, c)
    print(f'Run directory: {run_dir}')
    try:
        training_loop(run_dir, c, resume_state)
    except KeyboardInterrupt as err:
        print(f'Interrupted: {err}', file=sys.stderr)
        sys.exit(130)


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
