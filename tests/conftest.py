"""Suite-wide settings and shared fixtures."""

import struct

import numpy as np
import pytest
import torch

import dataset_tool


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny networks run fastest on one thread, and a CI machine's cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='session')
def dataset_zip(tmp_path_factory):
    """48 labelled 8x8 grayscale images (a bright square whose corner is the class), made with dataset_tool."""
    root = tmp_path_factory.mktemp('data')
    rng = np.random.RandomState(0)
    labels = np.arange(48) % 4
    images = rng.randint(0, 40, size=[48, 8, 8]).astype(np.uint8)
    for i, c in enumerate(labels):
        r, k = divmod(int(c), 2)
        images[i, r * 4:r * 4 + 4, k * 4:k * 4 + 4] = 230
    for name, array in (('train-images-idx3-ubyte', images), ('train-labels-idx1-ubyte', labels.astype(np.uint8))):
        with open(root / name, 'wb') as f:
            f.write(b'\0\0\x08' + bytes([array.ndim]) + struct.pack(f'>{array.ndim}I', *array.shape) + array.tobytes())
    path = str(root / 'squares.zip')
    dataset_tool.convert_dataset(str(root), path, progress=False)
    return path
