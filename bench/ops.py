"""Compiled vs reference custom ops at StyleGAN2 shapes: forward and forward+backward wall time.

Run: `python bench/ops.py [--repeats 7] [--threads N]`. Prints a table (speed-up = ref time / compiled time, > 1
means the compiled kernel is faster; "default" says which one `impl='cuda'`, the default, dispatches to), then one
JSON object as the last line. float32 on CPU; the first call builds the extension if it is not cached yet.
"""

import json
import os
import sys

import click
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from timing import median_time  # noqa: E402
from torch_utils.ops import _plugin, bias_act, upfirdn2d  # noqa: E402

# A 12-tap wavelet (sym6-like length) as used by ADA's augmentation, applied as a separable 1-D filter.
_AUGMENT_TAPS = np.hanning(14)[1:-1]


def _cases():
    gen = torch.Generator().manual_seed(0)
    f4 = upfirdn2d.setup_filter([1, 3, 3, 1])                     # what the networks build (2-D, 4x4)
    f4_1d = upfirdn2d.setup_filter([1, 3, 3, 1], separable=True)  # the same filter as two 1-D passes
    f12 = upfirdn2d.setup_filter(_AUGMENT_TAPS)                   # >= 8 taps: separable by default
    for shape in ([32, 512, 8, 8], [32, 128, 32, 32]):
        b = torch.randn(shape[1], generator=gen)
        yield (f'bias_act lrelu clamp {shape}', shape,
               lambda x, impl, b=b: bias_act.bias_act(x, b, act='lrelu', clamp=256, impl=impl))
    for act in ('tanh', 'swish'):
        yield (f'bias_act {act} [32,128,32,32]', [32, 128, 32, 32], lambda x, impl, act=act, b=torch.randn(128, generator=gen):
               bias_act.bias_act(x, b, act=act, impl=impl))
    yield ('bias_act linear [32,512] (mapping fc)', [32, 512], lambda x, impl, b=torch.randn(512, generator=gen):
           bias_act.bias_act(x, b, impl=impl))
    for name, f in (('4x4', f4), ('4-tap 1-D', f4_1d)):
        yield (f'upsample2d {name} [32,256,16,16]', [32, 256, 16, 16], lambda x, impl, f=f: upfirdn2d.upsample2d(x, f, impl=impl))
        yield (f'downsample2d {name} [32,256,16,16]', [32, 256, 16, 16], lambda x, impl, f=f: upfirdn2d.downsample2d(x, f, impl=impl))
        yield (f'filter2d {name} [32,256,16,16]', [32, 256, 16, 16], lambda x, impl, f=f: upfirdn2d.filter2d(x, f, impl=impl))
    yield ('upsample2d 12-tap 1-D [32,3,64,64]', [32, 3, 64, 64], lambda x, impl: upfirdn2d.upsample2d(x, f12, impl=impl))
    yield ('downsample2d 12-tap 1-D [32,3,128,128]', [32, 3, 128, 128], lambda x, impl: upfirdn2d.downsample2d(x, f12, impl=impl))


def _measure(op, shape, impl, repeats):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    xg = x.clone().requires_grad_()
    dy = torch.randn_like(op(x, 'ref'))

    def forward():
        with torch.no_grad():
            op(x, impl)

    def forward_backward():
        torch.autograd.grad(op(xg, impl), [xg], dy)

    return median_time(forward, repeats), median_time(forward_backward, repeats)


def _default_is_compiled(op, shape):
    """Which implementation the default impl picks for this call (by spying on the kernel dispatch)."""
    calls = []
    original = _plugin.use_compiled

    def spy(impl, x, beneficial=True):
        calls.append(original(impl, x, beneficial))
        return calls[-1]

    _plugin.use_compiled = spy
    try:
        op(torch.zeros(shape), 'cuda')
    finally:
        _plugin.use_compiled = original
    return any(calls)


@click.command()
@click.option('--repeats', type=click.IntRange(min=1), default=7, show_default=True, help='Timed runs per measurement')
@click.option('--threads', type=click.IntRange(min=1), default=None, help='torch intra-op threads [default: torch]')
def main(repeats, threads):
    """Benchmark the compiled custom ops against the pure-PyTorch reference."""
    if threads is not None:
        torch.set_num_threads(threads)
    _plugin.covered_devices(required=True)  # Build (or load) before timing anything.
    rows = []
    header = f'{"case":44s} {"ref fwd ms":>10s} {"cmp fwd ms":>10s} {"fwd x":>6s} {"ref f+b ms":>10s} {"cmp f+b ms":>10s} {"f+b x":>6s}  default'
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, float32, CPU, median of {repeats}')
    print(header)
    print('-' * len(header))
    for name, shape, op in _cases():
        ref_f, ref_fb = _measure(op, shape, 'ref', repeats)
        cmp_f, cmp_fb = _measure(op, shape, 'compiled', repeats)
        default = 'compiled' if _default_is_compiled(op, shape) else 'ref'
        row = dict(case=name, ref_fwd_ms=ref_f * 1e3, compiled_fwd_ms=cmp_f * 1e3, fwd_speedup=ref_f / cmp_f,
                   ref_fwd_bwd_ms=ref_fb * 1e3, compiled_fwd_bwd_ms=cmp_fb * 1e3, fwd_bwd_speedup=ref_fb / cmp_fb,
                   default=default)
        rows.append(row)
        print(f'{name:44s} {row["ref_fwd_ms"]:10.2f} {row["compiled_fwd_ms"]:10.2f} {row["fwd_speedup"]:6.2f} '
              f'{row["ref_fwd_bwd_ms"]:10.2f} {row["compiled_fwd_bwd_ms"]:10.2f} {row["fwd_bwd_speedup"]:6.2f}  {default}')
    print(json.dumps(dict(benchmark='ops', torch=torch.__version__, threads=torch.get_num_threads(), repeats=repeats,
                          results=rows)))


if __name__ == '__main__':
    main()
