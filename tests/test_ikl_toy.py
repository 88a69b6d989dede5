"""The vector networks' options: the generator's activation and latent gain, the denoiser's exact base; they reach
the network, survive pickling, and bad ones are refused by name."""

import pickle

import pytest
import torch

from ikl.toy import MLPDenoiser, MLPGenerator
from teachers.analytic import grid25


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
