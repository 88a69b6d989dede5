"""Small generic helpers that upstream network pickles and our scripts rely on."""

from .util import EasyDict, make_cache_dir_path

__all__ = ['EasyDict', 'make_cache_dir_path']
