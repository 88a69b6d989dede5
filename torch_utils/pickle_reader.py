"""The one reader of network pickles: open a path or URL, unpickle, and turn every failure into one line.

Loading a pickle runs code in two ways: the source text that `persistence` embeds is executed, and every global
the pickle names (`os.system`, `builtins.exec`, ...) is imported and may be called with arguments of the file's
choosing. With refusal on (`persistence.refuse_unknown_sources()`, `TOOLKIT_REFUSE_UNKNOWN_CODE=1`, or a
script's `--refuse-unknown-code`) both are closed: embedded source must be on the hash allow-list (see
`persistence`), and the unpickler resolves only the globals that network pickles are made of (`ALLOWED_GLOBALS`,
plus `torch.nn.Module` classes of torch and of this toolkit). Anything else is refused, naming the global, before
it is called. Tensor storages nested in a pickle are read with `torch.load(weights_only=True)`, so they cannot
smuggle code either. What refusal does not cover: bugs in torch or numpy's own reconstruction code, and trusted
source doing something harmful; it is a guard against files that carry code, not a sandbox.
"""

import io
import os
import pickle
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

import dnnlib
from torch_utils import persistence


class NetworkPickleError(Exception):
    """A file is missing, unreadable, refused, or not the kind of network pickle asked for (one line for the user)."""


def _load_storage_weights_only(data: bytes) -> Any:
    """`torch.storage._load_from_bytes` without code: a pickled tensor's storage is a small torch.save archive."""
    return torch.load(io.BytesIO(data), weights_only=True)


def _numpy_multiarray():
    """numpy's array/scalar reconstructors: `numpy._core.multiarray` since numpy 2, `numpy.core` before."""
    try:
        from numpy._core import multiarray
    except ImportError:
        from numpy.core import multiarray
    return multiarray


#: (module, name) pairs a network pickle may name, and what each resolves to under refusal.
ALLOWED_GLOBALS: Dict[Tuple[str, str], Callable[[], Any]] = {
    ('collections', 'OrderedDict'): lambda: __import__('collections').OrderedDict,
    ('builtins', 'set'): lambda: set,
    ('builtins', 'frozenset'): lambda: frozenset,
    ('builtins', 'slice'): lambda: slice,
    ('builtins', 'complex'): lambda: complex,
    ('builtins', 'bytearray'): lambda: bytearray,
    ('builtins', 'object'): lambda: object,
    ('copyreg', '_reconstructor'): lambda: __import__('copyreg')._reconstructor,
    ('torch', 'Size'): lambda: torch.Size,
    ('torch', 'device'): lambda: torch.device,
    ('torch', 'Tensor'): lambda: torch.Tensor,
    ('torch.nn.parameter', 'Parameter'): lambda: torch.nn.Parameter,
    ('torch._utils', '_rebuild_tensor'): lambda: torch._utils._rebuild_tensor,
    ('torch._utils', '_rebuild_tensor_v2'): lambda: torch._utils._rebuild_tensor_v2,
    ('torch._utils', '_rebuild_parameter'): lambda: torch._utils._rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): lambda: torch._utils._rebuild_parameter_with_state,
    ('torch._tensor', '_rebuild_from_type_v2'): lambda: torch._tensor._rebuild_from_type_v2,
    ('torch.storage', '_load_from_bytes'): lambda: _load_storage_weights_only,
    ('numpy', 'dtype'): lambda: __import__('numpy').dtype,
    ('numpy', 'ndarray'): lambda: __import__('numpy').ndarray,
    **{(module, name): (lambda name=name: getattr(_numpy_multiarray(), name))
       for module in ('numpy.core.multiarray', 'numpy._core.multiarray') for name in ('_reconstruct', 'scalar')},
    ('torch_utils.persistence', '_reconstruct_persistent_obj'): lambda: persistence._reconstruct_persistent_obj,
    ('dnnlib.util', 'EasyDict'): lambda: dnnlib.EasyDict,
    ('dnnlib', 'EasyDict'): lambda: dnnlib.EasyDict,
}

#: Packages whose `torch.nn.Module` classes a pickle may name (instantiating a module runs no code of the file's).
MODULE_CLASS_PACKAGES = ('torch.nn.modules.', 'stylegan2.', 'teachers.', 'ikl.', 'metrics.', 'training.', 'torch_utils.')


def _allowed_module_class(module: str, name: str) -> Optional[type]:
    if not module.startswith(MODULE_CLASS_PACKAGES) or name.startswith('_'):
        return None
    try:
        obj = getattr(__import__(module, fromlist=[name]), name)
    except (ImportError, AttributeError):
        return None
    return obj if isinstance(obj, type) and issubclass(obj, torch.nn.Module) else None


def _torch_dtype(module: str, name: str) -> Optional[torch.dtype]:
    obj = getattr(torch, name, None) if module == 'torch' else None
    return obj if isinstance(obj, torch.dtype) else None


class NetworkUnpickler(pickle.Unpickler):
    """Unpickler with substitutes (e.g. TensorFlow `Network` read as an attribute bag) and, when `restricted`,
    the allow-list of globals."""

    def __init__(self, file, substitutes: Optional[Dict[Tuple[str, str], Any]] = None, restricted: bool = False):
        super().__init__(file)
        self.substitutes = substitutes or {}
        self.restricted = restricted

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.substitutes:
            return self.substitutes[(module, name)]
        if not self.restricted:
            return super().find_class(module, name)
        if (module, name) in ALLOWED_GLOBALS:
            return ALLOWED_GLOBALS[(module, name)]()
        allowed = _torch_dtype(module, name) or _allowed_module_class(module, name)
        if allowed is None:
            raise persistence.RefusedCode(f'refusing global {module}.{name}: not on the allow-list of what network '
                                          f'pickles are made of (--refuse-unknown-code); nothing of this file has run')
        return allowed


def _describe(path_or_url: Any) -> str:
    return path_or_url if isinstance(path_or_url, str) else getattr(path_or_url, 'name', '<file object>')


def _one_line(err: BaseException, limit: int = 400) -> str:
    return ' '.join(str(err).split())[:limit] or type(err).__name__


def read_pickle(path_or_url: Any, substitutes: Optional[Dict[Tuple[str, str], Any]] = None,
                cache_dir: Optional[str] = None, verbose: bool = True) -> Any:
    """Unpickle a local path, URL (cached download) or binary file object; every failure is a NetworkPickleError
    whose message starts with the file's name. Refusal follows `persistence.refusing_unknown_sources()`."""
    what = _describe(path_or_url)
    if isinstance(path_or_url, str) and os.path.isdir(path_or_url):
        raise NetworkPickleError(f'{what}: is a directory, expected a network pickle file')
    try:
        f = dnnlib.util.open_url(path_or_url, cache_dir=cache_dir, verbose=verbose) \
            if isinstance(path_or_url, str) else path_or_url
    except FileNotFoundError:
        raise NetworkPickleError(f'{what}: no such file') from None
    except (OSError, ValueError) as err:
        raise NetworkPickleError(f'{what}: cannot open ({_one_line(err)})') from None
    try:
        head = f.peek(4)[:4] if hasattr(f, 'peek') else b''
        if head.startswith(b'PK'):
            kind = 'a numpy .npz archive' if what.endswith('.npz') else 'a torch.save() archive (e.g. a state dict)'
            raise NetworkPickleError(f'{what}: this is {kind}, not a network pickle; expected a .pkl written by a '
                                     f'StyleGAN2/EDM training run')
        if head.startswith(b'\x93NUMPY'):
            raise NetworkPickleError(f'{what}: this is a numpy .npy array, not a network pickle')
        return NetworkUnpickler(f, substitutes, restricted=persistence.refusing_unknown_sources()).load()
    except (NetworkPickleError, MemoryError, KeyboardInterrupt):
        raise
    except persistence.RefusedCode as err:
        raise NetworkPickleError(f'{what}: {_one_line(err)}') from None
    except Exception as err:  # noqa: BLE001 -- any failure inside unpickling is reported as one line.
        raise NetworkPickleError(f'{what}: not a loadable network pickle ({type(err).__name__}: {_one_line(err)})') from None
    finally:
        if f is not path_or_url:
            f.close()


def embedded_sources(path_or_url: Any, substitutes: Optional[Dict[Tuple[str, str], Any]] = None) -> List[Dict[str, str]]:
    """The module sources a pickle embeds, read without running any of them: one dict per distinct source with
    `sha256`, `classes` (comma-separated), `trusted` ('yes'/'no') and `source`. Globals are restricted as under refusal."""
    found: Dict[str, Dict[str, Any]] = {}

    def record(meta: Dict[str, Any]) -> Dict[str, Any]:
        src = meta.get('module_src', '') if isinstance(meta, dict) else ''
        entry = found.setdefault(src, dict(sha256=persistence.source_sha256(src), classes=[]))
        if meta.get('class_name') not in entry['classes']:
            entry['classes'].append(str(meta.get('class_name')))
        return dict(meta.get('state') or {})

    hooks = dict(substitutes or {})
    hooks[('torch_utils.persistence', '_reconstruct_persistent_obj')] = record
    what = _describe(path_or_url)
    try:
        with dnnlib.util.open_url(path_or_url) as f:
            NetworkUnpickler(f, hooks, restricted=True).load()
    except FileNotFoundError:
        raise NetworkPickleError(f'{what}: no such file') from None
    except Exception as err:  # noqa: BLE001 -- one line, as read_pickle.
        raise NetworkPickleError(f'{what}: cannot list its embedded code ({type(err).__name__}: {_one_line(err)})') from None
    return [dict(sha256=e['sha256'], classes=', '.join(e['classes']), source=src,
                 trusted='yes' if persistence.is_source_trusted(src) else 'no') for src, e in found.items()]
