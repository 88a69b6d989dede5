"""The fake score: the engine's model of the generator's own diffused distribution, and how it keeps up.

A `FakeScore` holds a denoiser `net` (`D(x, sigma, class_labels)`, what the divergences call) and takes one update
per fake step on a global batch of generator samples. Three kinds:

* `FittedFakeScore`: a network (usually a copy of the teacher) fitted to the samples by EDM's DSM loss, with its
  own Adam and loss scaler. What refinement and distillation use.
* `SharedForwardFakeScore`: the same, for IKL under one sigma law for both losses: the fake forward of the
  generator step is exactly DSM's forward at (x0, sigma, noise), so its first DSM gradient comes from the
  generator step's backward and costs no extra pass (`ikl.divergences.dsm_from_forward`).
* `ObservingFakeScore`: wraps an `ObservingDenoiser`, a denoiser that is handed the samples (gathered from every
  process) instead of being fitted, e.g. the exact denoiser of recent samples in a low-dimensional study.

`make_fake_score` picks the fitted kind a module gets from the options; pass a `FakeScore` to choose another.
"""

from typing import Callable, Dict, List, Optional, Tuple

import torch

from torch_utils import misc
from torch_utils import training_stats

from .divergences import dsm_from_forward, edm_dsm_loss
from .sigmas import LogNormal
from .updates import LossScaler

Samples = Callable[[int], Tuple[torch.Tensor, Optional[torch.Tensor]]]  # accumulation round -> (x0, labels)


class FakeScore:
    """Interface: `net`, `step(trainer, samples, k)` for fake step k of an iteration, and its state for resume.
    `trainer` (an `ikl.engine.Trainer`) provides the counter-seeded random streams, the learning-rate factor, the
    gather over processes and the guarded update."""

    shares_generator_forward = False  # True: the generator step's fake forward also yields the first DSM gradient.

    def __init__(self, net: torch.nn.Module):
        self.net = net

    def step(self, trainer, samples: Samples, k: int) -> None:
        raise NotImplementedError

    def state_dict(self) -> Dict:
        return dict(fake_score=self.net.state_dict())

    def load_state_dict(self, state: Dict) -> None:
        self.net.load_state_dict(state['fake_score'])


class FittedFakeScore(FakeScore):
    """A denoiser network fitted by DSM under its own lognormal sigma law: its trainable parameters, Adam and
    loss scaler. One step: per accumulation round a DSM loss on the round's samples, one guarded update."""

    def __init__(self, net: torch.nn.Module, opts):
        super().__init__(net)
        self.opts = opts
        self.sigma = LogNormal(opts.fake_P_mean, opts.fake_P_std)
        self.params: List[torch.nn.Parameter] = [p for p in net.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError(f'fake score {type(net).__name__}: nothing to fit (no trainable parameters); a denoiser '
                             'that is shown the samples goes in ikl.ObservingFakeScore')
        self.opt = misc.make_adam(self.params, lr=opts.fake_lr, betas=tuple(opts.betas), eps=opts.adam_eps)
        self.scaler = LossScaler(opts.precision == 'fp16', opts.loss_scale_init, opts.loss_scale_growth_interval)

    def loss_weight(self):
        """Factor on the per-sample DSM losses' sum: the global batch mean, times the loss scale."""
        return self.scaler.factor(self.opts.fake_loss_scale / self.opts.batch)

    def apply(self, trainer) -> None:
        trainer.update(self.params, self.opt, self.scaler, self.opts.fake_lr * trainer.lr_factor(), 'fake')

    def step(self, trainer, samples: Samples, k: int) -> None:
        self.net.train()
        for r in range(trainer.rounds):
            x, labels = samples(r)
            loss = edm_dsm_loss(self.net, x, labels, self.sigma, trainer.rng(2 + 2 * k, r), self.opts.sigma_data, trainer.amp)
            training_stats.report('Loss/fake_score', loss)
            (loss.sum() * self.loss_weight()).backward()
        self.apply(trainer)

    def state_dict(self) -> Dict:
        return dict(super().state_dict(), fake_opt=self.opt.state_dict(), fake_scaler=self.scaler.state_dict())

    def load_state_dict(self, state: Dict) -> None:
        super().load_state_dict(state)
        self.opt.load_state_dict(state['fake_opt'])
        self.scaler.load_state_dict(state['fake_scaler'])


class SharedForwardFakeScore(FittedFakeScore):
    """A fitted fake score whose first step of each iteration is made of the generator step's fake forward."""

    shares_generator_forward = True

    def loss_from_forward(self, fwd) -> torch.Tensor:
        """The scaled DSM loss of the generator step's fake forward, to add to the generator's before backward."""
        loss = dsm_from_forward(fwd, self.opts.sigma_data)
        training_stats.report('Loss/fake_score', loss)
        return loss.sum() * self.loss_weight()


class ObservingDenoiser(torch.nn.Module):
    """A denoiser `D(x, sigma, class_labels)` that tracks the generator by being shown its samples."""

    def observe(self, x: torch.Tensor, class_labels=None) -> None:
        raise NotImplementedError


class ObservingFakeScore(FakeScore):
    """Hands each round's samples, gathered from every process, to an `ObservingDenoiser`; nothing to optimise."""

    def __init__(self, net: ObservingDenoiser):
        if not isinstance(net, ObservingDenoiser):
            raise TypeError(f'ObservingFakeScore: expected an ikl.fake_scores.ObservingDenoiser, got {type(net).__name__}')
        super().__init__(net)

    def step(self, trainer, samples: Samples, k: int) -> None:
        for r in range(trainer.rounds):
            x, labels = samples(r)
            self.net.observe(trainer.gathered(x), trainer.gathered(labels))


def shares_generator_forward(opts) -> bool:
    """DSM can reuse the generator step's fake forward when it is IKL under the same sigma law as the fake's."""
    return (opts.fake_forward == 'shared' and opts.schedule == 'reuse' and opts.divergence == 'ikl'
            and opts.sigma == 'lognormal' and (opts.P_mean, opts.P_std) == (opts.fake_P_mean, opts.fake_P_std))


def make_fake_score(net: torch.nn.Module, opts) -> FittedFakeScore:
    """The fitted fake score for a denoiser network under these options (shared forward where it is exact)."""
    return (SharedForwardFakeScore if shares_generator_forward(opts) else FittedFakeScore)(net, opts)
