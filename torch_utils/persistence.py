"""Pickling of network classes together with their source code (upstream format, version 6).

A class decorated with `@persistent_class` pickles its instances as `_reconstruct_persistent_obj(meta)`, where
`meta` carries the full source text of the module that defined the class, the class name, and the object state.
Unpickling executes that source in a fresh module, so a pickle keeps working when our code changes, and pickles
written by NVIDIA's stylegan2-ada-pytorch and EDM load here (and ours load there) as long as the source only
uses `torch_utils`/`dnnlib` names that both sides offer.

Security: loading such a pickle runs the code inside it. Only load pickles you trust. To refuse any embedded
source that is not on an allow-list, call `refuse_unknown_sources()` or set `TOOLKIT_REFUSE_UNKNOWN_CODE=1`;
the sources of this toolkit's own modules (as on disk, and every earlier committed version listed in
`released_sources.txt`) are always trusted, others can be added by sha256 with
`trust_source_hash()` or listed one per line in the trust file (`trusted_code_file()`; `trust_code.py --add`
appends a pickle's hashes). Refusal also restricts the globals a pickle may name: see `torch_utils.pickle_reader`.
"""

import copy
import hashlib
import inspect
import io
import os
import pickle
import sys
import types
import uuid
from typing import Any, Callable, List, Optional, Set


import dnnlib

_version = 6                # Layout of `meta`; upstream S, E and T all write 6.
_decorators: Set[type] = set()          # Every class produced by persistent_class().
_import_hooks: List[Callable] = []      # Applied to `meta` before reconstruction.
_module_to_src_dict: dict = dict()      # module -> source text
_src_to_module_dict: dict = dict()      # source text -> module


# ----------------------------------------------------------------------------------------------------------------
# Decorating classes.

def persistent_class(orig_class: type) -> type:
    """Make `orig_class` pickle its instances together with the source code of its module.

    Instances remember their constructor arguments (`init_args`, `init_kwargs`) so a loaded network can be
    rebuilt, e.g. as `type(net)(**net.init_kwargs)`. The class must be defined at the top level of its module.
    """
    assert isinstance(orig_class, type)
    if is_persistent(orig_class):
        return orig_class

    assert orig_class.__module__ in sys.modules, f'{orig_class.__module__} is not an imported module'
    orig_module = sys.modules[orig_class.__module__]
    orig_module_src = _module_to_src(orig_module)

    class Decorator(orig_class):
        _orig_module_src = orig_module_src
        _orig_class_name = orig_class.__name__

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            record = getattr(self, '_record_init_args', True)
            self._init_args = copy.deepcopy(args) if record else None
            self._init_kwargs = copy.deepcopy(kwargs) if record else None
            assert orig_class.__name__ in orig_module.__dict__, \
                f'{orig_class.__name__} must be defined at the top level of its module to be persistent'
            _check_pickleable(self.__reduce__())

        @property
        def init_args(self) -> tuple:
            assert self._init_args is not None, 'constructor arguments were not recorded'
            return copy.deepcopy(self._init_args)

        @property
        def init_kwargs(self) -> dnnlib.EasyDict:
            assert self._init_kwargs is not None, 'constructor arguments were not recorded'
            return dnnlib.EasyDict(copy.deepcopy(self._init_kwargs))

        def __reduce__(self):
            fields = list(super().__reduce__())
            fields += [None] * max(3 - len(fields), 0)
            if fields[0] is not _reconstruct_persistent_obj:
                meta = dict(type='class', version=_version, module_src=self._orig_module_src,
                            class_name=self._orig_class_name, state=fields[2])
                fields[0] = _reconstruct_persistent_obj
                fields[1] = (meta,)
                fields[2] = None
            return tuple(fields)

    Decorator.__name__ = orig_class.__name__
    Decorator.__qualname__ = orig_class.__qualname__
    Decorator.__module__ = orig_class.__module__
    Decorator.__doc__ = orig_class.__doc__
    _decorators.add(Decorator)
    return Decorator


def is_persistent(obj: Any) -> bool:
    """True for a class made by persistent_class(), or an instance of one."""
    try:
        if obj in _decorators:
            return True
    except TypeError:  # Unhashable instance.
        pass
    return type(obj) in _decorators


def import_hook(hook: Callable[[dnnlib.EasyDict], dnnlib.EasyDict]) -> None:
    """Register `hook(meta) -> meta`, called on every persistent object before it is rebuilt.

    The usual use is patching `meta.module_src` of old pickles whose source calls an API that changed.
    """
    assert callable(hook)
    _import_hooks.append(hook)


# ----------------------------------------------------------------------------------------------------------------
# Unpickling.

def _reconstruct_persistent_obj(meta: dict) -> Any:
    """Rebuild a persistent object from its `meta` (the reduce function named in every pickle)."""
    meta = dnnlib.EasyDict(meta)
    meta.state = dnnlib.EasyDict(meta.state)
    for hook in _import_hooks:
        meta = hook(meta)
        assert meta is not None, 'persistence.import_hook() functions must return the meta'

    if meta.version != _version:
        raise pickle.UnpicklingError(f'Unsupported persistent object version {meta.version}; expected {_version}')
    if meta.type != 'class':
        raise pickle.UnpicklingError(f'Unsupported persistent object type {meta.type!r}')
    _check_source_allowed(meta.module_src, meta.class_name)

    module = _src_to_module(meta.module_src)
    orig_class = module.__dict__[meta.class_name]
    decorator_class = persistent_class(orig_class)
    obj = decorator_class.__new__(decorator_class)

    # nn.Module.__setstate__ back-fills attributes that newer torch versions added (hook dicts etc.), which
    # pickles written by older torch lack; a plain __dict__ update would leave such modules uncallable.
    setstate = getattr(obj, '__setstate__', None)
    if callable(setstate):
        setstate(meta.state)
    else:
        obj.__dict__.update(meta.state)
    return obj


def _module_to_src(module: types.ModuleType) -> str:
    """Source text of a module: the registered text for exec'd modules, else read from its file."""
    src = _module_to_src_dict.get(module, None)
    if src is None:
        src = inspect.getsource(module)
        _module_to_src_dict[module] = src
        _src_to_module_dict[src] = module
    return src


def _src_to_module(src: str) -> types.ModuleType:
    """A module executing `src`, shared by every object whose source text is identical."""
    module = _src_to_module_dict.get(src, None)
    if module is None:
        module_name = '_imported_module_' + uuid.uuid4().hex
        module = types.ModuleType(module_name)
        sys.modules[module_name] = module
        # Register before exec: the source applies @persistent_class while executing, which looks the text up.
        _module_to_src_dict[module] = src
        _src_to_module_dict[src] = module
        exec(src, module.__dict__)  # pylint: disable=exec-used
    return module


# ----------------------------------------------------------------------------------------------------------------
# Refusing unknown embedded source.

_refuse_unknown = os.environ.get('TOOLKIT_REFUSE_UNKNOWN_CODE', '0') not in ('', '0', 'false', 'False')
_trusted_hashes: Set[str] = set()
_own_hashes: Optional[Set[str]] = None


class RefusedCode(pickle.UnpicklingError):
    """Refusal is on and a pickle carries code (embedded source or a global) that is not on the allow-lists."""


def source_sha256(src: str) -> str:
    """The hash by which an embedded module source is put on the allow-list."""
    return hashlib.sha256(src.encode('utf-8')).hexdigest()


def refuse_unknown_sources(refuse: bool = True) -> None:
    """Make unpickling fail on any embedded source that is neither ours nor explicitly trusted."""
    global _refuse_unknown
    _refuse_unknown = refuse


def refusing_unknown_sources() -> bool:
    """Whether refusal is on: pickle readers then also restrict the globals they resolve (see `pickle_reader`)."""
    return _refuse_unknown


def trust_source_hash(*sha256: str) -> None:
    """Add sources (by sha256 of their text, see source_sha256) to the allow-list."""
    _trusted_hashes.update(h.strip().lower() for h in sha256)


def _own_source_hashes() -> Set[str]:
    """Hashes of every Python file of this toolkit as it is on disk, and of every earlier committed version of our
    persistent modules (released_sources.txt, so our older pickles keep loading): our own code is always trusted."""
    global _own_hashes
    if _own_hashes is None:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        released = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'released_sources.txt')
        _own_hashes = set()
        if os.path.isfile(released):  # Absent in a partial copy of torch_utils: only the files on disk are ours then.
            with open(released, encoding='utf-8') as f:
                _own_hashes = {line.split()[0] for line in f if line.strip() and not line.startswith('#')}
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if not d.startswith('.') and d not in ('tests', '__pycache__')]
            for name in filenames:
                if name.endswith('.py'):
                    with open(os.path.join(dirpath, name), encoding='utf-8-sig') as f:
                        _own_hashes.add(source_sha256(f.read()))
    return _own_hashes


def trusted_code_file() -> str:
    """The trust file: one sha256 per line (`#` comments). $TOOLKIT_TRUSTED_CODE, else `trusted-code.txt` in the
    dnnlib cache directory (where `trust_code.py --add` appends)."""
    return os.environ.get('TOOLKIT_TRUSTED_CODE') or dnnlib.util.make_cache_dir_path('trusted-code.txt')


def _file_trusted_hashes() -> Set[str]:
    path = trusted_code_file()
    if not os.path.exists(path):  # Nothing trusted yet (`trust_code.py --add` creates it).
        return set()
    try:
        with open(path, encoding='utf-8') as f:
            return {line.split('#')[0].strip().lower() for line in f if line.split('#')[0].strip()}
    except OSError as err:
        raise pickle.UnpicklingError(f'trust file {path}: cannot read it ({err})') from None


def is_source_trusted(src: str) -> bool:
    """Whether embedded source passes refusal: ours, trusted by hash in this process, or in the trust file."""
    digest = source_sha256(src)
    return digest in _trusted_hashes or digest in _own_source_hashes() or digest in _file_trusted_hashes()


def _check_source_allowed(src: str, class_name: str) -> None:
    if not _refuse_unknown or src in _src_to_module_dict or is_source_trusted(src):  # Already run here: no new code.
        return
    raise RefusedCode(
        f'refusing class {class_name}: its embedded source (sha256 {source_sha256(src)}) is not on the '
        f'allow-list. Loading a pickle runs the code inside it; if you trust this file, run '
        f'`python trust_code.py --add FILE.pkl` (appends to {trusted_code_file()}).')


# ----------------------------------------------------------------------------------------------------------------
# Pickleability check at construction time.

def _check_pickleable(obj: Any) -> None:
    """Fail early, at construction, when a persistent object holds something that cannot be pickled."""
    def walk(x):
        if isinstance(x, (list, tuple, set)):
            return [walk(v) for v in x]
        if isinstance(x, dict):
            return [[walk(k), walk(v)] for k, v in x.items()]
        if isinstance(x, (str, int, float, bool, bytes, bytearray)):
            return None
        if f'{type(x).__module__}.{type(x).__name__}' in ('numpy.ndarray', 'torch.Tensor', 'torch.nn.parameter.Parameter'):
            return None
        if is_persistent(x):
            return None
        return x
    with io.BytesIO() as f:
        pickle.dump(walk(obj), f)
