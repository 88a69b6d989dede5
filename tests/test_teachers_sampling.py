"""Samplers on exact teachers: the Heun ODE solution of a Gaussian against its closed form, mixture weights
recovered by Heun / Euler / stochastic sampling, and per-seed generation independent of batching."""

import math

import numpy as np
import pytest
import torch

import teachers
from teachers import networks
from teachers.analytic import GaussianMixture
from teachers.sampling import StackedRandomGenerator, ablation_sampler, edm_sampler, edm_time_steps, generate_images, \
    iddpm_sigmas, sample_seeds, split_seeds
from torch_utils.images import image_grid, to_uint8_nhwc


def test_time_steps_follow_the_rho_schedule():
    gauss = GaussianMixture(torch.zeros(1, 1), 1.0)
    t = edm_time_steps(gauss, num_steps=5, sigma_min=0.002, sigma_max=80, rho=7)
    i = np.arange(5)
    expected = (80 ** (1 / 7) + i / 4 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert t.dtype == torch.float64 and len(t) == 6 and t[-1] == 0
    assert np.allclose(t[:-1].numpy(), expected, rtol=1e-12)

    class Clipped(GaussianMixture):  # A teacher with its own range and a rounding rule.
        def round_sigma(self, sigma):
            return torch.as_tensor(sigma).mul(100).round().div(100)
    clipped = Clipped(torch.zeros(1, 1), 1.0)
    clipped.sigma_min, clipped.sigma_max = 0.01, 10.0
    t = edm_time_steps(clipped, num_steps=4)
    assert t[0] == 10.0 and t[3] == 0.01 and torch.equal(t, t.mul(100).round().div(100))
    assert edm_time_steps(gauss, num_steps=1).tolist() == [80.0, 0.0]


def test_heun_solves_the_gaussian_ode_in_closed_form():
    """For N(mu, s^2) the ODE maps x_T to mu + (x_T - mu) * s / sqrt(s^2 + T^2); Heun converges at second order."""
    mu, s = 0.7, 0.5
    teacher = GaussianMixture(torch.full([1, 1], mu), s ** 2)
    z = torch.randn(64, 1, generator=torch.Generator().manual_seed(0))
    exact = mu + (z.double() * 80 - mu) * s / math.sqrt(s ** 2 + 80 ** 2)
    errors = {}
    for solver, steps in (('heun', 40), ('heun', 160), ('euler', 40), ('euler', 160)):
        out = edm_sampler(teacher, z, num_steps=steps, solver=solver, randn_like=torch.zeros_like)
        errors[solver, steps] = float((out - exact).abs().max())
    assert errors['heun', 160] < 2e-3
    assert errors['heun', 40] / errors['heun', 160] > 10  # Second order: 4x the steps, ~16x smaller error.
    assert 2.5 < errors['euler', 40] / errors['euler', 160] < 6  # First order: ~4x.
    assert errors['euler', 40] > 4 * errors['heun', 40]


@pytest.mark.parametrize('solver,steps,churn', [('heun', 24, 0), ('euler', 200, 0), ('heun', 24, 30)])
def test_sampling_a_mixture_reproduces_its_weights_and_modes(solver, steps, churn):
    teacher = GaussianMixture(torch.tensor([[-2.0], [2.0]]), 0.3 ** 2, weights=torch.tensor([0.3, 0.7]))
    n = 4000
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(n, 1, generator=gen)
    out = edm_sampler(teacher, z, num_steps=steps, solver=solver, S_churn=churn, S_noise=1.0,
                      randn_like=lambda x: torch.randn(x.shape, dtype=x.dtype, generator=gen)).squeeze(1)
    right = out > 0
    tolerance = 4 * math.sqrt(0.3 * 0.7 / n)  # Four standard errors of the fraction.
    assert abs(float(right.double().mean()) - 0.7) < tolerance
    for mask, mean in ((right, 2.0), (~right, -2.0)):
        assert abs(float(out[mask].mean()) - mean) < 0.05
        assert abs(float(out[mask].std()) - 0.3) < 0.03


def test_stacked_generator_gives_each_seed_its_own_stream():
    rnd = StackedRandomGenerator('cpu', [3, 2 ** 32 + 7])
    draws = rnd.randn([2, 4])
    assert torch.equal(draws[0], torch.randn(4, generator=torch.Generator().manual_seed(3)))
    assert torch.equal(draws[1], torch.randn(4, generator=torch.Generator().manual_seed(7)))
    like = rnd.randn_like(torch.zeros(2, 3, dtype=torch.float64))
    assert like.dtype == torch.float64 and like.shape == (2, 3)
    ints = rnd.randint(10, size=[2])
    assert ints.shape == (2,) and bool(((ints >= 0) & (ints < 10)).all())


def test_generated_images_depend_only_on_seed():
    torch.manual_seed(0)
    net = networks.EDMPrecond(img_resolution=8, img_channels=1, label_dim=3, model_type='SongUNet', model_channels=16,
                              channel_mult=[1, 1], num_blocks=1, attn_resolutions=[], dropout=0).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape) * 0.05)
    seeds = [0, 1, 2, 3, 4]
    kwargs = dict(num_steps=3)
    one_batch = dict(pair for seeds_, images in generate_images(net, seeds, max_batch_size=8, **kwargs)
                     for pair in zip(seeds_, images))
    small_batches = dict(pair for seeds_, images in generate_images(net, seeds, max_batch_size=2, **kwargs)
                         for pair in zip(seeds_, images))
    assert sorted(one_batch) == seeds and all(np.array_equal(one_batch[s], small_batches[s]) for s in seeds)
    assert one_batch[0].shape == (8, 8, 1) and one_batch[0].dtype == np.uint8
    assert not np.array_equal(one_batch[0], one_batch[1])

    # --class overrides the label after the random draw: seeds whose random class was already 1 are unchanged.
    with torch.no_grad():
        free, free_labels = sample_seeds(net, seeds, **kwargs)
        forced, forced_labels = sample_seeds(net, seeds, class_idx=1, **kwargs)
    assert bool((forced_labels[:, 1] == 1).all())
    same = free_labels[:, 1] == 1
    assert 0 < int(same.sum()) < len(seeds)
    assert torch.equal(free[same], forced[same]) and not torch.equal(free[~same], forced[~same])
    with pytest.raises(ValueError, match='out of range'):
        sample_seeds(net, seeds, class_idx=3)


def test_seed_split_across_ranks_and_image_helpers():
    seeds = list(range(11))
    per_rank = [split_seeds(seeds, max_batch_size=2, rank=r, world_size=2) for r in range(2)]
    flat = sorted(s for batches in per_rank for batch in batches for s in batch)
    assert flat == seeds and len(per_rank[0]) == len(per_rank[1]) == 3
    assert all(len(batch) <= 2 for batches in per_rank for batch in batches)

    x = torch.tensor([-1.0, 0.0, 1.0, 2.0], dtype=torch.float64).reshape(1, 1, 2, 2)
    assert to_uint8_nhwc(x).flatten().tolist() == [0, 128, 255, 255]
    tiles = np.arange(3 * 2 * 2 * 1, dtype=np.uint8).reshape(3, 2, 2, 1)
    grid = image_grid(tiles, grid_w=2)
    assert grid.shape == (4, 4, 1) and (grid[2:, 2:] == 0).all() and (grid[2:4, 0:2] == tiles[2]).all()


def test_ablation_sampler_defaults_equal_edm_sampler():
    teacher = GaussianMixture(torch.tensor([[-1.0], [1.5]]), 0.2, weights=torch.tensor([0.4, 0.6]))
    z = torch.randn(32, 1, generator=torch.Generator().manual_seed(2))
    for churn in (0, 20):
        runs = []
        for sampler in (edm_sampler, ablation_sampler):
            gen = torch.Generator().manual_seed(3)
            runs.append(sampler(teacher, z, num_steps=12, S_churn=churn, sigma_min=0.002, sigma_max=80,
                                randn_like=lambda x: torch.randn(x.shape, dtype=x.dtype, generator=gen)))
        assert torch.allclose(runs[0], runs[1], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize('disc,schedule,scaling', [('vp', 'vp', 'vp'), ('ve', 've', 'none'), ('iddpm', 'linear', 'none'),
                                                   ('edm', 'linear', 'vp')])
def test_ablation_sampler_variants_solve_the_gaussian_ode(disc, schedule, scaling):
    mu, s = 0.7, 0.5
    teacher = GaussianMixture(torch.full([1, 1], mu), s ** 2)
    z = torch.randn(16, 1, generator=torch.Generator().manual_seed(0))
    sigma_start = {'vp': 152.16, 've': 100.0, 'edm': 80.0}.get(disc)
    if disc == 'iddpm':
        u = iddpm_sigmas()
        sigma_start = float(u[(u >= 0.002) & (u <= 81)].max())
    out = ablation_sampler(teacher, z, num_steps=256, discretization=disc, schedule=schedule, scaling=scaling,
                           randn_like=torch.zeros_like)
    if disc == 'vp':  # Exact start: sigma_VP(1) with beta_d = 19.9, beta_min = 0.1.
        sigma_start = math.sqrt(math.exp(0.5 * 19.9 + 0.1) - 1)
    exact = mu + (z.double() * sigma_start - mu) * s / math.sqrt(s ** 2 + sigma_start ** 2)
    tolerance = {'vp': 2e-4, 've': 4e-3, 'iddpm': 2e-4, 'edm': 1e-3}[disc]  # VE's sqrt(t) schedule converges slowest.
    assert float((out - exact).abs().max()) < tolerance
    # generate.py's path: any ablation option selects this sampler.
    imgs, _ = sample_seeds(teacher, [0, 1], num_steps=8, discretization=disc, schedule=schedule, scaling=scaling)
    assert imgs.shape == (2, 1) and torch.isfinite(imgs).all()


def test_score_helper_matches_the_exact_mixture_score():
    teacher = GaussianMixture(torch.tensor([[-1.0, 0.5], [2.0, 1.0]]), torch.tensor([0.3, 0.6]))
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(4))
    sigma = torch.tensor([0.1, 0.5, 1.0, 2.0, 8.0])
    assert torch.allclose(teachers.score(teacher, x, sigma), teacher.score(x, sigma), rtol=1e-4, atol=1e-4)
    assert teachers.is_teacher(teacher) and not teachers.is_teacher(torch.nn.Linear(1, 1))
    assert teachers.missing_teacher_attributes(torch.nn.Linear(1, 1))[0] == 'img_resolution'
