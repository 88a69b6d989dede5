"""Refine a pre-trained StyleGAN2(-ADA) generator with a diffusion teacher, data-free (Diff-Instruct / IKL).

The generator's samples are diffused, the teacher's score is compared with an online "fake" score fitted to the
generator's own samples, and the generator is pushed along the difference. No dataset is read. The run directory
holds the resolved configuration, a log, `stats.jsonl`, sample grids before and at each snapshot (same latents),
snapshots in the upstream stylegan2-ada-pytorch layout (refined `G` and `G_ema`, the original `D`) that upstream
tools load unchanged, and the training state (fake score, optimisers, RNG) for an exact `--resume`.

Loading a pickle runs the code stored inside it: only load files you trust (see --refuse-unknown-code).
"""

import copy
import json
import os
import re
import sys
from typing import Optional

import click
import torch

import dnnlib
import ikl
from adapters import StyleGAN2Adapter
from stylegan2.pickles import NetworkPickleError, load_network_pkl, rebuild_as_ours
import teachers
from torch_utils import distributed as dist
from torch_utils import persistence

# ----------------------------------------------------------------------------------------------------------------


class SetupError(click.ClickException):
    """A problem with the user's input, reported as one line."""


def next_run_dir(outdir: str, desc: str) -> str:
    """`outdir/NNNNN-desc`, numbered after existing runs, so nothing a user made is ever overwritten."""
    try:
        names = os.listdir(outdir) if os.path.isdir(outdir) else []
    except OSError as err:
        raise SetupError(f'--outdir {outdir}: cannot list ({err.strerror})') from None
    ids = [int(m.group(1)) for m in (re.match(r'^(\d+)-', name) for name in names) if m]
    return os.path.join(outdir, f'{max(ids, default=-1) + 1:05d}-{desc}')


def make_run_dir(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=False)
    except FileExistsError:
        raise SetupError(f'{path} already exists; refusing to overwrite a run directory') from None
    except OSError as err:
        raise SetupError(f'--outdir: cannot create {path} ({err.strerror})') from None


def check_labels(g_classes: int, t_classes: int, generator: str, teacher: str) -> int:
    """How many classes the teacher is given: G's when both are conditional, 0 for an unconditional teacher."""
    if t_classes == 0:
        return 0
    if g_classes == 0:
        raise SetupError(f'{teacher} is class-conditional ({t_classes} classes) but {generator} is unconditional: '
                         f'an unconditional generator cannot be refined by a conditional teacher')
    if g_classes != t_classes:
        raise SetupError(f'class labels: {generator} has {g_classes} classes but {teacher} has {t_classes}')
    return t_classes


def load_generator_networks(path: str, source_net: str) -> dict:
    """The StyleGAN2 pickle's networks, with the one to refine rebuilt as our own class."""
    try:
        data = load_network_pkl(path)
    except NetworkPickleError as err:
        raise SetupError(f'--network {err}') from None
    if data.get(source_net) is None:
        raise SetupError(f'--network {path}: has no {source_net} (has {[k for k in ("G", "G_ema") if data.get(k) is not None]})')
    data['G_source'] = rebuild_as_ours(data[source_net])
    return data


def load_teacher(name: str, device: torch.device) -> torch.nn.Module:
    try:
        return teachers.load(name, device=device)
    except teachers.TeacherLoadError as err:
        raise SetupError(f'--teacher {err}') from None


def refine_snapshot(original: dict):
    """Snapshot content: the upstream layout with the refined G and G_ema and the original D."""
    def snapshot(adapter: StyleGAN2Adapter, ema: StyleGAN2Adapter, fake_score: Optional[torch.nn.Module]) -> dict:
        frozen = lambda net: None if net is None else copy.deepcopy(net).eval().requires_grad_(False).cpu()
        return dict(G=frozen(adapter.G), D=frozen(original.get('D')), G_ema=frozen(ema.G),
                    augment_pipe=frozen(original.get('augment_pipe')),
                    training_set_kwargs=copy.deepcopy(original.get('training_set_kwargs')))
    return snapshot

# ----------------------------------------------------------------------------------------------------------------


def training_options(c: dnnlib.EasyDict) -> dict:
    """The `ikl.TrainingOptions` fields from the command line."""
    return dict(total_kimg=c.kimg, batch=c.batch, batch_gpu=c.batch_gpu, divergence=c.divergence, sigma=c.sigma,
                P_mean=c.p_mean, P_std=c.p_std, weighting=c.weighting, normalize=c.normalize, fake_steps=c.fake_steps,
                g_lr=c.glr, fake_lr=c.lr, lr_warmup_kimg=c.warmup, ema_halflife_kimg=c.ema,
                ema_rampup_ratio=c.ema_rampup if c.ema_rampup > 0 else None, schedule=c.schedule,
                precision=c.precision, seed=c.seed, tick_kimg=c.tick, snapshot_ticks=c.snap, image_ticks=c.snap,
                grid_size=c.grid, progress=not c.no_progress)


def run(c: dnnlib.EasyDict, run_dir: Optional[str], resume: bool, dry_run: bool) -> None:
    device = dist.init(device=c.device)
    if c.refuse_unknown_code:
        persistence.refuse_unknown_sources(True)
    original = load_generator_networks(c.network, c.source_net)
    G = original['G_source']
    teacher = load_teacher(c.teacher, device)
    if G.img_channels != teacher.img_channels:
        raise SetupError(f'channels: {c.network} makes {G.img_channels}-channel images but {c.teacher} expects '
                         f'{teacher.img_channels}')
    label_dim = check_labels(G.c_dim, teacher.label_dim, c.network, c.teacher)
    adapter = StyleGAN2Adapter(G, resolution=teacher.img_resolution, label_dim=label_dim, truncation_psi=c.trunc,
                               noise_mode=c.noise_mode, trainable=c.train)
    opts = ikl.TrainingOptions.from_dict(training_options(c))
    c.resolved = dict(generator=dict(resolution=G.img_resolution, channels=G.img_channels, classes=G.c_dim,
                                     trainable_params=sum(p.numel() for p in adapter.parameters() if p.requires_grad)),
                      teacher=dict(resolution=teacher.img_resolution, channels=teacher.img_channels,
                                   classes=teacher.label_dim, type=type(teacher).__name__),
                      teacher_sees_labels=label_dim > 0, ikl=opts.to_dict())
    if dry_run:
        print(json.dumps(c, indent=2))
        return

    if not resume and dist.get_rank() == 0:
        make_run_dir(run_dir)
        with open(os.path.join(run_dir, 'refine_options.json'), 'w', encoding='utf-8') as f:
            json.dump(c, f, indent=2)
    dist.barrier()
    logger = dnnlib.util.Logger(os.path.join(run_dir, 'log.txt'), file_mode='a') if dist.get_rank() == 0 else None
    try:
        dist.print0(f'Refining {c.network} ({c.source_net}, {G.img_resolution}px, {G.c_dim} classes) with teacher '
                    f'{c.teacher} ({teacher.img_resolution}px) into {run_dir}')
        fake_score = copy.deepcopy(teacher).train().requires_grad_(True) if opts.divergence != 'sds' else None
        ikl.train(adapter, teacher, fake_score, opts, run_dir, device=device, snapshot_fn=refine_snapshot(original),
                  resume='auto' if resume else None)
    finally:
        if logger is not None:
            logger.close()


@click.command(epilog='''\b
Examples:
  # Refine NVIDIA's class-conditional CIFAR-10 StyleGAN2-ADA with EDM's conditional CIFAR-10 teacher:
  python refine.py --network=https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/cifar10.pkl \\
      --teacher=cifar10-cond --outdir=runs --kimg=2000 --batch=64
  # A 256 px generator refined through a 64 px teacher (images are resized with antialiasing):
  python refine.py --network=ffhq256.pkl --teacher=edm-ffhq-64x64-uncond-vp --train=synthesis --outdir=runs
  # The shipped Fashion-MNIST models, on the CPU (this is what `make demo` runs):
  python refine.py --network=embedded/fmnist-stylegan2.pkl --teacher=embedded/fmnist-edm.pkl --kimg=10 --batch=32
  # Continue a stopped run exactly where it left off:
  python refine.py --resume=runs/00000-refine-cifar10-cifar10-cond
  # Several GPUs:
  torchrun --nproc_per_node=4 refine.py --network=... --teacher=... --batch=256''')
@click.option('--network', metavar='PKL|URL', help='StyleGAN2 pickle to refine (upstream, ours, or TensorFlow)')
@click.option('--teacher', metavar='PKL|URL|NAME', help='EDM teacher pickle, URL or official short name (e.g. cifar10-cond)')
@click.option('--outdir', type=click.Path(file_okay=False), default='runs', show_default=True, help='Where run directories go')
@click.option('--resume', type=click.Path(exists=True, file_okay=False), help='Run directory to continue')
@click.option('--source-net', type=click.Choice(['G_ema', 'G']), default='G_ema', show_default=True, help='Which generator of the pickle to refine')
@click.option('--train', type=click.Choice(StyleGAN2Adapter.TRAINABLE), default='all', show_default=True, help='Which generator parameters train')
@click.option('--trunc', type=click.FloatRange(min=0), default=1.0, show_default=True, help='Truncation psi during training')
@click.option('--noise-mode', type=click.Choice(['random', 'const', 'none']), default='random', show_default=True, help='Synthesis noise during training')
@click.option('--kimg', type=click.FloatRange(min=0, min_open=True), default=1000, show_default=True, help='Duration in thousands of generator samples')
@click.option('--batch', type=click.IntRange(min=1), default=64, show_default=True, help='Global batch size')
@click.option('--batch-gpu', type=click.IntRange(min=1), help='Samples per process per round (gradient accumulation)')
@click.option('--divergence', type=click.Choice(['ikl', 'sds', 'sid']), default='ikl', show_default=True, help='Generator objective')
@click.option('--sigma', type=click.Choice(['lognormal', 'karras', 'fixed']), default='lognormal', show_default=True, help='Noise-level distribution')
@click.option('--p-mean', type=float, default=-1.2, show_default=True, help='lognormal: mean of ln(sigma)')
@click.option('--p-std', type=click.FloatRange(min=0), default=1.2, show_default=True, help='lognormal: std of ln(sigma)')
@click.option('--weighting', type=click.Choice(['denoiser', 'score']), default='denoiser', show_default=True, help='Weight on the score difference')
@click.option('--normalize', type=bool, default=False, show_default=True, help='Per-sample normalisation (DMD-style)')
@click.option('--glr', type=click.FloatRange(min=0, min_open=True), default=1e-5, show_default=True, help='Generator learning rate')
@click.option('--lr', type=click.FloatRange(min=0, min_open=True), default=1e-5, show_default=True, help='Fake-score learning rate')
@click.option('--fake-steps', type=click.IntRange(min=1), default=1, show_default=True, help='Fake-score steps per generator step')
@click.option('--warmup', type=click.FloatRange(min=0), default=0, show_default=True, help='Learning-rate warm-up, kimg')
@click.option('--ema', type=click.FloatRange(min=0), default=500, show_default=True, help='EMA half-life of G_ema, kimg')
@click.option('--ema-rampup', type=click.FloatRange(min=0), default=0.05, show_default=True, help='EMA ramp-up ratio (0: none)')
@click.option('--precision', type=click.Choice(['fp32', 'bf16', 'fp16']), default='fp32', show_default=True, help='Autocast for teacher and fake score')
@click.option('--schedule', type=click.Choice(['reuse', 'official']), default='reuse', show_default=True, help='One generator pass per step, or the official extra pass')
@click.option('--tick', type=click.FloatRange(min=0, min_open=True), default=4, show_default=True, help='kimg per tick (stats line)')
@click.option('--snap', type=click.IntRange(min=1), default=10, show_default=True, help='Ticks per snapshot and grid')
@click.option('--grid', type=click.IntRange(min=0), default=64, show_default=True, help='Images in the sample grids')
@click.option('--seed', type=int, default=0, show_default=True, help='Random seed')
@click.option('--device', type=str, help='cuda, cpu, ... (default: cuda if available)')
@click.option('--refuse-unknown-code', is_flag=True, help='Refuse pickles whose embedded source is not on the allow-list')
@click.option('--no-progress', is_flag=True, help='No progress bar (log a line per tick instead)')
@click.option('--dry-run', is_flag=True, help='Print the resolved configuration and exit')
def main(resume, dry_run, **kwargs):
    """Refine a StyleGAN2 generator with a diffusion teacher (data-free Diff-Instruct)."""
    if resume:
        try:
            with open(os.path.join(resume, 'refine_options.json'), encoding='utf-8') as f:
                c = dnnlib.EasyDict(json.load(f))
        except (OSError, ValueError) as err:
            raise SetupError(f'--resume {resume}: not a refine run directory ({err})') from None
        c.pop('resolved', None)
        run(c, resume, resume=True, dry_run=dry_run)
        return
    c = dnnlib.EasyDict(kwargs)
    for name in ('network', 'teacher'):
        if not c[name]:
            raise click.UsageError(f'--{name} is required (or --resume to continue a run)')
    base = lambda p: os.path.splitext(os.path.basename(str(p).rstrip('/')))[0]
    run_dir = None if dry_run else next_run_dir(c.outdir, f'refine-{base(c.network)}-{base(c.teacher)}')
    run(c, run_dir, resume=False, dry_run=dry_run)


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
