"""Divergences: the generator's surrogate loss given its samples, the teacher and the fake score.

**The IKL gradient and its two forms.** With x_t = x0 + sigma * n and x0 = g_theta(z), the paper's eq. 3.2 is

    Grad(theta) = E_sigma E_{z, n} [ w'(sigma) * (s_fake(x_t) - s_teacher(x_t))^T dx_t/dtheta ],

and under EDM noising dx_t/dtheta = dx0/dtheta. The score of an x0-predicting denoiser is s(x) = (D(x) - x) / sigma^2,
so s_fake - s_teacher = (D_fake - D_teacher) / sigma^2: the x_t terms cancel. The official code's surrogate
sum((D_fake - D_teacher) * x0), with both networks under no-grad, has d/dx0 = D_fake - D_teacher; it is therefore
eq. 3.2 with w'(sigma) = sigma^2 (`weighting='denoiser'`). We write lam(sigma) * (D_fake - D_teacher) for any
weighting (see `ikl.sigmas`). Because E_{x_t ~ q}[d/dtheta log q_theta(x_t)] = 0, the same expectation is the
theta-gradient of E_sigma[lam(sigma) sigma^2 KL(q_sigma || p_sigma)], which is what the tests check in closed form.

Each divergence returns a per-sample loss `[N]` whose x0-gradient is the wanted update direction; the engine sums
it, divides by the global batch and backpropagates into the generator. The teacher and the fake score get inputs
detached from x0 and run without autograd (IKL, SDS) or with autograd through their inputs only (SiD).
"""

import contextlib
import warnings
from typing import NamedTuple, Optional

import torch

from torch_utils import training_stats

from .sigmas import SigmaDistribution, get_weighting

# ----------------------------------------------------------------------------------------------------------------


def has_native_precision(module: torch.nn.Module) -> bool:
    """NVlabs networks (EDM preconditioners, StyleGAN2 blocks) pick their own fp16 regions via `use_fp16` and assert
    on the dtypes they see, so they must not run under autocast."""
    return any(hasattr(m, 'use_fp16') for m in module.modules())


def supports_autocast(module: torch.nn.Module) -> bool:
    """Whether every native-precision part of `module` follows an enabled autocast (our EDM preconditioners and
    StyleGAN2 synthesis blocks say so with a `supports_autocast` class attribute; upstream's source has none)."""
    return all(getattr(m, 'supports_autocast', False) for m in module.modules() if hasattr(m, 'use_fp16'))


_warned_fp32 = set()


def autocast(module: torch.nn.Module, device: torch.device, dtype: Optional[torch.dtype]):
    """Autocast `module`'s forward to `dtype`; a no-op for None (float32).

    Networks with native fp16 (`use_fp16`) keep their own switch for float16. For bfloat16 they run under
    autocast when they support it, and otherwise (e.g. an upstream pickle not rebuilt as ours) in float32, with
    a warning once per class."""
    if dtype is None:
        return contextlib.nullcontext()
    if has_native_precision(module):
        if dtype != torch.bfloat16:
            return contextlib.nullcontext()
        if not supports_autocast(module):
            name = type(module).__name__
            if name not in _warned_fp32:
                _warned_fp32.add(name)
                warnings.warn(f'{name}: its network code does not support autocast; it runs in float32, not bfloat16 '
                              f'(rebuild it as ours, e.g. teachers.load(..., rebuild=True))')
            return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _per_sample(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[N] -> [N, 1, ..., 1] broadcastable against `like` (teachers accept this for [N, D] and NCHW data)."""
    return sigma.reshape([-1] + [1] * (like.ndim - 1))


@contextlib.contextmanager
def _frozen(*modules: torch.nn.Module):
    """Stop parameter gradients of `modules` for a while, so autograd through their inputs leaves them untouched."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class Divergence:
    """Base: draws sigma and noise for generator samples and turns network outputs into a surrogate loss."""

    needs_fake_score = True

    def __init__(self, sigma: SigmaDistribution, weighting: str = 'denoiser', normalize: bool = False,
                 amp_dtype: Optional[torch.dtype] = None):
        self.sigma = sigma
        self.weighting = get_weighting(weighting)
        self.normalize = normalize
        self.amp_dtype = amp_dtype

    def _noisy(self, x0: torch.Tensor, generator: torch.Generator):
        sigma = _per_sample(self.sigma.sample(x0.shape[0], generator, x0.device), x0)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device)
        return sigma, noise

    @staticmethod
    def _sum(t: torch.Tensor) -> torch.Tensor:
        return t.flatten(1).sum(1)

    def generator_loss(self, x0: torch.Tensor, labels: Optional[torch.Tensor], teacher: torch.nn.Module,
                       fake_score: Optional[torch.nn.Module], generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError


class FakeForward(NamedTuple):
    """The fake score's forward of a generator step, kept with its graph so DSM can reuse it (no second forward)."""
    denoised: torch.Tensor
    clean: torch.Tensor
    sigma: torch.Tensor


def _reseed(seed: Optional[int]) -> None:
    """Same dropout masks for the teacher and the fake score (the official code's CUDA RNG trick, on any device)."""
    if seed is not None:
        torch.manual_seed(seed)


class IKL(Divergence):
    """Diff-Instruct: lam(sigma) * (D_fake(x_t) - D_teacher(x_t)) applied to x0, optionally normalised per sample
    by mean|x0 - D_teacher| (DMD-style; then it is no longer the gradient of a fixed divergence).

    With `keep_fake_graph`, the fake score runs with autograd and its output is returned too, so the caller can
    train the fake score by DSM on exactly this forward (same x_t, sigma) instead of running it again.
    `dropout_seed` reseeds torch's RNG before each network so both draw the same dropout masks."""

    def _fake_denoised(self, x_t, sigma, labels, x0, fake_score):
        with autocast(fake_score, x_t.device, self.amp_dtype):
            return fake_score(x_t, sigma, labels).float()

    def generator_loss(self, x0, labels, teacher, fake_score, generator, keep_fake_graph: bool = False,
                       dropout_seed: Optional[int] = None):
        sigma, noise = self._noisy(x0, generator)
        x0_const = x0.detach()
        x_t = x0_const + sigma * noise
        with torch.no_grad(), autocast(teacher, x0.device, self.amp_dtype):
            _reseed(dropout_seed)
            d_teacher = teacher(x_t, sigma, labels).float()
        with torch.set_grad_enabled(keep_fake_graph):
            _reseed(dropout_seed)
            d_fake_live = self._fake_denoised(x_t, sigma, labels, x0_const, fake_score)
        with torch.no_grad():
            d_fake = d_fake_live.detach()
            direction = self.weighting(sigma) * (d_fake - d_teacher)
            if self.normalize:
                direction = direction / _per_sample((x0_const - d_teacher).abs().flatten(1).mean(1).clamp_min(1e-8), x0)
            training_stats.report('Divergence/denoiser_gap', (d_fake - d_teacher).square().flatten(1).mean(1).sqrt())
        loss = self._sum(direction * x0)
        return (loss, FakeForward(d_fake_live, x0_const, sigma)) if keep_fake_graph else loss


class SDS(IKL):
    """Score distillation: the generator as a Dirac at x0, whose diffused score is known in closed form,
    -(x_t - x0) / sigma^2, i.e. D_fake = x0 (Corollary 3.4). No fake-score network is needed."""

    needs_fake_score = False

    def _fake_denoised(self, x_t, sigma, labels, x0, fake_score):
        return x0


class SiD(Divergence):
    """Score identity Distillation's Fisher-divergence loss, per pixel
    (D_t - D_f) * ((D_t - x0) - alpha * (D_t - D_f)) / mean|x0 - D_t|, with gradients through both networks'
    inputs (not their weights), times lam(sigma). `normalize=False` drops the per-sample normaliser; with alpha = 0.5
    the loss's gradient is then half that of the model-based Fisher divergence E lam |D_t - D_f|^2 when the fake
    score is the generator's exact denoiser (the score identity SiD rests on; tested in closed form)."""

    def __init__(self, sigma, weighting='denoiser', alpha: float = 1.2, normalize: bool = True, amp_dtype=None):
        super().__init__(sigma, weighting, normalize=normalize, amp_dtype=amp_dtype)
        self.alpha = float(alpha)

    def generator_loss(self, x0, labels, teacher, fake_score, generator, dropout_seed: Optional[int] = None):
        sigma, noise = self._noisy(x0, generator)
        x_t = x0 + sigma * noise
        with _frozen(teacher, fake_score):
            with autocast(teacher, x0.device, self.amp_dtype):
                _reseed(dropout_seed)
                d_teacher = teacher(x_t, sigma, labels).float()
            with autocast(fake_score, x0.device, self.amp_dtype):
                _reseed(dropout_seed)
                d_fake = fake_score(x_t, sigma, labels).float()
        gap = d_teacher - d_fake
        scale = _per_sample((x0 - d_teacher).detach().abs().flatten(1).mean(1).clamp_min(1e-8), x0) \
            if self.normalize else 1.0
        loss = self.weighting(sigma) * gap * ((d_teacher - x0) - self.alpha * gap) / scale
        training_stats.report('Divergence/denoiser_gap', gap.detach().square().flatten(1).mean(1).sqrt())
        return self._sum(loss)


DIVERGENCES = dict(ikl=IKL, sds=SDS, sid=SiD)


def make_divergence(name: str, sigma: SigmaDistribution, weighting: str = 'denoiser', normalize: bool = False,
                    sid_alpha: float = 1.2, amp_dtype: Optional[torch.dtype] = None) -> Divergence:
    if name == 'sid':
        return SiD(sigma, weighting, alpha=sid_alpha, amp_dtype=amp_dtype)
    if name not in DIVERGENCES:
        raise ValueError(f'divergence: unknown name {name!r}, expected one of {sorted(DIVERGENCES)}')
    return DIVERGENCES[name](sigma, weighting, normalize=normalize, amp_dtype=amp_dtype)

# ----------------------------------------------------------------------------------------------------------------


def edm_dsm_loss(net: torch.nn.Module, images: torch.Tensor, labels: Optional[torch.Tensor], sigma: SigmaDistribution,
                 generator: torch.Generator, sigma_data: float = 0.5, amp_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """EDM's denoising score matching, per sample: sum over elements of lam(sigma) * |D(y + sigma n) - y|^2 with
    lam = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2. This is how the fake score tracks the generator."""
    s = _per_sample(sigma.sample(images.shape[0], generator, images.device), images)
    noise = torch.randn(images.shape, generator=generator, device=images.device)
    with autocast(net, images.device, amp_dtype):
        denoised = net(images + s * noise, s, labels).float()
    return dsm_from_forward(FakeForward(denoised, images, s), sigma_data)


def dsm_from_forward(fwd: FakeForward, sigma_data: float = 0.5) -> torch.Tensor:
    """The per-sample EDM DSM loss of a denoiser output already computed at (clean + sigma * noise, sigma)."""
    weight = (fwd.sigma ** 2 + sigma_data ** 2) / (fwd.sigma * sigma_data) ** 2
    return (weight * (fwd.denoised - fwd.clean).square()).flatten(1).sum(1)

# ----------------------------------------------------------------------------------------------------------------
