"""Reference statistics: real data (ZIP/folder, cached by dataset fingerprint and detector), precomputed
statistics files (EDM `fid-refs` npz with `mu`/`sigma`, or our own feature-statistics npz), or samples of a
generator such as a teacher with its sampler ("FID to teacher", for users without the data).
"""

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch
import tqdm

import dnnlib
from training.dataset import ImageFolderDataset
from .detectors import Detector
from .feature_stats import FeatureStats, STATS_FORMAT
from .images import generator_output_to_uint8


@dataclass(frozen=True)
class StatsRequest:
    """What a metric needs from the reference side: individual features and/or mean+cov, of up to max_items."""
    capture_all: bool
    capture_mean_cov: bool
    max_items: Optional[int]


def generated_batches(generator: Any, num: int, batch_size: int, seed: int,
                      device: torch.device) -> Iterator[torch.Tensor]:
    """uint8 batches from a generator adapter's `sample(batch_size, generator=...)`, deterministic in `seed`."""
    rng = torch.Generator(device).manual_seed(seed)
    done = 0
    while done < num:
        count = min(batch_size, num - done)
        with torch.no_grad():
            images, _labels = generator.sample(count, generator=rng)
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] != count:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f'generator.sample({count}) must return images [{count}, C, H, W], got {shape}')
        yield generator_output_to_uint8(images).to(device)
        done += count


def accumulate(batches: Iterator[torch.Tensor], total: int, detector: Detector, stats: FeatureStats,
               device: torch.device, desc: str, progress: bool) -> None:
    """Run the detector on every batch and append the features until the statistics are full."""
    with tqdm.tqdm(total=total, desc=desc, unit='img', disable=not progress, dynamic_ncols=True) as bar:
        for images in batches:
            stats.append(detector.features(images.to(device)))
            bar.update(len(images))
            if stats.is_full():
                break


def _effective(r: StatsRequest, length: int) -> int:
    """How many of the `length` available items a request reads."""
    return length if r.max_items is None else min(r.max_items, length)


def _merge(requests: List[StatsRequest], length: int) -> Dict[int, StatsRequest]:
    """One pass per distinct effective size: requests that read the same items share a pass."""
    passes: Dict[int, StatsRequest] = {}
    for r in requests:
        size = _effective(r, length)
        old = passes.get(size)
        passes[size] = StatsRequest(r.capture_all or (old is not None and old.capture_all),
                                    r.capture_mean_cov or (old is not None and old.capture_mean_cov), size)
    return passes


def dataset_fingerprint(path: str) -> str:
    """Identity of a dataset for the statistics cache, cheap to compute for any size.

    ZIP: absolute path, size and mtime of the archive. Folder: absolute path plus the relative name, size and
    mtime of every file. Any edit, added or removed file changes it; a copy elsewhere is a new key (recomputed
    once). Content hashing was rejected: it would read a 100 GB dataset before every cache hit.
    """
    digest = hashlib.sha1()
    if os.path.isdir(path):
        digest.update(f'dir:{os.path.abspath(path)}'.encode())
        for root, _dirs, files in sorted(os.walk(path)):
            for f in sorted(files):
                st = os.stat(os.path.join(root, f))
                digest.update(f'{os.path.relpath(os.path.join(root, f), path)}:{st.st_size}:{st.st_mtime_ns};'.encode())
    else:
        st = os.stat(path)
        digest.update(f'zip:{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}'.encode())
    return digest.hexdigest()


def _cache_path(prefix: str, key: dict) -> str:
    digest = hashlib.md5(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return dnnlib.make_cache_dir_path('gan-metrics', f'{prefix}-{digest}.npz')


def _stack_images(items: list) -> torch.Tensor:
    return torch.from_numpy(np.stack([image for image, _label in items]))


class _ComputedReference:
    """Statistics computed by running the detector on the reference's images: one pass per distinct size,
    kept in memory (snapshots reuse them) and on disk when the subclass names a cache file."""

    is_mean_cov_only = False

    def __init__(self):
        self._memory: Dict[tuple, FeatureStats] = {}

    def __len__(self) -> int:
        raise NotImplementedError

    def _batches(self, size: int, device: torch.device) -> Iterator[torch.Tensor]:
        raise NotImplementedError

    def cache_file(self, detector: Detector, request: StatsRequest) -> Optional[str]:
        raise NotImplementedError

    def get_stats(self, detector: Detector, requests: List[StatsRequest], device: torch.device,
                  progress: bool = False) -> Dict[StatsRequest, FeatureStats]:
        results: Dict[StatsRequest, FeatureStats] = {}
        for size, merged in _merge(requests, len(self)).items():
            memo_key = (detector.identity, merged)
            if memo_key not in self._memory:
                path = self.cache_file(detector, merged)
                if path is not None and os.path.isfile(path):
                    stats = FeatureStats.load(path)
                else:
                    stats = FeatureStats(merged.capture_all, merged.capture_mean_cov, max_items=size)
                    accumulate(self._batches(size, device), size, detector, stats, device,
                               desc=f'{self.name} [{detector.name}]', progress=progress)
                    if path is not None:
                        stats.save(path, detector=detector.identity, source=self.description)
                self._memory[memo_key] = stats
            for r in requests:
                if _effective(r, len(self)) == size:
                    results[r] = self._memory[memo_key]
        return results


class DatasetReference(_ComputedReference):
    """Real images of a dataset ZIP or folder (upstream layout). `_full` metrics read every image."""

    def __init__(self, path: str, mirror: bool = False, cache: bool = True, batch_size: int = 64,
                 num_workers: int = 0):
        super().__init__()
        self.path = path
        self.mirror = mirror
        self.dataset = ImageFolderDataset(path, xflip=mirror)
        self.name = self.dataset.name
        self.cache = cache
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.description = os.path.abspath(path)

    def __len__(self) -> int:
        return len(self.dataset)

    def cache_file(self, detector: Detector, request: StatsRequest) -> Optional[str]:
        if not self.cache:
            return None
        key = dict(format=STATS_FORMAT, dataset=dataset_fingerprint(self.path), mirror=self.mirror,
                   detector=detector.identity, capture_all=request.capture_all,
                   capture_mean_cov=request.capture_mean_cov, max_items=request.max_items)
        return _cache_path(f'{self.name}-{detector.name}', key)

    def _batches(self, size: int, device: torch.device) -> Iterator[torch.Tensor]:
        if self.num_workers > 0:
            self.dataset.close()  # Forked workers must not share the parent's open ZIP handle: each opens its own.
        subset = torch.utils.data.Subset(self.dataset, range(size))
        loader = torch.utils.data.DataLoader(subset, batch_size=self.batch_size, num_workers=self.num_workers,
                                             collate_fn=_stack_images)
        yield from loader


class _FixedMeanCov:
    """Statistics known only as mean and covariance (EDM's fid-refs files)."""

    def __init__(self, mu: np.ndarray, sigma: np.ndarray, source: str):
        self.mu, self.sigma, self.source = mu, sigma, source
        self.num_features = mu.shape[0]
        self.capture_all = False

    def get_mean_cov(self, unbiased: bool = False):
        return self.mu, self.sigma

    def get_all(self):
        raise ValueError(f'{self.source} holds only mu/sigma; KID, precision/recall need a dataset (--data)')


class StatsFileReference:
    """Precomputed statistics: an EDM-layout npz (`mu`, `sigma`) by path or URL, or a saved FeatureStats."""

    def __init__(self, path_or_url: str):
        self.description = path_or_url
        path = dnnlib.util.open_url(path_or_url, return_filename=True)
        with np.load(path, allow_pickle=False) as data:
            is_ours = 'format' in data.files and str(data['format']) == STATS_FORMAT
            if not is_ours and not {'mu', 'sigma'} <= set(data.files):
                raise ValueError(f'--ref: {path_or_url} has neither mu/sigma nor {STATS_FORMAT} statistics '
                                 f'(keys: {", ".join(data.files)})')
            if not is_ours:
                mu, sigma = data['mu'].astype(np.float64), data['sigma'].astype(np.float64)
        self.stats = FeatureStats.load(path) if is_ours else _FixedMeanCov(mu, sigma, path_or_url)
        self.is_mean_cov_only = not is_ours  # EDM files: FID only, with EDM's unbiased covariance.

    def get_stats(self, detector: Detector, requests: List[StatsRequest], device: torch.device,
                  progress: bool = False) -> Dict[StatsRequest, Any]:
        recorded = getattr(self.stats, 'extra', {}).get('detector')
        if recorded is not None and recorded != detector.identity:
            raise ValueError(f'--ref: {self.description} was computed with another detector than {detector.name}')
        for r in requests:
            if r.capture_all and not getattr(self.stats, 'capture_all', False):
                self.stats.get_all()  # Raises the explanatory error.
        return {r: self.stats for r in requests}


class GeneratorReference(_ComputedReference):
    """Samples of a generator adapter (e.g. the teacher with its sampler) as the reference distribution.

    `num` samples drawn with `seed`; kept in memory per detector, and cached on disk only when the caller gives
    `cache_key` (a string that identifies the generator and its sampler settings, e.g. pickle hash + steps).
    """

    name = 'reference samples'

    def __init__(self, generator: Any, num: int = 50000, seed: int = 1, batch_size: int = 64,
                 cache_key: Optional[str] = None):
        super().__init__()
        self.generator = generator
        self.num = num
        self.seed = seed
        self.batch_size = batch_size
        self.cache_key = cache_key
        self.description = f'generator:{cache_key or type(generator).__name__}:{num}@seed{seed}'

    def __len__(self) -> int:
        return self.num

    def cache_file(self, detector: Detector, request: StatsRequest) -> Optional[str]:
        if self.cache_key is None:
            return None
        key = dict(format=STATS_FORMAT, generator=self.cache_key, seed=self.seed, detector=detector.identity,
                   capture_all=request.capture_all, capture_mean_cov=request.capture_mean_cov,
                   max_items=request.max_items)
        return _cache_path(f'generator-{detector.name}', key)

    def _batches(self, size: int, device: torch.device) -> Iterator[torch.Tensor]:
        return generated_batches(self.generator, size, self.batch_size, self.seed, device)


def make_reference(reference: Any, mirror: bool = False, cache: bool = True, batch_size: int = 64,
                   num_workers: int = 0):
    """A reference from a dataset path, a statistics file (.npz path or URL), a generator adapter, or as is."""
    if hasattr(reference, 'get_stats'):
        return reference
    if hasattr(reference, 'sample'):
        return GeneratorReference(reference, batch_size=batch_size)
    if isinstance(reference, str):
        if reference.lower().endswith('.npz'):
            return StatsFileReference(reference)
        if dnnlib.util.is_url(reference):
            raise ValueError(f'--data: URLs are supported for .npz statistics only, got {reference}')
        if not os.path.exists(reference):
            raise ValueError(f'--data: {reference} does not exist')
        return DatasetReference(reference, mirror=mirror, cache=cache, batch_size=batch_size,
                                num_workers=num_workers)
    raise TypeError(f'reference: expected a dataset path, an .npz, or a generator, got {type(reference).__name__}')
