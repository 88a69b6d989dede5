"""The training engine shared by refinement and distillation: one loop over (adapter, teacher, fake score, options).

Per iteration (schedule `reuse`, the default):

1. Generator step. For each accumulation round, the adapter makes `batch_gpu` samples x0 with gradient (the one
   generator forward of the iteration); the divergence draws sigma and noise, runs the teacher (no autograd) and
   the fake score on the detached x_t and returns the surrogate loss; its backward reaches the generator only.
   Gradients are summed over rounds and processes (one all-reduce), checked for NaN/Inf, unscaled, and applied.
2. Fake-score steps (`fake_steps` = k). The first trains on the same x0, detached, with EDM's DSM loss. With
   `fake_forward='shared'` (IKL, same lognormal law for both losses) it even reuses the fake score's forward of
   step 1, kept with its graph: DSM at (x0, sigma, noise) is exactly what that forward computed, and the fake's
   weights do not change in between, so the one backward of step 1 also yields the fake's gradient. Per
   iteration this costs one generator forward+backward, one teacher forward and one fake forward+backward: the
   passes no schedule can avoid. The only statistical difference from separate draws is that the generator's
   and the fake's losses share their (sigma, noise) draws. Further fake steps draw fresh no-grad samples.
   A fake score with an `observe` method (`ikl.toy.EmpiricalDenoiser`, the exact denoiser of recent samples) is
   not fitted: it is handed the same samples, gathered from all processes, and needs no optimizer.
   Order and effect: the fake score fits samples of the generator *before* this iteration's update, and the next
   generator step uses it, so it lags the generator by one step (the official schedule fits the fake score to the
   current generator, then updates the generator, at the cost of a second generator forward). At the small
   learning rates of Diff-Instruct the lag is one small step; `schedule='official'` reproduces the upstream order
   (fake step on an extra no-grad generator pass, then the generator step on fresh samples) for comparison.
3. EMA of the generator (half-life in kimg, ramp-up ratio; parameters are averaged, buffers copied).

Randomness is a function of counters: every accumulation chunk of every iteration gets its own generator seeded
from (seed, iteration, purpose, global chunk index), and torch's global RNG (dropout) is reseeded the same way.
Hence exact resume needs no RNG bookkeeping, and N processes with `batch_gpu` b see the same samples as one process
accumulating N rounds of b.
"""

import copy
import dataclasses
import json
import math
import os
import pickle
import time
from typing import Callable, Dict, Optional, Union

import numpy as np
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import training_stats
from torch_utils.run_files import atomic_write, kimg_label, latest_training_state

from .adapters import GeneratorAdapter
from .divergences import Divergence, autocast, dsm_from_forward, edm_dsm_loss, make_divergence
from .images import save_preview
from .sigmas import LogNormal, make_sigma_distribution

# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainingOptions:
    """Every knob of the engine, JSON-serialisable. Defaults reproduce the official Diff-Instruct settings."""

    # Duration and batch.
    total_kimg: float = 10000.0     # Generator samples to train on, in thousands.
    batch: int = 128                # Global batch per iteration (generator samples).
    batch_gpu: Optional[int] = None  # Samples per process per accumulation round (None: batch / world size).
    # The divergence and its noise levels.
    divergence: str = 'ikl'         # ikl | sds | sid
    sigma: str = 'lognormal'        # lognormal | karras | fixed  (ikl.sigmas)
    P_mean: float = -1.2            # lognormal: mean of ln(sigma).
    P_std: float = 1.2              # lognormal: std of ln(sigma).
    sigma_min: float = 0.002        # karras: schedule range and shape...
    sigma_max: float = 80.0
    rho: float = 7.0
    karras_steps: int = 1000
    t_min: float = 0.0              # karras: sub-range of the schedule, 0 = sigma_max end, 1 = sigma_min end.
    t_max: float = 1.0
    sigma_fixed: float = 0.002      # fixed: the single sigma (small: the t = 0 limit, i.e. plain KL).
    weighting: str = 'denoiser'     # denoiser (official: unit weight on D_fake - D_teacher) | score
    normalize: bool = False         # Divide each sample's update by mean|x0 - D_teacher| (DMD-style).
    sid_alpha: float = 1.2          # sid: alpha of the Fisher-divergence loss.
    # The fake score (EDM denoising score matching on generator samples).
    fake_steps: int = 1             # Fake-score updates per generator update.
    fake_warmup_kimg: float = 0.0   # First fit the fake score alone on this many thousand generator samples (0: none).
    fake_P_mean: float = -1.2
    fake_P_std: float = 1.2
    sigma_data: float = 0.5
    # Optimisers.
    g_lr: float = 1e-5
    fake_lr: float = 1e-5
    betas: tuple = (0.0, 0.999)
    adam_eps: float = 1e-8
    lr_warmup_kimg: float = 0.0     # Linear ramp of both learning rates (0: none).
    lr_rampdown_kimg: float = 0.0   # Cosine ramp of both learning rates to zero over the last N kimg (0: none).
    g_loss_scale: float = 1.0       # Static multipliers (official --ls / --sgls).
    fake_loss_scale: float = 1.0
    # EMA of the generator.
    ema_halflife_kimg: float = 500.0
    ema_rampup_ratio: Optional[float] = 0.05
    # Execution.
    schedule: str = 'reuse'         # reuse (one generator forward per iteration) | official (an extra no-grad pass)
    fake_forward: str = 'shared'    # shared (DSM reuses the generator step's fake forward when the sigma laws agree) | separate
    step_dropout: bool = True       # Teacher and fake in train mode (dropout, same masks) in the generator step, as upstream;
                                    # off: both in eval mode (then a shared DSM forward is dropout-free too).
    precision: str = 'fp32'         # fp32 | bf16 (autocast) | fp16 (autocast + dynamic loss scaling). Networks with their
                                    # own `use_fp16` (EDM, StyleGAN2) skip autocast; for fp16 the teacher's, the fake's
                                    # and the adapter's direct children's `use_fp16` is switched on (fp16 on CUDA only).
    loss_scale_init: float = 2.0 ** 15
    loss_scale_growth_interval: int = 1000
    seed: int = 0
    # Reporting.
    tick_kimg: float = 10.0
    snapshot_ticks: Optional[int] = 50   # Network pickle and training state every N ticks (None: only at the end).
    image_ticks: Optional[int] = 50      # Preview PNG every N ticks (None: only at the end).
    grid_size: int = 64                  # Samples in the preview.
    tensorboard: bool = True             # Only used if tensorboard is installed.
    progress: bool = True                # tqdm bar with kimg/s and ETA on rank 0.

    @classmethod
    def from_dict(cls, values: Union[Dict, 'TrainingOptions']) -> 'TrainingOptions':
        if isinstance(values, cls):
            return copy.deepcopy(values)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f'training options: unknown option(s) {unknown}; known: {sorted(known)}')
        opts = cls(**values)
        opts.betas = tuple(opts.betas)
        return opts

    def to_dict(self) -> dnnlib.EasyDict:
        return dnnlib.EasyDict(dataclasses.asdict(self))

    def check(self, world_size: int) -> None:
        batch_gpu = self.batch_gpu or self.batch // world_size
        if self.batch <= 0 or batch_gpu <= 0 or self.batch % (batch_gpu * world_size) != 0:
            raise ValueError(f'training options: batch={self.batch} must be a positive multiple of batch_gpu={batch_gpu} '
                             f'x world size {world_size}')
        choices = dict(schedule=('reuse', 'official'), precision=('fp32', 'bf16', 'fp16'), fake_forward=('shared', 'separate'))
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f'training options: {name}={getattr(self, name)!r}, expected one of {list(allowed)}')
        if (self.fake_steps < 1 or self.total_kimg <= 0 or self.tick_kimg <= 0
                or min(self.fake_warmup_kimg, self.lr_warmup_kimg, self.lr_rampdown_kimg) < 0):
            raise ValueError('training options: fake_steps >= 1, total_kimg > 0, tick_kimg > 0 and fake_warmup_kimg, '
                             'lr_warmup_kimg, lr_rampdown_kimg >= 0 are required')


def build_divergence(opts: TrainingOptions) -> Divergence:
    kwargs = dict(lognormal=dict(P_mean=opts.P_mean, P_std=opts.P_std),
                  karras=dict(sigma_min=opts.sigma_min, sigma_max=opts.sigma_max, rho=opts.rho,
                              num_steps=opts.karras_steps, t_min=opts.t_min, t_max=opts.t_max),
                  fixed=dict(sigma=opts.sigma_fixed)).get(opts.sigma, {})
    sigma = make_sigma_distribution(opts.sigma, **kwargs)
    return make_divergence(opts.divergence, sigma, opts.weighting, opts.normalize, opts.sid_alpha, _AMP[opts.precision])


_AMP = dict(fp32=None, bf16=torch.bfloat16, fp16=torch.float16)

# ----------------------------------------------------------------------------------------------------------------


class LossScaler:
    """Dynamic loss scaling plus the NaN/Inf guard: a step with non-finite gradients is skipped and counted, and
    (when scaling is on) the scale halves; after `growth_interval` good steps in a row it doubles. With scaling
    off the scale stays 1 and only the guard acts."""

    def __init__(self, enabled: bool, init_scale: float = 2.0 ** 15, growth_interval: int = 1000):
        self.enabled = enabled
        self.scale = float(init_scale) if enabled else 1.0
        self.growth_interval = growth_interval
        self.good_steps = 0
        self.skipped = 0

    def update(self, finite: bool) -> None:
        if not finite:
            self.skipped += 1
            self.good_steps = 0
            if self.enabled:
                self.scale = max(self.scale * 0.5, 1.0 / 2 ** 24)
            return
        self.good_steps += 1
        if self.enabled and self.good_steps >= self.growth_interval:
            self.scale = min(self.scale * 2.0, 2.0 ** 24)
            self.good_steps = 0

    def state_dict(self) -> Dict:
        return dict(scale=self.scale, good_steps=self.good_steps, skipped=self.skipped)

    def load_state_dict(self, state: Dict) -> None:
        self.scale, self.good_steps, self.skipped = float(state['scale']), int(state['good_steps']), int(state['skipped'])


def default_snapshot(adapter: GeneratorAdapter, ema: GeneratorAdapter, fake_score: Optional[torch.nn.Module]) -> Dict:
    """What `network-snapshot-*.pkl` holds by default: the EMA adapter's export, plus the fake score."""
    data = dict(ema.export())
    if fake_score is not None:
        data['fake_score'] = copy.deepcopy(fake_score).eval().requires_grad_(False).cpu()
    return data


# ----------------------------------------------------------------------------------------------------------------


class Trainer:
    """Holds the networks, optimisers and counters of one run; `run()` trains to `total_kimg`."""

    def __init__(self, adapter: GeneratorAdapter, teacher: torch.nn.Module, fake_score: Optional[torch.nn.Module],
                 options: Union[Dict, TrainingOptions], run_dir: str, device: Optional[torch.device] = None,
                 snapshot_fn: Callable = default_snapshot, on_snapshot: Optional[Callable] = None):
        self.opts = TrainingOptions.from_dict(options)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.opts.check(self.world)
        self.device = torch.device(device) if device is not None else dist.get_device()
        self.run_dir = run_dir
        self.snapshot_fn = snapshot_fn
        self.on_snapshot = on_snapshot  # on_snapshot(trainer, snapshot_path or None): e.g. metrics, on rank 0.
        self.batch_gpu = self.opts.batch_gpu or self.opts.batch // self.world
        self.rounds = self.opts.batch // (self.batch_gpu * self.world)
        self.amp = _AMP[self.opts.precision]

        self.divergence = build_divergence(self.opts)
        self.fake_sigma = LogNormal(self.opts.fake_P_mean, self.opts.fake_P_std)
        if self.divergence.needs_fake_score and fake_score is None:
            raise ValueError(f'divergence {self.opts.divergence!r} needs a fake-score network (usually a copy of the teacher)')
        if fake_score is not None and fake_score is teacher:
            raise ValueError('fake score: pass a copy of the teacher (copy.deepcopy), not the teacher itself')
        self.fake_score = fake_score.to(self.device).requires_grad_(True) if self.divergence.needs_fake_score else None
        self.teacher = teacher.to(self.device).eval().requires_grad_(False)
        self.adapter = adapter.to(self.device)
        if self.opts.precision == 'fp16':
            for net in [self.teacher, self.fake_score, *self.adapter.children()]:
                if net is not None and isinstance(getattr(net, 'use_fp16', None), bool):
                    net.use_fp16 = True
        self.ema = copy.deepcopy(self.adapter).eval().requires_grad_(False)

        betas, eps = tuple(self.opts.betas), self.opts.adam_eps
        self.g_params = [p for p in self.adapter.parameters() if p.requires_grad]
        if not self.g_params:
            raise ValueError('generator adapter: no trainable parameters (all have requires_grad=False)')
        self.g_opt = torch.optim.Adam(self.g_params, lr=self.opts.g_lr, betas=betas, eps=eps)
        self.g_scaler = LossScaler(self.opts.precision == 'fp16', self.opts.loss_scale_init, self.opts.loss_scale_growth_interval)
        # A fake score with an `observe(samples, labels)` method (ikl.toy.EmpiricalDenoiser) is not fitted by DSM:
        # each fake-score step hands it the generator's detached samples, gathered from every process.
        self.fake_observes = self.fake_score is not None and callable(getattr(self.fake_score, 'observe', None))
        self.fake_fits = self.fake_score is not None and not self.fake_observes
        if self.fake_fits:
            self.fake_params = [p for p in self.fake_score.parameters() if p.requires_grad]
            self.fake_opt = torch.optim.Adam(self.fake_params, lr=self.opts.fake_lr, betas=betas, eps=eps)
            self.fake_scaler = LossScaler(self.opts.precision == 'fp16', self.opts.loss_scale_init, self.opts.loss_scale_growth_interval)

        self.iteration = 0
        self.cur_nimg = 0
        self.cur_tick = 0
        self.tick_start_nimg = 0

    # -- randomness -------------------------------------------------------------------------------------------

    def _seed(self, purpose: int, round_idx: int) -> int:
        """A 63-bit seed for one (iteration, purpose, global chunk)."""
        chunk = round_idx * self.world + self.rank
        words = np.random.SeedSequence([self.opts.seed, self.iteration, purpose, chunk]).generate_state(2, np.uint32)
        return (int(words[0]) << 31 | int(words[1])) & (2 ** 63 - 1)

    def _rng(self, purpose: int, round_idx: int) -> torch.Generator:
        """Generator for one chunk; also reseeds torch's global RNG so dropout is reproducible."""
        seed = self._seed(purpose, round_idx)
        torch.manual_seed(seed)
        return torch.Generator(device=self.device).manual_seed(seed)

    # -- one iteration ----------------------------------------------------------------------------------------

    def _lr_factor(self) -> float:
        """Linear warm-up from zero, then a cosine ramp-down that reaches zero at total_kimg. A late ramp-down lets
        the generator settle where a constant lr keeps it jittering (sharper modes in `bench/toy2d.py`)."""
        o, kimg = self.opts, self.cur_nimg / 1000
        factor = min(kimg / o.lr_warmup_kimg, 1.0) if o.lr_warmup_kimg > 0 else 1.0
        if o.lr_rampdown_kimg > 0:
            left = min(max(o.total_kimg - kimg, 0.0) / o.lr_rampdown_kimg, 1.0)
            factor *= 0.5 - 0.5 * math.cos(math.pi * left)
        return factor

    def _apply_gradients(self, params, optimizer, scaler: LossScaler, lr: float, name: str) -> bool:
        """Sum gradients over processes, then skip (non-finite) or unscale and step. Returns whether it stepped."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        if self.world > 1:
            flat = torch.cat([g.flatten() for g in grads])
            torch.distributed.all_reduce(flat)
            grads = [g.view_as(p) for g, p in zip(flat.split([p.numel() for p in params]), params)]
            finite = bool(torch.isfinite(flat).all())
        else:
            finite = bool(torch.isfinite(torch.stack([g.sum() for g in grads]).sum()))
        if finite:
            if scaler.scale != 1.0:
                torch._foreach_mul_(grads, 1.0 / scaler.scale)
            for p, g in zip(params, grads):
                p.grad = g
            for group in optimizer.param_groups:
                group['lr'] = lr
            optimizer.step()
        scaler.update(finite)
        training_stats.report0(f'Progress/skipped_{name}', float(not finite))
        for p in params:
            p.grad = None
        return finite

    def _shares_fake_forward(self) -> bool:
        """DSM can reuse the generator step's fake forward when it is IKL under the same sigma law as the fake's."""
        o = self.opts
        return (self.fake_fits and o.fake_forward == 'shared' and o.schedule == 'reuse'
                and o.divergence == 'ikl' and o.sigma == 'lognormal'
                and (o.P_mean, o.P_std) == (o.fake_P_mean, o.fake_P_std))

    def _generator_step(self) -> list:
        """Generator update (and, with a shared fake forward, the first fake-score gradient). Returns the samples."""
        o = self.opts
        share = self._shares_fake_forward()
        self.adapter.train()
        self.teacher.train(o.step_dropout)
        if self.fake_score is not None:
            self.fake_score.train(o.step_dropout)
        samples = []
        for r in range(self.rounds):
            gen = self._rng(0, r)
            with autocast(self.adapter, self.device, self.amp):
                x0, labels = self.adapter.sample(self.batch_gpu, gen)
            x0 = x0.float()
            kwargs = dict(dropout_seed=self._seed(3, r))
            if share:
                loss, fake_fwd = self.divergence.generator_loss(x0, labels, self.teacher, self.fake_score, gen,
                                                                keep_fake_graph=True, **kwargs)
                fake_loss = dsm_from_forward(fake_fwd, o.sigma_data)
                training_stats.report('Loss/fake_score', fake_loss)
                total = (loss.sum() * (o.g_loss_scale * self.g_scaler.scale / o.batch)
                         + fake_loss.sum() * (o.fake_loss_scale * self.fake_scaler.scale / o.batch))
            else:
                loss = self.divergence.generator_loss(x0, labels, self.teacher, self.fake_score, gen, **kwargs)
                total = loss.sum() * (o.g_loss_scale * self.g_scaler.scale / o.batch)
            total.backward()
            samples.append((x0.detach(), None if labels is None else labels.detach()))
        self.teacher.eval()
        self._apply_gradients(self.g_params, self.g_opt, self.g_scaler, o.g_lr * self._lr_factor(), 'G')
        if share:
            self._apply_gradients(self.fake_params, self.fake_opt, self.fake_scaler, o.fake_lr * self._lr_factor(), 'fake')
        return samples

    def _fresh_samples(self, purpose: int, r: int):
        self.adapter.eval()
        with torch.no_grad(), autocast(self.adapter, self.device, self.amp):
            x, labels = self.adapter.sample(self.batch_gpu, self._rng(purpose, r))
        self.adapter.train()
        return x.float(), labels

    def _gathered(self, x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """x from every process, concatenated in rank order (x itself with one process)."""
        if x is None or self.world == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world)]
        torch.distributed.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    def _fake_steps(self, reused=None, first: int = 0):
        """Fake-score steps `first`.. on the reused samples (step 0) or fresh ones: DSM, or `observe` (see __init__)."""
        o = self.opts
        self.fake_score.train()
        for k in range(first, o.fake_steps):
            for r in range(self.rounds):
                x, labels = reused[r] if (k == 0 and reused is not None) else self._fresh_samples(1 + 2 * k, r)
                if self.fake_observes:
                    self.fake_score.observe(self._gathered(x), self._gathered(labels))
                    continue
                loss = edm_dsm_loss(self.fake_score, x, labels, self.fake_sigma, self._rng(2 + 2 * k, r), o.sigma_data, self.amp)
                training_stats.report('Loss/fake_score', loss)
                (loss.sum() * (o.fake_loss_scale * self.fake_scaler.scale / o.batch)).backward()
            if self.fake_fits:
                self._apply_gradients(self.fake_params, self.fake_opt, self.fake_scaler, o.fake_lr * self._lr_factor(), 'fake')

    @torch.no_grad()
    def _update_ema(self) -> None:
        o = self.opts
        ema_nimg = o.ema_halflife_kimg * 1000
        if o.ema_rampup_ratio is not None:
            ema_nimg = min(ema_nimg, self.cur_nimg * o.ema_rampup_ratio)
        beta = 0.5 ** (o.batch / max(ema_nimg, 1e-8))
        torch._foreach_lerp_(list(self.ema.parameters()), [p.detach() for p in self.adapter.parameters()], 1.0 - beta)
        for b_ema, b in zip(self.ema.buffers(), self.adapter.buffers()):
            b_ema.copy_(b)

    def step(self) -> None:
        """One iteration: generator update, fake-score update(s), EMA (order per `schedule`). During the fake-score
        warm-up only the fake score trains, on no-grad samples; the iteration still counts its samples."""
        if self.fake_score is not None and self.cur_nimg < self.opts.fake_warmup_kimg * 1000:
            self._fake_steps(reused=None)
        elif self.fake_score is not None and self.opts.schedule == 'official':
            self._fake_steps(reused=None)
            self._generator_step()
        else:
            samples = self._generator_step()
            if self.fake_score is not None:
                self._fake_steps(reused=samples, first=int(self._shares_fake_forward()))
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
        if self.fake_score is not None:
            state['fake_score'] = self.fake_score.state_dict()
        if self.fake_fits:
            state.update(fake_opt=self.fake_opt.state_dict(), fake_scaler=self.fake_scaler.state_dict())
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
        if self.fake_score is not None:
            self.fake_score.load_state_dict(state['fake_score'])
        if self.fake_fits:
            self.fake_opt.load_state_dict(state['fake_opt'])
            self.fake_scaler.load_state_dict(state['fake_scaler'])
        torch.set_rng_state(state['torch_rng'])
        if 'cuda_rng' in state and self.device.type == 'cuda':
            torch.cuda.set_rng_state(state['cuda_rng'], self.device)

    def resume(self, path: str) -> None:
        try:
            state = torch.load(path, map_location=self.device, weights_only=False)
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
        """Train to `total_kimg`. `resume`: a training-state path, 'auto' (latest in run_dir, if any) or None."""
        o = self.opts
        if resume == 'auto':
            resume = latest_training_state(self.run_dir)
        if resume:
            self.resume(resume)
            dist.print0(f'Resuming from {resume} at {self.cur_nimg / 1000:.1f} kimg')
        if self.rank == 0:
            os.makedirs(self.run_dir, exist_ok=True)
            with open(os.path.join(self.run_dir, 'ikl_options.json'), 'wt') as f:
                json.dump(dict(o.to_dict(), batch_gpu=self.batch_gpu, world_size=self.world), f, indent=2)
            if self.cur_nimg == 0:
                self.save_preview('fakes_init.png')
                if self.on_snapshot is not None:
                    self.on_snapshot(self, None)  # The starting point, for before/after comparisons.
        stats_file = open(os.path.join(self.run_dir, 'stats.jsonl'), 'at') if self.rank == 0 else None
        tb_writer = self._tensorboard() if self.rank == 0 and o.tensorboard else None
        collector = training_stats.Collector(regex='.*')
        total_nimg = int(o.total_kimg * 1000)
        bar = self._progress_bar(total_nimg)
        tick_start_time = time.time()
        try:
            while self.cur_nimg < total_nimg:
                self.step()
                if bar is not None:
                    bar.update(self.cur_nimg / 1000 - bar.n)  # exact position, no drift
                done = self.cur_nimg >= total_nimg
                if not done and self.cur_nimg < self.tick_start_nimg + o.tick_kimg * 1000:
                    continue
                tick_kimg = (self.cur_nimg - self.tick_start_nimg) / 1000
                training_stats.report0('Progress/tick', self.cur_tick)
                training_stats.report0('Progress/kimg', self.cur_nimg / 1000)
                training_stats.report0('Progress/loss_scale_G', self.g_scaler.scale)
                training_stats.report0('Progress/skipped_total_G', self.g_scaler.skipped)
                training_stats.report0('Timing/sec_per_kimg', (time.time() - tick_start_time) / max(tick_kimg, 1e-8))
                collector.update()
                if stats_file is not None:
                    stats_file.write(json.dumps(dict(collector.as_dict(), timestamp=time.time())) + '\n')
                    stats_file.flush()
                if tb_writer is not None:
                    for name, value in collector.as_dict().items():
                        tb_writer.add_scalar(name, value.mean, global_step=int(self.cur_nimg / 1e3))
                    tb_writer.flush()
                if bar is None:
                    fake_loss = f"fake_loss {collector['Loss/fake_score']:<8.4g} " if self.fake_fits else ''
                    dist.print0(f'tick {self.cur_tick:<5d} kimg {self.cur_nimg / 1000:<9.1f} '
                                f"sec/kimg {collector['Timing/sec_per_kimg']:<8.2f} {fake_loss}skipped {self.g_scaler.skipped}")
                self.cur_tick += 1
                self.tick_start_nimg = self.cur_nimg
                if done or (o.snapshot_ticks and self.cur_tick % o.snapshot_ticks == 0):
                    self.save_snapshot()
                    self.save_state()
                if done or (o.image_ticks and self.cur_tick % o.image_ticks == 0):
                    self.save_preview(f'fakes{kimg_label(self.cur_nimg)}.png')
                tick_start_time = time.time()
        finally:
            if bar is not None:
                bar.close()
            if stats_file is not None:
                stats_file.close()
            if tb_writer is not None:
                tb_writer.close()

    def _progress_bar(self, total_nimg: int):
        if self.rank != 0 or not self.opts.progress:
            return None
        import tqdm
        batch = self.opts.batch
        return tqdm.tqdm(total=(-(-total_nimg // batch) * batch) / 1000, initial=self.cur_nimg / 1000, unit='kimg',
                         dynamic_ncols=True, bar_format='{l_bar}{bar}| {n:.1f}/{total:.1f} kimg [{elapsed}<{remaining}, {rate_fmt}]')

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
        return SummaryWriter(self.run_dir)


def train(adapter: GeneratorAdapter, teacher: torch.nn.Module, fake_score: Optional[torch.nn.Module],
          options: Union[Dict, TrainingOptions], run_dir: str, device: Optional[torch.device] = None,
          snapshot_fn: Callable = default_snapshot, resume: Optional[str] = None,
          on_snapshot: Optional[Callable] = None) -> Trainer:
    """Build a Trainer and run it to `options.total_kimg`; returns the trainer (its `ema`, `adapter`, counters).

    `on_snapshot(trainer, path)` runs on rank 0 after every snapshot is written, and once before training starts
    (path None); refine.py and distill.py compute their `--metrics` there."""
    trainer = Trainer(adapter, teacher, fake_score, options, run_dir, device=device, snapshot_fn=snapshot_fn,
                      on_snapshot=on_snapshot)
    trainer.run(resume=resume)
    return trainer

# ----------------------------------------------------------------------------------------------------------------
