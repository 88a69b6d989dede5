"""What `refine.py` and `distill.py` share: the engine's command-line options, run directories, and the run itself.

Both scripts are the same engine with different generator adapters, so they take the same training options
(`engine_options`), write the same run directory (`<outdir>/<NNNNN>-<desc>` with `training_options.json`, `log.txt`
and the engine's files) and resume the same way (`--resume=<run dir>` reads the saved options back).
"""

import glob
import json
import os
import re
import sys
from typing import Callable, List, Optional

import click
import torch

import dnnlib
from dnnlib.cli_types import FINITE_FLOAT, FiniteFloatRange
from ikl import TrainingDiverged, default_snapshot, train
from ikl.divergences import supports_autocast
from ikl.options import TrainingOptions
from metrics import MetricRunner
from metrics.metric_main import append_jsonl
from metrics.pixels import pixel_statistics
from teachers import rebuild_teacher
from torch_utils import distributed as dist
from training.plots import is_distance, plot_run
from training.run import atomic_write, kimg_label, latest_training_state, save_options
from training.run import load_options as load_run_options

from .generators import TeacherSamplerAdapter, sample_reference


class SetupError(click.ClickException):
    """A problem with the user's input, reported as one line."""


def bf16_ready(teacher: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """For --precision=bf16: an EDM teacher whose pickled source predates autocast support (upstream's, or an older
    version of ours) is rebuilt as our class, which computes in bf16 under autocast; anything else is kept."""
    if supports_autocast(teacher):
        return teacher
    if type(teacher).__name__ not in ('EDMPrecond', 'VPPrecond', 'VEPrecond', 'iDDPMPrecond'):
        return teacher
    return rebuild_teacher(teacher).to(device).train(teacher.training)


def engine_options(fn: Callable) -> Callable:
    """Decorate a click command with every option of the training engine (defaults: the official settings)."""
    options = [
        click.option('--kimg', type=FiniteFloatRange(min=0, min_open=True), default=1000, show_default=True, help='Duration in thousands of generator samples'),
        click.option('--batch', type=click.IntRange(min=1), default=64, show_default=True, help='Global batch size'),
        click.option('--batch-gpu', type=click.IntRange(min=1), help='Samples per process per round (gradient accumulation)'),
        click.option('--divergence', type=click.Choice(['ikl', 'sds', 'sid']), default='ikl', show_default=True, help='Generator objective'),
        click.option('--sigma', type=click.Choice(['lognormal', 'karras', 'fixed']), default='lognormal', show_default=True, help='Noise-level distribution'),
        click.option('--p-mean', type=FINITE_FLOAT, default=-1.2, show_default=True, help='lognormal: mean of ln(sigma) (generator and fake-score losses)'),
        click.option('--p-std', type=FiniteFloatRange(min=0), default=1.2, show_default=True, help='lognormal: std of ln(sigma) (generator and fake-score losses)'),
        click.option('--weighting', type=click.Choice(['denoiser', 'score']), default='denoiser', show_default=True, help='Weight on the score difference'),
        click.option('--normalize', type=bool, default=False, show_default=True, help='Per-sample normalisation (DMD-style)'),
        click.option('--glr', type=FiniteFloatRange(min=0, min_open=True), default=1e-5, show_default=True, help='Generator learning rate'),
        click.option('--lr', type=FiniteFloatRange(min=0, min_open=True), default=1e-5, show_default=True, help='Fake-score learning rate'),
        click.option('--g-beta1', type=FiniteFloatRange(min=0, max=1, max_open=True), default=0.0, show_default=True,
                     help="Generator Adam beta1 (momentum; the fake score's stays 0)"),
        click.option('--g-beta2', type=FiniteFloatRange(min=0, max=1, max_open=True), default=0.999, show_default=True,
                     help="Generator Adam beta2 (StyleGAN2's own training: 0.99, a memory of 100 steps instead of 1000)"),
        click.option('--fake-steps', type=click.IntRange(min=1), default=1, show_default=True, help='Fake-score steps per generator step'),
        click.option('--fake-warmup', type=FiniteFloatRange(min=0), default=0, show_default=True,
                     help='Fit the fake score alone to the generator for this many kimg first'),
        click.option('--warmup', type=FiniteFloatRange(min=0), default=0, show_default=True, help='Learning-rate warm-up, kimg'),
        click.option('--rampdown', type=FiniteFloatRange(min=0), default=0, show_default=True,
                     help='Cosine learning-rate ramp-down to zero over the last N kimg'),
        click.option('--ema', type=FiniteFloatRange(min=0), default=500, show_default=True, help='EMA half-life of the generator, kimg'),
        click.option('--ema-rampup', type=FiniteFloatRange(min=0), default=0.05, show_default=True, help='EMA ramp-up ratio (0: none)'),
        click.option('--max-skipped', type=click.IntRange(min=0), default=50, show_default=True,
                     help='Stop after more non-finite steps than this in a row'),
        click.option('--precision', type=click.Choice(['fp32', 'bf16', 'fp16']), default='fp32', show_default=True, help='Autocast for the forwards (fp16 adds dynamic loss scaling)'),
        click.option('--compile', is_flag=True,
                     help='torch.compile the generator, teacher and fake score (eager, with a warning, if it fails)'),
        click.option('--schedule', type=click.Choice(['reuse', 'official']), default='reuse', show_default=True, help='One generator pass per step, or the official extra pass'),
        click.option('--tick', type=FiniteFloatRange(min=0, min_open=True), default=4, show_default=True, help='kimg per tick (one stats line)'),
        click.option('--snap', type=click.IntRange(min=1), default=10, show_default=True, help='Ticks per snapshot and grid'),
        click.option('--grid', type=click.IntRange(min=0), default=64, show_default=True, help='Images in the sample grids'),
        click.option('--seed', type=int, default=0, show_default=True, help='Random seed'),
        click.option('--metrics', type=str, default='none', show_default=True, help='Metrics at the start and every snapshot, e.g. fid10k_full,kid10k_full'),
        click.option('--metrics-ref', metavar='ZIP|DIR|NPZ', help='Reference for --metrics: dataset or statistics file [default: teacher samples, data-free]'),
        click.option('--metrics-ref-num', type=click.IntRange(min=2), default=10000, show_default=True, help='Teacher samples in the data-free reference'),
        click.option('--detector', type=str, help="Detector for --metrics: inception, vgg16, fmnist, or a file [default: the metric's standard one]"),
        click.option('--device', type=str, help='cuda, cpu, ... (default: cuda if available)'),
        click.option('--refuse-unknown-code', is_flag=True, help='Refuse pickles whose embedded source is not on the allow-list'),
        click.option('--no-progress', is_flag=True, help='No progress bar (a line per tick instead)'),
        click.option('--outdir', type=click.Path(file_okay=False), default='runs', show_default=True, help='Where run directories go'),
        click.option('--resume', type=click.Path(exists=True), help='Run directory to continue (its newest state), or one training-state-*.pt of it'),
        click.option('--dry-run', is_flag=True, help='Print the resolved configuration and exit'),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def training_options(c: dnnlib.EasyDict) -> TrainingOptions:
    """The engine's options from the parsed command line."""
    return TrainingOptions.from_dict(dict(
        total_kimg=c.kimg, batch=c.batch, batch_gpu=c.batch_gpu, divergence=c.divergence, sigma=c.sigma,
        P_mean=c.p_mean, P_std=c.p_std, weighting=c.weighting, normalize=c.normalize, fake_steps=c.fake_steps,
        fake_warmup_kimg=c.get('fake_warmup', 0), fake_P_mean=c.p_mean, fake_P_std=c.p_std,
        g_lr=c.glr, fake_lr=c.lr, g_betas=(c.get('g_beta1', 0.0), c.get('g_beta2', 0.999)), max_skipped_in_row=c.get('max_skipped', 50), lr_warmup_kimg=c.warmup, lr_rampdown_kimg=c.get('rampdown', 0), ema_halflife_kimg=c.ema,
        ema_rampup_ratio=c.ema_rampup if c.ema_rampup > 0 else None, schedule=c.schedule, precision=c.precision,
        compile=bool(c.get('compile', False)),
        adv_weight=c.get('adv', 0.0), adv_lr=c.get('adv_lr', 2e-4), adv_r1_gamma=c.get('adv_r1', 0.01),
        adv_pixel_weight=c.get('adv_pixels', 0.0), adv_pixel_res=c.get('adv_pixels_res', 8),
        adv_pixel_halflife_kimg=c.get('adv_pixels_halflife', 1.0),
        seed=c.seed, tick_kimg=c.tick, snapshot_ticks=c.snap, image_ticks=c.snap, grid_size=c.grid,
        progress=not c.no_progress))


def resume_target(path: str, script: str):
    """`--resume` of a run directory (its newest whole state, found once here) or of one `training-state-*.pt`
    in it: returns (options, run_dir, state file)."""
    run_dir, state = path, None
    if os.path.isfile(path):
        if not re.fullmatch(r'training-state-[0-9.]+\.pt', os.path.basename(path)):
            raise SetupError(f'--resume {path}: expected a run directory or one of its training-state-*.pt files')
        run_dir, state = os.path.dirname(os.path.abspath(path)), path
    c = load_options(run_dir, script)
    c.setdefault('compile', False)  # Runs saved before --compile existed.
    if state is None:
        state = latest_training_state(run_dir)
        if state is None:
            raise SetupError(f'--resume {run_dir}: no training-state-*.pt in this directory (nothing to continue; '
                             f'start a new run instead)')
    return c, run_dir, state


def load_options(run_dir: str, script: str) -> dnnlib.EasyDict:
    """The options a run was started with (for `--resume`)."""
    try:
        c = load_run_options(run_dir)
    except ValueError as err:
        raise SetupError(f'--resume {err}') from None
    if c.pop('script', None) != script:
        raise SetupError(f'--resume {run_dir}: not a {script}.py run directory')
    c.pop('resolved', None)
    return c


def run_name(*sources: str) -> str:
    """A run directory suffix from file names or URLs: 'refine-cifar10-edm-cifar10-32x32-cond-vp'."""
    return '-'.join(os.path.splitext(os.path.basename(str(s).rstrip('/')))[0] for s in sources)


def metric_names(c: dnnlib.EasyDict) -> List[str]:
    return [] if c.metrics in (None, '', 'none') else [m.strip() for m in c.metrics.split(',') if m.strip()]


def summary(run_dir: str, cur_nimg: int) -> str:
    """Where the results are, and each metric first and last (read back from the run's `metric-*.jsonl`, so a
    resumed run still compares with its real start)."""
    lines = [f'Done at {cur_nimg / 1000:g} kimg: {run_dir}',
             f'  grids: fakes_init.png (start), fakes{kimg_label(cur_nimg)}.png (end)']
    for path in sorted(glob.glob(os.path.join(run_dir, 'metric-*.jsonl'))):
        with open(path, encoding='utf-8') as f:
            records = [json.loads(line) for line in f if line.strip()]
        if len(records) < 2:
            continue
        first, last = records[0], records[-1]
        where = 'start' if first.get('snapshot_pkl') is None else os.path.basename(first['snapshot_pkl'])
        for name, value in first['results'].items():
            lines.append(f'  {name}: {value:.4g} at {where} -> {last["results"][name]:.4g} at the end')
    best_path = os.path.join(run_dir, 'best.json')
    if os.path.exists(best_path):
        with open(best_path, encoding='utf-8') as f:
            best = json.load(f)
        lines.append(f'  best: {best["metric"]} {best["value"]:.4g} at {best["snapshot"]} '
                     f'(copied to network-snapshot-best.pkl); curves: curves.png')
    return '\n'.join(lines)


def metrics_hook(c: dnnlib.EasyDict, teacher: torch.nn.Module, to_generator: Callable, run_dir: str,
                 device: torch.device) -> Optional[Callable]:
    """The engine's `on_snapshot`: `--metrics` of the EMA generator (seen through `to_generator(ema)`) against the
    reference, appended to `<run_dir>/metric-<name>.jsonl` and printed. None when no metrics were asked for."""
    names = metric_names(c)
    if not names:
        return None
    if c.metrics_ref:
        reference = c.metrics_ref
    else:  # Data-free: samples of the teacher itself (EDM's 18-step Heun), cached by the teacher file's content.
        reference = sample_reference(c.teacher, TeacherSamplerAdapter(teacher, num_steps=18), num=c.metrics_ref_num)
    try:
        runner = MetricRunner(names, reference=reference, detector=c.detector, device=device, run_dir=run_dir)
    except ValueError as err:
        raise SetupError(f'--metrics: {err}') from None

    def on_snapshot(trainer, snapshot_path: Optional[str]) -> None:
        generator = to_generator(trainer.ema)
        results = runner(generator, snapshot_pkl=snapshot_path)
        where = 'start' if snapshot_path is None else os.path.basename(snapshot_path)
        pixels = pixel_statistics(generator)
        append_jsonl(dict(metric='pixels', results=pixels, snapshot_pkl=snapshot_path), run_dir)
        dist.print0(f'metrics at {where}: ' + ', '.join(f'{k} {v:.4g}' for k, v in {**results, **pixels}.items()))
        if snapshot_path is not None:
            keep_best(run_dir, snapshot_path, results)
        plot_run(run_dir)
    return on_snapshot


def selection_metric(results: dict) -> Optional[str]:
    """The first distance among the results (FID/KID or their renamed FD/KD): what `keep_best` minimises."""
    return next((name for name in results if is_distance(name)), None)


def keep_best(run_dir: str, snapshot_path: str, results: dict) -> None:
    """Keep `network-snapshot-best.pkl` (and `best.json`) at the snapshot with the lowest selection metric so far.
    With the default reference (teacher samples) the choice is data-free."""
    name = selection_metric(results)
    if name is None:
        return
    best_path = os.path.join(run_dir, 'best.json')
    if os.path.exists(best_path):
        with open(best_path, encoding='utf-8') as f:
            best = json.load(f)
        if best['metric'] == name and best['value'] <= results[name]:
            return
    with open(snapshot_path, 'rb') as src:
        data = src.read()
    atomic_write(os.path.join(run_dir, 'network-snapshot-best.pkl'), lambda f: f.write(data))
    record = dict(metric=name, value=results[name], snapshot=os.path.basename(snapshot_path))
    atomic_write(best_path, lambda f: f.write(json.dumps(record, indent=2).encode('utf-8')))


def start(script: str, c: dnnlib.EasyDict, run_dir: str, resume: Optional[str], adapter, teacher: torch.nn.Module,
          fake_score: Optional[torch.nn.Module], device: torch.device, snapshot_fn: Callable = default_snapshot,
          to_generator: Callable = lambda ema: ema, description: str = '', critic=None) -> None:
    """Create the run directory (new runs), save the options, tee the output to log.txt, and train.

    `to_generator(ema)` is what the metrics measure: the EMA adapter seen at the generator's own resolution.
    `critic`: the engine's `ikl.TeacherSampleCritic` for `--adv` (refine.py)."""
    if not resume and dist.get_rank() == 0:
        try:
            run_dir = dnnlib.util.make_run_dir(run_dir, renumber=dist.get_world_size() == 1)  # All ranks share the name.
        except dnnlib.util.RunDirError as err:
            raise SetupError(f'--outdir: {err}') from None
        save_options(run_dir, dict(c, script=script))
    dist.barrier()
    logger = dnnlib.util.Logger(os.path.join(run_dir, 'log.txt'), file_mode='a') if dist.get_rank() == 0 else None
    try:
        dist.print0(f'{description} -> {run_dir}')
        on_snapshot = metrics_hook(c, teacher, to_generator, run_dir, device) if dist.get_rank() == 0 else None
        try:
            trainer = train(adapter, teacher, fake_score, training_options(c), run_dir, device=device,
                            snapshot_fn=snapshot_fn, resume=resume, on_snapshot=on_snapshot, critic=critic)
        except KeyboardInterrupt as err:
            dist.print0(f'Interrupted: {err}')
            sys.exit(130)
        except TrainingDiverged as err:
            raise click.ClickException(f'training diverged: {err}') from None
        if dist.get_rank() == 0:
            plot_run(run_dir)
        dist.print0(summary(run_dir, trainer.cur_nimg))
        dist.shutdown()
    finally:
        if logger is not None:
            logger.close()
