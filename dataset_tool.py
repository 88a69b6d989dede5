"""Build a training dataset in the upstream layout: a ZIP (or folder) of PNGs plus `dataset.json` with labels.

Sources: a folder or ZIP of images (labels taken from its own `dataset.json` if present), the CIFAR-10 python
tarball (`cifar-10-python.tar.gz`), and MNIST / Fashion-MNIST idx files (the `*-images-idx3-ubyte[.gz]` file, or
the folder holding them). Images can be resized, centre-cropped or padded to a square power-of-two resolution.

Examples:

\b
  python dataset_tool.py --source=/usr/share/datasets/fashion-mnist --dest=fmnist-32x32.zip \\
      --transform=pad --resolution=32x32
  python dataset_tool.py --source=cifar-10-python.tar.gz --dest=cifar10-32x32.zip
  python dataset_tool.py --source=photos/ --dest=photos-64x64.zip --transform=center-crop --resolution=64x64
"""

import io
import json
import os
import pickle
import re
import shutil
import sys
import tarfile
import tempfile
import zipfile
from typing import Callable, Dict, Iterator, Optional, Tuple

import click
import numpy as np
import PIL.Image
from tqdm import tqdm

from training import dataset as training_dataset
from training.dataset import is_image_file

# ----------------------------------------------------------------------------------------------------------------
# Sources. Each yields dict(img=PIL.Image, label=int|list|None, name=str) and knows its length.


class DatasetToolError(click.ClickException):
    """Bad input; printed as one line."""


def _image_from_bytes(data: bytes, name: str) -> PIL.Image.Image:
    try:
        img = PIL.Image.open(io.BytesIO(data))
        img.load()
    except Exception as err:  # noqa: BLE001 -- PIL raises many types for a bad file.
        raise DatasetToolError(f'{name}: not a readable image ({type(err).__name__}: {err})') from None
    return img


def _labels_from_json(text: bytes, where: str) -> Optional[Dict[str, object]]:
    try:
        labels = json.loads(text).get('labels')
    except (ValueError, AttributeError) as err:
        raise DatasetToolError(f'{where}: not a valid dataset.json ({err})') from None
    return None if labels is None else {str(fname).replace('\\', '/'): label for fname, label in labels}


def open_image_collection(path: str) -> Tuple[int, Iterator[dict]]:
    """Images from a folder tree or a ZIP, in sorted order, with labels from its dataset.json when present."""
    if os.path.isdir(path):
        names = sorted(os.path.relpath(os.path.join(root, f), path).replace('\\', '/')
                       for root, _dirs, files in os.walk(path) for f in files)

        def read(name):
            with open(os.path.join(path, name), 'rb') as f:
                return f.read()
        closer = None
    else:
        archive = zipfile.ZipFile(path)
        names = sorted(archive.namelist())
        read = archive.read
        closer = archive
    images = [n for n in names if is_image_file(n)]
    if not images:
        raise DatasetToolError(f'--source {path}: no image files found')
    labels = _labels_from_json(read('dataset.json'), f'{path}/dataset.json') if 'dataset.json' in names else None
    if labels is not None:
        missing = [n for n in images if n not in labels]
        if missing:
            raise DatasetToolError(f'{path}/dataset.json: no label for {missing[0]} ({len(missing)} images unlabelled)')

    def items():
        try:
            for name in images:
                yield dict(img=_image_from_bytes(read(name), f'{path}:{name}'), name=name,
                           label=None if labels is None else labels[name])
        finally:
            if closer is not None:
                closer.close()
    return len(images), items()


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only (the CIFAR batches), never arbitrary objects."""
    _allowed = {('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
                ('numpy.core.numeric', '_frombuffer'), ('numpy._core.numeric', '_frombuffer'),
                ('numpy', 'ndarray'), ('numpy', 'dtype'), ('_codecs', 'encode')}

    def find_class(self, module, name):
        if (module, name) not in self._allowed:
            raise pickle.UnpicklingError(f'unexpected object {module}.{name} in a CIFAR batch')
        return super().find_class(module, name)


def open_cifar10(path: str, split: str) -> Tuple[int, Iterator[dict]]:
    """The CIFAR-10 python tarball: data_batch_1..5 (train) or test_batch (test), labels 0..9."""
    wanted = [f'data_batch_{i}' for i in range(1, 6)] if split == 'train' else ['test_batch']
    images, labels = [], []
    with tarfile.open(path) as tar:
        members = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}
        for batch in wanted:
            if batch not in members:
                raise DatasetToolError(f'--source {path}: not a CIFAR-10 python tarball (no {batch})')
            try:
                data = _ArrayUnpickler(tar.extractfile(members[batch]), encoding='latin1').load()
            except (pickle.UnpicklingError, EOFError, ValueError) as err:
                raise DatasetToolError(f'--source {path}: unreadable {batch} ({err})') from None
            data = {k.decode() if isinstance(k, bytes) else k: v for k, v in data.items()}
            images.append(np.asarray(data['data'], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(np.asarray(data['labels'], dtype=np.int64))
    images, labels = np.concatenate(images), np.concatenate(labels)

    def items():
        for i in range(len(images)):
            yield dict(img=PIL.Image.fromarray(images[i], 'RGB'), label=int(labels[i]), name=f'{i}')
    return len(images), items()


def read_idx(path: str) -> np.ndarray:
    try:
        return training_dataset.read_idx(path)
    except ValueError as err:
        raise DatasetToolError(str(err)) from None


_IDX_IMAGES = re.compile(r'^(train|t10k)-images[-.]idx3-ubyte(\.gz)?$')


def find_idx_images(path: str, split: str) -> Optional[str]:
    """The images idx file for `path` (the file itself, or the split's file inside a folder), else None."""
    if os.path.isfile(path):
        return path if _IDX_IMAGES.match(os.path.basename(path)) else None
    prefix = 'train' if split == 'train' else 't10k'
    for name in (f'{prefix}-images-idx3-ubyte', f'{prefix}-images-idx3-ubyte.gz', f'{prefix}-images.idx3-ubyte'):
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    return None


def open_idx(images_path: str) -> Tuple[int, Iterator[dict]]:
    """MNIST-style idx images [N, H, W] with labels from the matching `*-labels-idx1-ubyte` file if present."""
    images = read_idx(images_path)
    if images.ndim != 3:
        raise DatasetToolError(f'{images_path}: expected [N, H, W] images, got shape {list(images.shape)}')
    labels_path = os.path.join(os.path.dirname(images_path),
                               os.path.basename(images_path).replace('images', 'labels').replace('idx3', 'idx1'))
    labels = read_idx(labels_path) if os.path.isfile(labels_path) else None
    if labels is not None and labels.shape != (len(images),):
        raise DatasetToolError(f'{labels_path}: {labels.shape[0]} labels for {len(images)} images')

    def items():
        for i in range(len(images)):
            yield dict(img=PIL.Image.fromarray(images[i], 'L'), label=None if labels is None else int(labels[i]), name=f'{i}')
    return len(images), items()


def open_source(source: str, split: str) -> Tuple[int, Iterator[dict]]:
    if not os.path.exists(source):
        raise DatasetToolError(f'--source {source}: no such file or folder')
    idx_images = find_idx_images(source, split)
    if idx_images is not None:
        return open_idx(idx_images)
    if os.path.isfile(source) and tarfile.is_tarfile(source):
        return open_cifar10(source, split)
    if os.path.isdir(source) or zipfile.is_zipfile(source):
        return open_image_collection(source)
    raise DatasetToolError(f'--source {source}: expected an image folder, a ZIP, the CIFAR-10 python tarball '
                           f'or MNIST-style idx files')

# ----------------------------------------------------------------------------------------------------------------
# Transforms.


def make_transform(transform: Optional[str], resolution: Optional[Tuple[int, int]],
                   resize_filter: str) -> Callable[[PIL.Image.Image], PIL.Image.Image]:
    """PIL image -> PIL image of the requested size (crop/pad keep the aspect ratio; plain resize does not)."""
    resample = {'box': PIL.Image.BOX, 'lanczos': PIL.Image.LANCZOS}[resize_filter]
    if transform is not None and resolution is None:
        raise DatasetToolError(f'--transform={transform} needs --resolution=WxH')
    width, height = resolution if resolution is not None else (None, None)

    def resized(img, w, h):
        return img if img.size == (w, h) else img.resize((w, h), resample)

    def canvas(img, w, h, x, y):
        out = PIL.Image.new(img.mode, (w, h))
        out.paste(img, (x, y))
        return out

    def apply(img):
        iw, ih = img.size
        if transform is None:
            return img if width is None else resized(img, width, height)
        if transform == 'center-crop':
            side = min(iw, ih)
            img = img.crop(((iw - side) // 2, (ih - side) // 2, (iw - side) // 2 + side, (ih - side) // 2 + side))
            return resized(img, width, height)
        if transform == 'center-crop-wide':
            # Crop to the W:H aspect, scale to WxH, and letterbox into a WxW square.
            if iw * height > ih * width:
                cw, ch = round(ih * width / height), ih
            else:
                cw, ch = iw, round(iw * height / width)
            img = resized(img.crop(((iw - cw) // 2, (ih - ch) // 2, (iw - cw) // 2 + cw, (ih - ch) // 2 + ch)), width, height)
            return canvas(img, width, width, 0, (width - height) // 2)
        if transform == 'pad':
            # Shrink only if it does not fit; then centre on a black canvas.
            if iw > width or ih > height:
                scale = min(width / iw, height / ih)
                img = resized(img, max(round(iw * scale), 1), max(round(ih * scale), 1))
                iw, ih = img.size
            return canvas(img, width, height, (width - iw) // 2, (height - ih) // 2)
        raise DatasetToolError(f'--transform: unknown transform {transform!r}')
    if transform == 'center-crop-wide' and height > width:
        raise DatasetToolError('--transform=center-crop-wide needs a resolution at least as wide as tall')
    return apply


def normalized_mode(img: PIL.Image.Image) -> PIL.Image.Image:
    """Grayscale images become 'L' and everything else 'RGB' (1 or 3 channels, as the networks expect)."""
    if img.mode in ('L', 'RGB'):
        return img
    if img.mode in ('1', 'LA', 'I', 'I;16', 'I;16B', 'I;16L', 'F'):
        if img.mode.startswith('I') or img.mode == 'F':
            arr = np.asarray(img, dtype=np.float64)
            top = 65535.0 if arr.max() > 255 else 255.0
            return PIL.Image.fromarray(np.clip(arr * 255.0 / top, 0, 255).round().astype(np.uint8), 'L')
        return img.convert('L')
    return img.convert('RGB')

# ----------------------------------------------------------------------------------------------------------------
# Writing.


def parse_resolution(value: Optional[str]) -> Optional[Tuple[int, int]]:
    if value is None:
        return None
    match = re.fullmatch(r'(\d+)x(\d+)', value)
    if not match or int(match.group(1)) < 1 or int(match.group(2)) < 1:
        raise DatasetToolError(f'--resolution: expected WxH such as 32x32, got {value!r}')
    return int(match.group(1)), int(match.group(2))


def convert_dataset(source: str, dest: str, max_images: Optional[int] = None, transform: Optional[str] = None,
                    resolution: Optional[str] = None, resize_filter: str = 'lanczos', split: str = 'train',
                    progress: bool = True) -> int:
    """Convert `source` into `dest` (a new .zip or folder); returns the number of images written."""
    if os.path.exists(dest):
        raise DatasetToolError(f'--dest {dest}: already exists; choose a new name (nothing is overwritten)')
    apply = make_transform(transform, parse_resolution(resolution), resize_filter)
    count, items = open_source(source, split)
    count = min(count, max_images) if max_images is not None else count

    as_zip = dest.lower().endswith('.zip')
    parent = os.path.dirname(os.path.abspath(dest))
    os.makedirs(parent, exist_ok=True)
    # Build next to the destination and move into place at the end: an interrupted run leaves no half dataset.
    tmp = tempfile.mkdtemp(prefix='.dataset_tool_', dir=parent)
    try:
        archive = zipfile.ZipFile(os.path.join(tmp, 'out.zip'), 'w', compression=zipfile.ZIP_STORED) if as_zip else None
        labels, shape, written = [], None, 0
        for idx, item in enumerate(tqdm(items, total=count, desc='dataset_tool', unit='img', disable=not progress)):
            if idx >= count:
                break
            img = normalized_mode(apply(item['img']))
            item_shape = (img.size[0], img.size[1], len(img.getbands()))
            if shape is None:
                shape = item_shape
                w, h, _ = shape
                if w != h or (w & (w - 1)) != 0:
                    raise DatasetToolError(f'images would be {w}x{h}; they must be square with a power-of-two side '
                                           f'(use --resolution=WxH with --transform=pad or center-crop)')
            elif item_shape != shape:
                raise DatasetToolError(f'{source}: image {item["name"]} becomes {item_shape[0]}x{item_shape[1]}x{item_shape[2]} '
                                       f'(width x height x channels), unlike the first ({shape[0]}x{shape[1]}x{shape[2]})')
            fname = f'{idx // 1000:05d}/img{idx:08d}.png'
            buf = io.BytesIO()
            img.save(buf, format='png', compress_level=0, optimize=False)
            if archive is not None:
                archive.writestr(fname, buf.getvalue())
            else:
                os.makedirs(os.path.join(tmp, 'out', os.path.dirname(fname)), exist_ok=True)
                with open(os.path.join(tmp, 'out', fname), 'wb') as f:
                    f.write(buf.getvalue())
            if item['label'] is not None:
                labels.append([fname, item['label']])
            written += 1
        if labels and len(labels) != written:
            raise DatasetToolError(f'{source}: only {len(labels)} of {written} images have labels')
        meta = json.dumps(dict(labels=labels if labels else None))
        if archive is not None:
            archive.writestr('dataset.json', meta)
            archive.close()
            os.replace(os.path.join(tmp, 'out.zip'), dest)
        else:
            os.makedirs(os.path.join(tmp, 'out'), exist_ok=True)
            with open(os.path.join(tmp, 'out', 'dataset.json'), 'w') as f:
                f.write(meta)
            os.replace(os.path.join(tmp, 'out'), dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return written

# ----------------------------------------------------------------------------------------------------------------


@click.command(help=__doc__)
@click.option('--source', help='Image folder, ZIP, CIFAR-10 tarball, or idx file/folder', metavar='PATH', required=True)
@click.option('--dest', help='Output .zip (or folder); must not exist yet', metavar='PATH', required=True)
@click.option('--max-images', help='Stop after this many images', type=click.IntRange(min=1), default=None)
@click.option('--transform', help='Crop or pad before resizing', type=click.Choice(['center-crop', 'center-crop-wide', 'pad']))
@click.option('--resolution', help='Output size, e.g. 32x32', metavar='WxH', type=str, default=None)
@click.option('--resize-filter', help='Resampling filter', type=click.Choice(['lanczos', 'box']), default='lanczos', show_default=True)
@click.option('--split', help='Which part of CIFAR-10 / MNIST sources', type=click.Choice(['train', 'test']), default='train', show_default=True)
def main(source, dest, max_images, transform, resolution, resize_filter, split):
    n = convert_dataset(source, dest, max_images=max_images, transform=transform, resolution=resolution,
                        resize_filter=resize_filter, split=split)
    print(f'Wrote {n} images to {dest}', file=sys.stderr)


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
