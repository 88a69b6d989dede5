"""Persistent classes for the persistence tests.

Kept in their own module because a pickle embeds the whole module source, which the loading side executes:
the module must be importable without this directory on sys.path and must not use __file__.
"""

import numpy as np
import torch

import dnnlib
from torch_utils import misc, persistence


@persistence.persistent_class
class TinyNet(torch.nn.Module):
    def __init__(self, channels, gain=1.0, kwargs_dict=None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn([channels, channels]))
        self.register_buffer('offset', torch.arange(channels, dtype=torch.float32))
        self.gain = np.float64(gain)
        self.kwargs_dict = kwargs_dict

    def forward(self, x):
        misc.assert_shape(x, [None, self.weight.shape[1]])
        return (x @ self.weight.t() + self.offset) * self.gain


@persistence.persistent_class
class TinyPair(torch.nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.a = TinyNet(channels, gain=2.0, kwargs_dict=dnnlib.EasyDict(x=1))
        self.b = TinyNet(channels)

    def forward(self, x):
        return self.b(self.a(x))
