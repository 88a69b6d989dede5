"""The analytic Gaussian-mixture teacher against brute-force posterior means and exact identities."""

import math
import pickle

import numpy as np
import pytest
import torch

import ikl
from teachers.analytic import GaussianMixture, grid25, ring8


def _mixture_1d():
    return GaussianMixture(torch.tensor([[-2.0], [0.5], [3.0]]), torch.tensor([0.3, 0.05, 1.2]), torch.tensor([0.2, 0.5, 0.3]))


@pytest.mark.parametrize('sigma', [0.0, 0.05, 0.4, 2.0, 30.0])
def test_denoiser_matches_quadrature_1d(sigma):
    gm = _mixture_1d()
    x = torch.linspace(-5, 6, 23)[:, None]
    got = gm(x, sigma).double().squeeze(1).numpy()
    # Brute force: E[x0 | x] = int x0 p(x0) N(x; x0, sigma^2) dx0 / int p(x0) N(x; x0, sigma^2) dx0 on a fine grid.
    grid = np.linspace(-12, 14, 400001)
    mus, vs, ws = gm.means[:, 0].numpy(), gm.variances[:, 0].numpy(), gm.log_weights.exp().numpy()
    prior = sum(w * np.exp(-(grid - m) ** 2 / (2 * v)) / np.sqrt(2 * np.pi * v) for m, v, w in zip(mus, vs, ws))
    want = []
    for xi in x[:, 0].double().numpy():
        if sigma == 0:
            want.append(xi)
            continue
        lik = np.exp(-(xi - grid) ** 2 / (2 * sigma ** 2))
        want.append(np.trapezoid(grid * prior * lik, grid) / np.trapezoid(prior * lik, grid))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_denoiser_matches_importance_sampling_diagonal_2d():
    means = torch.tensor([[-1.0, 0.0], [1.0, 1.0], [0.0, -1.5]])
    variances = torch.tensor([[0.2, 0.05], [0.1, 0.3], [0.4, 0.1]])
    gm = GaussianMixture(means, variances, torch.tensor([0.5, 0.3, 0.2]))
    sigma = 0.7
    x = torch.tensor([[0.3, -0.2], [1.5, 0.8], [-1.0, -1.0]])
    got = gm(x, sigma).double()
    gen = torch.Generator().manual_seed(0)
    x0 = gm.sample(400000, generator=gen).double()  # proposal = prior; weights = likelihood
    for i in range(x.shape[0]):
        logw = -((x[i].double() - x0) ** 2).sum(1) / (2 * sigma ** 2)
        w = torch.softmax(logw, 0)
        est = (w[:, None] * x0).sum(0)
        ess = 1 / w.square().sum()
        err = 5 * x0.std(0) / ess.sqrt()  # generous Monte-Carlo band
        assert bool(((est - got[i]).abs() < err).all()), (i, est, got[i], err)


def test_score_is_denoiser_identity_and_log_prob_gradient():
    gm = GaussianMixture(torch.randn(4, 3, generator=torch.Generator().manual_seed(1)), torch.tensor([0.1, 0.2, 0.3, 0.5]))
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sigma = torch.tensor([0.1, 0.5, 1.0, 2.0, 0.3, 0.05])
    score = gm.score(x, sigma).double()
    via_denoiser = (gm(x, sigma).double() - x) / sigma.double()[:, None] ** 2
    torch.testing.assert_close(score, via_denoiser, rtol=1e-4, atol=1e-4)
    xg = x.clone().requires_grad_(True)
    autograd = torch.autograd.grad(gm.log_prob(xg, sigma).sum(), xg)[0]
    torch.testing.assert_close(score, autograd, rtol=1e-5, atol=1e-5)


def test_sampling_moments_and_components():
    gm = GaussianMixture(torch.tensor([[0.0, 0.0], [4.0, -2.0]]), torch.tensor([[1.0, 0.25], [0.04, 0.09]]), torch.tensor([0.25, 0.75]))
    x, comp = gm.sample(200000, generator=torch.Generator().manual_seed(3), return_components=True)
    assert x.dtype == torch.float32 and list(x.shape) == [200000, 2]
    assert abs(comp.float().mean().item() - 0.75) < 0.005
    for k in range(2):
        xk = x[comp == k].double()
        torch.testing.assert_close(xk.mean(0), gm.means[k], atol=0.02, rtol=0)
        torch.testing.assert_close(xk.var(0), gm.variances[k], atol=0.02, rtol=0.02)


def test_image_shaped_and_class_conditional():
    means = torch.randn(4, 3 * 4 * 4, generator=torch.Generator().manual_seed(4))
    gm = GaussianMixture(means, 0.1, data_shape=[3, 4, 4], component_classes=[0, 0, 1, 1], label_dim=2)

    assert gm.img_channels == 3 and gm.img_resolution == 4 and gm.label_dim == 2
    labels = torch.eye(2)[[1] * 64]
    x = gm.sample(64, generator=torch.Generator().manual_seed(5), class_labels=labels)
    assert list(x.shape) == [64, 3, 4, 4]
    # Samples of class 1 sit near components 2 or 3 only; the conditional denoiser at small sigma agrees.
    d = ((x.reshape(64, 1, -1) - means[None]) ** 2).sum(-1)
    assert set(d.argmin(1).tolist()) <= {2, 3}
    x0 = gm(x, torch.full([64, 1, 1, 1], 1e-3), labels)
    assert list(x0.shape) == [64, 3, 4, 4] and x0.dtype == torch.float32
    torch.testing.assert_close(x0, x, atol=1e-3, rtol=0)
    # At huge sigma the class-1 posterior mean is the mean of components 2 and 3.
    far = gm(torch.zeros(1, 3, 4, 4), 1e4, labels[:1]).reshape(-1)
    torch.testing.assert_close(far, means[2:].mean(0), atol=1e-4, rtol=0)


def test_ring_and_grid_constructors():
    r = ring8()
    assert r.num_components == 8
    torch.testing.assert_close(r.means.norm(dim=1), torch.full([8], 2.0, dtype=torch.float64))
    g = grid25(spacing=2.0, std=0.05)
    assert g.num_components == 25
    assert sorted(set(g.means[:, 0].tolist())) == [-4.0, -2.0, 0.0, 2.0, 4.0]
    torch.testing.assert_close(g.variances, torch.full([25, 2], 0.0025, dtype=torch.float64))
    torch.testing.assert_close(g.log_weights.exp(), torch.full([25], 1 / 25, dtype=torch.float64))


def test_bad_input_is_reported():
    with pytest.raises(ValueError, match='variances'):
        GaussianMixture(torch.zeros(2, 2), torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match='data_shape'):
        GaussianMixture(torch.zeros(2, 12), 1.0, data_shape=[3, 2, 3])
    assert math.isinf(ring8().sigma_max)


def test_trainable_copy_starts_exact_and_pickles():
    gm = _mixture_1d()
    fake = gm.trainable_copy()
    assert sorted(n for n, _ in fake.named_parameters()) == ['log_variances', 'logits', 'means']
    assert not list(gm.parameters())  # the teacher stays fixed
    x = torch.linspace(-5, 6, 23)[:, None]
    for sigma in [0.0, 0.3, 4.0]:
        torch.testing.assert_close(fake(x, sigma), gm(x, sigma), atol=0, rtol=0)
    fake(x, 0.3).sum().backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in fake.parameters())
    clone = pickle.loads(pickle.dumps(fake))
    torch.testing.assert_close(clone(x, 0.3), fake(x, 0.3), atol=0, rtol=0)


def test_trainable_copy_fitted_by_dsm_recovers_the_data_mixture():
    """Denoising score matching on samples of another mixture moves the copy's parameters to that mixture's."""
    start = GaussianMixture(torch.tensor([[-1.0], [1.0]]), torch.tensor([0.1, 0.1]))
    data = GaussianMixture(torch.tensor([[-1.3], [0.8]]), torch.tensor([0.05, 0.2]), torch.tensor([0.3, 0.7]))
    fake = start.trainable_copy()
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(fake.parameters(), lr=1e-2)
    for _ in range(1500):
        loss = ikl.edm_dsm_loss(fake, data.sample(512, gen), None, ikl.LogNormal(), gen, sigma_data=1.0).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.testing.assert_close(fake.means.detach(), data.means, atol=0.01, rtol=0)
    torch.testing.assert_close(fake.variances.detach(), data.variances, atol=0, rtol=0.06)
    torch.testing.assert_close(fake.log_weights.detach().exp(), data.log_weights.exp(), atol=0.015, rtol=0)
