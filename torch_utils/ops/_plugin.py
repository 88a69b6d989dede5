"""The compiled kernels behind bias_act and upfirdn2d, and the rule for when an op call uses them.

One extension, `toolkit_ops`, registers `torch.ops.toolkit_ops.{bias_act, upfirdn2d}` with a CPU kernel and, when
built with CUDA, a CUDA kernel; PyTorch's dispatcher then picks the kernel by tensor device. It is built on first
use (never at import) and cached; see torch_utils.custom_ops for the build policy and the TOOLKIT_OPS_IMPL switch.
"""

import os

import torch

from .. import custom_ops

MODULE_NAME = 'toolkit_ops'
SOURCE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'csrc')
HEADERS = ['common.h', 'bias_act_math.h', 'upfirdn2d_math.h', 'ops.h']
CPU_SOURCES = ['ops.cpp']
CUDA_SOURCES = ['ops_cuda.cu']

# Below this many elements the Python/autograd overhead of calling a kernel outweighs what it saves on CPU.
MIN_CPU_NUMEL = 1 << 16

_covered_devices = None  # Device types with a loaded kernel; empty after a failed build; None before trying.


def cuda_toolkit_usable():
    """A CUDA build makes sense: torch has CUDA, a GPU is visible and a toolkit (nvcc) was found."""
    if torch.version.cuda is None or not torch.cuda.is_available():
        return False
    import torch.utils.cpp_extension as cpp_extension
    return cpp_extension.CUDA_HOME is not None


def build_kwargs(device_kind, extra_include_paths=()):
    """The sources and compiler options of the extension for 'cpu' or 'cuda'."""
    # Without FP-exception and errno semantics (nothing here relies on them) GCC may if-convert selects such as
    # leaky ReLU and vectorise the loops; unlike -ffast-math, this keeps IEEE results (NaN, inf, rounding).
    kwargs = dict(sources=CPU_SOURCES, headers=HEADERS, source_dir=SOURCE_DIR, is_python_module=False,
                  extra_cflags=['-O3', '-fno-trapping-math', '-fno-math-errno'],
                  extra_include_paths=list(extra_include_paths))
    if device_kind == 'cuda':
        # No --use_fast_math: the CUDA kernels must compute the same math as the tested CPU kernels.
        kwargs.update(sources=CPU_SOURCES + CUDA_SOURCES, extra_cuda_cflags=['-O3'], with_cuda=True)
    return kwargs


def covered_devices(required):
    """Device types the compiled kernels serve in this process; builds on the first call.

    With `required`, a build failure raises BuildError; otherwise it warns once and nothing is covered.
    """
    global _covered_devices
    if _covered_devices is None or (required and not _covered_devices):
        kind = 'cuda' if cuda_toolkit_usable() else 'cpu'
        loader = custom_ops.get_plugin if required else custom_ops.try_get_plugin
        loaded = loader(MODULE_NAME, **build_kwargs(kind))
        _covered_devices = frozenset() if loaded is None else frozenset(['cpu', kind])
        if loaded is not None:
            register_fake_kernels()
    return _covered_devices


_fakes_registered = False


def register_fake_kernels():
    """Output shapes of the ops without running them, so torch.compile traces through them (no graph breaks)."""
    global _fakes_registered
    register = getattr(torch.library, 'register_fake', None)
    if _fakes_registered or register is None:
        return
    _fakes_registered = True

    @register(f'{MODULE_NAME}::bias_act')
    def _bias_act_fake(x, b, dy, ddx, mode, dim, act, alpha, gain, clamp):  # pylint: disable=unused-argument
        return torch.empty_like(x)

    @register(f'{MODULE_NAME}::upfirdn2d')
    def _upfirdn2d_fake(x, g, upx, upy, downx, downy, padx0, padx1, pady0, pady1):
        out_h = (x.shape[2] * upy + pady0 + pady1 - g.shape[0] + downy) // downy
        out_w = (x.shape[3] * upx + padx0 + padx1 - g.shape[1] + downx) // downx
        return x.new_empty([x.shape[0], x.shape[1], out_h, out_w])


KERNEL_DTYPES = (torch.float16, torch.float32, torch.float64)


def use_compiled(impl, x, beneficial=True):
    """Whether an op call with this `impl` on tensor `x` runs the compiled kernel.

    impl='ref' never does; impl='compiled' must (raises if impossible). The default impl='cuda' follows
    TOOLKIT_OPS_IMPL: 'ref' never, 'compiled' wherever a kernel exists, 'auto' where a kernel exists and the
    caller says it is `beneficial` (the benchmark bench/ops.py is the evidence for that rule).
    """
    if impl == 'ref':
        return False
    mode = custom_ops.impl_mode()
    if impl == 'cuda' and (mode == 'ref' or (mode == 'auto' and not beneficial)):
        return False
    device = x.device
    if device.type not in ('cpu', 'cuda') or x.dtype not in KERNEL_DTYPES:
        if impl == 'compiled':
            raise RuntimeError(f'No compiled kernel exists for {x.dtype} on {device.type!r}; use impl="ref"')
        return False
    required = impl == 'compiled' or mode == 'compiled'
    if device.type in covered_devices(required):
        return True
    if impl == 'compiled':
        raise RuntimeError(f'The compiled ops were built without {device.type} support (no usable CUDA toolkit)')
    return False
