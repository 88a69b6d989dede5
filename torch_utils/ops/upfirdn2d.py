"""Upsample, pad, FIR-filter and downsample 2-D images in one op (the resampling primitive of StyleGAN2).

Semantics, per channel: (1) insert `up - 1` zeros after every pixel, (2) pad with zeros (negative values crop),
(3) convolve with the filter `f`, keeping only "valid" outputs (true convolution unless `flip_filter=True`, which
gives correlation), (4) keep every `down`-th sample starting at index 0. Output size per axis:
`(in * up + pad0 + pad1 - taps + down) // down`.

`impl='ref'` is pure PyTorch (any device and dtype, differentiable to any order). The default `impl='cuda'` keeps
upstream's spelling and means "the compiled kernel when one is available for this tensor and configuration,
otherwise the reference"; see `torch_utils.custom_ops`.
"""

import torch
import torch.nn.functional as F

from . import _plugin

#----------------------------------------------------------------------------------------------------------------
# Argument parsing shared with conv2d_resample.

def _parse_scaling(scaling):
    """`up`/`down` as an int or `[x, y]` -> `(sx, sy)`, both ints >= 1."""
    if not isinstance(scaling, (list, tuple)):
        scaling = [scaling, scaling]
    sx, sy = (int(s) for s in scaling)
    if sx < 1 or sy < 1:
        raise ValueError(f'upfirdn2d: scaling factors must be >= 1, got {scaling}')
    return sx, sy


def _parse_padding(padding):
    """`padding` as an int, `[px, py]` or `[x0, x1, y0, y1]` -> `(x0, x1, y0, y1)`."""
    if not isinstance(padding, (list, tuple)):
        padding = [padding, padding]
    padding = [int(p) for p in padding]
    if len(padding) == 2:
        px, py = padding
        padding = [px, px, py, py]
    if len(padding) != 4:
        raise ValueError(f'upfirdn2d: padding must be an int, [px, py] or [x0, x1, y0, y1], got {padding}')
    return tuple(padding)


def _get_filter_size(f):
    """`(fw, fh)` of a filter made by `setup_filter` (None is the 1x1 identity)."""
    if f is None:
        return 1, 1
    if not isinstance(f, torch.Tensor) or f.ndim not in (1, 2):
        raise ValueError('upfirdn2d: filter must be None or a 1-D/2-D tensor made by setup_filter()')
    return f.shape[-1], f.shape[0]

#----------------------------------------------------------------------------------------------------------------

def setup_filter(f, device=torch.device('cpu'), normalize=True, flip_filter=False, gain=1, separable=None):
    """Turn a list/array/tensor of taps into the float32 filter tensor that the resampling ops expect.

    A 1-D input stays 1-D (separable) when `separable=True`, or by default when it has 8 taps or more; otherwise it
    becomes the 2-D outer product with itself. Steps, in order: normalize to sum 1, flip, scale by
    `gain ** (ndim / 2)` (so the 2-D effect is `gain` either way), move to `device`.
    """
    if f is None:
        f = 1
    f = torch.as_tensor(f, dtype=torch.float32).detach().cpu()
    if f.ndim not in (0, 1, 2) or f.numel() == 0:
        raise ValueError(f'setup_filter: expected a non-empty scalar, 1-D or 2-D filter, got shape {list(f.shape)}')
    if f.ndim == 0:
        f = f.reshape(1)
    if separable is None:
        separable = (f.ndim == 1 and f.numel() >= 8)
    if f.ndim == 1 and not separable:
        f = torch.outer(f, f)
    if f.ndim != (1 if separable else 2):
        raise ValueError('setup_filter: a 2-D filter cannot be made separable')
    if normalize:
        f = f / f.sum()
    if flip_filter:
        f = f.flip(list(range(f.ndim)))
    f = f * (gain ** (f.ndim / 2))
    return f.to(device=device)

#----------------------------------------------------------------------------------------------------------------

def _check_args(x, f):
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise ValueError(f'upfirdn2d: expected x to be a 4-D NCHW tensor, got {type(x).__name__} '
                         f'{list(x.shape) if isinstance(x, torch.Tensor) else ""}')
    if f is not None:
        if not isinstance(f, torch.Tensor) or f.ndim not in (1, 2) or f.dtype != torch.float32:
            raise ValueError('upfirdn2d: filter must be None or a float32 1-D/2-D tensor (use setup_filter())')
        if f.requires_grad:
            raise ValueError('upfirdn2d: gradients with respect to the filter are not supported; detach it')


def _output_size(in_size, up, down, pad0, pad1, taps):
    return (in_size * up + pad0 + pad1 - taps + down) // down


def _upfirdn2d_ref(x, f, up, down, padding, flip_filter, gain):
    """Pure-PyTorch upfirdn2d: literally the four steps of the module docstring."""
    upx, upy = up
    downx, downy = down
    px0, px1, py0, py1 = padding
    batch, channels, in_h, in_w = x.shape
    if f is None:
        f = torch.ones([1, 1], dtype=torch.float32, device=x.device)
    fw, fh = _get_filter_size(f)
    out_w = _output_size(in_w, upx, downx, px0, px1, fw)
    out_h = _output_size(in_h, upy, downy, py0, py1, fh)
    if out_w < 1 or out_h < 1:
        raise ValueError(f'upfirdn2d: empty output ({out_h}x{out_w}) for input {in_h}x{in_w}, filter {fh}x{fw}, '
                         f'up {up}, down {down}, padding {padding}')

    if upx > 1 or upy > 1:
        x = x.reshape(batch, channels, in_h, 1, in_w, 1)
        x = F.pad(x, [0, upx - 1, 0, 0, 0, upy - 1])
        x = x.reshape(batch, channels, in_h * upy, in_w * upx)
    x = F.pad(x, [px0, px1, py0, py1])  # F.pad crops for negative amounts.

    # conv2d correlates; flipping the taps turns it into a true convolution.
    f = f.to(device=x.device, dtype=x.dtype)
    if not flip_filter:
        f = f.flip(list(range(f.ndim)))
    if f.ndim == 2:
        weight = (f * gain).reshape(1, 1, fh, fw).expand(channels, 1, fh, fw)
        x = F.conv2d(x, weight, groups=channels)
    else:
        f = f * (gain ** 0.5)
        x = F.conv2d(x, f.reshape(1, 1, 1, fw).expand(channels, 1, 1, fw), groups=channels)
        x = F.conv2d(x, f.reshape(1, 1, fh, 1).expand(channels, 1, fh, 1), groups=channels)

    return x[:, :, ::downy, ::downx]


def upfirdn2d(x, f, up=1, down=1, padding=0, flip_filter=False, gain=1, impl='cuda'):
    """Upsample, pad, filter and downsample `x` [N,C,H,W] with the float32 filter `f` (None = identity).

    `up`/`down` are an int or `[x, y]`; `padding` an int, `[px, py]` or `[x0, x1, y0, y1]` (negative crops).
    The filter is scaled by `gain` (split as `sqrt(gain)` per pass for a separable 1-D filter).
    """
    _check_args(x, f)
    up = _parse_scaling(up)
    down = _parse_scaling(down)
    padding = _parse_padding(padding)
    gain = float(gain)
    flip_filter = bool(flip_filter)
    if impl not in ('ref', 'cuda', 'compiled'):
        raise ValueError(f"upfirdn2d: impl must be 'ref', 'cuda' (compiled when available) or 'compiled', got {impl!r}")
    if x.numel() > 0 and _plugin.use_compiled(impl, x, beneficial=_compiled_is_faster(x, up, down)):
        if f is None:
            f = torch.ones([1, 1], dtype=torch.float32, device=x.device)
        fw, fh = _get_filter_size(f)
        out_w = _output_size(x.shape[3], up[0], down[0], padding[0], padding[1], fw)
        out_h = _output_size(x.shape[2], up[1], down[1], padding[2], padding[3], fh)
        if out_w < 1 or out_h < 1:
            raise ValueError(f'upfirdn2d: empty output ({out_h}x{out_w}) for input {list(x.shape[2:])}, filter '
                             f'{fh}x{fw}, up {up}, down {down}, padding {padding}')
        return _Upfirdn2dCompiled.apply(x, f, (up, down, padding, flip_filter, gain))
    return _upfirdn2d_ref(x, f, up, down, padding, flip_filter, gain)

#----------------------------------------------------------------------------------------------------------------
# Compiled path. The gradient of upfirdn2d is again an upfirdn2d (its adjoint: up and down swap, the filter is
# mirrored, the padding is re-centred), so the autograd Function calls itself and is differentiable to any order.

def _compiled_is_faster(x, up, down):
    """Where the compiled kernel beats the reference by default (measured by bench/ops.py).

    On CPU the reference is a zero-inserting depthwise convolution that also computes the samples downsampling
    throws away; the polyphase kernel skips both, so it wins when there is resampling (and the tensor is large
    enough to amortise the call). Pure filtering is the reference's best case and stays with it. On CUDA the
    kernel is always used, as upstream does.
    """
    if x.device.type == 'cuda':
        return True
    return (max(up) > 1 or max(down) > 1) and x.numel() >= _plugin.MIN_CPU_NUMEL


def _run_kernel(x, f, up, down, padding, flip_filter, gain):
    x = x.contiguous()
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    g = f.to(device=x.device, dtype=acc_dtype)
    if not flip_filter:  # The kernel correlates; a true convolution needs the mirrored filter.
        g = g.flip(list(range(g.ndim)))
    (upx, upy), (downx, downy), (px0, px1, py0, py1) = up, down, padding
    if g.ndim == 2:
        return torch.ops.toolkit_ops.upfirdn2d(x, (g * gain).contiguous(), upx, upy, downx, downy, px0, px1, py0, py1)
    g = g * (gain ** 0.5)
    x = torch.ops.toolkit_ops.upfirdn2d(x, g.reshape(1, -1).contiguous(), upx, 1, downx, 1, px0, px1, 0, 0)
    return torch.ops.toolkit_ops.upfirdn2d(x, g.reshape(-1, 1).contiguous(), 1, upy, 1, downy, 0, 0, py0, py1)


def _adjoint_padding(in_size, out_size, up, down, pad0, taps):
    return taps - 1 - pad0, in_size * up - out_size * down + pad0 - up + 1


class _Upfirdn2dCompiled(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, f, cfg):
        ctx.save_for_backward(f)
        ctx.cfg = cfg
        ctx.in_shape = x.shape
        return _run_kernel(x, f, *cfg)

    @staticmethod
    def backward(ctx, dy):
        f, = ctx.saved_tensors
        (upx, upy), (downx, downy), (px0, px1, py0, py1), flip_filter, gain = ctx.cfg
        fw, fh = _get_filter_size(f)
        ax0, ax1 = _adjoint_padding(ctx.in_shape[3], dy.shape[3], upx, downx, px0, fw)
        ay0, ay1 = _adjoint_padding(ctx.in_shape[2], dy.shape[2], upy, downy, py0, fh)
        cfg = ((downx, downy), (upx, upy), (ax0, ax1, ay0, ay1), not flip_filter, gain)
        return _Upfirdn2dCompiled.apply(dy, f, cfg), None, None

#----------------------------------------------------------------------------------------------------------------
# Same-size filtering and 2x-style resampling, built on upfirdn2d with the padding that centres the filter.

def filter2d(x, f, padding=0, flip_filter=False, gain=1, impl='cuda'):
    """Filter `x` with `f`; the output has the input's size (plus any extra padding)."""
    px0, px1, py0, py1 = _parse_padding(padding)
    fw, fh = _get_filter_size(f)
    padding = [px0 + fw // 2, px1 + (fw - 1) // 2, py0 + fh // 2, py1 + (fh - 1) // 2]
    return upfirdn2d(x, f, padding=padding, flip_filter=flip_filter, gain=gain, impl=impl)


def upsample2d(x, f, up=2, padding=0, flip_filter=False, gain=1, impl='cuda'):
    """Upsample `x` by `up` and filter it; the gain is multiplied by `upx * upy` so constants stay constant."""
    upx, upy = _parse_scaling(up)
    px0, px1, py0, py1 = _parse_padding(padding)
    fw, fh = _get_filter_size(f)
    padding = [px0 + (fw + upx - 1) // 2, px1 + (fw - upx) // 2, py0 + (fh + upy - 1) // 2, py1 + (fh - upy) // 2]
    return upfirdn2d(x, f, up=[upx, upy], padding=padding, flip_filter=flip_filter, gain=gain * upx * upy, impl=impl)


def downsample2d(x, f, down=2, padding=0, flip_filter=False, gain=1, impl='cuda'):
    """Filter `x` and keep every `down`-th sample; a normalized filter keeps constants constant."""
    downx, downy = _parse_scaling(down)
    px0, px1, py0, py1 = _parse_padding(padding)
    fw, fh = _get_filter_size(f)
    padding = [px0 + (fw - downx + 1) // 2, px1 + (fw - downx) // 2,
               py0 + (fh - downy + 1) // 2, py1 + (fh - downy) // 2]
    return upfirdn2d(x, f, down=[downx, downy], padding=padding, flip_filter=flip_filter, gain=gain, impl=impl)
