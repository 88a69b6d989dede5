"""The training engine shared by refinement and distillation: one loop over (adapter, teacher, fake score, options).

Per iteration (schedule `reuse`, the default):

1. Generator step. For each accumulation round, the adapter makes `batch_gpu` samples x0 with gradient (the one
   generator forward of the iteration); the divergence draws sigma and noise, runs the teacher (no autograd) and
   the fake score on the detached x_t and returns the surrogate loss; its backward reaches the generator only.
   Gradients are summed over rounds and processes (one all-reduce), checked for NaN/Inf, unscaled, and applied.
2. Fake-score steps (`fake_steps` = k; the kinds are objects in `ikl.fake_scores`). The first trains on the same
   x0, detached, with EDM's DSM loss. A `SharedForwardFakeScore` (IKL, same lognormal law for both losses) even
   reuses the fake score's forward of step 1, kept with its graph: DSM at (x0, sigma, noise) is exactly what that forward computed, and the fake's
   weights do not change in between, so the one backward of step 1 also yields the fake's gradient. Per
   iteration this costs one generator forward+backward, one teacher forward and one fake forward+backward: the
   passes no schedule can avoid. The only statistical difference from separate draws is that the generator's
   and the fake's losses share their (sigma, noise) draws. Further fake steps draw fresh no-grad samples.
   An `ObservingFakeScore` is not fitted: it is handed the same samples, gathered from all processes.
   Order and effect: the fake score fits samples of the generator *before* this iteration's update, and the next
   generator step uses it, so it lags the generator by one step (the official schedule fits the fake score to the
   current generator, then updates the generator, at the cost of a second generator forward). At the small
   learning rates of Diff-Instruct the lag is one small step; `schedule='official'` reproduces the upstream order
   (fake step on an extra no-grad generator pass, then the generator step on fresh samples) for comparison.
3. With a critic (`ikl.critic`, `adv_weight > 0`): its softplus(-D(x0)) joins the generator's loss in step 1,
   and after the generator's update the critic takes one step on step 1's samples against teacher samples.
4. EMA of the generator (half-life in kimg, ramp-up ratio; parameters are averaged, buffers copied).

With `compile`, the adapter's networks, the teacher and a fitted fake score run through torch.compile (compiled in
place by `torch_utils.compiling`, so state dicts, copies and snapshots are unchanged; eager again, with one warning,
where compilation fails). Compilation happens at the first iteration, whose time is logged.

Randomness is a function of counters: every accumulation chunk of every iteration gets its own generator seeded
from (seed, iteration, purpose, global chunk index), and torch's global RNG (dropout) is reseeded the same way.
Hence exact resume needs no RNG bookkeeping, and N processes with `batch_gpu` b see the same samples as one process
accumulating N rounds of b.
"""

import copy
import dataclasses
import math
import os
import pickle
import time
from typing import Callable, Dict, Optional, Union

import torch

from torch_utils import compiling
from torch_utils import distributed as dist
from torch_utils import misc
from torch_utils import training_stats
from training.run import Run, atomic_write, counter_seed, ema_beta, kimg_label, latest_training_state, update_ema

from .adapters import GeneratorAdapter
from .critic import TeacherSampleCritic
from .divergences import autocast, edm_dsm_loss
from .fake_scores import FakeScore, FittedFakeScore, make_fake_score
from .images import save_preview
from .options import AMP_DTYPES, TrainingOptions, build_divergence
from .sigmas import LogNormal
from .updates import LossScaler, apply_update

# ----------------------------------------------------------------------------------------------------------------


def default_snapshot(adapter: GeneratorAdapter, ema: GeneratorAdapter, fake_score: Optional[torch.nn.Module]) -> Dict:
    """What `network-snapshot-*.pkl` holds by default: the EMA adapter's export, plus the fake score."""
    data = dict(ema.export())
    if fake_score is not None:
        data['fake_score'] = copy.deepcopy(fake_score).eval().requires_grad_(False).cpu()
    return data


# ----------------------------------------------------------------------------------------------------------------


class Trainer:
    """Holds the networks, optimisers and counters of one run; `run()` trains to `total_kimg`.

    `fake_score`: a denoiser module (fitted by DSM, see `ikl.fake_scores.make_fake_score`), any other
    `ikl.fake_scores.FakeScore`, or None for a divergence that needs none. `critic`: a `TeacherSampleCritic`,
    required when `adv_weight > 0` and refused otherwise."""

    def __init__(self, adapter: GeneratorAdapter, teacher: torch.nn.Module,
                 fake_score: Union[torch.nn.Module, FakeScore, None], options: Union[Dict, TrainingOptions],
                 run_dir: str, device: Optional[torch.device] = None, snapshot_fn: Callable = default_snapshot,
                 on_snapshot: Optional[Callable] = None, critic: Optional[TeacherSampleCritic] = None):
        self.opts = TrainingOptions.from_dict(options)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.opts.check(self.world)
        self.device = torch.device(device) if device is not None else dist.get_device()
        self.run_dir = run_dir
        self.snapshot_fn = snapshot_fn
        self.on_snapshot = on_snapshot  # on_snapshot(trainer, snapshot_path or None): e.g. metrics, on rank 0.
        self.batch_gpu = self.opts.batch_gpu or self.opts.batch // self.world
        self.rounds = self.opts.batch // (self.batch_gpu * self.world)
        self.amp = AMP_DTYPES[self.opts.precision]

        self.divergence = build_divergence(self.opts)
        self.tracking_sigma = LogNormal(self.opts.fake_P_mean, self.opts.fake_P_std)
        self.teacher = teacher.to(self.device).eval().requires_grad_(False)
        self.fake = self._fake_score(fake_score, teacher)
        self.fake_score = None if self.fake is None else self.fake.net  # What the divergences call.
        if (critic is None) != (self.opts.adv_weight == 0):
            raise ValueError(f'critic: adv_weight={self.opts.adv_weight:g} needs a critic exactly when it is > 0')
        self.critic = None if critic is None else critic.to(self.device)
        self.adapter = adapter.to(self.device)
        if self.opts.precision == 'fp16':
            for net in [self.teacher, self.fake_score, *self.adapter.children()]:
                if net is not None and isinstance(getattr(net, 'use_fp16', None), bool):
                    net.use_fp16 = True
        self.ema = copy.deepcopy(self.adapter).eval().requires_grad_(False)
        if self.opts.compile:
            self._compile_networks()

        self.g_params = [p for p in self.adapter.parameters() if p.requires_grad]
        if not self.g_params:
            raise ValueError('generator adapter: no trainable parameters (all have requires_grad=False)')
        self.g_opt = misc.make_adam(self.g_params, lr=self.opts.g_lr, betas=tuple(self.opts.g_betas), eps=self.opts.adam_eps)
        self.g_scaler = LossScaler(self.opts.precision == 'fp16', self.opts.loss_scale_init, self.opts.loss_scale_growth_interval)

        self.iteration = 0
        self.cur_nimg = 0
        self.cur_tick = 0
        self.tick_start_nimg = 0
        self._tick_params = None  # The generator's parameters at the last tick, for `Tracking/g_update`.

    def _fake_score(self, fake_score, teacher) -> Optional[FakeScore]:
        if not self.divergence.needs_fake_score:
            return None
        if fake_score is None:
            raise ValueError(f'divergence {self.opts.divergence!r} needs a fake-score network (usually a copy of the teacher)')
        given = isinstance(fake_score, FakeScore)
        net = fake_score.net if given else fake_score
        if net is teacher:
            raise ValueError('fake score: pass a copy of the teacher (copy.deepcopy), not the teacher itself')
        net.to(self.device).requires_grad_(True)
        return fake_score if given else make_fake_score(net, self.opts)

    def _compile_networks(self) -> None:
        """`compile`: the adapter's networks (its direct children), the teacher and a fitted fake score run through
        torch.compile, in place (`torch_utils.compiling`: eager again where compilation fails). The EMA copy, the
        critic and snapshots stay eager."""
        targets = [(f'generator ({name})', net) for name, net in self.adapter.named_children()]
        targets.append(('teacher', self.teacher))
        if isinstance(self.fake, FittedFakeScore):
            targets.append(('fake score', self.fake_score))
        for name, net in targets:
            compiling.compile_module(net, name, log=dist.print0)

    # -- what the fake score's steps use ----------------------------------------------------------------------

    def seed(self, purpose: int, round_idx: int) -> int:
        """A 63-bit seed for one (iteration, purpose, global chunk)."""
        return counter_seed(self.opts.seed, self.iteration, purpose, round_idx * self.world + self.rank)

    def rng(self, purpose: int, round_idx: int) -> torch.Generator:
        """Generator for one chunk; also reseeds torch's global RNG so dropout is reproducible."""
        seed = self.seed(purpose, round_idx)
        torch.manual_seed(seed)
        return torch.Generator(device=self.device).manual_seed(seed)

    def lr_factor(self) -> float:
        """Linear warm-up from zero, then a cosine ramp-down that reaches zero at total_kimg. A late ramp-down lets
        the generator settle where a constant lr keeps it jittering (sharper modes in `experiments/toy2d/toy2d.py`)."""
        o, kimg = self.opts, self.cur_nimg / 1000
        factor = min(kimg / o.lr_warmup_kimg, 1.0) if o.lr_warmup_kimg > 0 else 1.0
        if o.lr_rampdown_kimg > 0:
            left = min(max(o.total_kimg - kimg, 0.0) / o.lr_rampdown_kimg, 1.0)
            factor *= 0.5 - 0.5 * math.cos(math.pi * left)
        return factor

    def update(self, params, optimizer, scaler: LossScaler, lr: float, name: str) -> Union[bool, torch.Tensor]:
        """One guarded update of `params` (see `ikl.updates.apply_update`; a device flag where it decides there)."""
        return apply_update(params, optimizer, scaler, lr, name, self.world, self.opts.max_skipped_in_row)

    def gathered(self, x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """x from every process, concatenated in rank order (x itself with one process)."""
        if x is None or self.world == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world)]
        torch.distributed.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    # -- one iteration ----------------------------------------------------------------------------------------

    def _generator_step(self) -> list:
        """The Diff-Instruct update of the generator (and, with a shared fake forward, the fake score's first
        update). Returns the samples, detached, per accumulation round."""
        o = self.opts
        share = self.fake is not None and self.fake.shares_generator_forward
        self.adapter.train()
        self.teacher.train(o.step_dropout)
        if self.fake_score is not None:
            self.fake_score.train(o.step_dropout)
        samples = []
        for r in range(self.rounds):
            gen = self.rng(0, r)
            with autocast(self.adapter, self.device, self.amp):
                x0, labels = self.adapter.sample(self.batch_gpu, gen)
            x0 = x0.float()
            kwargs = dict(dropout_seed=self.seed(3, r))
            if share:
                loss, fake_fwd = self.divergence.generator_loss(x0, labels, self.teacher, self.fake_score, gen,
                                                                keep_fake_graph=True, **kwargs)
                total = loss.sum() * self.g_scaler.factor(o.g_loss_scale / o.batch) + self.fake.loss_from_forward(fake_fwd)
            else:
                loss = self.divergence.generator_loss(x0, labels, self.teacher, self.fake_score, gen, **kwargs)
                total = loss.sum() * self.g_scaler.factor(o.g_loss_scale / o.batch)
            if self.critic is not None:
                total = total + self.critic.generator_loss(x0, labels).sum() * self.g_scaler.factor(o.g_loss_scale / o.batch)
            total.backward()
            samples.append((x0.detach(), None if labels is None else labels.detach()))
        self.teacher.eval()
        self.update(self.g_params, self.g_opt, self.g_scaler, o.g_lr * self.lr_factor(), 'G')
        if share:
            self.fake.apply(self)
        return samples

    def fresh_samples(self, purpose: int, r: int):
        self.adapter.eval()
        with torch.no_grad(), autocast(self.adapter, self.device, self.amp):
            x, labels = self.adapter.sample(self.batch_gpu, self.rng(purpose, r))
        self.adapter.train()
        return x.float(), labels

    def _fake_steps(self, reused: Optional[list] = None, first: int = 0) -> None:
        """Fake-score steps `first`.. of this iteration: step 0 on the generator step's samples when given, the
        others on fresh no-grad samples."""
        for k in range(first, self.opts.fake_steps):
            if k == 0 and reused is not None:
                self.fake.step(self, reused.__getitem__, k)
            else:
                self.fake.step(self, lambda r, k=k: self.fresh_samples(1 + 2 * k, r), k)

    @torch.no_grad()
    def _report_tracking(self) -> None:
        """Once per tick: how well the fake score tracks the generator, and how far the generator moved.

        On one global batch of fresh samples (never trained on), the fake score's and the teacher's DSM losses are
        computed at the same (sigma, noise) draws. The fake score is useful only while its loss stays below the
        teacher's on the generator's own samples: the gap is the information the IKL gradient is made from.
        `g_update` is the relative parameter change since the last tick (|theta - theta_prev| / |theta_prev|)."""
        o = self.opts
        if self.fake_score is not None:
            self.fake_score.eval()
            for r in range(self.rounds):
                x, labels = self.fresh_samples(1000, r)  # Purposes far above the fake steps' 1 + 2k, 2 + 2k.
                seed = self.seed(1001, r)
                fake = edm_dsm_loss(self.fake_score, x, labels, self.tracking_sigma,
                                    torch.Generator(device=self.device).manual_seed(seed), o.sigma_data, self.amp)
                teacher = edm_dsm_loss(self.teacher, x, labels, self.tracking_sigma,
                                       torch.Generator(device=self.device).manual_seed(seed), o.sigma_data, self.amp)
                training_stats.report('Tracking/dsm_fake', fake)
                training_stats.report('Tracking/dsm_teacher', teacher)
                training_stats.report('Tracking/dsm_gap', teacher - fake)
            self.fake_score.train()
        now = torch.cat([p.detach().flatten().float() for p in self.g_params])
        if self._tick_params is not None:
            change = (now - self._tick_params).norm() / self._tick_params.norm().clamp_min(1e-12)
            training_stats.report0('Tracking/g_update', change)
        self._tick_params = now

    def _check_diverged(self) -> None:
        """Once per tick: the deferred stop of updates decided on the device (`ikl.updates`); on the host path the
        stop already happened at the step."""
        scalers = [('G', self.g_scaler), ('fake', getattr(self.fake, 'scaler', None)),
                   ('critic', getattr(self.critic, 'scaler', None))]
        for name, scaler in scalers:
            if scaler is not None:
                scaler.check_diverged(self.opts.max_skipped_in_row, name)

    def _update_ema(self) -> None:
        o = self.opts
        update_ema(self.ema, self.adapter, ema_beta(o.batch, self.cur_nimg, o.ema_halflife_kimg, o.ema_rampup_ratio))

    def step(self) -> None:
        """One iteration: generator update, fake-score update(s), EMA (order per `schedule`). During the fake-score
        warm-up only the fake score trains, on no-grad samples; the iteration still counts its samples."""
        warming_up = self.fake is not None and self.cur_nimg < self.opts.fake_warmup_kimg * 1000
        if self.critic is not None and not warming_up:
            self.critic.prepare(self)
        if warming_up:
            self._fake_steps()
            if self.critic is not None:
                self.critic.step(self, lambda r: self.fresh_samples(902, r))
        elif self.fake is not None and self.opts.schedule == 'official':
            self._fake_steps()
            samples = self._generator_step()
            if self.critic is not None:
                self.critic.step(self, samples.__getitem__)
        else:
            samples = self._generator_step()
            if self.fake is not None:
                self._fake_steps(reused=samples, first=int(self.fake.shares_generator_forward))
            if self.critic is not None:
                self.critic.step(self, samples.__getitem__)
        self._update_ema()
        self.cur_nimg += self.opts.batch
        self.iteration += 1

    # -- state ------------------------------------------------------------------------------------------------

    def state_dict(self) -> Dict:
        state = dict(version=1, options=dataclasses.asdict(self.opts), world_size=self.world,
                     counters=dict(iteration=self.iteration, cur_nimg=self.cur_nimg, cur_tick=self.cur_tick,
                                   tick_start_nimg=self.tick_start_nimg),
                     adapter=self.adapter.state_dict(), ema=self.ema.state_dict(),
                     g_opt=self.g_opt.state_dict(), g_scaler=self.g_scaler.state_dict(),
                     torch_rng=torch.get_rng_state())
        if self.fake is not None:
            state.update(self.fake.state_dict())
        if self.critic is not None:
            state.update(self.critic.state_dict())
        if self.device.type == 'cuda':
            state['cuda_rng'] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: Dict) -> None:
        if state.get('version') != 1:
            raise ValueError('training state: unknown format version (expected 1)')
        for key, value in state['counters'].items():
            setattr(self, key, int(value))
        self.adapter.load_state_dict(state['adapter'])
        self.ema.load_state_dict(state['ema'])
        self.g_opt.load_state_dict(state['g_opt'])
        self.g_scaler.load_state_dict(state['g_scaler'])
        if self.fake is not None:
            self.fake.load_state_dict(state)
        if self.critic is not None:
            self.critic.load_state_dict(state)
        torch.set_rng_state(state['torch_rng'])
        if 'cuda_rng' in state and self.device.type == 'cuda':
            torch.cuda.set_rng_state(state['cuda_rng'], self.device)

    def resume(self, path: str) -> None:
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except (OSError, RuntimeError, pickle.UnpicklingError) as err:
            raise ValueError(f'resume: cannot read training state {path!r}: {err}') from None
        self.load_state_dict(state)
        saved = state['options']
        for key in ('batch', 'seed', 'divergence', 'sigma', 'weighting', 'schedule'):
            if saved.get(key) != getattr(self.opts, key):
                dist.print0(f'Warning: resuming with {key}={getattr(self.opts, key)!r} (state has {saved.get(key)!r}); '
                            'the run will not match an uninterrupted one.')

    # -- outputs ----------------------------------------------------------------------------------------------

    def _kimg_name(self, prefix: str, ext: str) -> str:
        return os.path.join(self.run_dir, f'{prefix}-{kimg_label(self.cur_nimg)}.{ext}')

    def save_snapshot(self) -> None:
        if self.rank == 0:
            data = self.snapshot_fn(self.adapter, self.ema, self.fake_score)
            path = self._kimg_name('network-snapshot', 'pkl')
            atomic_write(path, lambda f: pickle.dump(data, f))
            if self.on_snapshot is not None:
                self.on_snapshot(self, path)

    def save_state(self) -> None:
        if self.rank == 0:
            state = self.state_dict()
            atomic_write(self._kimg_name('training-state', 'pt'), lambda f: torch.save(state, f))

    @torch.no_grad()
    def save_preview(self, name: str) -> None:
        if self.rank != 0 or self.opts.grid_size <= 0:
            return
        gen = torch.Generator(device=self.device).manual_seed(self.opts.seed)
        samples, _ = self.ema.preview(self.opts.grid_size, gen)
        save_preview(samples.float(), os.path.join(self.run_dir, name))

    # -- the loop ---------------------------------------------------------------------------------------------

    def run(self, resume: Optional[str] = None) -> None:
        """Train to `total_kimg`. `resume`: a training-state path, 'auto' (latest in run_dir, if any) or None.
        Ctrl-C finishes the step, saves a snapshot and the state, and raises KeyboardInterrupt."""
        o = self.opts
        if resume == 'auto':
            resume = latest_training_state(self.run_dir)
        if resume:
            self.resume(resume)
            dist.print0(f'Resuming from {resume} at {self.cur_nimg / 1000:.1f} kimg')
        if self.rank == 0:
            os.makedirs(self.run_dir, exist_ok=True)
            if self.cur_nimg == 0:
                self.save_preview('fakes_init.png')
                if self.on_snapshot is not None:
                    self.on_snapshot(self, None)  # The starting point, for before/after comparisons.
        clock = Run(self.run_dir, o.total_kimg, o.tick_kimg, o.snapshot_ticks, o.batch, progress=o.progress,
                    desc='ikl', tensorboard=o.tensorboard, log_file=False, rank=self.rank, world_size=self.world)
        clock.load_state_dict(dict(cur_nimg=self.cur_nimg, cur_tick=self.cur_tick, tick_start_nimg=self.tick_start_nimg))
        try:
            first = o.compile
            while not clock.done:
                start = time.perf_counter()
                self.step()
                if first:
                    first = False
                    dist.print0(f'compile: first iteration {time.perf_counter() - start:.1f} s (compilation included)')
                if not clock.advance(o.batch):
                    continue
                self._check_diverged()
                self._report_tracking()
                training_stats.report0('Progress/loss_scale_G', self.g_scaler.scale)
                training_stats.report0('Progress/skipped_total_G', self.g_scaler.skipped)
                stats = clock.end_tick()
                self.cur_tick, self.tick_start_nimg = clock.cur_tick, clock.tick_start_nimg
                if not o.progress:
                    fake = stats.get('Loss/fake_score')
                    fake_loss = f'fake_loss {fake.mean:<8.4g} ' if fake is not None and fake.num else ''
                    clock.log(f'tick {self.cur_tick - 1:<5d} kimg {self.cur_nimg / 1000:<9.1f} '
                              f"sec/kimg {stats['Timing/sec_per_kimg'].mean:<8.2f} {fake_loss}skipped {self.g_scaler.skipped}")
                if clock.snapshot_due:
                    self.save_snapshot()
                    self.save_state()
                if clock.done or (o.image_ticks and self.cur_tick % o.image_ticks == 0):
                    self.save_preview(f'fakes{kimg_label(self.cur_nimg)}.png')
        finally:
            clock.close()

# ----------------------------------------------------------------------------------------------------------------


def train(adapter: GeneratorAdapter, teacher: torch.nn.Module, fake_score: Optional[torch.nn.Module],
          options: Union[Dict, TrainingOptions], run_dir: str, device: Optional[torch.device] = None,
          snapshot_fn: Callable = default_snapshot, resume: Optional[str] = None,
          on_snapshot: Optional[Callable] = None, critic: Optional[TeacherSampleCritic] = None) -> Trainer:
    """Build a Trainer and run it to `options.total_kimg`; returns the trainer (its `ema`, `adapter`, counters).

    `on_snapshot(trainer, path)` runs on rank 0 after every snapshot is written, and once before training starts
    (path None); refine.py and distill.py compute their `--metrics` there."""
    trainer = Trainer(adapter, teacher, fake_score, options, run_dir, device=device, snapshot_fn=snapshot_fn,
                      on_snapshot=on_snapshot, critic=critic)
    trainer.run(resume=resume)
    return trainer

# ----------------------------------------------------------------------------------------------------------------
