"""Check every compiled op (torch.ops.toolkit_ops: bias_act, upfirdn2d and the ops built on it) against the
PyTorch reference on one device: forward, backward and, where the op promises it, double backward; plus the fake
(shape-only) kernels that torch.compile traces with. Exits non-zero on the first failure class, after reporting all.

Run: `python tools/ops_check.py --device cuda` (what tools/gpu_check.sh does), or `--device cpu` (the same checks on
the CPU kernels; tests/test_ops_compiled.py covers those in more depth).
"""

import itertools
import os
import sys

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torch_utils import custom_ops  # noqa: E402
from torch_utils.ops import _plugin, bias_act, conv2d_resample, upfirdn2d  # noqa: E402

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=2e-5, atol=2e-5),
       torch.float16: dict(rtol=1e-2, atol=1e-2)}


def rand(shape, dtype, device, seed, low=0.05):
    """|values| >= low: away from the kinks of piecewise activations and clamps."""
    gen = torch.Generator().manual_seed(seed)
    mag = torch.rand(shape, generator=gen, dtype=torch.float64) * 2 + low
    sign = torch.randint(0, 2, shape, generator=gen).to(torch.float64) * 2 - 1
    return (mag * sign).to(device=device, dtype=dtype)


def with_impl(impl, fn):
    """fn under TOOLKIT_OPS_IMPL=ref|compiled (for ops without an `impl` argument; autograd keeps the choice)."""
    mode = dict(ref='ref', compiled='compiled')[impl]

    def call(*args):
        with custom_ops.ops_impl(mode):
            return fn(*args)
    return call


def derivatives(fn, inputs, order):
    """[output, first derivatives, second derivatives of the first derivatives' squared norm] up to `order`."""
    out = fn(*inputs)
    weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).reshape(out.shape)
    result = [out]
    if order >= 1:
        grads = torch.autograd.grad((out * weight).sum(), inputs, create_graph=order >= 2, allow_unused=True)
        result.append(grads)
        if order >= 2:
            norm = sum(g.float().square().sum() for g in grads if g is not None and g.requires_grad)
            second = (torch.autograd.grad(norm, inputs, allow_unused=True) if torch.is_tensor(norm) and norm.requires_grad
                      else [None] * len(inputs))
            result.append(second)
    return result


def close(a, b, tol):
    if a is None or b is None:
        return a is None and b is None or float((a if a is not None else b).abs().max()) <= tol['atol']
    a, b = a.detach().double(), b.detach().double()
    return torch.allclose(a, b, rtol=tol['rtol'], atol=tol['atol'] * max(1.0, float(b.abs().max())))


def compare(name, fn_ref, fn_cmp, inputs, order, dtype, failures):
    ref, got = derivatives(fn_ref, inputs, order), derivatives(fn_cmp, inputs, order)
    tol = TOL[dtype]
    checks = [('forward', [ref[0]], [got[0]])]
    if order >= 1:
        checks.append(('backward', ref[1], got[1]))
    if order >= 2:
        checks.append(('double backward', ref[2], got[2]))
    for what, rs, gs in checks:
        if not all(close(g, r, tol) for g, r in zip(gs, rs)):
            failures.append(f'{name} {str(dtype)[6:]}: {what} differs from the reference')
    return len(checks)


def check_bias_act(device, failures):
    count = 0
    dtypes = [torch.float32, torch.float64] + ([torch.float16] if device.type == 'cuda' else [])
    for act, dtype in itertools.product(sorted(bias_act.activation_funcs), dtypes):
        order = 2 if dtype != torch.float16 else 1  # R1 and path-length regularisation differentiate twice
        for i, (shape, clamp, with_bias) in enumerate(itertools.product([[4, 6, 5, 7], [3, 9]], [None, 0.7], [True, False])):
            x = rand(shape, dtype, device, seed=i).requires_grad_()
            b = (rand([shape[1]], dtype, device, seed=50 + i) * 0.1).requires_grad_() if with_bias else None
            inputs = [x, b] if with_bias else [x]
            fn = lambda impl: (lambda x, b=None: bias_act.bias_act(x, b, act=act, clamp=clamp, impl=impl))
            count += compare(f'bias_act {act} {shape} clamp={clamp} bias={with_bias}', fn('ref'), fn('compiled'),
                             inputs, order, dtype, failures)
    return count


def check_upfirdn2d(device, failures):
    count = 0
    dtypes = [torch.float32, torch.float64] + ([torch.float16] if device.type == 'cuda' else [])
    filters = {'4x4': [1, 3, 3, 1], '1-D 12-tap': list(range(1, 7)) + list(range(6, 0, -1))}
    for dtype, (fname, taps) in itertools.product(dtypes, filters.items()):
        f = upfirdn2d.setup_filter(taps, device=device, separable=fname.startswith('1-D'))
        x = rand([2, 3, 12, 10], dtype, device, seed=7).requires_grad_()
        order = 2 if dtype != torch.float16 else 1  # linear ops: double backward is the op again
        cases = dict(
            upsample2d=lambda impl: (lambda x: upfirdn2d.upsample2d(x, f, up=2, impl=impl)),
            downsample2d=lambda impl: (lambda x: upfirdn2d.downsample2d(x, f, down=2, impl=impl)),
            filter2d=lambda impl: (lambda x: upfirdn2d.filter2d(x, f, padding=1, impl=impl)),
            upfirdn2d_crop=lambda impl: (lambda x: upfirdn2d.upfirdn2d(x, f, up=2, down=1, padding=[-1, 2, 0, -1], impl=impl)),
        )
        for name, fn in cases.items():
            count += compare(f'{name} {fname}', fn('ref'), fn('compiled'), [x], order, dtype, failures)
        w = rand([4, 3, 3, 3], dtype, device, seed=8).requires_grad_()
        for up, down in ((2, 1), (1, 2)):
            fn = lambda impl: with_impl(impl, lambda x, w: conv2d_resample.conv2d_resample(x, w, f=f, up=up, down=down,
                                                                                          padding=1))
            count += compare(f'conv2d_resample up={up} down={down} {fname}', fn('ref'), fn('compiled'), [x, w],
                             order, dtype, failures)
    return count


def check_fake_kernels(device, failures):
    """The fake kernels give the real kernels' shapes, strides and dtypes (torch.library.opcheck)."""
    opcheck = getattr(torch.library, 'opcheck', None)
    if opcheck is None:
        return 0
    _plugin.register_fake_kernels()
    x = rand([2, 3, 9, 8], torch.float32, device, seed=3)
    g = torch.ones([4, 4], dtype=torch.float32, device=device) / 16
    b = rand([3], torch.float32, device, seed=4)
    cases = [(torch.ops.toolkit_ops.upfirdn2d.default, (x, g, 2, 2, 1, 1, 2, 1, 1, 2)),
             (torch.ops.toolkit_ops.upfirdn2d.default, (x, g, 1, 1, 2, 2, -1, 0, 1, -1)),
             (torch.ops.toolkit_ops.bias_act.default, (x, b, None, None, 0, 1, 3, 0.2, 1.4, -1.0))]
    for op, args in cases:
        try:
            opcheck(op, args, test_utils=('test_schema', 'test_faketensor'))
        except Exception as err:  # pylint: disable=broad-except
            failures.append(f'{op}: fake kernel: {str(err).splitlines()[0]}')
    return len(cases)


@click.command()
@click.option('--device', default='cuda', show_default=True, help='cuda or cpu')
def main(device):
    device = torch.device(device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        sys.exit('ops_check: no CUDA device visible')
    if device.type not in _plugin.covered_devices(required=True):  # builds the extension (with CUDA when usable)
        sys.exit(f'ops_check: the compiled ops were built without {device.type} kernels')
    failures = []
    counts = dict(bias_act=check_bias_act(device, failures), upfirdn2d=check_upfirdn2d(device, failures),
                  fake_kernels=check_fake_kernels(device, failures))
    for line in failures:
        print('FAIL', line)
    print(f'ops_check on {device}: ' + ', '.join(f'{k} {v} checks' for k, v in counts.items()) +
          f'; {len(failures)} failed')
    sys.exit(1 if failures else 0)


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
