"""Fused bias + activation + gain + clamp, the element-wise tail of every StyleGAN2 layer.

`y = clamp(act(x + b) * gain, -clamp, +clamp)`, with `b` broadcast along `dim`. `impl='ref'` is pure PyTorch (any
device and dtype, differentiable to any order). The default `impl='cuda'` keeps upstream's spelling and means "the
compiled kernel when one is available for this tensor, otherwise the reference"; see `torch_utils.custom_ops`.
"""

import numpy as np
import torch
import torch.nn.functional as F

import dnnlib

from . import _plugin

#----------------------------------------------------------------------------------------------------------------
# The activation table. `cuda_idx` is the kernel's activation code; `ref` says which tensor the kernel's backward
# pass needs ('x' = the pre-activation input, 'y' = the output, '' = neither); `has_2nd_grad` says whether the
# second derivative is non-zero somewhere (piecewise-linear activations have none).

activation_funcs = {
    'linear':   dnnlib.EasyDict(func=lambda x, **_: x,                          def_alpha=0,   def_gain=1,          cuda_idx=1, ref='',  has_2nd_grad=False),
    'relu':     dnnlib.EasyDict(func=lambda x, **_: torch.relu(x),              def_alpha=0,   def_gain=np.sqrt(2), cuda_idx=2, ref='y', has_2nd_grad=False),
    'lrelu':    dnnlib.EasyDict(func=lambda x, alpha, **_: F.leaky_relu(x, alpha), def_alpha=0.2, def_gain=np.sqrt(2), cuda_idx=3, ref='y', has_2nd_grad=False),
    'tanh':     dnnlib.EasyDict(func=lambda x, **_: torch.tanh(x),              def_alpha=0,   def_gain=1,          cuda_idx=4, ref='y', has_2nd_grad=True),
    'sigmoid':  dnnlib.EasyDict(func=lambda x, **_: torch.sigmoid(x),           def_alpha=0,   def_gain=1,          cuda_idx=5, ref='y', has_2nd_grad=True),
    'elu':      dnnlib.EasyDict(func=lambda x, **_: F.elu(x),                   def_alpha=0,   def_gain=1,          cuda_idx=6, ref='y', has_2nd_grad=True),
    'selu':     dnnlib.EasyDict(func=lambda x, **_: F.selu(x),                  def_alpha=0,   def_gain=1,          cuda_idx=7, ref='y', has_2nd_grad=True),
    'softplus': dnnlib.EasyDict(func=lambda x, **_: F.softplus(x),              def_alpha=0,   def_gain=1,          cuda_idx=8, ref='y', has_2nd_grad=True),
    'swish':    dnnlib.EasyDict(func=lambda x, **_: torch.sigmoid(x) * x,       def_alpha=0,   def_gain=np.sqrt(2), cuda_idx=9, ref='x', has_2nd_grad=True),
}

#----------------------------------------------------------------------------------------------------------------

def _resolve_args(x, b, dim, act, alpha, gain, clamp):
    """Validate the arguments; return `(spec, alpha, gain, clamp)` as Python floats (clamp -1 = off)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f'bias_act: x must be a tensor, got {type(x).__name__}')
    if act not in activation_funcs:
        raise ValueError(f'bias_act: unknown activation {act!r}; expected one of {sorted(activation_funcs)}')
    if b is not None:
        if not isinstance(b, torch.Tensor) or b.ndim != 1:
            raise ValueError('bias_act: b must be None or a 1-D tensor')
        if not 0 <= dim < x.ndim or b.shape[0] != x.shape[dim]:
            raise ValueError(f'bias_act: b has {b.shape[0]} entries but x.shape[{dim}] is '
                             f'{x.shape[dim] if 0 <= dim < x.ndim else "out of range"} (x shape {list(x.shape)})')
    spec = activation_funcs[act]
    alpha = float(alpha if alpha is not None else spec.def_alpha)
    gain = float(gain if gain is not None else spec.def_gain)
    clamp = float(clamp if clamp is not None else -1)
    if clamp != -1 and clamp < 0:
        raise ValueError(f'bias_act: clamp must be None or >= 0, got {clamp}')
    return spec, alpha, gain, clamp


def _bias_act_ref(x, b, dim, spec, alpha, gain, clamp):
    """Pure-PyTorch bias_act, in the documented order: bias, activation, gain, clamp."""
    if b is not None:
        x = x + b.to(x.dtype).reshape([-1 if i == dim else 1 for i in range(x.ndim)])
    x = spec.func(x, alpha=alpha)
    if gain != 1:
        x = x * gain
    if clamp >= 0:
        x = x.clamp(-clamp, clamp)
    return x


def bias_act(x, b=None, dim=1, act='linear', alpha=None, gain=None, clamp=None, impl='cuda'):
    """Add bias `b` along `dim`, apply activation `act`, scale by `gain`, clamp to `[-clamp, clamp]`.

    `alpha`/`gain` default to the activation's `def_alpha`/`def_gain`; `clamp=None` disables clamping. The
    result has `x`'s shape and dtype and supports first and second derivatives.
    """
    spec, alpha, gain, clamp = _resolve_args(x, b, dim, act, alpha, gain, clamp)
    if impl not in ('ref', 'cuda', 'compiled'):
        raise ValueError(f"bias_act: impl must be 'ref', 'cuda' (compiled when available) or 'compiled', got {impl!r}")
    if x.numel() > 0 and _plugin.use_compiled(impl, x, beneficial=_compiled_is_faster(x, spec)):
        if b is not None:
            b = b.to(x.dtype).contiguous()
        if not (x.is_contiguous() or (x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last))):
            x = x.contiguous()
        return _BiasActCompiled.apply(x, b, (dim, act, alpha, gain, clamp))
    return _bias_act_ref(x, b, dim, spec, alpha, gain, clamp)

#----------------------------------------------------------------------------------------------------------------
# Compiled path. Backward recomputes v = x + b from the saved input instead of storing extra tensors; the second
# derivative splits into the part flowing to dy (the first-derivative kernel applied to ddx) and the part flowing
# back to x and b (the f'' kernel). Third derivatives are not provided (upstream provides none either).

_FORWARD, _GRAD, _GRAD2 = 0, 1, 2


def _compiled_is_faster(x, spec):
    """Where the compiled kernel beats the reference by default (measured by bench/ops.py).

    On CPU the piecewise-linear activations (linear, relu, lrelu: the ones StyleGAN2 uses) vectorise and fuse up to
    four passes into one; transcendental ones call scalar libm and lose to PyTorch's vectorised kernels, and small
    tensors are dominated by call overhead, so those stay with the reference. On CUDA the kernel is always used.
    """
    if x.device.type == 'cuda':
        return True
    return not spec.has_2nd_grad and x.numel() >= _plugin.MIN_CPU_NUMEL


def _kernel(mode, x, b, dy, ddx, cfg):
    dim, act, alpha, gain, clamp = cfg
    return torch.ops.toolkit_ops.bias_act(x, b, dy, ddx, mode, dim, activation_funcs[act].cuda_idx, alpha, gain, clamp)


def _like(t, x):
    """`t` with the strides of `x` (the kernels index all tensors of one call alike)."""
    return t if t.stride() == x.stride() else torch.empty_like(x).copy_(t)


def _bias_grad(dx, x, b, dim):
    return dx.sum([i for i in range(x.ndim) if i != dim]) if b is not None else None


class _BiasActCompiled(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, b, cfg):
        ctx.save_for_backward(x, b)
        ctx.cfg = cfg
        return _kernel(_FORWARD, x, b, None, None, cfg)

    @staticmethod
    def backward(ctx, dy):
        x, b = ctx.saved_tensors
        dx = _BiasActGradCompiled.apply(_like(dy, x), x, b, ctx.cfg)
        db = _bias_grad(dx, x, b, ctx.cfg[0]) if ctx.needs_input_grad[1] else None
        return dx, db, None


class _BiasActGradCompiled(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dy, x, b, cfg):
        ctx.save_for_backward(dy, x, b)
        ctx.cfg = cfg
        return _kernel(_GRAD, x, b, dy, None, cfg)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, ddx):
        dy, x, b = ctx.saved_tensors
        ddx = _like(ddx, x)
        d_dy = _kernel(_GRAD, x, b, ddx, None, ctx.cfg) if ctx.needs_input_grad[0] else None
        d_x = d_b = None
        if activation_funcs[ctx.cfg[1]].has_2nd_grad and (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]):
            d_x = _kernel(_GRAD2, x, b, dy, ddx, ctx.cfg)
            d_b = _bias_grad(d_x, x, b, ctx.cfg[0]) if ctx.needs_input_grad[2] else None
        return d_dy, d_x, d_b, None
