"""Diff-Instruct: instruct any differentiable generator with a diffusion teacher (IKL and relatives).

How `refine.py` and `distill.py` use it::

    import copy, ikl
    adapter = ikl.OneStepStudentAdapter.from_teacher(teacher, sigma_init=1.0)   # or a StyleGAN2 adapter
    fake = copy.deepcopy(teacher)                                                # the fake score starts as the teacher
    opts = ikl.TrainingOptions(batch=128, total_kimg=5000, g_lr=1e-5, fake_lr=1e-5)   # or a dict of the same names
    ikl.train(adapter, teacher, fake, opts, run_dir, device=device, resume='auto')

- `adapter`: an `ikl.GeneratorAdapter` (`sample(n, generator) -> (images, labels)` with gradient, `parameters()`,
  `export()`); `teacher`/`fake`: modules with the Teacher interface `D(x, sigma, class_labels) -> x0_hat`.
- `TrainingOptions` (a dataclass, JSON-serialisable via `to_dict()`, built from a dict with `from_dict()` which
  rejects unknown names): batch/batch_gpu, divergence (`ikl`, `sds`, `sid`), sigma law (`lognormal`, `karras`,
  `fixed`) and weighting (`denoiser`, `score`), normalisation, fake-score steps and lr, Adam betas, warm-up, EMA
  half-life and ramp-up, schedule (`reuse` | `official`), `fake_forward` (`shared`: the fake score's forward in the
  generator step also serves its DSM loss), `step_dropout` (upstream's dropout with equal masks in the generator
  step), precision (`fp32`, `bf16`, `fp16` with dynamic loss scaling; for fp16 NVlabs networks use their own `use_fp16`),
  seed, tick/snapshot/image intervals. Defaults are the official Diff-Instruct settings.
- Every iteration: one generator forward+backward, one teacher forward, one fake forward+backward (see
  `ikl.engine`'s docstring for the order and its effect); bad (NaN/Inf) steps are skipped and counted.
- Run directory: `network-snapshot-<kimg>.pkl` (`000123`, or `000000.064` between whole kimg; by default the EMA
  adapter's `export()` plus `fake_score`; pass `snapshot_fn(adapter, ema, fake_score) -> dict` to choose),
  `training-state-<kimg>.pt` (everything for exact resume), `stats.jsonl`, `ikl_options.json`, preview PNGs
  `fakes*.png` (the adapter's `preview()`), TensorBoard events if installed. All files are written atomically by
  rank 0. `on_snapshot(trainer, path)` runs after each snapshot and once at the start (path None).
- Distributed: launch with `torchrun`, call `torch_utils.distributed.init()` first and its `shutdown()` after a
  successful run; gradients are all-reduced by the engine (no DDP wrapper needed, so any adapter works), `batch`
  is global.
- `Trainer` exposes the pieces (`step()`, `state_dict()`, `save_snapshot()`) for callers that drive the loop.

Modules: `sigmas` (noise laws, weightings), `divergences` (IKL, SDS, SiD; EDM DSM for the fake score),
`adapters` (base class, `ModuleAdapter`, `OneStepStudentAdapter`), `fake_scores` (the fake-score interface: fitted
by DSM, sharing the generator step's forward, or observing the samples), `critic` (an optional adversarial term
against teacher samples), `updates` (the guarded optimiser step, loss
scaling), `options`, `engine` (the iteration and the loop), `images`, `toy` (MLP nets on flat vectors, for tests).
"""

from .adapters import GeneratorAdapter, ModuleAdapter, OneStepStudentAdapter
from .divergences import IKL, SDS, Divergence, SiD, edm_dsm_loss, make_divergence
from .fake_scores import (FakeScore, FittedFakeScore, ObservingDenoiser, ObservingFakeScore, SharedForwardFakeScore,
                          make_fake_score)
from .critic import TeacherSampleCritic
from .engine import Trainer, default_snapshot, train
from .options import TrainingOptions, build_divergence
from .sigmas import Fixed, Karras, LogNormal, implied_weight, make_sigma_distribution
from .updates import LossScaler, TrainingDiverged

__all__ = ['GeneratorAdapter', 'ModuleAdapter', 'OneStepStudentAdapter', 'IKL', 'SDS', 'SiD', 'Divergence',
           'edm_dsm_loss', 'make_divergence', 'FakeScore', 'FittedFakeScore', 'SharedForwardFakeScore',
           'ObservingDenoiser', 'ObservingFakeScore', 'make_fake_score', 'TeacherSampleCritic', 'LossScaler', 'Trainer', 'TrainingDiverged',
           'TrainingOptions', 'default_snapshot',
           'train', 'build_divergence', 'Fixed', 'Karras', 'LogNormal', 'implied_weight',
           'make_sigma_distribution']
