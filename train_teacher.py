"""Train an EDM teacher (a diffusion denoiser) on a dataset ZIP made by dataset_tool.py.

Each run gets a new directory `<outdir>/<00000>-<desc>` holding `training_options.json`, `log.txt`,
`stats.jsonl`, image grids, `network-snapshot-<kimg>.pkl` (upstream EDM layout, key `ema`: load it with
`teachers.load`, EDM's own scripts, or `generate.py`) and `training-state-<kimg>.pt` for exact resuming.

Examples:

\b
  # A small DDPM++ teacher for Fashion-MNIST 32x32 on a CPU:
  python train_teacher.py --outdir=runs --data=fmnist-32x32.zip --cond=1 --arch=ddpmpp \\
      --cbase=32 --cres=1,2,2 --blocks=2 --batch=64 --lr=2e-3 --kimg=200 --tick=10 --snap=5
  # Continue it exactly where it stopped (a new run directory is created):
  python train_teacher.py --outdir=runs --data=fmnist-32x32.zip --cond=1 ... --resume=runs/00000-fmnist-32x32-cond-ddpmpp-edm-batch64
"""

import json
import os
import re
import sys

import click
import torch

import dnnlib
from torch_utils import persistence
from dnnlib.cli_types import FiniteFloatRange
from teachers.training_loop import init_from_pickle, training_loop
from training.run import latest_training_state, new_run_dir, save_options
from training.dataset import ImageFolderDataset

ARCHS = {
    'ddpmpp': dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard', decoder_type='standard',
                   channel_mult_noise=1, resample_filter=[1, 1], model_channels=128, channel_mult=[2, 2, 2]),
    'ncsnpp': dict(model_type='SongUNet', embedding_type='fourier', encoder_type='residual', decoder_type='standard',
                   channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=128, channel_mult=[2, 2, 2]),
    'adm': dict(model_type='DhariwalUNet', model_channels=192, channel_mult=[1, 2, 3, 4]),
}
PRECONDS = {'edm': ('EDMPrecond', 'EDMLoss'), 'vp': ('VPPrecond', 'VPLoss'), 've': ('VEPrecond', 'VELoss')}


def parse_int_list(value):
    """'1,2,2' -> [1, 2, 2]; also accepts an int list (click passes defaults through)."""
    if value is None or isinstance(value, list):
        return value
    if not re.fullmatch(r'\s*\d+(\s*,\s*\d+)*\s*', value):
        raise click.BadParameter(f'expected comma-separated integers such as 1,2,2, got {value!r}')
    return [int(v) for v in value.split(',')]


def build_options(data, cond, arch, precond, cbase, cres, blocks, attn, dropout, label_dropout, batch, lr, ema,
                  ema_rampup, lr_rampup, duration, kimg, xflip, tick, snap, state_snap, grid, grid_steps, seed,
                  device) -> dnnlib.EasyDict:
    """All training options as one JSON-able dict (what training_options.json records)."""
    if duration is not None and kimg is not None:
        raise click.UsageError('give either --duration (Mimg) or --kimg, not both')
    total_kimg = kimg if kimg is not None else (duration if duration is not None else 200) * 1000
    if total_kimg <= 0:
        raise click.BadParameter(f'training length must be positive, got {total_kimg} kimg', param_hint='--kimg')
    net_class, loss_class = PRECONDS[precond]

    network_kwargs = dnnlib.EasyDict(class_name=f'teachers.networks.{net_class}', **ARCHS[arch])
    if cbase is not None:
        network_kwargs.model_channels = cbase
    if cres is not None:
        network_kwargs.channel_mult = cres
    if blocks is not None:
        network_kwargs.num_blocks = blocks
    if attn is not None:
        network_kwargs.attn_resolutions = attn
    network_kwargs.update(dropout=dropout, use_fp16=False)
    if label_dropout:
        network_kwargs.label_dropout = label_dropout

    return dnnlib.EasyDict(
        dataset_kwargs=dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset', path=data, use_labels=cond,
                                       xflip=xflip, cache=True),
        network_kwargs=network_kwargs,
        loss_kwargs=dnnlib.EasyDict(class_name=f'teachers.loss.{loss_class}'),
        optimizer_kwargs=dnnlib.EasyDict(class_name='torch.optim.Adam', lr=lr, betas=[0.9, 0.999], eps=1e-8),
        batch_size=batch, total_kimg=total_kimg, ema_halflife_kimg=ema * 1000, ema_rampup_ratio=ema_rampup,
        lr_rampup_kimg=lr_rampup if lr_rampup is not None else 0.05 * total_kimg,
        xflip=xflip, kimg_per_tick=tick, snapshot_ticks=snap, state_ticks=state_snap if state_snap is not None else snap,
        grid_size=grid, grid_steps=grid_steps, seed=seed, device=device)


def check_resume_state(path: str, net: torch.nn.Module) -> None:
    """Fail before making a run directory when a training state does not fit the network the options describe."""
    try:
        saved = torch.load(path, map_location='cpu', weights_only=True)['net']
    except Exception as err:  # noqa: BLE001 -- any unreadable file gets the same one-line answer.
        raise click.ClickException(f'--resume {path}: not a readable training state ({type(err).__name__})') from None
    ours = net.state_dict()
    mismatched = [k for k in ours if k not in saved or saved[k].shape != ours[k].shape] + [k for k in saved if k not in ours]
    if mismatched:
        raise click.ClickException(f'--resume {path}: does not match the network these options build '
                                   f'({len(mismatched)} tensors differ, e.g. {mismatched[0]}); use the original options')


@click.command(help=__doc__)
@click.option('--outdir', help='Where to make the run directory', metavar='DIR', required=True)
@click.option('--data', help='Dataset ZIP or folder (dataset_tool.py)', metavar='ZIP|DIR', required=True)
@click.option('--cond', help='Class-conditional (needs labels)', type=bool, default=False, show_default=True)
@click.option('--arch', help='Network architecture', type=click.Choice(list(ARCHS)), default='ddpmpp', show_default=True)
@click.option('--precond', help='Preconditioning and loss', type=click.Choice(list(PRECONDS)), default='edm', show_default=True)
@click.option('--cbase', help='Channel multiplier base [default: 128, adm 192]', type=click.IntRange(min=1))
@click.option('--cres', help='Channels per resolution, e.g. 1,2,2 [default: 2,2,2; adm 1,2,3,4]', callback=lambda c, p, v: parse_int_list(v))
@click.option('--blocks', help='Residual blocks per resolution [default: 4, adm 3]', type=click.IntRange(min=1))
@click.option('--attn', help='Resolutions with self-attention, e.g. 16 or 16,8 [default: 16; adm 32,16,8]', callback=lambda c, p, v: parse_int_list(v))
@click.option('--dropout', help='Dropout probability', type=FiniteFloatRange(0, 1), default=0.13, show_default=True)
@click.option('--label-dropout', help='Label dropout (for classifier-free guidance)', type=FiniteFloatRange(0, 1), default=0, show_default=True)
@click.option('--batch', help='Batch size', type=click.IntRange(min=1), default=512, show_default=True)
@click.option('--lr', help='Learning rate', type=FiniteFloatRange(min=0, min_open=True), default=1e-3, show_default=True)
@click.option('--ema', help='EMA half-life in Mimg', type=FiniteFloatRange(min=0), default=0.5, show_default=True)
@click.option('--ema-rampup', help='EMA half-life cap as a fraction of images seen (0: off)', type=FiniteFloatRange(min=0), default=0.05, show_default=True)
@click.option('--lr-rampup', help='Learning-rate warm-up in kimg [default: 5% of the run]', type=FiniteFloatRange(min=0))
@click.option('--duration', help='Training length in Mimg [default: 200]', type=FiniteFloatRange(min=0, min_open=True))
@click.option('--kimg', help='Training length in kimg (instead of --duration)', type=FiniteFloatRange(min=0, min_open=True))
@click.option('--xflip', help='Random horizontal flips', type=bool, default=False, show_default=True)
@click.option('--tick', help='kimg between progress lines / stats', type=FiniteFloatRange(min=0, min_open=True), default=50, show_default=True)
@click.option('--snap', help='Ticks between snapshots and grids (0: only at the end)', type=click.IntRange(min=0), default=50, show_default=True)
@click.option('--state-snap', help='Ticks between training states [default: --snap]', type=click.IntRange(min=0))
@click.option('--grid', help='Images in each sample grid (0: none)', type=click.IntRange(min=0), default=64, show_default=True)
@click.option('--grid-steps', help='Heun steps for the sample grids', type=click.IntRange(min=1), default=18, show_default=True)
@click.option('--seed', help='Random seed', type=int, default=0, show_default=True)
@click.option('--init', help="Start from this snapshot's weights (fresh optimizer and schedule)", metavar='PKL', type=click.Path(exists=True, dir_okay=False))
@click.option('--resume', help='training-state-*.pt, or a run directory (its latest state)', metavar='PT|DIR')
@click.option('--desc', help='Extra text for the run directory name', type=str)
@click.option('--device', help='Device', type=str, default='cuda' if torch.cuda.is_available() else 'cpu', show_default=True)
@click.option('--threads', help='CPU threads for torch [default: torch decides]', type=click.IntRange(min=1))
@click.option('--progress/--no-progress', help='Show a progress bar', default=True, show_default=True)
@click.option('--dry-run', help='Print the options and the network size, then exit', is_flag=True)
@click.option('--refuse-unknown-code', is_flag=True, help='Refuse an --init pickle whose code or globals are not on the allow-lists')
def main(outdir, desc, init, resume, threads, progress, dry_run, refuse_unknown_code, **kwargs):
    if refuse_unknown_code:
        persistence.refuse_unknown_sources(True)
    if int(os.environ.get('WORLD_SIZE', '1')) > 1:
        raise click.UsageError('train_teacher.py trains in a single process; run it without torchrun')
    if threads is not None:
        torch.set_num_threads(threads)
    opts = build_options(**kwargs)
    try:
        dataset = ImageFolderDataset(**dict({k: v for k, v in opts.dataset_kwargs.items() if k != 'class_name'}, xflip=False))
        if kwargs['cond'] and not dataset.has_labels:
            raise ValueError(f'Dataset {kwargs["data"]}: --cond=1 needs labels, and its dataset.json has none')
        resume_state = latest_training_state(resume, required=True) if resume is not None else None
    except (OSError, ValueError) as err:
        raise click.ClickException(str(err)) from None

    opts.dataset_kwargs.update(resolution=dataset.resolution, max_size=len(dataset))  # As upstream records them.
    run_desc = f'{dataset.name}-{"cond" if kwargs["cond"] else "uncond"}-{kwargs["arch"]}-{kwargs["precond"]}-batch{kwargs["batch"]}'
    if desc:
        run_desc += f'-{desc}'
    print(json.dumps(opts, indent=2))
    label_dim = dataset.label_dim if kwargs['cond'] else 0
    print(f'Dataset: {len(dataset)} images, {dataset.image_shape}, label_dim {label_dim}')
    net = dnnlib.util.construct_class_by_name(**opts.network_kwargs, img_resolution=dataset.resolution,
                                              img_channels=dataset.num_channels, label_dim=label_dim)
    print(f'Network: {sum(p.numel() for p in net.parameters()):,} parameters')
    if resume_state is not None:
        check_resume_state(resume_state, net)
    elif init is not None:
        opts.init_pkl = os.path.abspath(init)
        try:
            init_from_pickle(opts.init_pkl, net)
        except ValueError as err:
            raise click.ClickException(str(err)) from None
    if dry_run:
        print('Dry run; exiting.')
        return

    try:
        run_dir = new_run_dir(outdir, run_desc)
    except dnnlib.util.RunDirError as err:
        raise click.ClickException(f'--outdir: {err}') from None
    save_options(run_dir, dict(opts, resume_state=resume_state, run_dir=run_dir))
    print(f'Run directory: {run_dir}', file=sys.stderr)
    try:
        training_loop(run_dir=run_dir, resume_state=resume_state, progress=progress, **opts)
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    except KeyboardInterrupt as err:
        print(f'Interrupted: {err}', file=sys.stderr)
        sys.exit(130)


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
