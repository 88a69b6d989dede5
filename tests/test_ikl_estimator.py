"""The IKL/SDS estimators against closed forms for diffused Gaussians (exact scores from the analytic teacher)."""

import pytest
import torch

from ikl.divergences import IKL, SDS, SiD, edm_dsm_loss
from ikl.sigmas import Fixed, Karras, LogNormal, get_weighting, implied_weight
from teachers.analytic import GaussianMixture


def _gaussian(mean: torch.Tensor, var: torch.Tensor) -> GaussianMixture:
    return GaussianMixture(mean.detach()[None].double(), var.detach()[None].double())


def _closed_form_ikl(mu, log_s, m, v, sigma_dist, weighting):
    """sum_j p_j lam(sigma_j) sigma_j^2 KL(N(mu, s^2 + sigma^2) || N(m, v + sigma^2)), diagonal, float64."""
    nodes, probs = sigma_dist.quadrature()
    factor = torch.as_tensor(probs * implied_weight(weighting, nodes))
    s2 = torch.as_tensor(nodes ** 2)[:, None]
    a = (2 * log_s).exp()[None] + s2
    b = v[None] + s2
    kl = 0.5 * ((b / a).log() + (a + (mu[None] - m[None]) ** 2) / b - 1).sum(1)
    return (factor * kl).sum()


def _estimate(divergence, mu, log_s, m, v, batch, repeats, seed=0):
    """Mean and standard error of the estimated theta-gradient over `repeats` independent batches."""
    teacher = _gaussian(m, v)
    grads = []
    for i in range(repeats):
        gen = torch.Generator().manual_seed(seed + i)
        theta = [mu.clone().float().requires_grad_(True), log_s.clone().float().requires_grad_(True)]
        fake = _gaussian(theta[0], (2 * theta[1]).exp())  # the exact score of the generator's distribution
        z = torch.randn([batch, mu.numel()], generator=gen)
        x0 = theta[0] + theta[1].exp() * z
        loss = divergence.generator_loss(x0, None, teacher, fake, gen)
        grads.append(torch.cat([g.double() for g in torch.autograd.grad(loss.sum() / batch, theta)]))
    grads = torch.stack(grads)
    return grads.mean(0), grads.std(0) / repeats ** 0.5


@pytest.mark.parametrize('dim,sigma_dist,weighting', [
    (1, LogNormal(-1.2, 1.2), 'denoiser'),           # the official estimator
    (2, LogNormal(0.0, 1.0), 'score'),
    (2, Karras(0.002, 80.0, 7.0, 1000, 0.0, 0.8), 'denoiser'),  # SiD/DMD-style discrete schedule
    (2, Fixed(0.01), 'score'),                       # the t = 0 limit: the plain KL gradient
])
def test_ikl_gradient_matches_closed_form(dim, sigma_dist, weighting):
    gen = torch.Generator().manual_seed(dim)
    mu = torch.randn(dim, generator=gen, dtype=torch.float64) + 0.8
    log_s = torch.full([dim], -0.3, dtype=torch.float64) + 0.2 * torch.randn(dim, generator=gen, dtype=torch.float64)
    m = torch.randn(dim, generator=gen, dtype=torch.float64) * 0.5
    v = torch.rand(dim, generator=gen, dtype=torch.float64) + 0.2

    theta = [mu.clone().requires_grad_(True), log_s.clone().requires_grad_(True)]
    want = torch.cat(torch.autograd.grad(_closed_form_ikl(theta[0], theta[1], m, v, sigma_dist, weighting), theta))
    got, stderr = _estimate(IKL(sigma_dist, weighting), mu, log_s, m, v, batch=40000, repeats=8)
    assert bool((stderr < 0.1 * want.abs().max()).all()), (stderr, want)  # the check has power
    assert bool(((got - want).abs() < 4 * stderr + 1e-4).all()), (got, want, stderr)


def test_sds_gradient_matches_closed_form():
    """A Dirac generator at theta against a Gaussian teacher: grad = E_sigma[lam sigma^2 (theta - m) / (v + sigma^2)]."""
    sigma_dist, m, v = LogNormal(-0.5, 1.0), torch.tensor([0.3, -1.0], dtype=torch.float64), torch.tensor([0.5, 2.0], dtype=torch.float64)
    theta = torch.tensor([1.5, 0.5], requires_grad=True)
    batch, repeats, grads = 50000, 8, []
    for i in range(repeats):
        x0 = theta[None].expand(batch, 2)
        loss = SDS(sigma_dist).generator_loss(x0, None, _gaussian(m, v), None, torch.Generator().manual_seed(i))
        grads.append(torch.autograd.grad(loss.sum() / batch, theta)[0].double())
    grads = torch.stack(grads)
    got, stderr = grads.mean(0), grads.std(0) / repeats ** 0.5
    nodes, probs = sigma_dist.quadrature()
    s2 = torch.as_tensor(nodes ** 2)[:, None]
    want = (torch.as_tensor(probs)[:, None] * s2 * (theta.detach().double() - m) / (v + s2)).sum(0)
    assert bool(((got - want).abs() < 4 * stderr + 1e-4).all()), (got, want, stderr)
    assert bool((stderr < 0.05 * want.abs()).all())


def test_surrogate_gradient_is_weighted_score_difference():
    """The official form d/dx0 sum((D_fake - D_teacher) x0) equals sigma^2 (s_fake - s_teacher)(x_t): eq. 3.2."""
    teacher = GaussianMixture(torch.tensor([[1.0, 0.0], [-1.0, 0.5]]), torch.tensor([0.1, 0.3]))
    fake = GaussianMixture(torch.tensor([[0.5, 0.5], [0.0, -1.0], [2.0, 2.0]]), torch.tensor([0.2, 0.05, 0.4]))
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    for weighting, lam in [('denoiser', lambda s: 1.0), ('score', lambda s: 1 / s ** 2)]:
        loss = IKL(LogNormal(), weighting).generator_loss(x0, None, teacher, fake, torch.Generator().manual_seed(7))
        direction = torch.autograd.grad(loss.sum(), x0)[0]
        gen = torch.Generator().manual_seed(7)  # the same sigma and noise draws, in the same order
        sigma = LogNormal().sample(64, gen, x0.device)[:, None]
        x_t = x0.detach() + sigma * torch.randn(x0.shape, generator=gen)
        want = lam(sigma) * sigma ** 2 * (fake.score(x_t, sigma) - teacher.score(x_t, sigma))
        torch.testing.assert_close(direction, want, rtol=1e-4, atol=1e-5)


def test_normalized_update_has_unit_scale_per_sample():
    teacher = GaussianMixture(torch.tensor([[3.0, 0.0]]), 0.1)
    fake = GaussianMixture(torch.tensor([[0.0, 0.0]]), 0.1)
    x0 = torch.zeros(16, 2, requires_grad=True)
    plain = torch.autograd.grad(IKL(Fixed(0.5)).generator_loss(x0, None, teacher, fake, torch.Generator().manual_seed(1)).sum(), x0)[0]
    normed = torch.autograd.grad(IKL(Fixed(0.5), normalize=True).generator_loss(x0, None, teacher, fake, torch.Generator().manual_seed(1)).sum(), x0)[0]
    gen = torch.Generator().manual_seed(1)
    x_t = 0.5 * torch.randn(16, 2, generator=gen)
    scale = teacher(x_t, 0.5).abs().mean(1, keepdim=True)
    torch.testing.assert_close(normed, plain / scale, rtol=1e-5, atol=1e-6)


def test_sid_pushes_mean_towards_teacher():
    teacher, fake = _gaussian(torch.tensor([0.0]), torch.tensor([1.0])), _gaussian(torch.tensor([2.0]), torch.tensor([1.0]))
    mu = torch.tensor([2.0], requires_grad=True)
    x0 = mu + torch.randn(20000, 1, generator=torch.Generator().manual_seed(0))
    loss = SiD(LogNormal()).generator_loss(x0, None, teacher, fake, torch.Generator().manual_seed(1))
    grad = torch.autograd.grad(loss.mean(), mu)[0]
    assert grad.item() > 0.05  # descent lowers mu towards the teacher's mean 0


class _Gauss1d(torch.nn.Module):
    """Exact denoiser of N(mean, var) in 1-D, differentiable in its input and (if they are tensors) its parameters."""

    def __init__(self, mean, var):
        super().__init__()
        self.mean, self.var = mean, var

    def forward(self, x, sigma, labels=None):
        return (x * self.var + self.mean * sigma ** 2) / (self.var + sigma ** 2)


@pytest.mark.parametrize('sigma', [0.6, 2.0])
def test_sid_with_alpha_half_is_half_the_fisher_divergence_gradient(sigma):
    """SiD's score identity: with the fake score the generator's exact denoiser (weights held fixed, gradients
    through the inputs only), alpha = 0.5 and no normaliser, the loss's gradient equals half the gradient of the
    Fisher divergence E lam |D_teacher - D_q(theta)|^2, whose fake side moves with theta."""
    m, v = 0.7, 0.25                                   # teacher: the data N(m, v)
    mu = torch.tensor(0.1, requires_grad=True)         # generator: x0 = mu + s * eps
    s = torch.tensor(0.8, requires_grad=True)
    n = 400000
    x0 = mu + s * torch.randn(n, 1, generator=torch.Generator().manual_seed(1))
    teacher, fake = _Gauss1d(m, v), _Gauss1d(mu.detach(), (s ** 2).detach())

    def sid_grad(alpha):
        div = SiD(Fixed(sigma), alpha=alpha, normalize=False)
        loss = div.generator_loss(x0, None, teacher, fake, torch.Generator().manual_seed(2)).sum() / n
        return torch.stack(torch.autograd.grad(loss, [mu, s], retain_graph=True))

    x_t = x0 + sigma * torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    fisher = (get_weighting('denoiser')(torch.tensor(sigma)) * (teacher(x_t, sigma) - _Gauss1d(mu, s ** 2)(x_t, sigma)) ** 2).sum() / n
    half = 0.5 * torch.stack(torch.autograd.grad(fisher, [mu, s], retain_graph=True))
    torch.testing.assert_close(sid_grad(0.5), half, rtol=0.02, atol=0)
    for alpha in (-0.5, 1.2):  # alpha and its sign matter: beyond the Monte-Carlo tolerance above
        assert not torch.allclose(sid_grad(alpha), half, rtol=0.05, atol=0)


def test_karras_uses_sids_time_convention():
    """t = 0 at sigma_min, t = 1 at sigma_max: SiD's t in [0, 0.8] is sigma in [0.002, ~24.2]."""
    atoms = Karras(0.002, 80.0, 7.0, 1000, 0.0, 0.8)._atoms()
    top = (80.0 ** (1 / 7) + 0.2 * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
    assert atoms.min() == pytest.approx(0.002, rel=1e-6) and atoms.max() == pytest.approx(top, rel=2e-3)
    assert 24.0 < top < 24.5


def test_dsm_loss_excess_is_the_denoiser_error():
    """EDM DSM decomposes as E[lam |D* - y|^2] + E[lam |D - D*|^2] with D* the exact posterior mean: the excess
    loss of a wrong denoiser is its weighted squared error against the exact one (cross term vanishes)."""
    data = GaussianMixture(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]), 0.05)
    wrong = GaussianMixture(torch.tensor([[1.2, -1.0], [-1.0, 0.8]]), 0.08)
    x = data.sample(100000, torch.Generator().manual_seed(0))
    exact = edm_dsm_loss(data, x, None, LogNormal(), torch.Generator().manual_seed(1)).mean()
    worse = edm_dsm_loss(wrong, x, None, LogNormal(), torch.Generator().manual_seed(1)).mean()
    gen = torch.Generator().manual_seed(1)
    sigma = LogNormal().sample(x.shape[0], gen, x.device)[:, None]
    x_t = x + sigma * torch.randn(x.shape, generator=gen)
    lam = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
    excess = (lam * (wrong(x_t, sigma) - data(x_t, sigma)).square()).sum(1).mean()
    assert excess > 0.05
    assert abs((worse - exact) - excess) < 0.1 * excess, (worse - exact, excess)


def test_shared_fake_forward_gives_the_dsm_gradient_of_a_separate_forward():
    """DSM through the fake forward kept from the generator step equals DSM from a fresh forward at the same x_t."""
    from ikl.divergences import dsm_from_forward, FakeForward
    from ikl.toy import MLPDenoiser
    torch.manual_seed(0)
    fake = MLPDenoiser(2, 16, 2)
    teacher = GaussianMixture(torch.tensor([[1.0, 0.0]]), 0.1)
    x0 = torch.randn(32, 2, generator=torch.Generator().manual_seed(1))
    _, fwd = IKL(LogNormal()).generator_loss(x0, None, teacher, fake, torch.Generator().manual_seed(2), keep_fake_graph=True)
    shared = torch.autograd.grad(dsm_from_forward(fwd).sum(), list(fake.parameters()))
    gen = torch.Generator().manual_seed(2)
    sigma = LogNormal().sample(32, gen, x0.device)[:, None]
    x_t = x0 + sigma * torch.randn(x0.shape, generator=gen)
    separate = torch.autograd.grad(dsm_from_forward(FakeForward(fake(x_t, sigma), x0, sigma)).sum(), list(fake.parameters()))
    for a, b in zip(shared, separate):
        torch.testing.assert_close(a, b)
