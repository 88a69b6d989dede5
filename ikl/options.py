"""Every knob of the IKL engine in one JSON-serialisable dataclass; the defaults are the official Diff-Instruct
settings. `build_divergence` turns the options into the generator objective."""

import copy
import dataclasses
from typing import Dict, Optional, Union

import torch

import dnnlib

from .divergences import Divergence, make_divergence
from .sigmas import make_sigma_distribution

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
    t_min: float = 0.0              # karras: sub-range of the schedule, 0 = sigma_min end, 1 = sigma_max end (SiD).
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
    # The data-free adversarial term (ikl.critic): a discriminator between teacher samples and generator samples.
    adv_weight: float = 0.0         # Factor on the generator's softplus(-D(x0)) (0: no critic, the official method).
    adv_lr: float = 2e-4            # The critic's Adam learning rate...
    adv_betas: tuple = (0.0, 0.99)  # ...and betas (StyleGAN2's).
    adv_r1_gamma: float = 0.01      # R1 weight on the teacher samples.
    adv_r1_interval: int = 4        # Lazy R1: every N critic steps, with gain N.
    adv_pixel_weight: float = 0.0   # Factor on the pixel-moment loss against the same bank (ikl.critic.PixelMoments; 0: off)...
    adv_pixel_res: int = 8          # ...on images average-pooled to this size...
    adv_pixel_halflife_kimg: float = 1.0  # ...with the generator's moments averaged over this half-life.
    # Optimisers.
    g_lr: float = 1e-5
    fake_lr: float = 1e-5
    betas: tuple = (0.0, 0.999)     # Adam betas of the fake score (official: no momentum).
    g_betas: tuple = (0.0, 0.999)   # Adam betas of the generator.
    adam_eps: float = 1e-8
    max_skipped_in_row: int = 50    # Stop (TrainingDiverged) after more non-finite steps than this in a row.
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
                                    # own `use_fp16` (EDM, StyleGAN2) skip autocast for fp16: the teacher's, the fake's
                                    # and the adapter's direct children's `use_fp16` is switched on (fp16 on CUDA only).
                                    # bf16 autocasts ours too (`supports_autocast`); upstream-source ones warn, stay fp32.
    compile: bool = False           # torch.compile the generator's networks, the teacher and a fitted fake score (falls
                                    # back to eager, with a warning, where compilation fails; torch_utils.compiling).
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
        opts.g_betas = tuple(opts.g_betas)
        opts.adv_betas = tuple(opts.adv_betas)
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
        if self.adv_weight < 0 or self.adv_r1_gamma < 0 or self.adv_r1_interval < 1:
            raise ValueError('training options: adv_weight >= 0, adv_r1_gamma >= 0 and adv_r1_interval >= 1 are required')
        if self.adv_pixel_weight < 0 or self.adv_pixel_res < 1 or self.adv_pixel_halflife_kimg < 0:
            raise ValueError('training options: adv_pixel_weight >= 0, adv_pixel_res >= 1 and adv_pixel_halflife_kimg >= 0 '
                             'are required')
        if self.adv_pixel_weight > 0 and self.adv_weight == 0:
            raise ValueError('training options: adv_pixel_weight > 0 needs the critic\'s bank (adv_weight > 0)')
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
    return make_divergence(opts.divergence, sigma, opts.weighting, opts.normalize, opts.sid_alpha, AMP_DTYPES[opts.precision])


AMP_DTYPES = dict(fp32=None, bf16=torch.bfloat16, fp16=torch.float16)
