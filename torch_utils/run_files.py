"""Files of a training run: snapshot names, finding the newest training state, and atomic writes.

Shared by every trainer (train_teacher.py, train_stylegan2.py, the ikl engine), so their run directories look
alike and `--resume` works the same way everywhere.
"""

import glob
import os
import re
from typing import Callable, List, Optional, Tuple


def kimg_label(nimg: int) -> str:
    """`000123` for whole kimg (upstream's file names); `000000.032` for snapshots that fall between kimg."""
    return f'{nimg // 1000:06d}' if nimg % 1000 == 0 else f'{nimg / 1000:010.3f}'


def kimg_files(run_dir: str, prefix: str, ext: str) -> List[Tuple[float, str]]:
    """The `<prefix>-<kimg>.<ext>` files of a run directory (snapshots, training states) with their kimg, oldest
    first."""
    pattern = re.compile(re.escape(prefix) + r'-([\d.]+)\.' + re.escape(ext) + '$')
    found = [(pattern.search(p), p) for p in glob.glob(os.path.join(run_dir, f'{prefix}-*.{ext}'))]
    return sorted((float(m.group(1)), p) for m, p in found if m)


def latest_training_state(path: str, required: bool = False) -> Optional[str]:
    """A `training-state-*.pt` file itself, or the newest one in a run directory (None when it has none,
    FileNotFoundError instead when `required`)."""
    if not os.path.isdir(path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f'--resume {path}: no such file or run directory')
        return path
    states = kimg_files(path, 'training-state', 'pt')
    if not states and required:
        raise FileNotFoundError(f'--resume {path}: no training-state-*.pt in this directory')
    return states[-1][1] if states else None


def atomic_write(path: str, write: Callable) -> None:
    """Call `write(file)` on a temporary file, then rename it to `path`: readers never see a partial file."""
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        with open(tmp, 'wb') as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
