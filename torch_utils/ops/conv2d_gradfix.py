"""conv2d / conv_transpose2d with upstream's switches for cheap regularizer gradients.

Upstream replaced the convolutions with a custom op so that (a) double backward works and (b) weight gradients can be
skipped inside `no_weight_gradients()` (R1 and path-length penalties only need gradients with respect to images).
Modern PyTorch gives both for free: convolution double backward is built in, and `torch.autograd.grad(..., inputs=
[images])` already computes only the gradients it needs. So the functions below are exactly `F.conv2d` /
`F.conv_transpose2d`; `enabled` and `no_weight_gradients()` are kept because training code sets and uses them.
"""

import contextlib

import torch.nn.functional as F

enabled = False                     # Upstream's opt-in flag; nothing to switch on here, kept for compatibility.
weight_gradients_disabled = False   # True inside no_weight_gradients().


@contextlib.contextmanager
def no_weight_gradients(disable=True):
    """Mark a region whose backward passes need no weight gradients (nestable, restores the previous state)."""
    global weight_gradients_disabled
    previous = weight_gradients_disabled
    if disable:
        weight_gradients_disabled = True
    try:
        yield
    finally:
        weight_gradients_disabled = previous


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    return F.conv2d(input, weight, bias, stride=stride, padding=padding, dilation=dilation, groups=groups)


def conv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    return F.conv_transpose2d(input, weight, bias, stride=stride, padding=padding, output_padding=output_padding,
                              groups=groups, dilation=dilation)
