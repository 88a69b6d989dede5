"""Image datasets in the upstream layout: a folder or ZIP of images plus an optional `dataset.json` with labels.

`ImageFolderDataset` takes the same keyword arguments that upstream StyleGAN2-ADA and EDM record in their
pickles (`training_set_kwargs` / `dataset_kwargs`), and lives at `training.dataset.ImageFolderDataset`, the class
name those pickles store. Items are `(image, label)`: uint8 `[C, H, W]` numpy arrays and float32
labels (one-hot `[label_dim]` for integer labels, `[0]` without labels).
"""

import gzip
import io
import json
import os
import struct
import zipfile
from typing import List, Optional

import numpy as np
import PIL.Image
import torch

_LABELS_FILE = 'dataset.json'


def is_image_file(fname: str) -> bool:
    PIL.Image.init()
    return os.path.splitext(fname)[1].lower() in PIL.Image.EXTENSION


def decode_image(data: bytes, fname: str) -> np.ndarray:
    """uint8 [C, H, W] from encoded image bytes; grayscale stays one channel."""
    try:
        image = np.array(PIL.Image.open(io.BytesIO(data)))
    except Exception as err:  # noqa: BLE001 -- PIL raises many types for a bad file.
        raise ValueError(f'{fname}: not a readable image ({type(err).__name__}: {err})') from None
    if image.ndim == 2:
        image = image[:, :, np.newaxis]
    if image.dtype != np.uint8:
        raise ValueError(f'{fname}: expected 8-bit pixels, got {image.dtype}')
    return image.transpose(2, 0, 1)


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images from a directory tree or a ZIP, with labels from its `dataset.json` when `use_labels` is set."""

    def __init__(self, path: str, resolution: Optional[int] = None, name: Optional[str] = None,
                 max_size: Optional[int] = None, use_labels: bool = False, xflip: bool = False,
                 random_seed: int = 0, cache: bool = False, use_pyspng: bool = True):
        # use_pyspng is accepted because EDM records it; PIL does all decoding here.
        self._path = path
        self._zipfile = None
        self._cache = cache
        self._cached_images = dict()
        if os.path.isdir(path):
            self._type = 'dir'
            self._all_fnames = sorted(
                os.path.relpath(os.path.join(root, f), start=path).replace('\\', '/')
                for root, _dirs, files in os.walk(path) for f in files)
        elif os.path.isfile(path) and zipfile.is_zipfile(path):
            self._type = 'zip'
            self._all_fnames = sorted(self._get_zipfile().namelist())
        elif os.path.exists(path):
            raise ValueError(f'Dataset {path}: expected a directory or a ZIP file')
        else:
            raise FileNotFoundError(f'Dataset {path}: no such directory or ZIP file')
        self._image_fnames = [f for f in self._all_fnames if is_image_file(f)]
        if not self._image_fnames:
            raise ValueError(f'Dataset {path}: no image files found')

        self._name = name if name is not None else os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
        first = self._load_raw_image(0)
        self._raw_shape = [len(self._image_fnames)] + list(first.shape)
        if resolution is not None and (first.shape[1] != resolution or first.shape[2] != resolution):
            raise ValueError(f'Dataset {path}: images are {first.shape[2]}x{first.shape[1]}, '
                             f'but resolution {resolution} was requested')
        self._use_labels = use_labels
        self._raw_labels = None

        # Subset and mirroring, as upstream: a seeded random subset (kept in file order), then x-flips appended.
        self._raw_idx = np.arange(self._raw_shape[0], dtype=np.int64)
        if max_size is not None and self._raw_idx.size > max_size:
            np.random.RandomState(random_seed % (1 << 31)).shuffle(self._raw_idx)
            self._raw_idx = np.sort(self._raw_idx[:max_size])
        self._xflip = np.zeros(self._raw_idx.size, dtype=np.uint8)
        if xflip:
            self._raw_idx = np.tile(self._raw_idx, 2)
            self._xflip = np.concatenate([self._xflip, np.ones_like(self._xflip)])

    # ------------------------------------------------------------------------------------------------------------
    # Raw access.

    def _get_zipfile(self) -> zipfile.ZipFile:
        if self._zipfile is None:
            self._zipfile = zipfile.ZipFile(self._path)
        return self._zipfile

    def _read(self, fname: str) -> bytes:
        if self._type == 'dir':
            with open(os.path.join(self._path, fname), 'rb') as f:
                return f.read()
        return self._get_zipfile().read(fname)

    def _load_raw_image(self, raw_idx: int) -> np.ndarray:
        fname = self._image_fnames[raw_idx]
        image = decode_image(self._read(fname), f'{self._path}:{fname}')
        if hasattr(self, '_raw_shape') and list(image.shape) != self._raw_shape[1:]:
            raise ValueError(f'Dataset {self._path}: {fname} has shape {list(image.shape)}, '
                             f'expected {self._raw_shape[1:]} like the first image')
        return image

    def _load_raw_labels(self) -> np.ndarray:
        """Labels for every raw image: int64 [N] class indices or float32 [N, D] vectors, or float32 [N, 0]."""
        n = self._raw_shape[0]
        if not self._use_labels or _LABELS_FILE not in self._all_fnames:
            if self._use_labels:
                raise ValueError(f'Dataset {self._path}: labels were requested but there is no {_LABELS_FILE}')
            return np.zeros([n, 0], dtype=np.float32)
        labels = json.loads(self._read(_LABELS_FILE)).get('labels')
        if labels is None:
            raise ValueError(f'Dataset {self._path}: labels were requested but {_LABELS_FILE} has "labels": null')
        labels = dict(labels)
        missing = [f for f in self._image_fnames if f.replace('\\', '/') not in labels]
        if missing:
            raise ValueError(f'Dataset {self._path}: {_LABELS_FILE} has no label for {missing[0]} '
                             f'({len(missing)} images unlabelled)')
        values = np.array([labels[f.replace('\\', '/')] for f in self._image_fnames])
        if values.ndim == 1:
            if not np.issubdtype(values.dtype, np.integer) or values.min() < 0:
                raise ValueError(f'Dataset {self._path}: scalar labels must be non-negative class indices')
            return values.astype(np.int64)
        return values.astype(np.float32)

    def _get_raw_labels(self) -> np.ndarray:
        if self._raw_labels is None:
            self._raw_labels = self._load_raw_labels()
        return self._raw_labels

    def close(self) -> None:
        if self._zipfile is not None:
            self._zipfile.close()
            self._zipfile = None

    def __getstate__(self):
        return dict(self.__dict__, _zipfile=None)  # DataLoader workers reopen the ZIP themselves.

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 -- interpreter shutdown.
            pass

    # ------------------------------------------------------------------------------------------------------------
    # Dataset protocol.

    def __len__(self) -> int:
        return self._raw_idx.size

    def __getitem__(self, idx: int):
        raw_idx = int(self._raw_idx[idx])
        image = self._cached_images.get(raw_idx)
        if image is None:
            image = self._load_raw_image(raw_idx)
            if self._cache:
                self._cached_images[raw_idx] = image
        if self._xflip[idx]:
            image = image[:, :, ::-1]
        return image.copy(), self.get_label(idx)

    def get_label(self, idx: int) -> np.ndarray:
        label = self._get_raw_labels()[self._raw_idx[idx]]
        if label.dtype == np.int64:
            onehot = np.zeros(self.label_shape, dtype=np.float32)
            onehot[label] = 1
            return onehot
        return label.copy()

    def load_all(self):
        """Every item at once: uint8 images [N, C, H, W] and float32 labels [N, label_dim] (for in-memory training)."""
        images = np.empty([len(self)] + self.image_shape, dtype=np.uint8)
        for i in range(len(self)):
            images[i] = self[i][0]
        labels = np.stack([self.get_label(i) for i in range(len(self))]).astype(np.float32)
        return images, labels

    # ------------------------------------------------------------------------------------------------------------
    # Properties (upstream names).

    @property
    def name(self) -> str:
        return self._name

    @property
    def image_shape(self) -> List[int]:
        return list(self._raw_shape[1:])

    @property
    def num_channels(self) -> int:
        return self.image_shape[0]

    @property
    def resolution(self) -> int:
        assert self.image_shape[1] == self.image_shape[2], 'non-square images'
        return self.image_shape[1]

    @property
    def label_shape(self) -> List[int]:
        raw = self._get_raw_labels()
        if raw.dtype == np.int64:
            return [int(raw.max()) + 1]
        return list(raw.shape[1:])

    @property
    def label_dim(self) -> int:
        return self.label_shape[0] if self.label_shape else 0

    @property
    def has_labels(self) -> bool:
        return any(x != 0 for x in self.label_shape)

    @property
    def has_onehot_labels(self) -> bool:
        return self._get_raw_labels().dtype == np.int64

# ----------------------------------------------------------------------------------------------------------------
# The idx format of (Fashion-)MNIST.

#: The idx files of the Fashion-MNIST splits (images, labels).
IDX_FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}


def read_idx(path: str) -> np.ndarray:
    """An idx file (MNIST format, optionally gzipped) of unsigned bytes as an array of its stated shape; a
    ValueError names the file otherwise."""
    opener = gzip.open if path.endswith('.gz') else open
    try:
        with opener(path, 'rb') as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise ValueError(f'{path}: cannot read ({err})') from None
    if len(data) < 4 or data[:2] != b'\0\0' or data[2] != 0x08:
        raise ValueError(f'{path}: not an unsigned-byte idx file')
    ndim = data[3]
    dims = struct.unpack(f'>{ndim}I', data[4:4 + 4 * ndim])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(dims)):
        raise ValueError(f'{path}: holds {array.size} values, its header says {dims}')
    return array.reshape(dims)
