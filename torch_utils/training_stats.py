"""Cheap statistics collection during training, reduced across ranks.

`report(name, value)` can be called anywhere (inside the networks, the loss, the loop); a `Collector` then
gathers the mean and standard deviation of everything reported since its last `update()`, summed over all
processes with one all-reduce. Same API as upstream, so upstream-style training code works unchanged.
"""

import re
from typing import Any, Dict, List, Optional

import numpy as np
import torch

import dnnlib

_num_moments = 3             # [count, sum, sum of squares]
_reduce_dtype = torch.float32  # What all_reduce sends; float64 is not supported by every backend.
_counter_dtype = torch.float64  # What accumulates locally, to avoid losing precision over many reports.

_rank: int = 0
_sync_device: Optional[torch.device] = None  # Device for all_reduce (None: no reduction across processes).
_sync_called: bool = False
_counters: Dict[str, Dict[torch.device, torch.Tensor]] = dict()
_cumulative: Dict[str, torch.Tensor] = dict()


def init_multiprocessing(rank: int, sync_device: Optional[torch.device]) -> None:
    """Declare this process's rank and the device used to reduce statistics (None for a single process).

    Must be called before the first Collector.update() when training with several processes.
    """
    global _rank, _sync_device
    assert not _sync_called or (rank, sync_device) == (_rank, _sync_device), \
        'init_multiprocessing() must come before the first Collector.update()'
    _rank = rank
    _sync_device = sync_device


def report(name: str, value: Any) -> Any:
    """Record scalar(s) under `name` (each element counts as one sample). Returns `value` unchanged."""
    if name not in _counters:
        _counters[name] = dict()
    elems = torch.as_tensor(value)
    if elems.numel() == 0:
        return value
    elems = elems.detach().flatten().to(_reduce_dtype)
    moments = torch.stack([torch.ones_like(elems).sum(), elems.sum(), elems.square().sum()])
    assert moments.ndim == 1 and moments.shape[0] == _num_moments
    moments = moments.to(_counter_dtype)
    device = moments.device
    if device not in _counters[name]:
        _counters[name][device] = torch.zeros_like(moments)
    _counters[name][device].add_(moments)
    return value


def report0(name: str, value: Any) -> Any:
    """Like report(), but only rank 0 contributes (for values every rank computes identically)."""
    report(name, value if _rank == 0 else [])
    return value


def _sync(names: List[str]) -> List[tuple]:
    """Fold the per-device counters of `names` into the cumulative totals, summed over processes."""
    global _sync_called
    if len(names) == 0:
        return []
    _sync_called = True

    deltas = []
    device = _sync_device if _sync_device is not None else torch.device('cpu')
    for name in names:
        delta = torch.zeros([_num_moments], dtype=_counter_dtype, device=device)
        for counter in _counters[name].values():
            delta.add_(counter.to(device))
            counter.copy_(torch.zeros_like(counter))
        deltas.append(delta)
    deltas = torch.stack(deltas)

    if _sync_device is not None:
        reduced = deltas.to(_reduce_dtype)
        torch.distributed.all_reduce(reduced)
        deltas = reduced.to(_counter_dtype)

    deltas = deltas.cpu()
    for idx, name in enumerate(names):
        if name not in _cumulative:
            _cumulative[name] = torch.zeros([_num_moments], dtype=_counter_dtype)
        _cumulative[name].add_(deltas[idx])
    return [(name, _cumulative[name]) for name in names]


class Collector:
    """Reads the statistics reported since its previous update(), for names matching `regex`."""

    def __init__(self, regex: str = '.*', keep_previous: bool = True):
        self._regex = re.compile(regex)
        self._keep_previous = keep_previous
        self._cumulative: Dict[str, torch.Tensor] = dict()
        self._moments: Dict[str, torch.Tensor] = dict()
        self.update()
        self._moments.clear()

    def names(self) -> List[str]:
        """Names reported so far that match the regex."""
        return [name for name in _counters if self._regex.fullmatch(name)]

    def update(self) -> None:
        """Take a new reading. Collective: every process must call it at the same point."""
        if not self._keep_previous:
            self._moments.clear()
        for name, cumulative in _sync(self.names()):
            if name not in self._cumulative:
                self._cumulative[name] = torch.zeros([_num_moments], dtype=_counter_dtype)
            delta = cumulative - self._cumulative[name]
            self._cumulative[name].copy_(cumulative)
            if float(delta[0]) != 0:
                self._moments[name] = delta

    def _get_delta(self, name: str) -> torch.Tensor:
        assert self._regex.fullmatch(name)
        if name not in self._moments:
            self._moments[name] = torch.zeros([_num_moments], dtype=_counter_dtype)
        return self._moments[name]

    def num(self, name: str) -> int:
        """How many scalars were reported under `name` in the last reading."""
        return int(self._get_delta(name)[0])

    def mean(self, name: str) -> float:
        """Their mean (NaN when none)."""
        delta = self._get_delta(name)
        if int(delta[0]) == 0:
            return float('nan')
        return float(delta[1] / delta[0])

    def std(self, name: str) -> float:
        """Their standard deviation (NaN when none)."""
        delta = self._get_delta(name)
        if int(delta[0]) == 0 or not np.isfinite(float(delta[1])):
            return float('nan')
        if int(delta[0]) == 1:
            return 0.0
        mean = float(delta[1] / delta[0])
        raw_var = float(delta[2] / delta[0])
        return float(np.sqrt(max(raw_var - mean ** 2, 0)))

    def as_dict(self) -> dnnlib.EasyDict:
        """{name: {num, mean, std}} for the names of the last reading."""
        stats = dnnlib.EasyDict()
        for name in self.names():
            stats[name] = dnnlib.EasyDict(num=self.num(name), mean=self.mean(name), std=self.std(name))
        return stats

    def __getitem__(self, name: str) -> float:
        return self.mean(name)


default_collector = Collector()
