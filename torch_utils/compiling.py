"""`--compile`: torch.compile of a module in place, with a fallback to eager when compilation fails.

`compile_module(net, name)` routes `net(...)` through `torch.compile` (the module's own `__call__` hook, as
`nn.Module.compile` does), so the module keeps its identity, parameters, state dict and hooks. Copies and pickles
of it are plain eager modules: torch drops the compiled call from a module's pickled state (`copy.deepcopy`, the
snapshots' `pickle.dump`).

Compilation is lazy: it happens at the first call (and again whenever torch's guards see a new situation, e.g. a
new batch size or train/eval mode). When that raises (no C++ compiler for inductor, an unsupported construct, a
backend error), one one-line warning is given and the module runs eager from then on. Under autograd the
backward graph is compiled at the forward call too (not lazily at the first backward), so a failing backward
compile also falls back instead of failing the step. Random numbers drawn inside a compiled network (StyleGAN2's
noise, dropout) come from torch's generator as in eager mode, so counter-seeded draws, the teacher's and the fake
score's shared dropout masks and exact resume work as without compile. The first call's wall time, compilation included, goes to
`log` (the "compile time").

Results equal eager up to floating-point reassociation (inductor fuses and reorders reductions); the tests check
outputs and gradients of small networks within 1e-5 relative to their scale.
"""

import contextlib
import time
import warnings
from typing import Callable, Optional

import torch

#: What torch.compile is given as `backend`; tests replace it with a failing callable to check the fallback.
BACKEND = 'inductor'


def _one_line(err: BaseException) -> str:
    """The first line of the innermost error (torch wraps a backend's error in BackendCompilerFailed)."""
    for _ in range(10):
        inner = getattr(err, 'inner_exception', None) or err.__cause__
        if inner is None:
            break
        err = inner
    text = str(err).strip().splitlines()
    first = next((line.strip() for line in text if line.strip()), '')
    return f'{type(err).__name__}: {first}'[:300]


def _compile_settings():
    """While a compiled call may compile: AOTAutograd compiles the backward graph together with the forward, and
    inductor draws random numbers (StyleGAN2's noise inputs, dropout) with torch's own generator, so they are the
    numbers eager draws from the same seed (private configs, used where present)."""
    stack = contextlib.ExitStack()
    functorch = getattr(getattr(torch, '_functorch', None), 'config', None)
    if functorch is not None and hasattr(functorch, 'force_non_lazy_backward_lowering'):
        stack.enter_context(functorch.patch(force_non_lazy_backward_lowering=True))
    try:
        import torch._inductor.config as inductor  # pylint: disable=import-outside-toplevel
    except ImportError:
        inductor = None
    if inductor is not None and hasattr(inductor, 'fallback_random'):
        stack.enter_context(inductor.patch(fallback_random=True))
    return stack


class CompiledCall:
    """Stands in for a module's call: the torch.compile'd call until it fails once, then the eager call."""

    def __init__(self, module: torch.nn.Module, name: str, log: Callable[[str], None], **options):
        self.name = name
        self.log = log
        self.eager = module._call_impl  # pylint: disable=protected-access
        self.compiled = torch.compile(self.eager, backend=BACKEND, **options)
        self.failure: Optional[str] = None  # The one-line reason, once it fell back.
        self.first_call_sec: Optional[float] = None

    def __call__(self, *args, **kwargs):
        if self.failure is not None:
            return self.eager(*args, **kwargs)
        start = time.perf_counter()
        try:
            with _compile_settings():
                out = self.compiled(*args, **kwargs)
        except Exception as err:  # pylint: disable=broad-except
            self.failure = _one_line(err)
            warnings.warn(f'compile: {self.name} could not be compiled, it runs eager ({self.failure})', stacklevel=2)
            return self.eager(*args, **kwargs)  # A genuine error of the call itself raises here again.
        if self.first_call_sec is None:
            self.first_call_sec = time.perf_counter() - start
            self.log(f'compile: {self.name}: first call {self.first_call_sec:.1f} s (compilation included)')
        return out


def compile_module(module: torch.nn.Module, name: str, log: Callable[[str], None] = print, **options) -> torch.nn.Module:
    """Compile `module`'s calls in place (see the module docstring); returns `module`. `options` go to torch.compile
    (e.g. mode='max-autotune'). A torch without torch.compile leaves the module eager, with a warning."""
    if not hasattr(torch, 'compile'):
        warnings.warn(f'compile: torch {torch.__version__} has no torch.compile; {name} runs eager')
        return module
    module._compiled_call_impl = CompiledCall(module, name, log, **options)  # pylint: disable=protected-access
    return module


def compiled_call(module: torch.nn.Module) -> Optional[CompiledCall]:
    """The module's `CompiledCall` (its first-call time and failure), or None when it was not compiled here."""
    call = getattr(module, '_compiled_call_impl', None)
    return call if isinstance(call, CompiledCall) else None


def uncompile(module: torch.nn.Module) -> torch.nn.Module:
    """Undo `compile_module`: the module runs eager again."""
    if compiled_call(module) is not None:
        module._compiled_call_impl = None  # pylint: disable=protected-access
    return module
