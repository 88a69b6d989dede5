"""Process-group setup for `torchrun`, also usable as a single process without any launcher.

NCCL is used when CUDA is available, gloo otherwise (so CPU-only machines can run several processes).
"""

import os
import sys
from typing import Any

import torch

from . import training_stats

_device: torch.device = torch.device('cpu')


def init(device: Any = None) -> torch.device:
    """Join the process group described by torchrun's environment (or a world of one) and pick the device.

    Returns the device this process should use: `cuda:LOCAL_RANK` when CUDA is available, else the CPU,
    unless `device` says otherwise.
    """
    global _device
    for key, default in [('MASTER_ADDR', 'localhost'), ('MASTER_PORT', '29500'), ('RANK', '0'),
                         ('LOCAL_RANK', '0'), ('WORLD_SIZE', '1')]:
        os.environ.setdefault(key, default)
    local_rank = int(os.environ['LOCAL_RANK'])
    if device is None:
        device = f'cuda:{local_rank}' if torch.cuda.is_available() else 'cpu'
    _device = torch.device(device)
    if _device.type == 'cuda':
        torch.cuda.set_device(_device)

    world_size = int(os.environ['WORLD_SIZE'])
    if world_size > 1 and not torch.distributed.is_initialized():
        backend = 'nccl' if _device.type == 'cuda' and sys.platform != 'win32' else 'gloo'
        torch.distributed.init_process_group(backend=backend, init_method='env://')
    training_stats.init_multiprocessing(rank=get_rank(), sync_device=_device if get_world_size() > 1 else None)
    return _device


def get_rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def get_world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def get_device() -> torch.device:
    """The device chosen by init() (the CPU before init())."""
    return _device


def should_stop() -> bool:
    """Hook for cluster schedulers that ask a job to stop; never set here."""
    return False


def update_progress(cur: Any, total: Any) -> None:
    """Hook for cluster schedulers that track progress; nothing to do here."""
    _ = cur, total


def print0(*args: Any, **kwargs: Any) -> None:
    """print() on rank 0 only."""
    if get_rank() == 0:
        print(*args, **kwargs)


def shutdown() -> None:
    """Leave the process group together once work is done, on every rank. A gloo rank that exits with its group alive,
    or while another rank still talks to it, can abort at exit ('terminate called without an active exception'; we
    saw it in about 1 of 8 two-process test runs, and destroying the group without the barrier did not stop it).
    Only call it on success: after a failure other ranks may never reach the barrier."""
    if torch.distributed.is_initialized():
        barrier()  # no rank tears its connections down while another still uses them
        torch.distributed.destroy_process_group()


def barrier() -> None:
    """Wait for every process (no-op for a single process)."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
