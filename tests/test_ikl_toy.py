"""The toy MLP generator's options: activation and latent gain reach the network, survive pickling, and bad ones
are refused by name."""

import pickle

import pytest
import torch

from ikl.toy import MLPGenerator


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
