"""Build, cache and load C++/CUDA extensions for the custom ops, without the usual pain.

What users of upstream's plugin loader hit, and what this module does instead:
* builds re-run on every call after a failure -> a failure is remembered (in the process, and on disk next to the
  cache) and reported by ONE warning; callers then use the pure-PyTorch reference;
* hangs on a stale lock after Ctrl-C -> the build lock is an OS file lock (fcntl/msvcrt), which the kernel releases
  when its holder dies, and waiting for it has a timeout;
* half-written build directories -> every build happens in a private temporary directory that is renamed into
  place only once it loaded successfully;
* rebuilding per process or per torch upgrade confusion -> the cache key is the hash of the sources and headers,
  the torch and Python versions, the device kind (cpu/cuda) and the build options; a cached library is loaded
  directly, without invoking ninja or a compiler.

Environment:
* `TOOLKIT_OPS_IMPL` = `auto` (default: compiled kernels where they help, built on first use, reference otherwise),
  `ref` (never build; always the reference) or `compiled` (use the kernels wherever they apply; a build failure
  raises instead of falling back, and a remembered failure is retried).
* `TOOLKIT_OPS_BUILD_DIR`: cache root (else `$TORCH_EXTENSIONS_DIR`, else `<dnnlib cache>/torch_extensions`).
* `TOOLKIT_OPS_LOCK_TIMEOUT`: seconds to wait for another process's build (default 600).
"""

import contextlib
import hashlib
import importlib.util
import os
import shutil
import sys
import threading
import time
import uuid
import warnings

import torch

import dnnlib

verbosity = 'brief'  # 'none' | 'brief' (one line per build) | 'full' (compiler output too)

IMPL_ENV = 'TOOLKIT_OPS_IMPL'
BUILD_DIR_ENV = 'TOOLKIT_OPS_BUILD_DIR'
LOCK_TIMEOUT_ENV = 'TOOLKIT_OPS_LOCK_TIMEOUT'
_IMPL_MODES = ('auto', 'ref', 'compiled')


class BuildError(RuntimeError):
    """The extension could not be built or loaded; `log_path` is the compiler log when there is one."""

    def __init__(self, message, log_path=None):
        super().__init__(message)
        self.log_path = log_path


def impl_mode():
    """The `TOOLKIT_OPS_IMPL` setting: 'auto', 'ref' or 'compiled'."""
    mode = os.environ.get(IMPL_ENV, '').strip().lower() or 'auto'
    if mode not in _IMPL_MODES:
        raise ValueError(f'{IMPL_ENV}={os.environ[IMPL_ENV]!r}: expected one of {", ".join(_IMPL_MODES)}')
    return mode



@contextlib.contextmanager
def ops_impl(mode: str):
    """Run the block under TOOLKIT_OPS_IMPL=`mode` (benchmarks and checks that compare the implementations); the
    previous value, or its absence, comes back afterwards."""
    previous = os.environ.get(IMPL_ENV)
    os.environ[IMPL_ENV] = mode
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(IMPL_ENV, None)
        else:
            os.environ[IMPL_ENV] = previous

def build_root():
    """Directory holding one subdirectory per built extension version."""
    for var in (BUILD_DIR_ENV, 'TORCH_EXTENSIONS_DIR'):
        if os.environ.get(var):
            return os.environ[var]
    return dnnlib.make_cache_dir_path('torch_extensions')


def _log(message, end='\n'):
    if verbosity in ('brief', 'full'):
        print(message, end=end, file=sys.stderr, flush=True)

#----------------------------------------------------------------------------------------------------------------
# Cross-process lock. The OS drops an fcntl/msvcrt lock when its holder exits, however it exits, so a lock can
# never go stale; the lock file itself is left in place harmlessly.

def _try_lock(fd):
    if os.name == 'nt':
        import msvcrt
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    else:
        import fcntl
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _unlock(fd):
    if os.name == 'nt':
        import msvcrt
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    else:
        import fcntl
        fcntl.flock(fd, fcntl.LOCK_UN)


@contextlib.contextmanager
def _file_lock(path, timeout, what):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        deadline = time.monotonic() + timeout
        waiting_announced = False
        while True:
            try:
                _try_lock(fd)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise BuildError(f'{what}: gave up after waiting {timeout:.0f} s for another process building it '
                                     f'(lock {path}; raise {LOCK_TIMEOUT_ENV} to wait longer)') from None
                if not waiting_announced:
                    _log(f'{what}: waiting for another process to finish building it...')
                    waiting_announced = True
                time.sleep(0.25)
        try:
            yield
        finally:
            _unlock(fd)
    finally:
        os.close(fd)

#----------------------------------------------------------------------------------------------------------------

def _library_path(directory, module_name):
    for ext in ('.so', '.pyd', '.dylib'):
        path = os.path.join(directory, module_name + ext)
        if os.path.isfile(path):
            return path
    return None


def _load_library(path, module_name, is_python_module):
    if not is_python_module:
        torch.ops.load_library(path)
        return path
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cache_key(module_name, files, device_kind, build_kwargs):
    digest = hashlib.sha256()
    for path in files:
        digest.update(os.path.basename(path).encode() + b'\0')
        with open(path, 'rb') as f:
            digest.update(f.read() + b'\0')
    env = [module_name, torch.__version__, str(torch.version.cuda), device_kind, sys.implementation.cache_tag,
           sys.platform, repr(sorted(build_kwargs.items()))]
    digest.update(repr(env).encode())
    return digest.hexdigest()[:20]


_lock = threading.Lock()
_results = {}  # cache key -> loaded module/library path, or the BuildError of a failed attempt


def get_plugin(module_name, sources, headers=None, source_dir=None, **build_kwargs):
    """Build (at most once per process, reusing the on-disk cache) and load an extension; return it.

    `sources`/`headers` may be relative to `source_dir`; headers only enter the cache key. `build_kwargs` go to
    `torch.utils.cpp_extension.load` (e.g. `extra_cflags`, `is_python_module=False` for libraries that register
    `torch.ops`). Raises BuildError on failure, and again (without rebuilding) on later calls.
    """
    if source_dir is not None:
        sources = [os.path.join(source_dir, s) for s in sources]
        headers = [os.path.join(source_dir, h) for h in (headers or [])]
    files = list(sources) + list(headers or [])
    device_kind = 'cuda' if any(s.endswith('.cu') for s in sources) or build_kwargs.get('with_cuda') else 'cpu'
    key = _cache_key(module_name, files, device_kind, build_kwargs)
    with _lock:
        if key not in _results:
            try:
                _results[key] = _build_and_load(module_name, files, sources, key, build_kwargs)
            except BuildError as e:
                _results[key] = e
        result = _results[key]
    if isinstance(result, BuildError):
        raise result
    return result


def _build_and_load(module_name, files, sources, key, build_kwargs):
    what = f'Compiled ops "{module_name}"'
    is_python_module = build_kwargs.get('is_python_module', True)
    root = build_root()
    final_dir = os.path.join(root, f'{module_name}-{key}')
    failure_log = final_dir + '.failed.log'
    os.makedirs(root, exist_ok=True)

    # Fast path: a finished build is complete by construction (renamed into place only after it loaded).
    path = _library_path(final_dir, module_name)
    if path is not None:
        return _load_library(path, module_name, is_python_module)
    if os.path.isfile(failure_log) and impl_mode() != 'compiled':
        raise BuildError(f'{what}: an earlier build failed (log: {failure_log}); delete that file or set '
                         f'{IMPL_ENV}=compiled to retry', log_path=failure_log)

    timeout = float(os.environ.get(LOCK_TIMEOUT_ENV, 600))
    with _file_lock(final_dir + '.lock', timeout, what):
        path = _library_path(final_dir, module_name)  # Another process may have finished it while we waited.
        if path is not None:
            return _load_library(path, module_name, is_python_module)
        for name in os.listdir(root):  # Leftovers of builds that were killed; nobody else holds our lock.
            if name.startswith(f'.{module_name}-{key}.tmp-'):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        tmp_dir = os.path.join(root, f'.{module_name}-{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}')
        os.makedirs(tmp_dir)
        copied = []
        for src in files:  # Sources and headers side by side, so relative includes resolve.
            dst = os.path.join(tmp_dir, os.path.basename(src))
            shutil.copyfile(src, dst)
            if src in sources:
                copied.append(dst)

        _log(f'{what}: building once for this machine (about a minute; cached in {final_dir})... ', end='')
        start = time.monotonic()
        try:
            import torch.utils.cpp_extension as cpp_extension  # Imported lazily: it is slow to import.
            result = cpp_extension.load(name=module_name, sources=copied, build_directory=tmp_dir,
                                        verbose=(verbosity == 'full'), **build_kwargs)
        except Exception as e:  # Compiler errors, missing ninja/compiler/toolkit, link or load errors.
            _log('failed.')
            shutil.rmtree(tmp_dir, ignore_errors=True)
            message = f'{type(e).__name__}: {e}'
            with open(failure_log, 'w') as f:
                f.write(message)
            lines = [line for line in message.splitlines() if line.strip()] or [message]
            first_line = next((line for line in lines if 'error:' in line.lower()), lines[0])[:300]
            raise BuildError(f'{what}: build failed ({first_line}); full log: {failure_log}',
                             log_path=failure_log) from None
        try:
            os.replace(tmp_dir, final_dir)
        except OSError:  # Cannot rename (e.g. a loaded DLL on Windows): keep the temporary directory as the build.
            pass
        if os.path.isfile(failure_log):
            os.remove(failure_log)
        _log(f'done in {time.monotonic() - start:.0f} s.')
        return result


def try_get_plugin(module_name, sources, headers=None, source_dir=None, **build_kwargs):
    """Like get_plugin, but on failure warn once per process and return None (callers use the reference)."""
    try:
        return get_plugin(module_name, sources, headers=headers, source_dir=source_dir, **build_kwargs)
    except BuildError as e:
        if not getattr(e, 'warned', False):
            e.warned = True
            warnings.warn(f'{e}. Falling back to the pure-PyTorch reference implementation '
                          f'(correct, slower; set {IMPL_ENV}=ref to skip the build).', RuntimeWarning, stacklevel=3)
        return None
