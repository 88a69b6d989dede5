"""The empirical denoiser (an independent float64 mixture of near-Diracs as reference, its ring buffer), and what
the IKL update does to a grid of modes with and without samples between them (the explanation in README.md)."""

import os
import pickle
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import ikl  # noqa: E402
from teachers.analytic import GaussianMixture, grid25  # noqa: E402

from empirical import EmpiricalDenoiser  # noqa: E402


@pytest.mark.parametrize('sigma', [0.03, 0.3, 3.0])
def test_empirical_denoiser_equals_a_mixture_of_near_diracs_on_its_samples(sigma):
    torch.manual_seed(0)
    samples, x = torch.randn(60, 2), 2 * torch.randn(200, 2)
    diracs = GaussianMixture(samples.double(), 1e-12)  # an independent implementation, in float64
    want = diracs(x.double(), torch.full([200], sigma, dtype=torch.float64))
    got = EmpiricalDenoiser(samples)(x, sigma)
    assert torch.allclose(got.double(), want.double(), atol=2e-5, rtol=0)


def test_empirical_denoiser_keeps_the_latest_samples_and_pickles():
    fake = EmpiricalDenoiser(torch.zeros(5, 2))
    batches = [torch.full([3, 2], 1.0), torch.full([4, 2], 2.0)]
    for b in batches:
        fake.observe(b)
    assert sorted(fake.samples[:, 0].tolist()) == [1.0, 2.0, 2.0, 2.0, 2.0] and int(fake.write_pos) == 2
    fake.observe(torch.arange(14.0).reshape(7, 2))  # more than it holds: the last five
    assert sorted(fake.samples[:, 0].tolist()) == [4.0, 6.0, 8.0, 10.0, 12.0]
    clone = pickle.loads(pickle.dumps(fake))
    assert torch.equal(clone.samples, fake.samples) and int(clone.write_pos) == int(fake.write_pos)
    with pytest.raises(ValueError, match=r'\[capacity, dim\]'):
        EmpiricalDenoiser(torch.zeros(0, 2))


def _grid_with_bridges(n: int, std: float, bridge_share: float, seed: int) -> torch.Tensor:
    """Samples of 25 modes of the given std on the grid; a share of them lies along the segment from its mode to a
    neighbour (the bridges a continuous generator cannot avoid)."""
    g = torch.Generator().manual_seed(seed)
    centres = grid25().means.float()[torch.randint(25, (n,), generator=g)]
    axis = torch.nn.functional.one_hot(torch.randint(2, (n,), generator=g), 2).float()
    towards_inside = torch.where(centres <= 0, 2.0, -2.0) * axis
    bridges = centres + torch.rand(n, 1, generator=g) * towards_inside + 0.03 * torch.randn(n, 2, generator=g)
    cores = centres + std * torch.randn(n, 2, generator=g)
    return torch.where(torch.rand(n, 1, generator=g) < bridge_share, bridges, cores)


def _core_radial_update(std: float, bridge_share: float, seed: int = 0) -> float:
    """Mean of the IKL update times the offset from the nearest centre (positive: outwards) over the samples within
    3 teacher std of a centre; official noise law, exact scores (the mixture, and the empirical denoiser of a
    second draw of the same law)."""
    x0 = _grid_with_bridges(8192, std, bridge_share, seed).requires_grad_(True)
    fake = EmpiricalDenoiser(_grid_with_bridges(8192, std, bridge_share, seed + 1))
    teacher = grid25()
    loss = ikl.make_divergence('ikl', ikl.LogNormal()).generator_loss(x0, None, teacher, fake,
                                                                        torch.Generator().manual_seed(seed + 2))
    update = -torch.autograd.grad(loss.sum(), x0)[0]
    x0 = x0.detach()
    offset = x0 - teacher.means.float()[torch.cdist(x0.double(), teacher.means).argmin(1)]
    core = offset.norm(dim=1) < 0.15
    return float((update * offset).sum(1)[core].mean())


def test_ikl_update_widens_narrow_modes_but_bridges_make_it_contract_the_cores():
    """The explanation in README.md: even with exact scores, samples between modes make the IKL update pull each
    mode's core inwards, the more the more bridges there are, while narrow modes without bridges are widened."""
    assert _core_radial_update(std=0.03, bridge_share=0.0) > 5e-5
    assert abs(_core_radial_update(std=0.05, bridge_share=0.0)) < 3e-5  # the teacher's own law: no pull either way
    contract = [_core_radial_update(std=0.05, bridge_share=share) for share in (0.03, 0.1)]
    assert contract[1] < contract[0] < 0, contract
