"""Small PyTorch helpers used by the networks' embedded source, by upstream scripts and by our trainers."""

import contextlib
import re
import warnings
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch

import dnnlib

# ----------------------------------------------------------------------------------------------------------------
# Constants and shape checks (called from pickled network source).

_constant_cache: Dict[tuple, torch.Tensor] = dict()


def constant(value: Any, shape: Optional[Sequence[int]] = None, dtype: Optional[torch.dtype] = None,
             device: Optional[torch.device] = None, memory_format: Optional[torch.memory_format] = None) -> torch.Tensor:
    """A cached tensor holding `value`; the same object is returned for equal requests, so never modify it."""
    value = np.asarray(value)
    if shape is not None:
        shape = tuple(shape)
    if dtype is None:
        dtype = torch.get_default_dtype()
    if device is None:
        device = torch.device('cpu')
    if memory_format is None:
        memory_format = torch.contiguous_format
    key = (value.shape, value.dtype, value.tobytes(), shape, dtype, device, memory_format)
    tensor = _constant_cache.get(key, None)
    if tensor is None:
        # np.array copies, so arrays with negative strides (e.g. x[::-1]) are accepted.
        tensor = torch.as_tensor(np.array(value), dtype=dtype, device=device)
        if shape is not None:
            tensor, _ = torch.broadcast_tensors(tensor, torch.empty(shape))
        tensor = tensor.contiguous(memory_format=memory_format)
        _constant_cache[key] = tensor
    return tensor


def nan_to_num(input: torch.Tensor, nan: float = 0.0, posinf: Optional[float] = None,
               neginf: Optional[float] = None, *, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """torch.nan_to_num, kept under this name for upstream callers."""
    return torch.nan_to_num(input, nan=nan, posinf=posinf, neginf=neginf, out=out)


@contextlib.contextmanager
def suppress_tracer_warnings() -> Iterator[None]:
    """Silence torch.jit.TracerWarning inside the block (shape checks are fine to trace as constants). Under
    torch.compile there is nothing to silence, and touching the warning filters would break the graph."""
    compiler = getattr(torch, 'compiler', None)
    if compiler is not None and hasattr(compiler, 'is_compiling') and compiler.is_compiling():
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', category=torch.jit.TracerWarning)
        yield


def symbolic_assert(condition: Any, message: str) -> None:
    """An assert that also works (symbolically) while tracing."""
    torch._assert(condition, message)  # pylint: disable=protected-access


def assert_shape(tensor: torch.Tensor, ref_shape: Sequence[Optional[int]]) -> None:
    """Check a tensor's shape; None in `ref_shape` matches any size."""
    if tensor.ndim != len(ref_shape):
        raise AssertionError(f'Wrong number of dimensions: got {tensor.ndim}, expected {len(ref_shape)}')
    for idx, (size, ref_size) in enumerate(zip(tensor.shape, ref_shape)):
        if ref_size is None:
            continue
        if isinstance(ref_size, torch.Tensor):
            with suppress_tracer_warnings():
                symbolic_assert(torch.equal(torch.as_tensor(size), ref_size), f'Wrong size for dimension {idx}')
        elif isinstance(size, torch.Tensor):
            with suppress_tracer_warnings():
                symbolic_assert(torch.equal(size, torch.as_tensor(ref_size)),
                                f'Wrong size for dimension {idx}: expected {ref_size}')
        elif size != ref_size:
            raise AssertionError(f'Wrong size for dimension {idx}: got {size}, expected {ref_size}')


def profiled_function(fn):
    """Decorator: name the function's time in the autograd profiler."""
    def decorator(*args, **kwargs):
        with torch.autograd.profiler.record_function(fn.__name__):
            return fn(*args, **kwargs)
    decorator.__name__ = fn.__name__
    decorator.__doc__ = fn.__doc__
    return decorator


# ----------------------------------------------------------------------------------------------------------------
# Data loading.

class InfiniteSampler(torch.utils.data.Sampler):
    """Endless index stream over a dataset, optionally shuffled with a sliding window, split across ranks."""

    def __init__(self, dataset, rank: int = 0, num_replicas: int = 1, shuffle: bool = True, seed: int = 0,
                 window_size: float = 0.5):
        assert len(dataset) > 0
        assert num_replicas > 0 and 0 <= rank < num_replicas
        assert 0 <= window_size <= 1
        super().__init__()
        self.dataset = dataset
        self.rank = rank
        self.num_replicas = num_replicas
        self.shuffle = shuffle
        self.seed = seed
        self.window_size = window_size

    def __iter__(self):
        order = np.arange(len(self.dataset))
        rnd = None
        window = 0
        if self.shuffle:
            rnd = np.random.RandomState(self.seed)
            rnd.shuffle(order)
            window = int(np.rint(order.size * self.window_size))
        idx = 0
        while True:
            i = idx % order.size
            if idx % self.num_replicas == self.rank:
                yield order[i]
            if window >= 2:
                j = (i - rnd.randint(window)) % order.size
                order[i], order[j] = order[j], order[i]
            idx += 1


class EpochSampler:
    """Batches of indices from successive random permutations; its whole state can be saved and restored."""

    def __init__(self, num_items: int, batch_size: int, seed: int, device=torch.device('cpu')):
        self.num_items = num_items
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.device = device
        self.order = torch.randperm(num_items, generator=self.generator)
        self.pos = 0

    def next_batch(self) -> torch.Tensor:
        parts, need = [], self.batch_size
        while need > 0:
            if self.pos == self.num_items:
                self.order = torch.randperm(self.num_items, generator=self.generator)
                self.pos = 0
            take = min(need, self.num_items - self.pos)
            parts.append(self.order[self.pos:self.pos + take])
            self.pos += take
            need -= take
        return torch.cat(parts).to(self.device)

    def draw_flips(self) -> torch.Tensor:
        return (torch.rand([self.batch_size], generator=self.generator) < 0.5).to(self.device)

    def state_dict(self) -> dict:
        return dict(generator=self.generator.get_state(), order=self.order.clone(), pos=self.pos)

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state['generator'])
        self.order = state['order'].clone()
        self.pos = int(state['pos'])


# ----------------------------------------------------------------------------------------------------------------
# Parameters, buffers and distributed consistency.

def params_and_buffers(module: torch.nn.Module) -> List[torch.Tensor]:
    """Parameters followed by buffers."""
    assert isinstance(module, torch.nn.Module)
    return list(module.parameters()) + list(module.buffers())


def named_params_and_buffers(module: torch.nn.Module) -> List[tuple]:
    """(name, tensor) for parameters followed by buffers."""
    assert isinstance(module, torch.nn.Module)
    return list(module.named_parameters()) + list(module.named_buffers())


@torch.no_grad()
def copy_params_and_buffers(src_module: torch.nn.Module, dst_module: torch.nn.Module,
                            require_all: bool = False) -> None:
    """Copy every parameter and buffer of `src_module` into the same-named tensor of `dst_module`."""
    assert isinstance(src_module, torch.nn.Module) and isinstance(dst_module, torch.nn.Module)
    src_tensors = dict(named_params_and_buffers(src_module))
    for name, tensor in named_params_and_buffers(dst_module):
        assert (name in src_tensors) or (not require_all), f'{name} is missing from the source module'
        if name in src_tensors:
            tensor.copy_(src_tensors[name])


@contextlib.contextmanager
def ddp_sync(module: torch.nn.Module, sync: bool) -> Iterator[None]:
    """Skip DistributedDataParallel's gradient all-reduce inside the block when `sync` is False."""
    assert isinstance(module, torch.nn.Module)
    if sync or not isinstance(module, torch.nn.parallel.DistributedDataParallel):
        yield
    else:
        with module.no_sync():
            yield


def check_ddp_consistency(module: torch.nn.Module, ignore_regex: Optional[str] = None) -> None:
    """Assert that every rank holds the same parameters and buffers as rank 0."""
    assert isinstance(module, torch.nn.Module)
    for name, tensor in named_params_and_buffers(module):
        fullname = type(module).__name__ + '.' + name
        if ignore_regex is not None and re.fullmatch(ignore_regex, fullname):
            continue
        tensor = tensor.detach()
        if tensor.is_floating_point():
            tensor = nan_to_num(tensor)
        other = tensor.clone()
        torch.distributed.broadcast(tensor=other, src=0)
        assert (tensor == other).all(), fullname


# ----------------------------------------------------------------------------------------------------------------
# Summary table.

def print_module_summary(module: torch.nn.Module, inputs: Sequence[Any], max_nesting: int = 3,
                         skip_redundant: bool = True) -> Any:
    """Run `module(*inputs)` once and print a table of submodules: parameters, buffers, output shapes, dtypes."""
    assert isinstance(module, torch.nn.Module)
    assert not isinstance(module, torch.jit.ScriptModule)
    assert isinstance(inputs, (tuple, list))

    entries = []
    nesting = [0]

    def pre_hook(_mod, _inputs):
        nesting[0] += 1

    def post_hook(mod, _inputs, outputs):
        nesting[0] -= 1
        if nesting[0] <= max_nesting:
            outputs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
            outputs = [t for t in outputs if isinstance(t, torch.Tensor)]
            entries.append(dnnlib.EasyDict(mod=mod, outputs=outputs))

    hooks = [mod.register_forward_pre_hook(pre_hook) for mod in module.modules()]
    hooks += [mod.register_forward_hook(post_hook) for mod in module.modules()]
    try:
        outputs = module(*inputs)
    finally:
        for hook in hooks:
            hook.remove()

    # Each tensor is counted once, by the outermost module that owns it.
    tensors_seen = set()
    for e in entries:
        e.unique_params = [t for t in e.mod.parameters() if id(t) not in tensors_seen]
        e.unique_buffers = [t for t in e.mod.buffers() if id(t) not in tensors_seen]
        e.unique_outputs = [t for t in e.outputs if id(t) not in tensors_seen]
        tensors_seen |= {id(t) for t in e.unique_params + e.unique_buffers + e.unique_outputs}
    if skip_redundant:
        entries = [e for e in entries if len(e.unique_params) or len(e.unique_buffers) or len(e.unique_outputs)]

    rows = [[type(module).__name__, 'Parameters', 'Buffers', 'Output shape', 'Datatype'], ['---'] * 5]
    param_total = buffer_total = 0
    submodule_names = {mod: name for name, mod in module.named_modules()}
    for e in entries:
        name = '<top-level>' if e.mod is module else submodule_names[e.mod]
        param_size = sum(t.numel() for t in e.unique_params)
        buffer_size = sum(t.numel() for t in e.unique_buffers)
        output_shapes = [str(list(t.shape)) for t in e.outputs]
        output_dtypes = [str(t.dtype).split('.')[-1] for t in e.outputs]
        rows.append([name + (':0' if len(e.outputs) >= 2 else ''),
                     str(param_size) if param_size else '-',
                     str(buffer_size) if buffer_size else '-',
                     (output_shapes + ['-'])[0],
                     (output_dtypes + ['-'])[0]])
        for idx in range(1, len(e.outputs)):
            rows.append([name + f':{idx}', '-', '-', output_shapes[idx], output_dtypes[idx]])
        param_total += param_size
        buffer_total += buffer_size
    rows += [['---'] * 5, ['Total', str(param_total), str(buffer_total), '-', '-']]

    widths = [max(len(cell) for cell in column) for column in zip(*rows)]
    print()
    for row in rows:
        print('  '.join(cell + ' ' * (width - len(cell)) for cell, width in zip(row, widths)))
    print()
    return outputs

#----------------------------------------------------------------------------------------------------------------
# Optimizers.


def adam_kernel_kwargs(params: Sequence[torch.Tensor]) -> Dict[str, bool]:
    """The fastest Adam implementation torch offers for `params`: `fused=True` when they all live on CUDA,
    `foreach=True` (multi-tensor kernels) otherwise. Both are the same update as the per-parameter loop up to
    float rounding. Not for our own use in embedded network code (upstream's `torch_utils` lacks it)."""
    params = list(params)
    if params and all(p.is_cuda for p in params):
        return dict(fused=True)
    return dict(foreach=True)


def make_adam(params, **kwargs) -> torch.optim.Adam:
    """`torch.optim.Adam(params, **kwargs)` with `adam_kernel_kwargs` unless kwargs choose `foreach`/`fused`."""
    params = list(params)
    if 'foreach' not in kwargs and 'fused' not in kwargs:
        tensors = [p for group in params for p in group['params']] if params and isinstance(params[0], dict) else params
        kwargs.update(adam_kernel_kwargs(tensors))
    return torch.optim.Adam(params, **kwargs)
