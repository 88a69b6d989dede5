"""Toy benchmark: refine a mode-dropping 2-D generator with IKL, with SDS, or not at all (25 Gaussians, 5x5 grid).

The teacher is the exact Gaussian-mixture denoiser (`teachers.analytic.grid25`: centres -4..4, std 0.05). The
starting generator is an MLP made to drop modes on purpose: a fresh one is instructed (IKL, one fixed recipe) by
the mixture *without* five held-out modes. Refinement defaults: the official noise law and weighting, 32 Mimg at
lr 1e-3 with a cosine ramp-down over the last quarter; a tanh MLP generator 128x3 with latent gain 5 and its output
noise held at strength 0.04; the empirical fake score (the exact denoiser of recent generator samples, so no fitting
error). The README shows what each choice measured: this is the recipe that meets the target (25/25 modes, at least
97 % high quality) on every seed with modes of about the teacher's width.
Metrics on 10k samples of each generator (EMA weights for the refined ones):
- modes covered: a mode counts when it holds at least 10 % of its fair share (1/25) of the samples within 3 std;
- high quality: the share of samples within 3 std (0.15) of some centre (98.9 % for exact samples);
- reverse KL: KL(q || uniform) over the 25-mode histogram of the high-quality samples (0 is perfect);
- mode std: per-coordinate spread of the high-quality samples around their centre (the teacher's is 0.05);
- coverage: the share of 10k fresh mixture samples whose 5-nearest-neighbour ball holds a generated sample (about
  97 % for exact samples); modes narrower than the teacher's, which the high-quality share rewards, lower it.
With --snapshots N the refinements keep N evenly spaced snapshots and the same metrics are reported for each (the
JSON's `trajectory`, and one table per method), to see when modes narrow or noise strengths die.
Scatter plots (PNG) go to --outdir. Prints tables, then one JSON object as its last line.
"""

import copy
import json
import math
import os
import pickle
import sys
import time
from typing import Callable

import click

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from dnnlib.cli_types import FINITE_FLOAT, FiniteFloatRange  # noqa: E402

import ikl  # noqa: E402
from ikl.images import save_scatter  # noqa: E402
from ikl.toy import ACTIVATIONS, MLPDenoiser, MLPGenerator  # noqa: E402
from teachers.analytic import GaussianMixture, grid25  # noqa: E402
from training.run import kimg_files  # noqa: E402

from empirical import EmpiricalDenoiser  # noqa: E402

DROPPED = [0, 7, 12, 18, 24]  # modes the starting generator is steered away from
EMPIRICAL_SAMPLES = 8192  # an empirical fake score holds the samples of the last 32 iterations of 256
# How the start is made, whatever the refinement options, so that runs with different options start alike.
START_RECIPE = dict(g_lr=1e-3, fake_lr=3e-3, fake_steps=1, P_mean=-1.2, P_std=1.2, fake_P_mean=-1.2, fake_P_std=1.2,
                    weighting='denoiser', normalize=False, lr_rampdown_kimg=0)


def coverage(real: torch.Tensor, fake: torch.Tensor, k: int = 5, chunk: int = 1024) -> float:
    """Share of real samples whose k-nearest-neighbour ball (among the real samples) holds a generated sample (the
    coverage of Naeem et al. 2020). It falls when the generator's modes are narrower than the data's, which the
    high-quality share rewards; about 1 - 2^-k for two equal-sized sample sets of the same law."""
    real, fake = real.double(), fake.double()
    covered = []
    for part in real.split(chunk):
        radius = torch.cdist(part, real).kthvalue(k + 1, dim=1).values  # the first is the point itself
        covered.append(torch.cdist(part, fake).min(1).values <= radius)
    return float(torch.cat(covered).double().mean())


def mode_metrics(x: torch.Tensor, teacher, real: torch.Tensor) -> dict:
    d = torch.cdist(x.double(), teacher.means).min(1)
    hq = d.values < 3 * math.sqrt(float(teacher.variances[0, 0]))
    counts = torch.bincount(d.indices[hq], minlength=teacher.num_components).double()
    fair = x.shape[0] / teacher.num_components
    q = counts / counts.sum().clamp_min(1)
    nz = q > 0
    rkl = float((q[nz] * (q[nz] * teacher.num_components).log()).sum())
    spread = float((d.values[hq] ** 2).mean().div(x.shape[1]).sqrt()) if bool(hq.any()) else float('nan')
    return dict(modes=int((counts >= 0.1 * fair).sum()), high_quality=float(hq.double().mean()), reverse_kl=rkl,
                mode_std=spread, coverage=coverage(real, x))


def generator_metrics(model: ikl.GeneratorAdapter, teacher, real: torch.Tensor, eval_gen: torch.Generator) -> tuple:
    """`mode_metrics` of 10k samples of `model`, plus its output-noise strengths if it has them; and the samples."""
    with torch.no_grad():
        x = model.sample(10000, eval_gen)[0]
    metrics = mode_metrics(x, teacher, real)
    if model.G.noise_strength is not None:
        metrics['noise_strength'] = [round(a, 4) for a in model.G.noise_strength.tolist()]
    return metrics, x


def trajectory(run_dir: str, teacher, real: torch.Tensor, make_eval_gen: Callable) -> list:
    """The metrics of the EMA generator of every network snapshot in `run_dir`, in order of training progress."""
    points = []
    for kimg, path in kimg_files(run_dir, 'network-snapshot', 'pkl'):
        with open(path, 'rb') as f:
            G = pickle.load(f)['G_ema']  # our own run's pickle, written moments ago
        metrics = generator_metrics(ikl.ModuleAdapter(G, [G.z_dim]), teacher, real, make_eval_gen())[0]
        points.append(dict(kimg=kimg, **metrics))
    return points


def print_table(rows: dict, first: str) -> None:
    print(f'{first:<8} {"modes":>6} {"high-quality %":>15} {"reverse KL":>11} {"mode std":>9} {"coverage %":>11} '
          f'{"noise strength":>16} {"seconds":>8}')
    for name, r in rows.items():
        noise = ' '.join(f'{a:.4f}' for a in r.get('noise_strength', []))
        seconds = f'{r["seconds"]:.1f}' if 'seconds' in r else ''
        print(f'{name:<8} {r["modes"]:>4}/25 {100 * r["high_quality"]:>15.2f} {r["reverse_kl"]:>11.4f} '
              f'{r["mode_std"]:>9.4f} {100 * r["coverage"]:>11.2f} {noise:>16} {seconds:>8}')


def make_mode_dropping_generator(teacher, opts: dict, kimg: float, fake_init_steps: int, seed: int, outdir: str,
                                 generator_kwargs: dict, fake_kwargs: dict):
    """Collapse on purpose: instruct a fresh MLP generator (IKL) by the mixture *without* the DROPPED modes."""
    kept = [k for k in range(teacher.num_components) if k not in DROPPED]
    partial = GaussianMixture(teacher.means[kept], teacher.variances[kept])
    torch.manual_seed(seed)
    G = MLPGenerator(out_dim=2, **generator_kwargs)
    adapter = ikl.ModuleAdapter(G, [G.z_dim])
    fake = initial_fake(partial, 'learned', fake_init_steps, seed, opts['sigma_data'], fake_kwargs)
    start_opts = dict(opts, **START_RECIPE, total_kimg=kimg, seed=seed + 7)
    trainer = ikl.train(adapter, partial, fake, start_opts, os.path.join(outdir, 'start'))
    return trainer.ema.G


def initial_fake(teacher, how: str, steps: int, seed: int, sigma_data: float, fake_kwargs: dict,
                 generator=None) -> torch.nn.Module:
    """The fake score's start: `mixture`, a trainable copy of the mixture itself (the teacher's own family, as a
    network fake score is a copy of a network teacher); `exact`, the teacher plus a zero-initialised network
    correction; `learned`, a network fitted to the teacher by `steps` of denoising score matching; `empirical`, the
    exact denoiser of the last EMPIRICAL_SAMPLES samples of `generator` (no fitting error; starts on fresh ones)."""
    if how == 'mixture':
        return teacher.trainable_copy()
    if how == 'empirical':
        with torch.no_grad():
            z = torch.randn(EMPIRICAL_SAMPLES, generator.z_dim, generator=torch.Generator().manual_seed(seed + 1))
            return EmpiricalDenoiser(generator(z))
    torch.manual_seed(seed + 1)
    if how == 'exact':
        return MLPDenoiser(2, sigma_data=sigma_data, base=copy.deepcopy(teacher), **fake_kwargs)
    fake = MLPDenoiser(2, sigma_data=sigma_data, **fake_kwargs)
    gen = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.Adam(fake.parameters(), 1e-3)
    for _ in range(steps):
        loss = ikl.edm_dsm_loss(fake, teacher.sample(512, gen), None, ikl.LogNormal(), gen, sigma_data=sigma_data).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return fake


class OutputNoise(click.ParamType):
    """`--output-noise`: off, trained, or a fixed strength (a float >= 0)."""
    name = 'off|trained|STRENGTH'

    def convert(self, value, param, ctx):
        if value in ('off', 'trained'):
            return value
        try:
            strength = float(value)
        except ValueError:
            strength = math.nan
        if not strength >= 0:  # also refuses nan
            self.fail(f'expected off, trained or a strength >= 0, got {value!r}', param, ctx)
        return strength


@click.command()
@click.option('--outdir', type=str, default='bench-out/toy2d', show_default=True)
@click.option('--kimg', type=FINITE_FLOAT, default=32000, show_default=True, help='Refinement length.')
@click.option('--batch', type=int, default=256, show_default=True)
@click.option('--lr', type=FINITE_FLOAT, default=1e-3, show_default=True)
@click.option('--fake-lr', type=FINITE_FLOAT, default=3e-3, show_default=True, help='Fake-score lr.')
@click.option('--fake-steps', type=int, default=1, show_default=True)
@click.option('--P-mean', 'p_mean', type=FINITE_FLOAT, default=-1.2, show_default=True)
@click.option('--P-std', 'p_std', type=FINITE_FLOAT, default=1.2, show_default=True)
@click.option('--weighting', type=click.Choice(['denoiser', 'score']), default='denoiser', show_default=True)
@click.option('--normalize', type=bool, default=False, show_default=True)
@click.option('--ema', type=FINITE_FLOAT, default=20, show_default=True, help='EMA half-life in kimg.')
@click.option('--rampdown', type=FiniteFloatRange(0, 1), default=0.25, show_default=True,
              help='Cosine lr ramp-down over this last fraction of --kimg.')
@click.option('--start-kimg', type=FINITE_FLOAT, default=3000, show_default=True, help='Training of the mode-dropping start.')
@click.option('--fake-init', type=click.Choice(['learned', 'exact', 'mixture', 'empirical']), default='empirical',
              show_default=True,
              help='The refinement\'s fake score: a network fitted to the teacher (learned), the teacher plus a '
                   'zero-initialised network correction (exact), a trainable copy of the mixture (mixture), or the '
                   'exact denoiser of recent generator samples (empirical).')
@click.option('--fake-init-steps', type=int, default=2000, show_default=True, help='DSM steps of a fitted fake score.')
@click.option('--latent-dim', type=int, default=2, show_default=True, help='Latent dimensions of the generator.')
@click.option('--g-width', type=int, default=128, show_default=True, help='Hidden units of the generator MLP.')
@click.option('--g-depth', type=int, default=3, show_default=True, help='Hidden layers of the generator MLP.')
@click.option('--g-act', type=click.Choice(sorted(ACTIVATIONS)), default='tanh', show_default=True, help='Its activation.')
@click.option('--input-gain', type=FINITE_FLOAT, default=5.0, show_default=True, help='Its latent gain (ikl.toy.MLPGenerator).')
@click.option('--output-noise', type=OutputNoise(), default=0.04, show_default=True,
              help='Latent noise added to the generator\'s output (ikl.toy.MLPGenerator): off; trained (its strength '
                   'learned, by the start and on by the refinement); or a strength held fixed during the refinement, '
                   'as refine.py holds StyleGAN2\'s noise strengths (the start still learns its own).')
@click.option('--fake-width', type=int, default=128, show_default=True, help='Hidden units of the fake-score MLP.')
@click.option('--fake-depth', type=int, default=3, show_default=True, help='Hidden layers of the fake-score MLP.')
@click.option('--snapshots', type=click.IntRange(min=0), default=0, show_default=True,
              help='Evenly spaced snapshots of each refinement whose metrics are reported too (0: only the end).')
@click.option('--seed', type=int, default=0, show_default=True)
@click.option('--methods', type=str, default='exact,none,sds,ikl', show_default=True,
              help='exact: samples of the mixture itself; none: the start; sds, ikl: refined from it.')
def main(outdir, kimg, batch, lr, fake_lr, fake_steps, p_mean, p_std, weighting, normalize, ema, rampdown, start_kimg,
         fake_init, fake_init_steps, latent_dim, g_width, g_depth, g_act, input_gain, output_noise,
         fake_width, fake_depth, snapshots, seed, methods):
    unknown = sorted(set(methods.split(',')) - {'exact', 'none', 'sds', 'ikl'})
    if unknown:
        raise click.BadParameter(f'unknown {unknown}, expected a comma-separated subset of exact,none,sds,ikl',
                                 param_hint='--methods')
    torch.set_num_threads(1)
    os.makedirs(outdir, exist_ok=True)
    teacher = grid25()
    sigma_data = 2.8  # the grid's per-coordinate std (sqrt(8) for centres -4..4)
    opts = dict(total_kimg=kimg, batch=batch, g_lr=lr, fake_lr=fake_lr or lr, fake_steps=fake_steps, P_mean=p_mean,
                P_std=p_std, fake_P_mean=p_mean, fake_P_std=p_std, weighting=weighting, normalize=normalize,
                sigma_data=sigma_data, ema_halflife_kimg=ema, lr_rampdown_kimg=rampdown * kimg, seed=seed,
                tick_kimg=max(kimg / 10, 1), snapshot_ticks=None, image_ticks=None, grid_size=0, progress=False,
                tensorboard=False)
    tracking = dict(tick_kimg=kimg / snapshots, snapshot_ticks=1) if snapshots else {}  # refinements only, not the start
    t0 = time.time()
    generator_kwargs = dict(latent_dim=latent_dim, hidden=g_width, layers=g_depth, activation=g_act, input_gain=input_gain,
                            output_noise=output_noise != 'off')
    noise_strength = output_noise if isinstance(output_noise, float) else None
    fake_kwargs = dict(hidden=fake_width, layers=fake_depth)
    G0 = make_mode_dropping_generator(teacher, opts, start_kimg, fake_init_steps, seed, outdir, generator_kwargs, fake_kwargs)
    G1 = copy.deepcopy(G0).train().requires_grad_(True)  # what the refinements start from
    if noise_strength is not None:
        G1.noise_strength.requires_grad_(False).data.fill_(noise_strength)
    fake0 = initial_fake(teacher, fake_init, fake_init_steps, seed, sigma_data, fake_kwargs, G1)
    setup_sec = time.time() - t0
    results, trajectories = dict(), dict()
    eval_gen = lambda: torch.Generator().manual_seed(seed + 100)
    real = teacher.sample(10000, torch.Generator().manual_seed(seed + 200))  # the reference set for coverage
    for method in methods.split(','):
        t1 = time.time()
        if method == 'exact':
            x = teacher.sample(10000, eval_gen())
            results[method] = mode_metrics(x, teacher, real)
        else:
            model = ikl.ModuleAdapter(G0, [G0.z_dim])
            if method != 'none':
                adapter = ikl.ModuleAdapter(copy.deepcopy(G1), [G1.z_dim])
                fake = copy.deepcopy(fake0) if method == 'ikl' else None
                if isinstance(fake, EmpiricalDenoiser):
                    fake = ikl.ObservingFakeScore(fake)  # shown the samples, not fitted
                run_dir = os.path.join(outdir, method)
                model = ikl.train(adapter, teacher, fake, dict(opts, divergence=method, **tracking), run_dir).ema
                if snapshots:
                    trajectories[method] = trajectory(run_dir, teacher, real, eval_gen)
            results[method], x = generator_metrics(model, teacher, real, eval_gen())
        results[method]['seconds'] = round(time.time() - t1, 1)
        save_scatter(x[:3000], os.path.join(outdir, f'scatter-{method}.png'), extent=5.5, centres=teacher.means.tolist())

    print_table(results, 'method')
    for method, points in trajectories.items():
        print()
        print_table({f'{p["kimg"]:.0f}': p for p in points}, f'{method} kimg')
        results[method]['trajectory'] = points
    print(json.dumps(dict(benchmark='toy2d', setup_seconds=round(setup_sec, 1), options=opts, snapshots=snapshots,
                          generator=dict(generator_kwargs, fixed_noise_strength=noise_strength),
                          fake=dict(fake_kwargs, init=fake_init), results=results)))


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
