"""The toy networks' options: the generator's activation and latent gain and the denoiser's octave features of x
reach the network, survive pickling, and bad ones are refused by name."""

import math
import pickle

import pytest
import torch

from ikl.toy import MLPDenoiser, MLPGenerator


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


def test_unknown_activation_is_refused():
    with pytest.raises(ValueError, match="activation: unknown 'elu'"):
        MLPGenerator(activation='elu')


def test_denoiser_octave_features_match_a_hand_computed_forward():
    torch.manual_seed(0)
    D = MLPDenoiser(2, hidden=8, layers=1, sigma_data=0.5, num_freqs=3, x_octaves=2)
    x, sigma = torch.randn(5, 2), torch.tensor([0.01, 0.1, 0.5, 1.0, 7.0])
    s = sigma[:, None]
    c_in, c_skip, c_out = 1 / (s ** 2 + 0.25).sqrt(), 0.25 / (s ** 2 + 0.25), s * 0.5 / (s ** 2 + 0.25).sqrt()
    u = c_in * x
    octaves = torch.stack([u[:, 0] * torch.pi, u[:, 0] * 2 * torch.pi, u[:, 1] * torch.pi, u[:, 1] * 2 * torch.pi], 1)
    angles = (s.log() / 4) * torch.exp(torch.linspace(0, math.log(100.0), 3))[None]
    features = torch.cat([u, octaves.sin(), octaves.cos(), angles.sin(), angles.cos()], dim=1)
    assert torch.allclose(D(x, sigma), c_skip * x + c_out * D.net(features), atol=1e-5)
    assert D.net[0].in_features == 2 + 2 * 4 + 2 * 3
    assert torch.equal(pickle.loads(pickle.dumps(D))(x, sigma), D(x, sigma))
