"""Distil a diffusion teacher into a one-step generator with Diff-Instruct (IKL), data-free.

Two students:
  * `--student=onestep` (default, the official Diff-Instruct student): a copy of the teacher network evaluated once
    on pure noise, `G(z) = D(init_sigma * z; init_sigma)`. Snapshots are EDM-layout pickles
    `dict(ema=<student>, init_sigma=...)` that `generate.py`, `calc_metrics.py` and EDM-style tools read.
  * `--student=stylegan2`: a fresh StyleGAN2 generator of the teacher's resolution, channels and classes
    (`--z-dim`, `--map`, `--cbase`, `--cmax`). Snapshots are stylegan2-ada-pytorch-layout pickles.

The run directory holds the options, a log, `stats.jsonl`, sample grids, snapshots and the training state
(fake score, optimisers, RNG) for an exact `--resume`. Loading a pickle runs the code stored inside it: only load
files you trust (see --refuse-unknown-code).
"""

import copy
import json
from typing import Optional

import click
import torch

import dnnlib
from dnnlib.cli_types import FINITE_FLOAT
import ikl
import teachers
from pipelines.generators import StyleGAN2Adapter
from pipelines import cli
from pipelines.cli import SetupError
from stylegan2 import networks as stylegan2_networks
from torch_utils import distributed as dist
from torch_utils import persistence

# ----------------------------------------------------------------------------------------------------------------


def one_step_snapshot(adapter: ikl.OneStepStudentAdapter, ema: ikl.OneStepStudentAdapter,
                      fake_score: Optional[torch.nn.Module]) -> dict:
    """The EMA student under `ema` (the key EDM tools read) with the noise level it samples at."""
    return dict(ema.export(), init_sigma=ema.sigma_init)


def stylegan2_snapshot(D: torch.nn.Module):
    """stylegan2-ada-pytorch's layout. Data-free distillation trains no discriminator; `D` is an untrained one of
    matching size, there only because upstream loaders require a D in every pickle."""
    def snapshot(adapter: StyleGAN2Adapter, ema: StyleGAN2Adapter, fake_score: Optional[torch.nn.Module]) -> dict:
        frozen = lambda net: copy.deepcopy(net).eval().requires_grad_(False).cpu()
        return dict(G=frozen(adapter.G), D=D, G_ema=frozen(ema.G), augment_pipe=None, training_set_kwargs=None)
    return snapshot


def build_student(c: dnnlib.EasyDict, teacher: torch.nn.Module):
    """(adapter, snapshot function) for the chosen student."""
    if c.student == 'onestep':
        if not c.init_sigma > 0:
            raise SetupError(f'--init-sigma must be positive, got {c.init_sigma}')
        return ikl.OneStepStudentAdapter.from_teacher(teacher, sigma_init=c.init_sigma), one_step_snapshot
    torch.manual_seed(c.seed)
    size = dict(c_dim=teacher.label_dim, img_resolution=teacher.img_resolution, img_channels=teacher.img_channels)
    G = stylegan2_networks.Generator(z_dim=c.z_dim, w_dim=c.z_dim, **size, mapping_kwargs=dict(num_layers=c.map),
                                     synthesis_kwargs=dict(channel_base=c.cbase, channel_max=c.cmax))
    D = stylegan2_networks.Discriminator(**size, channel_base=c.cbase, channel_max=c.cmax).eval().requires_grad_(False)
    return StyleGAN2Adapter(G, label_dim=teacher.label_dim, train_noise_strength=True), stylegan2_snapshot(D)


def run(c: dnnlib.EasyDict, run_dir: Optional[str], resume: Optional[str], dry_run: bool) -> None:
    """`resume`: None for a new run, else the training-state file to continue from."""
    device = dist.init(device=c.device)
    if c.refuse_unknown_code:
        persistence.refuse_unknown_sources(True)
    try:
        teacher = teachers.load(c.teacher, device=device)
    except teachers.NetworkPickleError as err:
        raise SetupError(f'--teacher {err}') from None
    if c.precision == 'bf16':
        teacher = cli.bf16_ready(teacher, device)  # Before the one-step student copies it.
    if c.student == 'stylegan2' and teacher.img_resolution & (teacher.img_resolution - 1):
        raise SetupError(f'--student=stylegan2 needs a power-of-two resolution; the teacher has {teacher.img_resolution}')
    adapter, snapshot_fn = build_student(c, teacher)
    opts = cli.training_options(c)
    c.resolved = dict(teacher=dict(resolution=teacher.img_resolution, channels=teacher.img_channels,
                                   classes=teacher.label_dim, type=type(teacher).__name__),
                      student_params=sum(p.numel() for p in adapter.parameters() if p.requires_grad), ikl=opts.to_dict())
    if dry_run:
        print(json.dumps(c, indent=2))
        return
    fake_score = copy.deepcopy(teacher).train().requires_grad_(True) if opts.divergence != 'sds' else None
    cli.start('distill', c, run_dir, resume, adapter, teacher, fake_score, device, snapshot_fn=snapshot_fn,
              description=f'Distilling {c.teacher} ({teacher.img_resolution}px) into a {c.student} student')


@click.command(epilog='''\b
Examples:
  # The official Diff-Instruct setting: EDM's unconditional CIFAR-10 teacher into a one-step student.
  python distill.py --teacher=cifar10-uncond --init-sigma=1.0 --batch=128 --glr=1e-5 --lr=1e-5 --outdir=runs
  # A StyleGAN2 student instead of a copy of the teacher:
  python distill.py --teacher=cifar10-cond --student=stylegan2 --z-dim=512 --cbase=16384 --cmax=256 --outdir=runs
  # The shipped Fashion-MNIST teacher on the CPU (about 13 min), then sample the student:
  python distill.py --teacher=embedded/fmnist-edm.pkl --kimg=20 --batch=32 --glr=1e-4 --lr=1e-4 --tick=2 \\
      --snap=1 --outdir=runs
  python generate.py --network=runs/00000-distill-fmnist-edm-onestep/network-snapshot-000020.pkl \\
      --seeds=0-63 --grid --outdir=out
  # Continue a stopped run:
  python distill.py --resume=runs/00000-distill-fmnist-edm''')
@click.option('--teacher', metavar='PKL|URL|NAME|DIR', help='EDM teacher pickle, URL or official short name (e.g. cifar10-uncond), or a diffusers folder / cached Hub id')
@click.option('--student', type=click.Choice(['onestep', 'stylegan2']), default='onestep', show_default=True, help='Student network')
@click.option('--init-sigma', type=FINITE_FLOAT, default=1.0, show_default=True, help='onestep: the noise level the student denoises')
@click.option('--z-dim', type=click.IntRange(min=1), default=512, show_default=True, help='stylegan2: latent (and w) size')
@click.option('--map', type=click.IntRange(min=1), default=2, show_default=True, help='stylegan2: mapping layers')
@click.option('--cbase', type=click.IntRange(min=1), default=16384, show_default=True, help='stylegan2: channel base')
@click.option('--cmax', type=click.IntRange(min=1), default=512, show_default=True, help='stylegan2: max channels')
@cli.engine_options
def main(resume, dry_run, **kwargs):
    """Distil a diffusion teacher into a one-step generator (data-free Diff-Instruct)."""
    if resume:
        c, run_dir, state = cli.resume_target(resume, 'distill')
        c.compile = c.compile or kwargs['compile']  # Changes no result, so --resume may add it.
        run(c, run_dir, resume=state, dry_run=dry_run)
        return
    c = dnnlib.EasyDict(kwargs)
    if not c.teacher:
        raise click.UsageError('--teacher is required (or --resume to continue a run)')
    run_dir = None if dry_run else dnnlib.util.next_run_dir(c.outdir, f'distill-{cli.run_name(c.teacher)}-{c.student}')
    run(c, run_dir, resume=None, dry_run=dry_run)


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
