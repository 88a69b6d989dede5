"""2-D convolution fused with FIR upsampling/downsampling, as StyleGAN2's layers use it.

The meaning is the reference pipeline `_conv2d_resample_ref` (padding is relative to the upsampled image and applied
once). The public function takes cheaper but mathematically identical routes where it can:
* no resampling: one `conv2d` (with symmetric padding folded in);
* `down > 1`: filter, then a strided convolution (subsampling a convolution's output = striding it);
* `up > 1`: a strided transposed convolution (= zero insertion + full convolution), then the filter;
* 1x1 kernels: the per-channel resampling commutes with channel mixing, so it runs on the side with fewer channels.
The tests check each route against the reference.
"""

import torch

from . import conv2d_gradfix
from . import upfirdn2d
from .upfirdn2d import _parse_padding, _get_filter_size

#----------------------------------------------------------------------------------------------------------------

def _check_args(x, w, f, up, down, groups):
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise ValueError('conv2d_resample: x must be a 4-D NCHW tensor')
    if not isinstance(w, torch.Tensor) or w.ndim != 4 or w.dtype != x.dtype:
        raise ValueError(f'conv2d_resample: w must be a 4-D tensor with the dtype of x ({x.dtype})')
    if f is not None and (not isinstance(f, torch.Tensor) or f.ndim not in (1, 2) or f.dtype != torch.float32):
        raise ValueError('conv2d_resample: f must be None or a float32 1-D/2-D filter (use upfirdn2d.setup_filter())')
    for name, value in (('up', up), ('down', down), ('groups', groups)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f'conv2d_resample: {name} must be an int >= 1, got {value!r}')
    if x.shape[1] != w.shape[1] * groups:
        raise ValueError(f'conv2d_resample: x has {x.shape[1]} channels but w {list(w.shape)} with groups={groups} '
                         f'expects {w.shape[1] * groups}')


def _resampling_padding(f, up, down, padding):
    """The total padding of the pipeline: the caller's, plus what centres the up- and down-filters."""
    px0, px1, py0, py1 = _parse_padding(padding)
    fw, fh = _get_filter_size(f)
    if up > 1:
        px0 += (fw + up - 1) // 2
        px1 += (fw - up) // 2
        py0 += (fh + up - 1) // 2
        py1 += (fh - up) // 2
    if down > 1:
        px0 += (fw - down + 1) // 2
        px1 += (fw - down) // 2
        py0 += (fh - down + 1) // 2
        py1 += (fh - down) // 2
    return px0, px1, py0, py1


def _conv(x, w, flip_weight, groups, stride=1, padding=0):
    """Plain convolution; `flip_weight=False` makes it a true convolution instead of correlation."""
    if not flip_weight:
        w = w.flip([2, 3])
    return conv2d_gradfix.conv2d(x, w, stride=stride, padding=padding, groups=groups)


def _conv2d_resample_ref(x, w, f, up, down, padding, groups, flip_weight, flip_filter):
    """The definition: upsample + pad, convolve (valid), downsample."""
    pad = _resampling_padding(f, up, down, padding)
    x = upfirdn2d.upfirdn2d(x, f if up > 1 else None, up=up, padding=pad, gain=up ** 2, flip_filter=flip_filter)
    x = _conv(x, w, flip_weight, groups)
    if down > 1:
        x = upfirdn2d.upfirdn2d(x, f, down=down, flip_filter=flip_filter)
    return x


def _transposed_weight(w, groups, flip_weight):
    """`w` [out, in/g, kh, kw] as a conv_transpose2d weight [in, out/g, kh, kw] computing the same map."""
    out_channels, in_per_group, kh, kw = w.shape
    w = w.reshape(groups, out_channels // groups, in_per_group, kh, kw).transpose(1, 2)
    w = w.reshape(groups * in_per_group, out_channels // groups, kh, kw)
    # conv_transpose2d is a true convolution; correlation (flip_weight=True) needs flipped taps.
    return w.flip([2, 3]) if flip_weight else w

#----------------------------------------------------------------------------------------------------------------

def conv2d_resample(x, w, f=None, up=1, down=1, padding=0, groups=1, flip_weight=True, flip_filter=False):
    """Convolve `x` [N,C,H,W] with `w` [O,C/groups,kh,kw], optionally upsampling or downsampling with filter `f`.

    `padding` (int, `[px, py]` or `[x0, x1, y0, y1]`) is relative to the upsampled image. `flip_weight=True`
    means PyTorch's correlation. The upsampling gain `up**2` keeps a normalized filter's DC level.
    """
    _check_args(x, w, f, up, down, groups)
    out_channels, _, kh, kw = w.shape
    in_channels = x.shape[1]
    px0, px1, py0, py1 = _parse_padding(padding)

    # 1x1 kernel: resample on whichever side of the channel mixing has fewer channels.
    if kh == 1 and kw == 1 and (up > 1 or down > 1) and not (up > 1 and down > 1):
        resample = lambda t: upfirdn2d.upfirdn2d(t, f, up=up, down=down, padding=_resampling_padding(f, up, down, padding),
                                                 gain=up ** 2, flip_filter=flip_filter)
        if out_channels < in_channels:
            return resample(_conv(x, w, flip_weight, groups))
        return _conv(resample(x), w, flip_weight, groups)

    # No resampling: a single convolution, with symmetric non-negative padding folded into it.
    if up == 1 and down == 1:
        if px0 == px1 and py0 == py1 and px0 >= 0 and py0 >= 0:
            return _conv(x, w, flip_weight, groups, padding=[py0, px0])
        return _conv2d_resample_ref(x, w, f, up, down, padding, groups, flip_weight, flip_filter)

    # Downsampling: filter (with all the padding), then a strided convolution.
    if down > 1 and up == 1:
        x = upfirdn2d.upfirdn2d(x, f, padding=_resampling_padding(f, up, down, padding), flip_filter=flip_filter)
        return _conv(x, w, flip_weight, groups, stride=down)

    # Upsampling: zero insertion + full convolution is a strided transposed convolution; the filter then absorbs
    # the padding, expressed relative to the transposed convolution's (in - 1) * up + k outputs.
    if up > 1 and down == 1:
        x = conv2d_gradfix.conv_transpose2d(x, _transposed_weight(w, groups, flip_weight), stride=up, groups=groups)
        qx0, qx1, qy0, qy1 = _resampling_padding(f, up, down, padding)
        pad = [qx0 - (kw - 1), qx1 + up - kw, qy0 - (kh - 1), qy1 + up - kh]
        return upfirdn2d.upfirdn2d(x, f, padding=pad, gain=up ** 2, flip_filter=flip_filter)

    return _conv2d_resample_ref(x, w, f, up, down, padding, groups, flip_weight, flip_filter)
