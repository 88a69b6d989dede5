"""Write torch_utils/released_sources.txt: the sha256 of every committed version of this toolkit's modules that
define persistent classes, so pickles written by earlier versions still pass `--refuse-unknown-code`.

A pickle embeds the source of the module its classes came from; the version on disk is trusted by content, and
this list extends that trust to the versions in our own git history (and to nothing else). Run it after a commit
that changes such a module (`python tools/released_sources.py`); `--check` exits 1 when a committed version that
is no longer on disk is missing from the list.
"""

import argparse
import hashlib
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIST = os.path.join(ROOT, 'torch_utils', 'released_sources.txt')
MARKER = b'persistent_class'
HEADER = ('# sha256 of every committed version of a toolkit module that defines persistent classes (see\n'
          '# torch_utils/persistence.py). Written by tools/released_sources.py from git history; do not edit.\n')


def _git(*args: str) -> bytes:
    return subprocess.run(['git', '-C', ROOT, *args], check=True, capture_output=True).stdout


def historical_sources() -> dict:
    """sha256 of the text -> 'path@commit' of its first appearance, over every commit reachable from any ref."""
    found, seen_blobs = {}, set()
    for commit in reversed(_git('rev-list', '--all').decode().split()):
        for line in _git('ls-tree', '-r', commit).decode().splitlines():
            meta, path = line.split('\t', 1)
            blob = meta.split()[2]
            if not path.endswith('.py') or path.startswith('tests/') or blob in seen_blobs:
                continue
            seen_blobs.add(blob)
            data = _git('cat-file', 'blob', blob)
            if MARKER not in data or path == 'torch_utils/persistence.py':
                continue
            text = data.decode('utf-8-sig')  # As the loader reads files on disk.
            found.setdefault(hashlib.sha256(text.encode('utf-8')).hexdigest(), f'{path}@{commit[:10]}')
    return found


def _on_disk(where: str) -> bool:
    """Whether the version named 'path@commit' is the file on disk now (trusted by content anyway)."""
    path, commit = where.rsplit('@', 1)
    try:
        with open(os.path.join(ROOT, path), encoding='utf-8-sig') as f:
            return f.read().encode('utf-8') == _git('show', f'{commit}:{path}').decode('utf-8-sig').encode('utf-8')
    except OSError:
        return False


def render(found: dict) -> str:
    return HEADER + ''.join(f'{digest}  {where}\n' for digest, where in sorted(found.items(), key=lambda kv: kv[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--check', action='store_true', help='exit 1 if the list is not up to date')
    args = parser.parse_args()
    found = historical_sources()
    if args.check:
        listed = open(LIST, encoding='utf-8').read() if os.path.exists(LIST) else ''
        missing = [where for digest, where in found.items() if digest not in listed and not _on_disk(where)]
        if missing:
            sys.exit(f'{LIST} lacks {len(missing)} earlier sources ({missing[0]}, ...): run python tools/released_sources.py')
        return
    text = render(found)
    with open(LIST, 'w', encoding='utf-8') as f:
        f.write(text)
    print(f'{LIST}: {len(text.splitlines()) - 2} sources')


if __name__ == '__main__':
    main()
