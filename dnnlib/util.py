"""Generic utilities: attribute dicts, construct-by-name, cached URL opening, logging.

Upstream pickles resolve `dnnlib.util.EasyDict` while unpickling, and their scripts call the helpers below by
these names, so the names and signatures are part of our public surface.
"""

import ctypes
import fnmatch
import hashlib
import importlib
import inspect
import io
import os
import re
import shutil
import sys
import tempfile
import types
import urllib.parse
import uuid
from typing import Any, List, Optional, Tuple, Union

import numpy as np


class EasyDict(dict):
    """A dict whose items are also attributes.

    A missing attribute raises AttributeError (never KeyError): pickle, copy and hasattr probe optional hooks
    such as `__setstate__` through getattr and must see "absent", not crash.
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        try:
            del self[name]
        except KeyError:
            raise AttributeError(name) from None


# ----------------------------------------------------------------------------------------------------------------
# Cache directory.

_cache_dir: Optional[str] = None


def set_cache_dir(path: Optional[str]) -> None:
    """Override where downloads and computed statistics are cached (highest precedence)."""
    global _cache_dir
    _cache_dir = path


def make_cache_dir_path(*paths: str) -> str:
    """Path inside the cache: set_cache_dir(), else $DNNLIB_CACHE_DIR, else ~/.cache/dnnlib, else a temp dir."""
    if _cache_dir is not None:
        return os.path.join(_cache_dir, *paths)
    if 'DNNLIB_CACHE_DIR' in os.environ:
        return os.path.join(os.environ['DNNLIB_CACHE_DIR'], *paths)
    if 'HOME' in os.environ:
        return os.path.join(os.environ['HOME'], '.cache', 'dnnlib', *paths)
    if 'USERPROFILE' in os.environ:
        return os.path.join(os.environ['USERPROFILE'], '.cache', 'dnnlib', *paths)
    return os.path.join(tempfile.gettempdir(), '.cache', 'dnnlib', *paths)


# ----------------------------------------------------------------------------------------------------------------
# Small conveniences used by scripts.

class Logger:
    """Tee everything written to stdout/stderr into a log file as well."""

    def __init__(self, file_name: Optional[str] = None, file_mode: str = 'w', should_flush: bool = True):
        self.file = open(file_name, file_mode) if file_name is not None else None
        self.should_flush = should_flush
        self.stdout = sys.stdout
        self.stderr = sys.stderr
        sys.stdout = self
        sys.stderr = self

    def __enter__(self) -> 'Logger':
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def write(self, text: Union[str, bytes]) -> None:
        if isinstance(text, bytes):
            text = text.decode()
        if len(text) == 0:
            return
        if self.file is not None:
            self.file.write(text)
        self.stdout.write(text)
        if self.should_flush:
            self.flush()

    def flush(self) -> None:
        if self.file is not None:
            self.file.flush()
        self.stdout.flush()

    def isatty(self) -> bool:
        return self.stdout.isatty()

    def close(self) -> None:
        self.flush()
        if sys.stdout is self:
            sys.stdout = self.stdout
        if sys.stderr is self:
            sys.stderr = self.stderr
        if self.file is not None:
            self.file.close()
            self.file = None


def _duration_parts(seconds: Union[int, float]) -> List[str]:
    """['1h', '02m', '05s'] for 3725 s: from the largest non-zero unit down, the first one unpadded."""
    s = int(np.rint(seconds))
    values = [s // 86400, (s // 3600) % 24, (s // 60) % 60, s % 60]
    first = 3 if s < 60 else 2 if s < 60 * 60 else 1 if s < 24 * 60 * 60 else 0
    return [f'{v}{unit}' if i == first else f'{v:02d}{unit}'
            for i, (v, unit) in enumerate(zip(values, 'dhms')) if i >= first]


def format_time(seconds: Union[int, float]) -> str:
    """Human-readable duration with up to three units, e.g. '1h 02m 05s'."""
    return ' '.join(_duration_parts(seconds)[:3])


def format_time_brief(seconds: Union[int, float]) -> str:
    """Duration with the two most significant units, e.g. '1h 02m'."""
    return ' '.join(_duration_parts(seconds)[:2])


def ask_yes_no(question: str) -> bool:
    """Ask on the terminal until the answer is yes or no."""
    while True:
        answer = input(f'{question} [y/n] ').strip().lower()
        if answer in ('y', 'yes'):
            return True
        if answer in ('n', 'no'):
            return False


def tuple_product(t: Tuple) -> Any:
    """Product of all elements of a tuple (1 for the empty tuple)."""
    result = 1
    for v in t:
        result *= v
    return result


_DTYPE_TO_CTYPE = {
    'float32': ctypes.c_float, 'float64': ctypes.c_double,
    'int8': ctypes.c_int8, 'int16': ctypes.c_int16, 'int32': ctypes.c_int32, 'int64': ctypes.c_int64,
    'uint8': ctypes.c_ubyte, 'uint16': ctypes.c_uint16, 'uint32': ctypes.c_uint32, 'uint64': ctypes.c_uint64,
}


def get_dtype_and_ctype(type_obj: Any) -> Tuple[np.dtype, Any]:
    """The numpy dtype and the ctypes type of the same width for a numpy type or dtype name."""
    dtype = np.dtype(type_obj)
    if dtype.name not in _DTYPE_TO_CTYPE:
        raise ValueError(f'No ctypes equivalent for dtype {dtype.name}')
    ctype = _DTYPE_TO_CTYPE[dtype.name]
    assert dtype.itemsize == ctypes.sizeof(ctype)
    return dtype, ctype


def is_pickleable(obj: Any) -> bool:
    """True when `obj` survives pickle.dumps."""
    import pickle
    try:
        with io.BytesIO() as stream:
            pickle.dump(obj, stream)
        return True
    except Exception:
        return False


# ----------------------------------------------------------------------------------------------------------------
# Looking up objects by dotted name.

def get_module_from_obj_name(obj_name: str) -> Tuple[types.ModuleType, str]:
    """Split 'pkg.mod.attr.sub' into the longest importable module and the remaining attribute path."""
    obj_name = re.sub(r'^np\.', 'numpy.', obj_name)  # Alias used by upstream configs.
    parts = obj_name.split('.')
    for i in range(len(parts), 0, -1):
        module_name, local_name = '.'.join(parts[:i]), '.'.join(parts[i:])
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name is not None and (module_name == err.name or module_name.startswith(err.name + '.')):
                continue  # This prefix is not a module; try a shorter one.
            raise  # The module exists but one of its own imports is missing.
        try:
            get_obj_from_module(module, local_name)
        except AttributeError:
            raise ImportError(f'Module {module_name!r} has no attribute path {local_name!r}') from None
        return module, local_name
    raise ImportError(f'Cannot find an object named {obj_name!r}')


def get_obj_from_module(module: types.ModuleType, obj_name: str) -> Any:
    """Follow a dotted attribute path inside a module ('' returns the module)."""
    if obj_name == '':
        return module
    obj = module
    for part in obj_name.split('.'):
        obj = getattr(obj, part)
    return obj


def get_obj_by_name(name: str) -> Any:
    """The object at a fully qualified dotted name."""
    module, obj_name = get_module_from_obj_name(name)
    return get_obj_from_module(module, obj_name)


def call_func_by_name(*args, func_name: Optional[str] = None, **kwargs) -> Any:
    """Look up a function by dotted name and call it."""
    assert func_name is not None
    func_obj = get_obj_by_name(func_name)
    assert callable(func_obj)
    return func_obj(*args, **kwargs)


def construct_class_by_name(*args, class_name: Optional[str] = None, **kwargs) -> Any:
    """Look up a class by dotted name and instantiate it."""
    return call_func_by_name(*args, func_name=class_name, **kwargs)


def get_module_dir_by_obj_name(obj_name: str) -> str:
    """The directory holding the module that defines `obj_name`."""
    module, _ = get_module_from_obj_name(obj_name)
    return os.path.dirname(inspect.getfile(module))


def is_top_level_function(obj: Any) -> bool:
    """True for a function defined at module top level (so it can be found again by name)."""
    return callable(obj) and obj.__name__ in sys.modules[obj.__module__].__dict__


def get_top_level_function_name(obj: Any) -> str:
    """Fully qualified name of a top-level function."""
    assert is_top_level_function(obj)
    module = obj.__module__
    if module == '__main__':
        module = os.path.splitext(os.path.basename(sys.modules[module].__file__))[0]
    return module + '.' + obj.__name__


# ----------------------------------------------------------------------------------------------------------------
# File helpers.

def list_dir_recursively_with_ignore(dir_path: str, ignores: Optional[List[str]] = None,
                                     add_base_to_relative: bool = False) -> List[Tuple[str, str]]:
    """All files below `dir_path` as (absolute, relative) pairs, skipping names matching `ignores` globs."""
    assert os.path.isdir(dir_path)
    base_name = os.path.basename(os.path.normpath(dir_path))
    ignores = ignores or []
    result = []
    for root, dirs, files in os.walk(dir_path, topdown=True):
        dirs[:] = [d for d in dirs if not any(fnmatch.fnmatch(d, pat) for pat in ignores)]
        for name in files:
            if any(fnmatch.fnmatch(name, pat) for pat in ignores):
                continue
            abs_path = os.path.join(root, name)
            rel_path = os.path.relpath(abs_path, dir_path)
            if add_base_to_relative:
                rel_path = os.path.join(base_name, rel_path)
            result.append((abs_path, rel_path))
    return result


def copy_files_and_create_dirs(files: List[Tuple[str, str]]) -> None:
    """Copy (src, dst) pairs, creating destination directories as needed."""
    for src, dst in files:
        os.makedirs(os.path.dirname(dst) or '.', exist_ok=True)
        shutil.copyfile(src, dst)


# ----------------------------------------------------------------------------------------------------------------
# URLs and the download cache.

def is_url(obj: Any, allow_file_urls: bool = False) -> bool:
    """True when `obj` is a string holding an http(s) URL (or a file:// URL if allowed)."""
    if not isinstance(obj, str) or '://' not in obj:
        return False
    if allow_file_urls and obj.startswith('file://'):
        return True
    try:
        parsed = urllib.parse.urlparse(obj)
        if not parsed.scheme or not parsed.netloc or '.' not in parsed.netloc:
            return False
        parsed = urllib.parse.urlparse(urllib.parse.urljoin(obj, '/'))
        if not parsed.scheme or not parsed.netloc or '.' not in parsed.netloc:
            return False
    except ValueError:
        return False
    return True


class DownloadError(OSError):
    """A URL could not be fetched and is not in the cache."""


def _file_url_to_path(url: str) -> str:
    path = urllib.parse.unquote(urllib.parse.urlparse(url).path)
    if re.match(r'^/[a-zA-Z]:', path):  # Windows drive letter: '/c:/x' -> 'c:/x'.
        path = path[1:]
    return path


def _safe_file_name(url: str, content_disposition: Optional[str] = None) -> str:
    name = None
    if content_disposition:
        match = re.search(r'filename="?([^";]+)"?', content_disposition)
        if match:
            name = match.group(1)
    if name is None:
        name = os.path.basename(urllib.parse.urlparse(url).path) or 'download'
    name = re.sub(r'[^0-9a-zA-Z-._]', '_', name)
    return name[:128]


def download_cache_path(url: str, cache_dir: Optional[str] = None) -> Optional[str]:
    """The cached file for `url`, or None when it has not been downloaded yet."""
    cache_dir = cache_dir or make_cache_dir_path('downloads')
    url_md5 = hashlib.md5(url.encode('utf-8')).hexdigest()
    if not os.path.isdir(cache_dir):
        return None
    hits = [f for f in os.listdir(cache_dir) if f.startswith(url_md5 + '_') and not f.endswith('.tmp')]
    return os.path.join(cache_dir, hits[0]) if len(hits) == 1 else None


def open_url(url: str, cache_dir: Optional[str] = None, num_attempts: int = 10, verbose: bool = True,
             return_filename: bool = False, cache: bool = True) -> Any:
    """Open a local path, a file:// URL or an http(s) URL (downloaded once into the cache).

    Returns an open binary file (or BytesIO), or the local file name with `return_filename=True`.
    A failed download raises DownloadError naming the URL and how to use a local copy instead.
    """
    assert num_attempts >= 1
    assert not (return_filename and not cache)

    if not re.match('^[a-z]+://', url):
        if not os.path.isfile(url):
            raise FileNotFoundError(f'No such file: {url}')
        return url if return_filename else open(url, 'rb')
    if url.startswith('file://'):
        path = _file_url_to_path(url)
        if not os.path.isfile(path):
            raise FileNotFoundError(f'No such file: {path} (from {url})')
        return path if return_filename else open(path, 'rb')
    if not is_url(url):
        raise ValueError(f'Not a valid URL or path: {url}')

    cache_dir = cache_dir or make_cache_dir_path('downloads')
    if cache:
        hit = download_cache_path(url, cache_dir)
        if hit is not None:
            return hit if return_filename else open(hit, 'rb')

    data, name = _download(url, num_attempts=num_attempts, verbose=verbose)
    if cache:
        os.makedirs(cache_dir, exist_ok=True)
        url_md5 = hashlib.md5(url.encode('utf-8')).hexdigest()
        path = os.path.join(cache_dir, f'{url_md5}_{name}')
        tmp = os.path.join(cache_dir, f'tmp_{uuid.uuid4().hex}_{url_md5}_{name}.tmp')
        with open(tmp, 'wb') as f:
            f.write(data)
        os.replace(tmp, path)
        if return_filename:
            return path
    return io.BytesIO(data)


def _download(url: str, num_attempts: int, verbose: bool) -> Tuple[bytes, str]:
    """Fetch `url` with retries; one clear DownloadError when every attempt fails."""
    import requests
    last_error: Optional[BaseException] = None
    for attempt in range(num_attempts):
        if verbose:
            print(f'Downloading {url} ...', end='', flush=True)
        try:
            with requests.Session() as session:
                with session.get(url, timeout=30) as res:
                    res.raise_for_status()
                    if len(res.content) == 0:
                        raise IOError('No data received')
                    if len(res.content) < 8192 and b'download_warning' in res.content:
                        raise IOError('Google Drive download quota exceeded or virus-scan page returned')
                    name = _safe_file_name(url, res.headers.get('Content-Disposition'))
                    if verbose:
                        print(' done')
                    return res.content, name
        except KeyboardInterrupt:
            raise
        except Exception as err:  # noqa: BLE001 -- any network failure is retried, then reported once.
            last_error = err
            if verbose:
                print(' failed')
            if isinstance(err, requests.exceptions.ConnectionError) and attempt >= 1:
                break  # Offline: more attempts will not help.
    raise DownloadError(
        f'Could not download {url} ({type(last_error).__name__}: {last_error}). '
        f'If you are offline, download the file elsewhere and pass its local path instead of the URL, '
        f'or place it in the cache directory {make_cache_dir_path("downloads")}.')

# ----------------------------------------------------------------------------------------------------------------
# Run directories.

class RunDirError(OSError):
    """A run directory cannot be created; the message is one line for the user."""


def next_run_dir(outdir: str, desc: str) -> str:
    """`outdir/NNNNN-desc`, numbered after the runs already there, so an existing run is never reused."""
    try:
        names = os.listdir(outdir) if os.path.isdir(outdir) else []
    except OSError as err:
        raise RunDirError(f'{outdir}: cannot list the output directory ({err.strerror})') from None
    ids = [int(m.group(1)) for m in (re.match(r'^(\d+)-', name) for name in names) if m]
    return os.path.join(outdir, f'{max(ids, default=-1) + 1:05d}-{desc}')


def make_run_dir(path: str, renumber: bool = False) -> str:
    """Create a new run directory and return its path; never reuse an existing one (nothing a user made is
    overwritten). With `renumber`, a numbered `NNNNN-desc` path that another run took in the meantime (two runs
    started at once) moves on to the next free number instead of failing."""
    for _ in range(100):
        try:
            os.makedirs(path, exist_ok=False)
            return path
        except FileExistsError:
            m = re.match(r'^\d+-(.+)$', os.path.basename(path))
            if not (renumber and m):
                raise RunDirError(f'{path} already exists; refusing to overwrite a run directory') from None
            path = next_run_dir(os.path.dirname(path), m.group(1))
        except OSError as err:
            raise RunDirError(f'cannot create run directory {path} ({err.strerror})') from None
    raise RunDirError(f'{path}: no free run number after 100 tries')
