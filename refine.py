"""Refine a pre-trained StyleGAN2(-ADA) generator with a diffusion teacher, data-free (Diff-Instruct / IKL).

The generator's samples are diffused, the teacher's score is compared with an online "fake" score fitted to the
generator's own samples, and the generator is pushed along the difference. No dataset is read. The run directory
holds the resolved configuration, a log, `stats.jsonl`, sample grids before and at each snapshot (same latents),
snapshots in the upstream stylegan2-ada-pytorch layout (refined `G` and `G_ema`, the pickle's `D`) that upstream
tools load unchanged, and the training state (fake score, optimisers, RNG) for an exact `--resume`.

Loading a pickle runs the code stored inside it: only load files you trust (see --refuse-unknown-code).
"""

import copy
import json
from typing import Optional

import click
import torch

import dnnlib
from dnnlib.cli_types import FiniteFloatRange
import ikl
import teachers
from pipelines.critic import DiscriminatorCritic, teacher_bank
from pipelines.generators import StyleGAN2Adapter
from pipelines import cli
from pipelines.cli import SetupError
from stylegan2.pickles import NetworkPickleError, load_network_pkl, rebuild_network
from torch_utils import distributed as dist
from torch_utils import persistence

# ----------------------------------------------------------------------------------------------------------------


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
    data['G_source'] = rebuild_network(data[source_net])
    return data


def load_teacher(name: str, device: torch.device) -> torch.nn.Module:
    """The teacher, with a one-line error for anything unusable."""
    try:
        return teachers.load(name, device=device)
    except teachers.NetworkPickleError as err:
        raise SetupError(f'--teacher {err}') from None


def refine_snapshot(original: dict):
    """Snapshot content: the upstream layout with the refined G and G_ema and the pickle's D (trained on against the
    teacher's samples with `--adv`, unchanged otherwise)."""
    def snapshot(adapter: StyleGAN2Adapter, ema: StyleGAN2Adapter, fake_score: Optional[torch.nn.Module]) -> dict:
        frozen = lambda net: None if net is None else copy.deepcopy(net).eval().requires_grad_(False).cpu()
        return dict(G=frozen(adapter.G), D=frozen(original.get('D')), G_ema=frozen(ema.G),
                    augment_pipe=frozen(original.get('augment_pipe')),
                    training_set_kwargs=copy.deepcopy(original.get('training_set_kwargs')))
    return snapshot

def make_critic(c: dnnlib.EasyDict, original: dict, teacher: torch.nn.Module, label_dim: int, opts) -> ikl.TeacherSampleCritic:
    """`--adv`: the pickle's D against a bank of `--adv-bank` teacher samples (cached, shipped, or drawn once)."""
    D = original.get('D')
    if D is None:
        raise SetupError(f'--adv: {c.network} holds no discriminator D to train against the teacher\'s samples '
                         f'(refine with IKL alone: --adv=0, or --recipe=official)')
    if D.c_dim not in (0, label_dim):
        raise SetupError(f'--adv: the discriminator of {c.network} has {D.c_dim} classes but the teacher sees '
                         f'{label_dim}; an unconditional teacher cannot train a conditional D')
    try:
        images, labels = teacher_bank(c.teacher, teacher, c.adv_bank, progress=not c.no_progress)
    except ValueError as err:
        raise SetupError(f'--adv-bank: {err}') from None
    D = original['D'] = rebuild_network(D).train().requires_grad_(True)  # Snapshots export this trained D.
    return ikl.TeacherSampleCritic(DiscriminatorCritic(D), images, labels, opts)

# Settings bundles for --recipe. An option given on the command line overrides its recipe's value; options a recipe
# leaves out keep the defaults --help shows, which are the official Diff-Instruct settings.
RECIPES = {
    # IKL with the data-free adversarial term at the pace of GAN training: the critic's term weighted 10x, the
    # critic at StyleGAN2's 2.5e-3 with R1 1 against 10k teacher samples, the generator at 2e-3 after a 2-kimg
    # warm-up with StyleGAN2's Adam beta2 (0.99) and an EMA of half-life min(3, kimg/4), and a pull of the 8x8-pooled
    # pixels' Frechet distance to the bank's, relative to the GAN's own at the start, at weight 1. IKL alone stops at
    # 5-10 % of the gap to the teacher; together the terms close about half of it in 20 kimg on Fashion-MNIST, end at
    # their best, and the pull keeps the pixel statistics where the GAN had them (docs/refinement-fmnist.md,
    # docs/benchmarks.md).
    'ikl-gan': dict(glr=2e-3, warmup=2.0, g_beta2=0.99, ema=3.0, ema_rampup=0.25, lr=1e-4, fake_warmup=1.0, batch=32,
                    adv=10.0, adv_lr=2.5e-3, adv_r1=1.0, adv_bank=10000, adv_pixels=1.0),
    # The same two terms at IKL's pace: keeps its gain, but ends at only 0.90-0.95x of the start.
    'ikl-adv': dict(glr=1e-4, lr=1e-4, fake_warmup=1.0, batch=128, adv=1.0, adv_lr=5e-4),
    'official': dict(),  # The official code's settings: IKL alone at lr 1e-5, no warm-up.
}


def apply_recipe(kwargs: dict, ctx: click.Context) -> None:
    """Fill the options the user left at their defaults with the values of `--recipe`. A recipe's `--adv-pixels`
    pulls towards its critic's bank, so `--adv=0` given on the command line turns it off too."""
    given = lambda name: ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT
    for name, value in RECIPES[kwargs['recipe']].items():
        if not given(name):
            kwargs[name] = value
    if given('adv') and kwargs['adv'] == 0 and not given('adv_pixels'):
        kwargs['adv_pixels'] = 0.0

# ----------------------------------------------------------------------------------------------------------------


def run(c: dnnlib.EasyDict, run_dir: Optional[str], resume: Optional[str], dry_run: bool) -> None:
    """`resume`: None for a new run, else the training-state file to continue from."""
    device = dist.init(device=c.device)
    if c.refuse_unknown_code:
        persistence.refuse_unknown_sources(True)
    teacher = load_teacher(c.teacher, device)  # First: it needs no compiled ops, so a bad --teacher fails fast.
    if c.precision == 'bf16':
        teacher = cli.bf16_ready(teacher, device)
    original = load_generator_networks(c.network, c.source_net)
    G = original['G_source']
    if G.img_channels != teacher.img_channels:
        raise SetupError(f'channels: {c.network} makes {G.img_channels}-channel images but {c.teacher} expects '
                         f'{teacher.img_channels}')
    label_dim = check_labels(G.c_dim, teacher.label_dim, c.network, c.teacher)
    adapter = StyleGAN2Adapter(G, resolution=teacher.img_resolution, label_dim=label_dim, truncation_psi=c.trunc,
                               noise_mode=c.noise_mode, trainable=c.train,
                               train_noise_strength=c.get('train_noise_strength', True))
    if c.get('adv_pixels', 0.0) > 0 and c.adv == 0:  # get: run directories made before --adv-pixels resume too.
        raise SetupError('--adv-pixels: the pull is towards the critic\'s bank of teacher samples; it needs --adv > 0')
    opts = cli.training_options(c)
    c.resolved = dict(generator=dict(resolution=G.img_resolution, channels=G.img_channels, classes=G.c_dim,
                                     trainable_params=sum(p.numel() for p in adapter.parameters() if p.requires_grad)),
                      teacher=dict(resolution=teacher.img_resolution, channels=teacher.img_channels,
                                   classes=teacher.label_dim, type=type(teacher).__name__),
                      teacher_sees_labels=label_dim > 0, ikl=opts.to_dict())
    if dry_run:
        print(json.dumps(c, indent=2))
        return
    fake_score = copy.deepcopy(teacher).train().requires_grad_(True) if opts.divergence != 'sds' else None
    critic = make_critic(c, original, teacher, label_dim, opts) if opts.adv_weight > 0 else None
    native = lambda ema: StyleGAN2Adapter(ema.G, trainable='none')  # Metrics as upstream: psi 1, random noise.
    cli.start('refine', c, run_dir, resume, adapter, teacher, fake_score, device, snapshot_fn=refine_snapshot(original),
              to_generator=native,
              description=f'Refining {c.network} ({c.source_net}, {G.img_resolution}px, {G.c_dim} classes) with '
                          f'{c.teacher} ({teacher.img_resolution}px)', critic=critic)


@click.command(epilog='''\b
Examples:
  # Refine NVIDIA's class-conditional CIFAR-10 StyleGAN2-ADA with EDM's conditional CIFAR-10 teacher:
  python refine.py --network=https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/cifar10.pkl \\
      --teacher=cifar10-cond --outdir=runs --kimg=2000 --batch=64
  # A 256 px generator refined through a 64 px teacher (images are resized with antialiasing):
  python refine.py --network=ffhq256.pkl --teacher=edm-ffhq-64x64-uncond-vp --train=synthesis --outdir=runs
  # The shipped Fashion-MNIST models (embedded/README.md) on the CPU, default recipe, with the Frechet distance in
  # the offline detector's features at the start and at every 2 kimg (the benchmark's setting):
  python refine.py --network=embedded/fmnist-stylegan2-240kimg.pkl --teacher=embedded/fmnist-edm-492kimg.pkl \\
      --outdir=runs --kimg=20 --tick=1 --snap=2 \\
      --metrics=fid5k_full --metrics-ref=embedded/fmnist-32x32-fmnist.npz --detector=fmnist
  # The official Diff-Instruct settings instead of the default recipe:
  python refine.py --network=g.pkl --teacher=edm.pkl --recipe=official --outdir=runs
  # Data-free metrics instead (reference: samples of the teacher):
  python refine.py --network=g.pkl --teacher=edm.pkl --metrics=fid10k_full --outdir=runs
  # Continue a stopped run exactly where it left off:
  python refine.py --resume=runs/00000-refine-cifar10-cifar10-cond
  # Several GPUs:
  torchrun --nproc_per_node=4 refine.py --network=... --teacher=... --batch=256''')
@click.option('--network', metavar='PKL|URL', help='StyleGAN2 pickle to refine (upstream, ours, or TensorFlow)')
@click.option('--teacher', metavar='PKL|URL|NAME|DIR', help='EDM teacher pickle, URL or official short name (e.g. cifar10-cond), or a diffusers folder / cached Hub id')
@click.option('--source-net', type=click.Choice(['G_ema', 'G']), default='G_ema', show_default=True, help='Which generator of the pickle to refine')
@click.option('--train', type=click.Choice(['all', 'synthesis', 'mapping']), default='all', show_default=True, help='Which generator parameters train')
@click.option('--train-noise-strength', type=bool, default=False, show_default=True, help='Also train the per-layer noise strengths (off: their IKL gradient is noise)')
@click.option('--trunc', type=FiniteFloatRange(min=0), default=1.0, show_default=True, help='Truncation psi during training')
@click.option('--noise-mode', type=click.Choice(['random', 'const', 'none']), default='random', show_default=True, help='Synthesis noise during training')
@click.option('--recipe', type=click.Choice(list(RECIPES)), default='ikl-gan', show_default=True,
              help='Settings bundle; options given explicitly override it. ikl-gan: --glr=2e-3 --warmup=2 --g-beta2=0.99 '
                   '--ema=3 --ema-rampup=0.25 --lr=1e-4 --fake-warmup=1 --batch=32 --adv=10 --adv-lr=2.5e-3 --adv-r1=1 '
                   '--adv-bank=10000 --adv-pixels=1; ikl-adv: --glr=1e-4 --lr=1e-4 --fake-warmup=1 --batch=128 --adv=1 --adv-lr=5e-4; '
                   'official: the Diff-Instruct release (the defaults shown below)')
@click.option('--adv', type=FiniteFloatRange(min=0), default=0.0, show_default=True,
              help="Weight of the data-free adversarial term: the pickle's D trained on teacher samples (0: off)")
@click.option('--adv-lr', type=FiniteFloatRange(min=0, min_open=True), default=2e-4, show_default=True, help='--adv: D learning rate')
@click.option('--adv-r1', type=FiniteFloatRange(min=0), default=0.01, show_default=True, help='--adv: R1 weight on the teacher samples')
@click.option('--adv-pixels', type=FiniteFloatRange(min=0), default=0.0, show_default=True,
              help="--adv: weight of the pull of the generator's pooled-pixel mean and covariance towards the bank's, "
                   "on their distance relative to the GAN's own at the start (0: off)")
@click.option('--adv-pixels-res', type=click.IntRange(min=1), default=8, show_default=True, help='--adv-pixels: pooled image size')
@click.option('--adv-pixels-halflife', type=FiniteFloatRange(min=0), default=1.0, show_default=True,
              help="--adv-pixels: half-life in kimg of the generator's running pixel moments (shorter: closer to a "
                   "fast generator, from fewer samples)")
@click.option('--adv-bank', type=click.IntRange(min=4), default=5000, show_default=True,
              help='--adv: teacher samples in the bank (drawn once and cached per teacher file, or shipped beside it)')
@cli.engine_options
def main(resume, dry_run, **kwargs):
    """Refine a StyleGAN2 generator with a diffusion teacher (data-free Diff-Instruct)."""
    if resume:
        c, run_dir, state = cli.resume_target(resume, 'refine')
        c.compile = c.compile or kwargs['compile']  # Changes no result, so --resume may add it.
        run(c, run_dir, resume=state, dry_run=dry_run)
        return
    apply_recipe(kwargs, click.get_current_context())
    c = dnnlib.EasyDict(kwargs)
    for name in ('network', 'teacher'):
        if not c[name]:
            raise click.UsageError(f'--{name} is required (or --resume to continue a run)')
    run_dir = None if dry_run else dnnlib.util.next_run_dir(c.outdir, 'refine-' + cli.run_name(c.network, c.teacher))
    run(c, run_dir, resume=None, dry_run=dry_run)


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
