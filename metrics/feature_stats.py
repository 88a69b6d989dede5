"""Accumulated detector features: running mean/covariance sums in float64 and, optionally, every feature.

Saved as a plain .npz (no pickle), so cached statistics never execute code when loaded.
"""

import os
import uuid
from typing import Optional, Tuple

import numpy as np
import torch

STATS_FORMAT = 'ikl-feature-stats-v1'


class FeatureStats:
    """Streaming statistics of [N, D] feature batches, up to `max_items` items (None: no limit)."""

    def __init__(self, capture_all: bool = False, capture_mean_cov: bool = False, max_items: Optional[int] = None):
        self.capture_all = capture_all
        self.capture_mean_cov = capture_mean_cov
        self.max_items = max_items
        self.num_items = 0
        self.num_features: Optional[int] = None
        self._all: list = []
        self.raw_sum: Optional[np.ndarray] = None     # sum of x, float64 [D]
        self.raw_outer: Optional[np.ndarray] = None   # sum of x x^T, float64 [D, D]
        self.extra: dict = {}                         # provenance strings saved alongside (detector, source)

    def is_full(self) -> bool:
        return self.max_items is not None and self.num_items >= self.max_items

    def append(self, features) -> None:
        x = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2:
            raise ValueError(f'features must be [N, D], got {x.shape}')
        if self.max_items is not None:
            x = x[:max(self.max_items - self.num_items, 0)]
        if self.num_features is None:
            self.num_features = x.shape[1]
            if self.capture_mean_cov:
                self.raw_sum = np.zeros(self.num_features, np.float64)
                self.raw_outer = np.zeros((self.num_features, self.num_features), np.float64)
        elif x.shape[1] != self.num_features:
            raise ValueError(f'features have {x.shape[1]} dimensions, earlier batches had {self.num_features}')
        if len(x) == 0:
            return
        self.num_items += len(x)
        if self.capture_all:
            self._all.append(x)
        if self.capture_mean_cov:
            x64 = x.astype(np.float64)
            self.raw_sum += x64.sum(axis=0)
            self.raw_outer += x64.T @ x64

    def get_all(self) -> np.ndarray:
        if not self.capture_all:
            raise ValueError('these statistics did not capture individual features')
        if not self._all:
            return np.zeros((0, self.num_features or 0), np.float32)
        if len(self._all) > 1:
            self._all = [np.concatenate(self._all)]
        return self._all[0]

    def get_mean_cov(self, unbiased: bool = False) -> Tuple[np.ndarray, np.ndarray]:
        """Mean and covariance; biased (divide by N, StyleGAN2-ADA) or unbiased (N - 1, EDM)."""
        if self.num_items < 2:
            raise ValueError(f'need at least 2 items for a covariance, have {self.num_items}')
        if self.capture_mean_cov:
            raw_sum, raw_outer = self.raw_sum, self.raw_outer
        else:
            x64 = self.get_all().astype(np.float64)
            raw_sum, raw_outer = x64.sum(axis=0), x64.T @ x64
        n = self.num_items
        mean = raw_sum / n
        scatter = raw_outer - n * np.outer(mean, mean)
        return mean, scatter / (n - 1 if unbiased else n)

    @classmethod
    def from_features(cls, features: np.ndarray, capture_all: bool = True) -> 'FeatureStats':
        stats = cls(capture_all=capture_all, capture_mean_cov=True)
        stats.append(features)
        return stats

    def save(self, path: str, **extra: str) -> None:
        """Write atomically (temp file + rename) so concurrent readers never see a partial file."""
        arrays = dict(format=np.array(STATS_FORMAT), capture_all=np.array(self.capture_all),
                      capture_mean_cov=np.array(self.capture_mean_cov),
                      max_items=np.array(-1 if self.max_items is None else self.max_items),
                      num_items=np.array(self.num_items), num_features=np.array(self.num_features or 0))
        if self.capture_all:
            arrays['all_features'] = self.get_all()
        if self.capture_mean_cov and self.raw_sum is not None:
            arrays['raw_sum'] = self.raw_sum
            arrays['raw_outer'] = self.raw_outer
        arrays.update({f'extra_{key}': np.array(value) for key, value in extra.items()})
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f'{path}.{uuid.uuid4().hex}.tmp.npz'
        np.savez(tmp, **arrays)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> 'FeatureStats':
        with np.load(path, allow_pickle=False) as data:
            if 'format' not in data or str(data['format']) != STATS_FORMAT:
                raise ValueError(f'{path}: not a feature-statistics file of format {STATS_FORMAT}')
            max_items = int(data['max_items'])
            stats = cls(capture_all=bool(data['capture_all']), capture_mean_cov=bool(data['capture_mean_cov']),
                        max_items=None if max_items < 0 else max_items)
            stats.num_items = int(data['num_items'])
            stats.num_features = int(data['num_features']) or None
            if stats.capture_all:
                stats._all = [data['all_features']]
            if stats.capture_mean_cov and 'raw_sum' in data:
                stats.raw_sum = data['raw_sum']
                stats.raw_outer = data['raw_outer']
            stats.extra = {key[len('extra_'):]: str(data[key]) for key in data.files if key.startswith('extra_')}
        return stats
