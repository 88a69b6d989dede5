"""dataset_tool.py round trips (idx, image folder, zip, CIFAR-layout tarball built here) read back through the
dataset class, the transforms, and clear one-line errors for bad input."""

import gzip
import io
import json
import os
import pickle
import struct
import tarfile

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner

import dataset_tool
from training.dataset import ImageFolderDataset


def write_idx(path, array):
    header = b'\0\0\x08' + bytes([array.ndim]) + struct.pack(f'>{array.ndim}I', *array.shape)
    opener = gzip.open if path.endswith('.gz') else open
    with opener(path, 'wb') as f:
        f.write(header + array.astype(np.uint8).tobytes())


def run_tool(*args):
    result = CliRunner().invoke(dataset_tool.main, list(args))
    return result


def test_idx_round_trip_with_padding(tmp_path):
    rng = np.random.RandomState(0)
    images = rng.randint(0, 256, size=[7, 28, 28]).astype(np.uint8)
    labels = rng.randint(0, 10, size=[7]).astype(np.uint8)
    labels[0] = 9  # Make sure the label range (label_dim) is 10.
    src = tmp_path / 'fashion'
    src.mkdir()
    write_idx(str(src / 'train-images-idx3-ubyte.gz'), images)
    write_idx(str(src / 'train-labels-idx1-ubyte.gz'), labels)
    write_idx(str(src / 't10k-images-idx3-ubyte'), images[:3])

    dest = str(tmp_path / 'fm.zip')
    result = run_tool('--source', str(src), '--dest', dest, '--transform=pad', '--resolution=32x32')
    assert result.exit_code == 0, result.output
    ds = ImageFolderDataset(dest, use_labels=True)
    assert len(ds) == 7 and ds.image_shape == [1, 32, 32] and ds.label_dim == 10 and ds.resolution == 32
    for i in range(7):
        img, label = ds[i]
        assert img.dtype == np.uint8 and np.array_equal(img[0, 2:30, 2:30], images[i])
        assert img[0, :2].sum() == 0 and img[0, :, 30:].sum() == 0  # Black padding.
        assert label.argmax() == labels[i] and label.sum() == 1
    with open(os.path.join(tmp_path, 'fm.zip'), 'rb') as f:
        import zipfile
        names = zipfile.ZipFile(f).namelist()
    assert '00000/img00000000.png' in names and 'dataset.json' in names

    # The test split (no labels file), given as the images file itself; --max-images.
    dest2 = str(tmp_path / 'test')
    result = run_tool('--source', str(src / 't10k-images-idx3-ubyte'), '--dest', dest2, '--resolution=32x32',
                      '--transform=pad', '--max-images=2')
    assert result.exit_code == 0, result.output
    ds2 = ImageFolderDataset(dest2)
    assert len(ds2) == 2 and ds2.label_dim == 0 and np.array_equal(ds2[1][0][0, 2:30, 2:30], images[1])
    with open(os.path.join(dest2, 'dataset.json')) as f:
        assert json.load(f) == {'labels': None}


def test_cifar_tarball_round_trip(tmp_path):
    rng = np.random.RandomState(1)
    batches = {}
    for name in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']:
        batches[name] = dict(data=rng.randint(0, 256, size=[2, 3072]).astype(np.uint8),
                             labels=[int(v) for v in rng.randint(0, 10, size=[2])])
    tar_path = str(tmp_path / 'cifar-10-python.tar.gz')
    with tarfile.open(tar_path, 'w:gz') as tar:
        for name, batch in batches.items():
            payload = pickle.dumps(batch, protocol=2)
            info = tarfile.TarInfo(f'cifar-10-batches-py/{name}')
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))

    dest = str(tmp_path / 'cifar.zip')
    assert run_tool('--source', tar_path, '--dest', dest).exit_code == 0
    ds = ImageFolderDataset(dest, use_labels=True, resolution=32)
    assert len(ds) == 10 and ds.image_shape == [3, 32, 32]
    for i in range(10):
        batch = batches[f'data_batch_{i // 2 + 1}']
        img, label = ds[i]
        assert np.array_equal(img, batch['data'][i % 2].reshape(3, 32, 32))
        assert label.argmax() == batch['labels'][i % 2]

    test = str(tmp_path / 'cifar-test.zip')
    assert run_tool('--source', tar_path, '--dest', test, '--split=test').exit_code == 0
    assert np.array_equal(ImageFolderDataset(test)[1][0], batches['test_batch']['data'][1].reshape(3, 32, 32))

    # A batch holding anything but arrays and plain data is refused, not executed.
    evil = str(tmp_path / 'evil.tar')
    with tarfile.open(evil, 'w') as tar:
        payload = pickle.dumps(dict(data=PIL.Image.new('L', (1, 1)), labels=[]), protocol=2)
        for name in [f'data_batch_{i}' for i in range(1, 6)]:
            info = tarfile.TarInfo(f'cifar-10-batches-py/{name}')
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    result = run_tool('--source', evil, '--dest', str(tmp_path / 'evil.zip'))
    assert result.exit_code != 0 and 'unexpected object' in result.output


def test_folder_and_zip_round_trip_with_crop_and_labels(tmp_path):
    rng = np.random.RandomState(2)
    src = tmp_path / 'photos'
    (src / 'sub').mkdir(parents=True)
    arrays = {}
    for i, name in enumerate(['a.png', 'sub/b.png', 'c.png']):
        arr = rng.randint(0, 256, size=[40, 24, 3]).astype(np.uint8)  # 24 wide, 40 tall
        PIL.Image.fromarray(arr).save(src / name)
        arrays[name] = arr
    (src / 'notes.txt').write_text('not an image')
    (src / 'dataset.json').write_text(json.dumps({'labels': [['a.png', 2], ['sub/b.png', 0], ['c.png', 1]]}))

    # Centre-crop to 24x24 (rows 8..32) at the same size: pixel exact; labels carried in sorted file order.
    dest = str(tmp_path / 'crop.zip')
    result = run_tool('--source', str(src), '--dest', dest, '--transform=center-crop', '--resolution=16x16',
                      '--resize-filter=box')
    assert result.exit_code == 0, result.output
    ds = ImageFolderDataset(dest, use_labels=True)
    assert len(ds) == 3 and ds.image_shape == [3, 16, 16]
    assert [int(ds.get_label(i).argmax()) for i in range(3)] == [2, 1, 0]  # a.png, c.png, sub/b.png
    crop = arrays['c.png'][8:32]
    expected = np.asarray(PIL.Image.fromarray(crop).resize((16, 16), PIL.Image.BOX)).transpose(2, 0, 1)
    assert np.array_equal(ds[1][0], expected)

    # The ZIP is itself a valid source (a second round trip keeps pixels and labels).
    again = str(tmp_path / 'again')
    assert run_tool('--source', dest, '--dest', again).exit_code == 0
    ds_again = ImageFolderDataset(again, use_labels=True, xflip=True)
    assert len(ds_again) == 6
    for i in range(3):
        assert np.array_equal(ds_again[i][0], ds[i][0]) and np.array_equal(ds_again.get_label(i), ds.get_label(i))
        assert np.array_equal(ds_again[i + 3][0], ds[i][0][:, :, ::-1])
    images, labels = ds_again.load_all()
    assert images.shape == (6, 3, 16, 16) and labels.shape == (6, 3)

    # Subsets are reproducible and sorted.
    sub = ImageFolderDataset(dest, max_size=2, random_seed=3)
    assert len(sub) == 2 and list(sub._raw_idx) == sorted(sub._raw_idx)


def test_transforms_sizes():
    img = PIL.Image.fromarray(np.full([20, 40, 3], 200, dtype=np.uint8))  # 40 wide, 20 tall
    wide = dataset_tool.make_transform('center-crop-wide', (32, 16), 'lanczos')(img)
    assert wide.size == (32, 32)
    arr = np.asarray(wide)
    assert arr[:8].max() == 0 and arr[24:].max() == 0 and arr[8:24].min() > 190
    padded = dataset_tool.make_transform('pad', (64, 64), 'lanczos')(img)
    arr = np.asarray(padded)
    assert padded.size == (64, 64) and arr[22:42, 12:52].min() == 200 and arr[:22].max() == 0
    shrunk = dataset_tool.make_transform('pad', (16, 16), 'box')(img)
    assert shrunk.size == (16, 16) and np.asarray(shrunk)[:4].max() == 0 and np.asarray(shrunk)[4:12].min() > 190
    assert dataset_tool.make_transform(None, (8, 8), 'box')(img).size == (8, 8)


def test_bad_inputs_give_one_line_errors(tmp_path):
    src = tmp_path / 'imgs'
    src.mkdir()
    PIL.Image.fromarray(np.zeros([8, 8], dtype=np.uint8)).save(src / 'a.png')
    PIL.Image.fromarray(np.zeros([16, 16], dtype=np.uint8)).save(src / 'b.png')
    existing = tmp_path / 'exists.zip'
    existing.write_bytes(b'mine')

    cases = [
        (['--source', str(tmp_path / 'nothing'), '--dest', str(tmp_path / 'o1.zip')], 'no such file'),
        (['--source', str(src), '--dest', str(existing)], 'already exists'),
        (['--source', str(src), '--dest', str(tmp_path / 'o2.zip')], 'unlike the first'),
        (['--source', str(src), '--dest', str(tmp_path / 'o3.zip'), '--resolution=12x12'], 'power-of-two'),
        (['--source', str(src), '--dest', str(tmp_path / 'o4.zip'), '--resolution=big'], 'expected WxH'),
        (['--source', str(src), '--dest', str(tmp_path / 'o5.zip'), '--transform=pad'], 'needs --resolution'),
    ]
    for args, expected in cases:
        result = run_tool(*args)
        assert result.exit_code != 0 and expected in result.output, (args, result.output)
        error_lines = [line for line in result.output.splitlines() if 'Error' in line]
        assert len(error_lines) == 1 and 'Traceback' not in result.output, result.output
    assert existing.read_bytes() == b'mine'  # Never overwritten.
    assert not any(p.name.startswith('.dataset_tool_') for p in tmp_path.iterdir())  # No temporary leftovers.

    with pytest.raises(FileNotFoundError, match='no such directory'):
        ImageFolderDataset(str(tmp_path / 'missing.zip'))
    with pytest.raises(ValueError, match='resolution 32 was requested'):
        ImageFolderDataset(str(src), resolution=32)
    with pytest.raises(ValueError, match='labels were requested'):
        ImageFolderDataset(str(src), use_labels=True).get_label(0)


def test_read_idx_reads_the_header_shape_and_refuses_a_short_file(tmp_path):
    import gzip
    import struct
    import numpy as np
    from training.dataset import read_idx
    values = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / 'x-images-idx3-ubyte.gz'
    with gzip.open(path, 'wb') as f:
        f.write(b'\0\0\x08\x03' + struct.pack('>3I', 2, 3, 4) + values.tobytes())
    assert np.array_equal(read_idx(str(path)), values)
    short = tmp_path / 'short-idx1-ubyte'
    short.write_bytes(b'\0\0\x08\x01' + struct.pack('>I', 5) + b'\1\2')
    with pytest.raises(ValueError, match='holds 2 values'):
        read_idx(str(short))
