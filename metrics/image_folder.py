"""A small reader for datasets in the upstream layout: a ZIP or folder of images plus optional dataset.json.

The metrics read real images themselves so they do not depend on the training dataset class; images come out
as uint8 CHW arrays in file-name order, the order the upstream dataset classes use.
"""

import hashlib
import json
import os
import zipfile
from typing import List, Optional

import numpy as np
import PIL.Image
import torch

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp', '.ppm', '.tif', '.tiff')


class ImageFolderReader(torch.utils.data.Dataset):
    """Images of a ZIP archive or a directory tree; `mirror` appends x-flipped copies, as upstream's xflip."""

    def __init__(self, path: str, mirror: bool = False):
        self.path = path
        self.mirror = mirror
        self._zip: Optional[zipfile.ZipFile] = None
        self._zip_pid: Optional[int] = None
        if os.path.isdir(path):
            self.kind = 'dir'
            names = [os.path.relpath(os.path.join(root, f), path).replace(os.sep, '/')
                     for root, _dirs, files in os.walk(path) for f in files]
        elif os.path.isfile(path) and zipfile.is_zipfile(path):
            self.kind = 'zip'
            names = self._open_zip().namelist()
        else:
            raise ValueError(f'--data: {path} is neither a directory nor a ZIP archive of images')
        self.image_names: List[str] = sorted(n for n in names if n.lower().endswith(IMAGE_EXTENSIONS))
        if not self.image_names:
            raise ValueError(f'--data: no images found in {path}')
        self.name = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
        first = self._load(0)
        self.channels, self.resolution = first.shape[0], first.shape[1]

    def _open_zip(self) -> zipfile.ZipFile:
        if self._zip is None or self._zip_pid != os.getpid():  # One handle per DataLoader worker process.
            self._zip = zipfile.ZipFile(self.path)
            self._zip_pid = os.getpid()
        return self._zip

    def _open(self, name: str):
        if self.kind == 'zip':
            return self._open_zip().open(name, 'r')
        return open(os.path.join(self.path, name), 'rb')

    def __getstate__(self):
        return dict(self.__dict__, _zip=None, _zip_pid=None)

    def __len__(self) -> int:
        return len(self.image_names) * (2 if self.mirror else 1)

    def _load(self, index: int) -> np.ndarray:
        name = self.image_names[index]
        with self._open(name) as f:
            image = np.array(PIL.Image.open(f))
        if image.ndim == 2:
            image = image[:, :, None]
        if image.dtype != np.uint8 or image.shape[2] not in (1, 3, 4):
            raise ValueError(f'{self.path}: {name}: expected an 8-bit L, RGB or RGBA image, '
                             f'got {image.dtype} with shape {image.shape}')
        return image[:, :, :3].transpose(2, 0, 1)

    def __getitem__(self, index: int) -> np.ndarray:
        image = self._load(index % len(self.image_names))
        if image.shape[0] != self.channels or image.shape[1] != self.resolution:
            raise ValueError(f'{self.path}: {self.image_names[index % len(self.image_names)]} has shape '
                             f'{image.shape}, the first image has ({self.channels}, {self.resolution}, ...)')
        if index >= len(self.image_names):
            image = image[:, :, ::-1]
        return np.ascontiguousarray(image)

    def labels(self) -> Optional[dict]:
        """dataset.json labels {file name: label}, or None."""
        if 'dataset.json' not in self._all_names():
            return None
        with self._open('dataset.json') as f:
            labels = json.load(f).get('labels')
        return None if labels is None else {name: label for name, label in labels}

    def _all_names(self) -> List[str]:
        if self.kind == 'zip':
            return self._open_zip().namelist()
        return os.listdir(self.path)

    def fingerprint(self) -> str:
        """Identity for the statistics cache: for a ZIP its absolute path, size and mtime; for a folder the
        relative name, size and mtime of every file. Any edit, added or removed file changes it; a copy of the
        data at another path is a different key (recomputed once)."""
        digest = hashlib.sha1()
        if self.kind == 'zip':
            st = os.stat(self.path)
            digest.update(f'zip:{os.path.abspath(self.path)}:{st.st_size}:{st.st_mtime_ns}'.encode())
        else:
            digest.update(f'dir:{os.path.abspath(self.path)}'.encode())
            for root, _dirs, files in sorted(os.walk(self.path)):
                for f in sorted(files):
                    st = os.stat(os.path.join(root, f))
                    rel = os.path.relpath(os.path.join(root, f), self.path)
                    digest.update(f'{rel}:{st.st_size}:{st.st_mtime_ns};'.encode())
        digest.update(f'mirror={self.mirror}'.encode())
        return digest.hexdigest()
