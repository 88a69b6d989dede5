"""Reference (pure PyTorch) ops vs closed forms and independent numpy computations (spec upstream-compat §2.3-§2.7)."""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from torch_utils.ops import bias_act, conv2d_gradfix, conv2d_resample, fma, grid_sample_gradfix, upfirdn2d

#----------------------------------------------------------------------------------------------------------------
# Independent numpy implementation of upfirdn2d: zero insertion, pad/crop, explicit true convolution, subsampling.

def numpy_upfirdn2d(x, f, up, down, padding, flip_filter, gain):
    upx, upy = up
    downx, downy = down
    px0, px1, py0, py1 = padding
    f = np.asarray(f, dtype=np.float64)
    if f.ndim == 1:
        f = np.outer(f, f)  # A separable filter is the outer product of its two passes.
    f = f * gain
    if flip_filter:
        f = f[::-1, ::-1]  # Correlation with f == convolution with f rotated by 180 degrees.
    n, c, h, w = x.shape
    up_img = np.zeros([n, c, h * upy, w * upx])
    up_img[:, :, ::upy, ::upx] = x
    padded = np.pad(up_img, [(0, 0), (0, 0), (max(py0, 0), max(py1, 0)), (max(px0, 0), max(px1, 0))])
    padded = padded[:, :, max(-py0, 0):padded.shape[2] - max(-py1, 0), max(-px0, 0):padded.shape[3] - max(-px1, 0)]
    fh, fw = f.shape
    out_h, out_w = padded.shape[2] - fh + 1, padded.shape[3] - fw + 1
    if out_h < 1 or out_w < 1:
        return None
    out = np.zeros([n, c, out_h, out_w])
    for i in range(fh):
        for j in range(fw):  # out[y, x] = sum_ij img[y + i, x + j] * f[fh-1-i, fw-1-j]  (true convolution)
            out += padded[:, :, i:i + out_h, j:j + out_w] * f[fh - 1 - i, fw - 1 - j]
    return out[:, :, ::downy, ::downx]


def test_upfirdn2d_matches_numpy_pipeline():
    rng = np.random.default_rng(0)
    x = rng.standard_normal([2, 3, 5, 7])
    filters = [[1, 3, 3, 1], [[1, 2], [3, 4], [5, 0]], list(rng.standard_normal(9))]
    cases = itertools.product(filters, [1, 2, [3, 1]], [1, 2, [1, 3]], [0, [2, 1], [3, -1, 0, 2]], [False, True], [1, 2.5])
    checked = 0
    for taps, up, down, padding, flip, gain in cases:
        f = upfirdn2d.setup_filter(taps, normalize=False)
        up2, down2, pad4 = upfirdn2d._parse_scaling(up), upfirdn2d._parse_scaling(down), upfirdn2d._parse_padding(padding)
        expected = numpy_upfirdn2d(x, f.numpy(), up2, down2, pad4, flip, gain)
        if expected is None or min(expected.shape) == 0:
            continue  # Configuration with an empty output.
        got = upfirdn2d.upfirdn2d(torch.from_numpy(x), f, up=up, down=down, padding=padding, flip_filter=flip,
                                  gain=gain, impl='ref')
        assert got.shape == expected.shape
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-10)
        checked += 1
    assert checked > 200


@pytest.mark.parametrize('flip_filter', [False, True])
def test_upfirdn2d_impulse_response_shows_flip_convention(flip_filter):
    taps = torch.tensor([[1., 2., 3.], [4., 5., 6.]])  # Asymmetric, 2 x 3.
    impulse = torch.ones([1, 1, 1, 1])
    out = upfirdn2d.upfirdn2d(impulse, taps, padding=[2, 2, 1, 1], flip_filter=flip_filter, impl='ref')[0, 0]
    expected = taps.flip([0, 1]) if flip_filter else taps  # Convolution reproduces f; correlation rotates it.
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize('in_size,up,down,pad0,pad1,taps', [(8, 2, 1, 2, 1, 4), (16, 1, 2, 1, 1, 4), (7, 3, 2, -1, 4, 5),
                                                             (5, 1, 1, 0, 0, 5), (9, 2, 3, 0, -2, 1)])
def test_upfirdn2d_output_size_formula(in_size, up, down, pad0, pad1, taps):
    x = torch.zeros([1, 1, in_size, in_size + 1])
    f = upfirdn2d.setup_filter(torch.ones(taps))
    y = upfirdn2d.upfirdn2d(x, f, up=up, down=down, padding=[pad0, pad1, pad0, pad1], impl='ref')
    assert y.shape[2] == (in_size * up + pad0 + pad1 - taps + down) // down
    assert y.shape[3] == ((in_size + 1) * up + pad0 + pad1 - taps + down) // down


@pytest.mark.parametrize('taps,factor', [([1, 3, 3, 1], 2), ([1, 2, 1], 2), ([1, 1], 2), (list(np.hanning(10)[1:-1]), 2),
                                         ([1, 1, 1, 1], 4), ([1, 2, 3, 4, 4, 3, 2, 1], 4)])
def test_constant_image_stays_constant(taps, factor):
    # Upsampling keeps constants iff every polyphase component of the filter sums to 1/factor (true for these).
    f = upfirdn2d.setup_filter(taps)
    x = torch.full([1, 2, 12, 12], 3.0, dtype=torch.float64)
    margin = len(taps)  # Borders see the zero padding; the interior must be exactly constant.
    up = upfirdn2d.upsample2d(x, f, up=factor, impl='ref')
    down = upfirdn2d.downsample2d(x, f, down=factor, impl='ref')
    same = upfirdn2d.filter2d(x, f, impl='ref')
    assert up.shape[2:] == (12 * factor, 12 * factor)
    assert down.shape[2:] == (12 // factor, 12 // factor)
    assert same.shape == x.shape
    torch.testing.assert_close(up[:, :, margin * factor:-margin * factor, margin * factor:-margin * factor],
                               torch.full_like(up[:, :, margin * factor:-margin * factor, margin * factor:-margin * factor], 3.0))
    inner = max(1, margin // factor)
    torch.testing.assert_close(down[:, :, inner:-inner, inner:-inner], torch.full_like(down[:, :, inner:-inner, inner:-inner], 3.0))
    torch.testing.assert_close(same[:, :, margin:-margin, margin:-margin], torch.full_like(same[:, :, margin:-margin, margin:-margin], 3.0))


def test_resampling_helpers_use_centring_padding():
    f = upfirdn2d.setup_filter([1, 3, 3, 1])
    x = torch.randn([1, 2, 6, 5], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(upfirdn2d.upsample2d(x, f, impl='ref'),
                               upfirdn2d.upfirdn2d(x, f, up=2, padding=[2, 1, 2, 1], gain=4, impl='ref'))
    torch.testing.assert_close(upfirdn2d.downsample2d(x, f, padding=1, impl='ref'),
                               upfirdn2d.upfirdn2d(x, f, down=2, padding=[2, 2, 2, 2], impl='ref'))
    torch.testing.assert_close(upfirdn2d.filter2d(x, f, impl='ref'),
                               upfirdn2d.upfirdn2d(x, f, padding=[2, 1, 2, 1], impl='ref'))


def test_setup_filter_facts():
    f = upfirdn2d.setup_filter([1, 3, 3, 1])
    assert f.shape == (4, 4) and f.dtype == torch.float32
    assert abs(f.sum().item() - 1) < 1e-6
    torch.testing.assert_close(f, torch.outer(torch.tensor([1., 3, 3, 1]), torch.tensor([1., 3, 3, 1])) / 64)
    assert upfirdn2d.setup_filter(np.ones(12)).shape == (12,)  # >= 8 taps: separable by default.
    assert upfirdn2d.setup_filter(np.ones(12), separable=False).shape == (12, 12)
    assert upfirdn2d.setup_filter([1, 2], separable=True).shape == (2,)
    torch.testing.assert_close(upfirdn2d.setup_filter(None), torch.ones([1, 1]))
    torch.testing.assert_close(upfirdn2d.setup_filter(5.0), torch.ones([1, 1]))
    torch.testing.assert_close(upfirdn2d.setup_filter([1, 2], normalize=False, gain=4), 4 * torch.tensor([[1., 2], [2, 4]]))
    torch.testing.assert_close(upfirdn2d.setup_filter(np.arange(1., 9), normalize=False, gain=4), 2 * torch.arange(1., 9))
    torch.testing.assert_close(upfirdn2d.setup_filter([[1, 2], [3, 4]], normalize=False, flip_filter=True),
                               torch.tensor([[4., 3], [2, 1]]))
    src = torch.tensor([1., 1.])
    upfirdn2d.setup_filter(src)
    assert src.tolist() == [1., 1.]  # The caller's tensor is not modified.
    with pytest.raises(ValueError, match='non-empty'):
        upfirdn2d.setup_filter([])


@pytest.mark.parametrize('dtype', [torch.float16, torch.float32, torch.float64])
def test_upfirdn2d_dtypes_and_keyword_forms(dtype):
    f = upfirdn2d.setup_filter([1, 3, 3, 1])
    x = torch.randn([2, 3, 8, 8], generator=torch.Generator().manual_seed(2)).to(dtype)
    up = upfirdn2d.upsample2d(x=x, f=f, up=2)
    down = upfirdn2d.downsample2d(x=x, f=f, down=2, padding=-1, flip_filter=True)
    assert up.dtype == dtype and up.shape == (2, 3, 16, 16)
    assert down.dtype == dtype and down.shape == (2, 3, 3, 3)
    ref = upfirdn2d.upsample2d(x.double(), f)
    torch.testing.assert_close(up.double(), ref, rtol=1e-2, atol=1e-2)


def test_upfirdn2d_rejects_bad_input():
    with pytest.raises(ValueError, match='4-D'):
        upfirdn2d.upfirdn2d(torch.zeros([3, 4]), None)
    with pytest.raises(ValueError, match='float32'):
        upfirdn2d.upfirdn2d(torch.zeros([1, 1, 4, 4]), torch.ones([2, 2], dtype=torch.float64))
    with pytest.raises(ValueError, match='filter'):
        upfirdn2d.upfirdn2d(torch.zeros([1, 1, 4, 4]), torch.ones([2, 2], requires_grad=True))
    with pytest.raises(ValueError, match='empty output'):
        upfirdn2d.upfirdn2d(torch.zeros([1, 1, 2, 2]), torch.ones([4, 4]))
    with pytest.raises(ValueError, match='impl'):
        upfirdn2d.upfirdn2d(torch.zeros([1, 1, 4, 4]), None, impl='triton')

#----------------------------------------------------------------------------------------------------------------
# bias_act vs the formula.

def _sigmoid(v):
    return 1 / (1 + np.exp(-v))

CLOSED_FORMS = {
    'linear': lambda v, a: v,
    'relu': lambda v, a: np.maximum(v, 0),
    'lrelu': lambda v, a: np.where(v > 0, v, v * a),
    'tanh': lambda v, a: np.tanh(v),
    'sigmoid': lambda v, a: _sigmoid(v),
    'elu': lambda v, a: np.where(v > 0, v, np.expm1(v)),
    'selu': lambda v, a: 1.0507009873554805 * np.where(v > 0, v, 1.6732632423543772 * np.expm1(v)),
    'softplus': lambda v, a: np.log1p(np.exp(v)),
    'swish': lambda v, a: v * _sigmoid(v),
}
EXPECTED_TABLE = {  # name: (def_alpha, def_gain, cuda_idx, ref, has_2nd_grad)
    'linear': (0, 1, 1, '', False), 'relu': (0, np.sqrt(2), 2, 'y', False), 'lrelu': (0.2, np.sqrt(2), 3, 'y', False),
    'tanh': (0, 1, 4, 'y', True), 'sigmoid': (0, 1, 5, 'y', True), 'elu': (0, 1, 6, 'y', True),
    'selu': (0, 1, 7, 'y', True), 'softplus': (0, 1, 8, 'y', True), 'swish': (0, np.sqrt(2), 9, 'x', True),
}


def test_activation_table():
    assert set(bias_act.activation_funcs) == set(EXPECTED_TABLE)
    for name, (alpha, gain, idx, ref, second) in EXPECTED_TABLE.items():
        spec = bias_act.activation_funcs[name]
        assert (spec.def_alpha, spec.cuda_idx, spec.ref, spec.has_2nd_grad) == (alpha, idx, ref, second)
        assert spec.def_gain == pytest.approx(gain)
        assert spec.def_alpha == spec['def_alpha']  # EasyDict: attribute and item access.
    assert isinstance(bias_act.activation_funcs['lrelu'].def_gain, np.float64)


@pytest.mark.parametrize('act', sorted(EXPECTED_TABLE))
def test_bias_act_matches_formula(act):
    rng = np.random.default_rng(3)
    x = rng.standard_normal([3, 4, 5]) * 3
    b = rng.standard_normal(4)
    for gain, clamp, alpha, dim in itertools.product([None, 1, 0.5], [None, 0, 1.5], [None, 0.1], [1]):
        spec = bias_act.activation_funcs[act]
        a = spec.def_alpha if alpha is None else alpha
        g = spec.def_gain if gain is None else gain
        expected = CLOSED_FORMS[act](x + b[None, :, None], a) * g
        if clamp is not None:
            expected = np.clip(expected, -clamp, clamp)
        got = bias_act.bias_act(torch.from_numpy(x), torch.from_numpy(b), dim=dim, act=act, alpha=alpha, gain=gain,
                                clamp=clamp, impl='ref')
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-12)


def test_bias_act_dim_and_no_bias():
    x = torch.randn([2, 3, 4], dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    b = torch.tensor([1., -2., 3., 0.5], dtype=torch.float64)
    torch.testing.assert_close(bias_act.bias_act(x, b, dim=2, act='relu', gain=1), torch.relu(x + b))
    torch.testing.assert_close(bias_act.bias_act(x, None, dim=7, act='tanh'), torch.tanh(x))  # dim ignored w/o bias.
    with pytest.raises(ValueError, match='entries'):
        bias_act.bias_act(x, b, dim=1)
    with pytest.raises(ValueError, match='unknown activation'):
        bias_act.bias_act(x, act='gelu')
    with pytest.raises(ValueError, match='clamp'):
        bias_act.bias_act(x, clamp=-2)


def test_bias_act_spec_examples():
    x = torch.tensor([-2., -0.5, 0.5, 3.])
    torch.testing.assert_close(bias_act.bias_act(x, act='lrelu'), torch.tensor([-0.566, -0.141, 0.707, 4.243]),
                               atol=1e-3, rtol=0)
    torch.testing.assert_close(bias_act.bias_act(x, act='lrelu', gain=1, clamp=1), torch.tensor([-0.4, -0.1, 0.5, 1.0]))
    # Upstream's call forms: numpy gain, int clamp, keyword bias.
    x4 = torch.randn([2, 3, 4, 4], generator=torch.Generator().manual_seed(5))
    b = torch.randn([3], generator=torch.Generator().manual_seed(6))
    y = bias_act.bias_act(x4, b, act='lrelu', gain=np.float64(np.sqrt(2)), clamp=256)
    torch.testing.assert_close(y, F.leaky_relu(x4 + b[:, None, None], 0.2) * np.sqrt(2))
    torch.testing.assert_close(bias_act.bias_act(x4, b, clamp=None), x4 + b[:, None, None])


@pytest.mark.parametrize('dtype', [torch.float16, torch.float32, torch.float64])
def test_bias_act_keeps_dtype(dtype):
    x = torch.randn([2, 3, 4, 4]).to(dtype)
    b = torch.randn([3])
    y = bias_act.bias_act(x, b, act='swish', clamp=1)
    assert y.dtype == dtype and y.shape == x.shape

#----------------------------------------------------------------------------------------------------------------

def test_fma_equals_multiply_add_with_gradients():
    gen = torch.Generator().manual_seed(7)
    a = torch.randn([4, 1, 3], dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn([1, 5, 3], dtype=torch.float64, generator=gen, requires_grad=True)
    c = torch.randn([3], dtype=torch.float64, generator=gen, requires_grad=True)
    y = fma.fma(a, b, c)
    torch.testing.assert_close(y, a * b + c)
    grads = torch.autograd.grad(y.square().sum(), [a, b, c])
    expected = torch.autograd.grad((a * b + c).square().sum(), [a, b, c])
    for got, want, t in zip(grads, expected, [a, b, c]):
        assert got.shape == t.shape
        torch.testing.assert_close(got, want)
    assert torch.autograd.gradgradcheck(lambda a, b, c: fma.fma(a, b, c), [a, b, c])

#----------------------------------------------------------------------------------------------------------------
# conv2d_resample vs the generic pipeline of spec §2.4, composed here from upfirdn2d (checked against numpy above)
# and a plain convolution.

def generic_conv2d_resample(x, w, f, up, down, padding, groups, flip_weight, flip_filter):
    fw, fh = (1, 1) if f is None else (f.shape[-1], f.shape[0])
    px0, px1, py0, py1 = upfirdn2d._parse_padding(padding)
    if up > 1:
        px0, px1, py0, py1 = px0 + (fw + up - 1) // 2, px1 + (fw - up) // 2, py0 + (fh + up - 1) // 2, py1 + (fh - up) // 2
    if down > 1:
        px0, px1 = px0 + (fw - down + 1) // 2, px1 + (fw - down) // 2
        py0, py1 = py0 + (fh - down + 1) // 2, py1 + (fh - down) // 2
    x = upfirdn2d.upfirdn2d(x, f if up > 1 else None, up=up, padding=[px0, px1, py0, py1], gain=up ** 2,
                            flip_filter=flip_filter, impl='ref')
    x = F.conv2d(x, w if flip_weight else w.flip([2, 3]), groups=groups)
    if down > 1:
        x = upfirdn2d.upfirdn2d(x, f, down=down, flip_filter=flip_filter, impl='ref')
    return x


def test_conv2d_resample_matches_generic_pipeline():
    gen = torch.Generator().manual_seed(8)
    filters = [upfirdn2d.setup_filter([1, 3, 3, 1]), upfirdn2d.setup_filter([1, 2, 1]),
               upfirdn2d.setup_filter(np.arange(1., 9), separable=True)]
    count = 0
    for k, up, down, padding, groups, flip_weight, flip_filter, f in itertools.product(
            [1, 3, 2], [1, 2], [1, 2], [1, [1, 0, 2, -1]], [1, 2], [True, False], [False, True], filters):
        x = torch.randn([1, 4, 7, 6], dtype=torch.float64, generator=gen)
        w = torch.randn([2, 4 // groups, k, k], dtype=torch.float64, generator=gen)
        try:
            expected = generic_conv2d_resample(x, w, f, up, down, padding, groups, flip_weight, flip_filter)
        except ValueError:
            continue  # Configuration with an empty output.
        got = conv2d_resample.conv2d_resample(x=x, w=w, f=f, up=up, down=down, padding=padding, groups=groups,
                                              flip_weight=flip_weight, flip_filter=flip_filter)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        count += 1
    assert count > 250


def test_conv2d_resample_network_call_forms():
    gen = torch.Generator().manual_seed(9)
    f = upfirdn2d.setup_filter([1, 3, 3, 1])
    x = torch.randn([1, 2 * 4, 8, 8], generator=gen)  # Fused modconv: batch folded into groups.
    w = torch.randn([2 * 5, 4, 3, 3], generator=gen)
    up = conv2d_resample.conv2d_resample(x=x, w=w, f=f, up=2, down=1, padding=1, groups=2, flip_weight=False)
    down = conv2d_resample.conv2d_resample(x=x, w=w, f=f, up=1, down=2, padding=1, groups=2, flip_weight=True)
    same = conv2d_resample.conv2d_resample(x=x, w=w, f=f, padding=1, groups=2)
    assert up.shape == (1, 10, 16, 16) and down.shape == (1, 10, 4, 4) and same.shape == (1, 10, 8, 8)
    with pytest.raises(ValueError, match='dtype'):
        conv2d_resample.conv2d_resample(x, w.double(), f)
    with pytest.raises(ValueError, match='channels'):
        conv2d_resample.conv2d_resample(x, w, f, groups=1)

#----------------------------------------------------------------------------------------------------------------
# Gradients (float64): first and second order.

def _away_from_kinks(shape, gen, low=0.2):
    """Random values whose magnitude is >= low, so piecewise activations/clamps are smooth near them."""
    x = torch.rand(shape, dtype=torch.float64, generator=gen) * 1.5 + low
    sign = torch.randint(0, 2, shape, generator=gen).to(torch.float64) * 2 - 1
    return x * sign


@pytest.mark.parametrize('act', sorted(EXPECTED_TABLE))
def test_bias_act_gradcheck(act):
    gen = torch.Generator().manual_seed(10)
    x = _away_from_kinks([2, 3, 2], gen).requires_grad_()
    b = torch.zeros([3], dtype=torch.float64, requires_grad=True)
    for gain, clamp in [(None, None), (0.7, 0.9)]:
        fn = lambda x, b: bias_act.bias_act(x, b, act=act, gain=gain, clamp=clamp, impl='ref')
        assert torch.autograd.gradcheck(fn, [x, b])
        assert torch.autograd.gradgradcheck(fn, [x, b])


@pytest.mark.parametrize('up,down,padding,flip,taps', [(1, 1, 1, False, [1, 3, 3, 1]), (2, 1, [2, 1], True, [1, 2, 1]),
                                                      (1, 2, [1, 2, 0, 1], False, [[1, 2], [3, 5]]),
                                                      ([2, 1], [1, 2], [1, 3], True, np.arange(1., 9))])
def test_upfirdn2d_gradcheck(up, down, padding, flip, taps):
    f = upfirdn2d.setup_filter(taps, separable=len(np.shape(taps)) == 1 and len(taps) >= 8)
    x = torch.randn([1, 1, 4, 5], dtype=torch.float64, generator=torch.Generator().manual_seed(11), requires_grad=True)
    fn = lambda x: upfirdn2d.upfirdn2d(x, f, up=up, down=down, padding=padding, flip_filter=flip, gain=1.5, impl='ref')
    assert torch.autograd.gradcheck(fn, [x])
    assert torch.autograd.gradgradcheck(lambda x: fn(x).square(), [x])


@pytest.mark.parametrize('up,down,k,flip_weight', [(1, 1, 3, True), (2, 1, 3, False), (1, 2, 3, True), (2, 1, 1, False)])
def test_conv2d_resample_gradcheck(up, down, k, flip_weight):
    gen = torch.Generator().manual_seed(12)
    f = upfirdn2d.setup_filter([1, 3, 3, 1])
    x = torch.randn([1, 2, 3, 3], dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn([2, 2, k, k], dtype=torch.float64, generator=gen, requires_grad=True)
    fn = lambda x, w: conv2d_resample.conv2d_resample(x, w, f, up=up, down=down, padding=k // 2, flip_weight=flip_weight)
    assert torch.autograd.gradcheck(fn, [x, w])
    assert torch.autograd.gradgradcheck(fn, [x, w])

#----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('enabled', [False, True])
def test_grid_sample_matches_torch_and_has_double_backward(enabled, monkeypatch):
    monkeypatch.setattr(grid_sample_gradfix, 'enabled', enabled)
    gen = torch.Generator().manual_seed(13)
    x = torch.randn([2, 3, 5, 6], dtype=torch.float64, generator=gen, requires_grad=True)
    grid = torch.rand([2, 4, 7, 2], dtype=torch.float64, generator=gen) * 2.4 - 1.2  # Some samples fall outside.
    torch.testing.assert_close(grid_sample_gradfix.grid_sample(x, grid),
                               F.grid_sample(x, grid, mode='bilinear', padding_mode='zeros', align_corners=False))
    assert torch.autograd.gradcheck(lambda x: grid_sample_gradfix.grid_sample(x, grid), [x])
    assert torch.autograd.gradgradcheck(lambda x: grid_sample_gradfix.grid_sample(x, grid).square(), [x])


def test_grid_sample_gradient_wrt_grid():
    grid_sample_gradfix.enabled = True
    try:
        gen = torch.Generator().manual_seed(14)
        x = torch.randn([1, 2, 4, 4], dtype=torch.float64, generator=gen, requires_grad=True)
        grid = (torch.rand([1, 3, 3, 2], dtype=torch.float64, generator=gen) * 1.6 - 0.8).requires_grad_()
        assert torch.autograd.gradcheck(grid_sample_gradfix.grid_sample, [x, grid])
    finally:
        grid_sample_gradfix.enabled = False


def test_conv2d_gradfix_is_plain_convolution():
    gen = torch.Generator().manual_seed(15)
    x = torch.randn([2, 4, 6, 6], dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn([6, 2, 3, 3], dtype=torch.float64, generator=gen, requires_grad=True)
    torch.testing.assert_close(conv2d_gradfix.conv2d(input=x, weight=w, groups=2, padding=1),
                               F.conv2d(x, w, groups=2, padding=1))
    wt = torch.randn([4, 3, 3, 3], dtype=torch.float64, generator=gen)
    torch.testing.assert_close(conv2d_gradfix.conv_transpose2d(x, wt, stride=2, padding=1, output_padding=1),
                               F.conv_transpose2d(x, wt, stride=2, padding=1, output_padding=1))
    assert not conv2d_gradfix.weight_gradients_disabled
    with conv2d_gradfix.no_weight_gradients():
        assert conv2d_gradfix.weight_gradients_disabled
        with conv2d_gradfix.no_weight_gradients(disable=False):
            assert conv2d_gradfix.weight_gradients_disabled  # disable=False keeps the outer state.
        y = conv2d_gradfix.conv2d(x, w, groups=2)
        (gx,) = torch.autograd.grad(y.square().sum(), [x], create_graph=True)
    assert not conv2d_gradfix.weight_gradients_disabled
    # The R1-style penalty still reaches the weights through the input gradient.
    (gw,) = torch.autograd.grad(gx.square().sum(), [w])
    assert gw.abs().sum() > 0
    xs, ws = x[:1, :, :4, :4].detach().requires_grad_(), w[:2].detach().requires_grad_()
    assert torch.autograd.gradgradcheck(lambda x, w: conv2d_gradfix.conv2d(x, w, groups=2), [xs, ws])
