"""The toy networks' options: the generator's activation and latent gain, the denoiser's exact base; they reach the
network, survive pickling, and bad ones are refused by name. The empirical denoiser, and what the IKL update does
to a grid of modes with and without samples between them (the README's toy2d explanation)."""

import pickle

import pytest
import torch

import ikl
from ikl.toy import EmpiricalDenoiser, MLPDenoiser, MLPGenerator
from teachers.analytic import GaussianMixture, grid25


@pytest.mark.parametrize('activation, fn', [('relu', torch.relu), ('tanh', torch.tanh),
                                            ('silu', lambda a: a * torch.sigmoid(a))])
def test_generator_with_gain_matches_a_hand_computed_forward(activation, fn):
    torch.manual_seed(0)
    G = MLPGenerator(2, 2, hidden=8, layers=2, input_gain=5.0, activation=activation)
    z = torch.randn(16, 2)
    (w0, b0), (w1, b1), (w2, b2) = [(m.weight, m.bias) for m in G.net if isinstance(m, torch.nn.Linear)]
    h = fn((5.0 * z) @ w0.T + b0)
    h = fn(h @ w1.T + b1)
    assert torch.allclose(G(z), h @ w2.T + b2, atol=1e-6)
    clone = pickle.loads(pickle.dumps(G))
    assert clone.input_gain == 5.0 and torch.equal(clone(z), G(z))


def test_generator_output_noise_adds_the_last_latents_with_a_learned_strength():
    torch.manual_seed(0)
    G = MLPGenerator(3, 2, hidden=8, layers=2, input_gain=2.0, output_noise=True, noise_init=0.05)
    assert G.z_dim == 5 and torch.equal(G.noise_strength.detach(), torch.full([2], 0.05))
    z = torch.randn(16, 5)
    torch.testing.assert_close(G(z), G.net(2.0 * z[:, :3]) + 0.05 * z[:, 3:], atol=0, rtol=0)
    G(z)[:, 1].sum().backward()  # d/da_1 of sum_n x_n1 is sum_n z_n4; nothing reaches a_0
    torch.testing.assert_close(G.noise_strength.grad, torch.stack([torch.tensor(0.0), z[:, 4].sum()]))
    clone = pickle.loads(pickle.dumps(G))
    assert torch.equal(clone(z), G(z))
    assert MLPGenerator(3, 2).z_dim == 3 and MLPGenerator(3, 2).noise_strength is None


def test_output_noise_strength_gradient_is_strength_times_mean_update_derivative():
    """Stein's lemma, as the docstring and README use it: for samples x = f(z) + a * n receiving an update field g(x)
    through the surrogate sum(g(x).detach() * x), the gradient on a_i is E[g_i(x) n_i] = a_i E[dg_i/dx_i]."""
    torch.manual_seed(0)
    G = MLPGenerator(2, 2, hidden=8, layers=2, output_noise=True)
    with torch.no_grad():
        G.noise_strength.copy_(torch.tensor([0.5, 0.2]))
    A = torch.tensor([[2.0, 0.7], [-0.4, -1.5]])  # g(x) = A x + tanh(2 x): dg_i/dx_i = A_ii + 2 (1 - tanh(2 x_i)^2)
    x = G(torch.randn(400000, 4, generator=torch.Generator().manual_seed(1)))
    g = x.detach() @ A.T + torch.tanh(2 * x.detach())
    (g * x).sum(1).mean().backward()
    mean_derivative = A.diagonal() + 2 * (1 - torch.tanh(2 * x.detach()).square()).mean(0)
    torch.testing.assert_close(G.noise_strength.grad, torch.tensor([0.5, 0.2]) * mean_derivative, atol=0.02, rtol=0)


def test_unknown_activation_is_refused():
    with pytest.raises(ValueError, match="activation: unknown 'elu'"):
        MLPGenerator(activation='elu')


def test_denoiser_on_an_exact_base_starts_as_that_base_and_learns_only_its_correction():
    teacher = grid25()
    D = MLPDenoiser(2, hidden=16, layers=2, sigma_data=2.8, base=teacher)
    gen = torch.Generator().manual_seed(0)
    x, sigma = 3 * torch.randn(64, 2, generator=gen), torch.rand(64, generator=gen) + 0.01
    assert torch.equal(D(x, sigma), teacher(x, sigma))
    assert all(name.startswith('net.') for name, _ in D.named_parameters())  # the teacher is not trained
    opt = torch.optim.SGD(D.parameters(), lr=0.1)
    D(x, sigma).square().sum().backward()
    opt.step()
    s = sigma[:, None]
    c_in, c_out = 1 / (s ** 2 + 2.8 ** 2).sqrt(), s * 2.8 / (s ** 2 + 2.8 ** 2).sqrt()
    angles = (s.log() / 4) * D.freqs[None]
    correction = c_out * D.net(torch.cat([c_in * x, angles.sin(), angles.cos()], dim=1))
    assert correction.abs().max() > 0
    assert torch.allclose(D(x, sigma), teacher(x, sigma) + correction, atol=1e-6)
    assert torch.equal(pickle.loads(pickle.dumps(D))(x, sigma), D(x, sigma))


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
    """The README's toy2d explanation: even with exact scores, samples between modes make the IKL update pull each
    mode's core inwards, the more the more bridges there are, while narrow modes without bridges are widened."""
    assert _core_radial_update(std=0.03, bridge_share=0.0) > 5e-5
    assert abs(_core_radial_update(std=0.05, bridge_share=0.0)) < 3e-5  # the teacher's own law: no pull either way
    contract = [_core_radial_update(std=0.05, bridge_share=share) for share in (0.03, 0.1)]
    assert contract[1] < contract[0] < 0, contract
