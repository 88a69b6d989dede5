"""The data-free adversarial term: a critic that tells the teacher's samples from the generator's.

IKL, like the reverse KL it integrates, is mode-seeking: it moves samples towards where the teacher has mass but
has no force that spreads a generator over modes it misses. Measured on Fashion-MNIST (docs/refinement-fmnist.md),
refinement raises precision and leaves recall where it is. A discriminator trained on a fixed bank of the
teacher's samples against the generator's adds such a force: the generator's non-saturating loss
softplus(-D(x0)) is at its optimum only when the generator covers the bank's distribution (the JS divergence of
a GAN is not mode-seeking). It stays data-free: the "real" images are the teacher's.

Per iteration the critic costs one D forward+backward in the generator step (on the same x0) and one D step on
the generator step's samples (detached) against a batch from the bank, with R1 on the bank images every
`adv_r1_interval` steps (lazy, gain = interval).

`PixelMoments` (`adv_pixel_weight > 0`) adds a second pull towards the same bank, on what neither term holds on
its own: measured on Fashion-MNIST, IKL and the critic at GAN pace make the garments' sizes more alike (the
spread of per-image brightness, the first principal component of the coarse pixels, narrows) while the detector's
distance falls. It pulls the mean and covariance of the generator's images, average-pooled to a few pixels,
towards the bank's.
"""

import math
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch
import torch.nn.functional as F

from torch_utils import misc
from torch_utils import training_stats

from .updates import LossScaler

Samples = Callable[[int], Tuple[torch.Tensor, Optional[torch.Tensor]]]  # accumulation round -> (x0, labels)


class PixelMoments:
    """The Frechet distance between the generator's `res` x `res`-pooled images and the bank's, as Gaussians.

    The Frechet distance |m - m_b|^2 + tr(S + S_b - 2 (S_b^1/2 S S_b^1/2)^1/2) weighs each direction of the
    covariance by its relative size (a direction the bank hardly varies in counts as much as its brightest); a
    Frobenius norm of S - S_b, tried first on Fashion-MNIST, left the pixel distance nearly where no term left it,
    because it sees only the largest directions. A batch of 32 estimates a 64-dimensional covariance poorly (its rank is at
    most 31), so the distance is taken at running moments, an exponential average of the batches with a half-life
    of `halflife_kimg` thousand samples (bias-corrected like Adam's), and its gradient, in closed form there
    (d/dS = I - S_b^1/2 (S_b^1/2 S S_b^1/2)^-1/2 S_b^1/2), reaches the current batch through its moments: each
    sample moves as it would move the running moments, of which it is a part. With several processes each keeps
    its own running moments (the gradients are averaged as usual).

    Before the generator first moves, `start` fills the running moments with its samples, so that the first steps'
    distance is not that of a few batches (biased upwards, and noisy in every direction), and keeps that distance
    as `reference`. `TeacherSampleCritic` weighs the distance relative to it.
    """

    def __init__(self, bank: torch.Tensor, res: int, halflife_kimg: float):
        self.res = res
        self.halflife = halflife_kimg * 1000
        self.reference = None  # The distance of the generator as given (`start`); None before it.
        pooled = self._pool(bank.double())
        self.bank_mean = pooled.mean(0)
        bank_cov = torch.cov(pooled.T, correction=0)
        if float(bank_cov.trace()) <= 0:
            raise ValueError('critic: the teacher bank has no pixel variance to match (all images alike)')
        self.bank_trace = bank_cov.trace()
        self.bank_root, = _sym_powers(bank_cov, (0.5,))
        dim = len(self.bank_mean)
        self.moments = dict(first=torch.zeros(dim, dtype=torch.float64), second=torch.zeros(dim, dim, dtype=torch.float64),
                            weight=torch.zeros([], dtype=torch.float64))

    def _pool(self, img: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(img, self.res).flatten(1)

    def to(self, device: torch.device) -> 'PixelMoments':
        for name in ('bank_mean', 'bank_trace', 'bank_root'):
            setattr(self, name, getattr(self, name).to(device))
        self.moments = {k: v.to(device) for k, v in self.moments.items()}
        self.reference = None if self.reference is None else self.reference.to(device)
        return self

    def distance(self, mean: torch.Tensor, cov: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The Frechet distance of N(mean, cov) to the bank's Gaussian, and its gradient in cov."""
        root, inverse_root = _sym_powers(self.bank_root @ cov @ self.bank_root, (0.5, -0.5))
        value = (mean - self.bank_mean).square().sum() + cov.trace() + self.bank_trace - 2 * root.trace()
        grad = torch.eye(len(cov), dtype=cov.dtype, device=cov.device) - self.bank_root @ inverse_root @ self.bank_root
        return value, grad

    def loss(self, x0: torch.Tensor) -> torch.Tensor:
        """The distance at the running moments (this batch included), differentiable in x0 through the batch's
        moments."""
        first, second = self._batch_moments(x0)
        self._observe(self.moments, first.detach(), second.detach(), len(x0))
        mean, cov_second = self._running(self.moments)
        value, grad_cov = self.distance(mean, cov_second - torch.outer(mean, mean))
        first = mean + (first - first.detach())  # The running values, with the batch's gradient.
        cov = cov_second + (second - second.detach()) - torch.outer(first, first)
        surrogate = (first - self.bank_mean).square().sum() + (grad_cov * cov).sum()
        training_stats.report('Loss/critic_pixels', value)
        return (value + surrogate - surrogate.detach()).float()

    def _batch_moments(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        y = self._pool(x.double())
        return y.mean(0), y.T @ y / len(y)

    def _observe(self, moments: Dict[str, torch.Tensor], first: torch.Tensor, second: torch.Tensor, n: int) -> None:
        beta = 0.5 ** (n / self.halflife) if self.halflife > 0 else 0.0
        for key, batch in (('first', first), ('second', second), ('weight', 1.0)):
            moments[key] = beta * moments[key] + (1 - beta) * batch

    @staticmethod
    def _running(moments: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """The bias-corrected running mean and second moment."""
        return moments['first'] / moments['weight'], moments['second'] / moments['weight']

    def start_batches(self, batch: int) -> int:
        """Batches for `start`: four half-lives, after which the running moments weigh their start by 1/16."""
        return max(1, math.ceil(4 * self.halflife / batch))

    @torch.no_grad()
    def start(self, batches: Iterable[torch.Tensor]) -> None:
        """The running moments from fresh batches of the generator as given, and their distance as `reference`."""
        moments = {k: torch.zeros_like(v) for k, v in self.moments.items()}
        for x in batches:
            self._observe(moments, *self._batch_moments(x), len(x))
        self.moments = moments
        mean, cov_second = self._running(moments)
        value, _ = self.distance(mean, cov_second - torch.outer(mean, mean))
        self.reference = value.clamp_min(1e-12)  # Divides the pull: finite even for a generator exactly at the bank.


def _sym_powers(matrix: torch.Tensor, powers: Tuple[float, ...]) -> Tuple[torch.Tensor, ...]:
    """A symmetric positive semi-definite matrix to each of `powers`, from one eigendecomposition, its eigenvalues
    clamped at 1e-12 of the largest (so that directions of no variance give finite inverse powers)."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    values = values.clamp_min(values.max().clamp_min(1e-30) * 1e-12)
    return tuple((vectors * values ** power) @ vectors.T for power in powers)


class TeacherSampleCritic:
    """A discriminator `net(img, labels) -> logits [N, 1]` against a bank of teacher samples.

    `images`: [M, ...] teacher samples shaped like the generator's (any float dtype; used as float32), `labels`: their one-hot labels
    [M, label_dim] or None; the generator's labels must have the same width. Hyperparameters come from the
    engine's options: `adv_weight` (factor on the generator's loss), `adv_lr`, `adv_betas`, `adv_r1_gamma`,
    `adv_r1_interval`, and `adv_pixel_weight`, `adv_pixel_res`, `adv_pixel_halflife_kimg` for `PixelMoments`.
    """

    def __init__(self, net: torch.nn.Module, images: torch.Tensor, labels: Optional[torch.Tensor], opts):
        if images.ndim < 2 or len(images) == 0:
            raise ValueError(f'critic: the teacher bank must be a non-empty [M, ...] tensor of samples, got {list(images.shape)}')
        if labels is not None and len(labels) != len(images):
            raise ValueError(f'critic: {len(labels)} labels for {len(images)} bank images')
        self.net = net
        self.images = images
        self.labels = labels
        self.opts = opts
        self.params = [p for p in net.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError(f'critic {type(net).__name__}: no trainable parameters')
        self.opt = misc.make_adam(self.params, lr=opts.adv_lr, betas=tuple(opts.adv_betas), eps=opts.adam_eps)
        self.scaler = LossScaler(opts.precision == 'fp16', opts.loss_scale_init, opts.loss_scale_growth_interval)
        self.steps = 0
        self.pixels = (PixelMoments(images.float(), opts.adv_pixel_res, opts.adv_pixel_halflife_kimg)
                       if opts.adv_pixel_weight > 0 else None)

    def to(self, device: torch.device) -> 'TeacherSampleCritic':
        self.net.to(device)
        if self.pixels is not None:
            self.pixels.to(device)
        self.images = self.images.to(device)
        self.labels = None if self.labels is None else self.labels.to(device)
        return self

    def _logits(self, img: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        if labels is None:
            labels = torch.zeros([img.shape[0], 0], device=img.device)
        return self.net(img, labels).float().reshape(-1)

    def generator_loss(self, x0: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        """Per-sample `adv_weight * softplus(-D(x0))`, differentiable in x0; D's parameters get no gradient. With
        `PixelMoments`, `adv_pixel_weight` times its distance relative to the generator's at the start is added to
        every sample's (the batch's sum then holds it once per sample, as the per-sample terms are held, so the
        engine's mean over the batch weighs it once). Relative, so that one weight serves a generator whose pixels
        start far from the bank and one that starts close: the pull's gradient grows with the distance, and at a
        fixed weight it held a weak GAN back (measured on Fashion-MNIST) where a good one needed it at full strength.
        `prepare` must have started it."""
        for p in self.params:
            p.requires_grad_(False)
        try:
            logits = self._logits(x0, labels)
        finally:
            for p in self.params:
                p.requires_grad_(True)
        loss = F.softplus(-logits)
        training_stats.report('Loss/critic_G', loss)
        loss = self.opts.adv_weight * loss
        if self.pixels is not None:
            if self.pixels.reference is None:
                raise RuntimeError('critic: the pixel term is not started; call prepare() before the first generator loss')
            loss = loss + self.opts.adv_pixel_weight / self.pixels.reference * self.pixels.loss(x0)
        return loss

    def prepare(self, trainer) -> None:
        """Before each generator step: start the pixel term on the generator's samples before it first moves."""
        if self.pixels is not None and self.pixels.reference is None:
            count = self.pixels.start_batches(trainer.batch_gpu)
            self.pixels.start(trainer.fresh_samples(903, k)[0] for k in range(count))

    def _bank_batch(self, n: int, generator: torch.Generator):
        idx = torch.randint(len(self.images), [n], generator=generator, device=generator.device).to(self.images.device)
        return self.images[idx].float(), (None if self.labels is None else self.labels[idx])

    def step(self, trainer, samples: Samples) -> None:
        """One D update: logistic loss on each round's (detached) samples against as many bank images."""
        o = self.opts
        r1_due = o.adv_r1_gamma > 0 and self.steps % o.adv_r1_interval == 0
        weight = self.scaler.factor(1.0 / o.batch)
        self.net.train()
        for r in range(trainer.rounds):
            fake, fake_labels = samples(r)
            real, real_labels = self._bank_batch(fake.shape[0], trainer.rng(900, r))
            if r1_due:
                real.requires_grad_(True)
            fake_logits = self._logits(fake.detach(), fake_labels)
            real_logits = self._logits(real, real_labels)
            loss = F.softplus(fake_logits) + F.softplus(-real_logits)
            training_stats.report('Loss/critic_D', loss)
            training_stats.report('Critic/real_logit', real_logits)
            training_stats.report('Critic/fake_logit', fake_logits)
            total = loss.sum()
            if r1_due:
                grad, = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
                penalty = grad.square().flatten(1).sum(1)
                training_stats.report('Loss/critic_r1', penalty)
                total = total + penalty.sum() * (o.adv_r1_gamma / 2 * o.adv_r1_interval)
            (total * weight).backward()
        trainer.update(self.params, self.opt, self.scaler, o.adv_lr * trainer.lr_factor(), 'critic')
        self.steps += 1

    def state_dict(self) -> Dict:
        state = dict(critic=self.net.state_dict(), critic_opt=self.opt.state_dict(),
                     critic_scaler=self.scaler.state_dict(), critic_steps=self.steps)
        if self.pixels is not None:
            state['critic_pixel_moments'] = dict(self.pixels.moments)
            state['critic_pixel_reference'] = self.pixels.reference  # None: saved before the first generator step.
        return state

    def load_state_dict(self, state: Dict) -> None:
        self.net.load_state_dict(state['critic'])
        self.opt.load_state_dict(state['critic_opt'])
        self.scaler.load_state_dict(state['critic_scaler'])
        self.steps = int(state['critic_steps'])
        if self.pixels is not None:
            if 'critic_pixel_moments' not in state:
                raise ValueError('training state: saved without the pixel-moment term (adv_pixel_weight=0), '
                                 'cannot resume with it')
            device = self.pixels.bank_mean.device
            self.pixels.moments = {k: v.to(device) for k, v in state['critic_pixel_moments'].items()}
            reference = state.get('critic_pixel_reference')  # Missing in states of earlier versions: started anew.
            self.pixels.reference = None if reference is None else reference.to(device)
