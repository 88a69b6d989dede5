"""The run layer every trainer stands on: teacher training, GAN training and the IKL engine (refine, distil).

A run is a directory `<outdir>/<NNNNN>-<desc>` holding `training_options.json` (every knob, so `--resume` needs
nothing else), `log.txt`, `stats.jsonl` (one line per tick), `network-snapshot-<kimg>.pkl`,
`training-state-<kimg>.pt` and image grids. Its clock counts images: a tick every `kimg_per_tick`, snapshots and
training states every N ticks and at the end. Randomness is derived from counters (`counter_seed`), so an exact
resume needs only the weights, the optimisers and the counters. Ctrl-C (or SIGTERM) finishes the current step,
saves a snapshot and the training state, and stops.
"""

import glob
import json
import os
import re
import signal
import threading
import time
import zipfile
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import training_stats

OPTIONS_FILE = 'training_options.json'

# ----------------------------------------------------------------------------------------------------------------
# Files.


def kimg_label(nimg: int) -> str:
    """`000123` for whole kimg (upstream's file names); `000000.032` for snapshots that fall between kimg."""
    return f'{nimg // 1000:06d}' if nimg % 1000 == 0 else f'{nimg / 1000:010.3f}'


SNAPSHOT_NAME = re.compile(r'network-snapshot-(\d+(?:\.\d+)?)\.pkl')


def snapshot_kimg(path: str) -> Optional[float]:
    """kimg of a `network-snapshot-<kimg>.pkl` path; None for any other name (`network-snapshot-best.pkl`)."""
    m = SNAPSHOT_NAME.fullmatch(os.path.basename(path))
    return float(m.group(1)) if m else None


def kimg_files(run_dir: str, prefix: str, ext: str) -> List[Tuple[float, str]]:
    """The `<prefix>-<kimg>.<ext>` files of a run directory with their kimg, oldest first."""
    pattern = re.compile(re.escape(prefix) + r'-([\d.]+)\.' + re.escape(ext) + '$')
    found = [(pattern.search(p), p) for p in glob.glob(os.path.join(run_dir, f'{prefix}-*.{ext}'))]
    return sorted((float(m.group(1)), p) for m, p in found if m)


def _readable_archive(path: str) -> bool:
    """Whether a torch.save file is whole: a truncated or corrupted zip fails its CRC check."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (OSError, zipfile.BadZipFile, EOFError):
        return False


def latest_training_state(path: str, required: bool = False) -> Optional[str]:
    """A `training-state-*.pt` file itself, or the newest whole one in a run directory (None when it has none,
    FileNotFoundError instead when `required`). A truncated or corrupt newer state is skipped with a warning."""
    if not os.path.isdir(path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f'--resume {path}: no such file or run directory')
        return path
    states = [state for _, state in kimg_files(path, 'training-state', 'pt')]
    for state in reversed(states):
        if _readable_archive(state):
            return state
        dist.print0(f'Warning: {state} is truncated or corrupt; falling back to the previous training state')
    if required:
        what = 'no readable training-state-*.pt' if states else 'no training-state-*.pt'
        raise FileNotFoundError(f'--resume {path}: {what} in this directory')
    return None


def atomic_write(path: str, write: Callable) -> None:
    """Call `write(file)` on a temporary file, then rename it to `path`: readers never see a partial file."""
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        with open(tmp, 'wb') as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def new_run_dir(outdir: str, desc: str) -> str:
    """Create `outdir/NNNNN-desc`, numbered after the runs already there; an existing directory is never reused."""
    path = dnnlib.util.next_run_dir(outdir, desc)
    dnnlib.util.make_run_dir(path)
    return path


def save_options(run_dir: str, options: dict) -> None:
    """Write the run's options (JSON) where `load_options` and `--resume` find them."""
    text = json.dumps(options, indent=2)
    atomic_write(os.path.join(run_dir, OPTIONS_FILE), lambda f: f.write(text.encode('utf-8')))


def load_options(run_dir: str) -> dnnlib.EasyDict:
    """The options a run was started with; ValueError (one line) when `run_dir` is not a run directory."""
    path = os.path.join(run_dir, OPTIONS_FILE)
    try:
        with open(path, encoding='utf-8') as f:
            return dnnlib.EasyDict(json.load(f))
    except (OSError, ValueError) as err:
        raise ValueError(f'{run_dir}: not a run directory (cannot read {OPTIONS_FILE}: '
                         f'{getattr(err, "strerror", None) or err})') from None

# ----------------------------------------------------------------------------------------------------------------
# Randomness and averaging.


def counter_seed(*counters: int) -> int:
    """A 63-bit seed that is a function of the counters alone (e.g. seed, iteration, purpose, chunk)."""
    words = np.random.SeedSequence([int(c) for c in counters]).generate_state(2, np.uint32)
    return (int(words[0]) << 31 | int(words[1])) & (2 ** 63 - 1)


def counter_generator(device: torch.device, *counters: int) -> torch.Generator:
    """A generator seeded by `counter_seed(*counters)`; torch's global RNG (dropout, noise inputs) is reseeded the
    same way, so everything random in one step follows the counters."""
    seed = counter_seed(*counters)
    torch.manual_seed(seed)
    return torch.Generator(device=device).manual_seed(seed)


def ema_beta(batch: int, cur_nimg: int, halflife_kimg: float, rampup_ratio: Optional[float]) -> float:
    """Per-step decay of an EMA with a half-life in images, capped at `rampup_ratio` x images seen early on."""
    halflife_nimg = halflife_kimg * 1000
    if rampup_ratio is not None:
        halflife_nimg = min(halflife_nimg, cur_nimg * rampup_ratio)
    return 0.5 ** (batch / max(halflife_nimg, 1e-8))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, net: torch.nn.Module, beta: float) -> None:
    """ema <- beta * ema + (1 - beta) * net for parameters; buffers (running averages, constants) are copied."""
    ema_params = list(ema.parameters())
    if ema_params:
        torch._foreach_lerp_(ema_params, [p.detach() for p in net.parameters()], 1.0 - beta)
    for b_ema, b in zip(ema.buffers(), net.buffers()):
        b_ema.copy_(b)

# ----------------------------------------------------------------------------------------------------------------
# The clock of a run.


class Run:
    """Counters, ticks, statistics and stopping of one training run.

    The loop of every trainer reads:

        run = Run(run_dir, total_kimg, kimg_per_tick, snapshot_ticks, batch)
        while not run.done:
            ... one step on `batch` images ...
            if run.advance(batch):          # a tick ended (or the run did)
                stats = run.end_tick()      # stats.jsonl, TensorBoard, progress
                if run.snapshot_due: ...
                if run.state_due: ...
        run.close()                         # raises KeyboardInterrupt after Ctrl-C, once everything is saved

    `state_dict()` holds the counters for the training state. Only rank 0 writes files.
    """

    def __init__(self, run_dir: str, total_kimg: float, kimg_per_tick: float, snapshot_ticks: Optional[int],
                 batch: int, state_ticks: Optional[int] = None, progress: bool = True, desc: str = 'train',
                 tensorboard: bool = False, log_file: bool = True, rank: int = 0, world_size: int = 1):
        self.run_dir = run_dir
        self.total_nimg = int(round(total_kimg * 1000))
        self.tick_nimg = kimg_per_tick * 1000
        self.snapshot_ticks = snapshot_ticks
        self.state_ticks = snapshot_ticks if state_ticks is None else state_ticks
        self.rank, self.world_size = rank, world_size
        self.log_file = log_file  # False where the console is already teed to log.txt (dnnlib.util.Logger).
        self.cur_nimg, self.cur_tick, self.tick_start_nimg = 0, 0, 0
        self.snapshot_due = self.state_due = False
        self.collector = training_stats.Collector(regex='.*')
        self._start_time = self._tick_start_time = time.time()
        self._stop = []
        self._previous_handlers = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C, and what schedulers send before a kill.
                self._previous_handlers[signum] = signal.signal(signum, self._request_stop)
        self._bar = None
        if rank == 0 and progress:
            from tqdm import tqdm
            self._bar = tqdm(total=self.total_nimg, unit='img', unit_scale=True, desc=desc, mininterval=1.0,
                             smoothing=0.1, dynamic_ncols=True)
        self._tb = None
        if rank == 0 and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(run_dir)
            except ImportError:
                pass

    def _request_stop(self, signum, frame) -> None:
        self._stop.append(signum)
        signal.signal(signum, self._previous_handlers[signum])  # A second signal acts at once.

    @property
    def stopping(self) -> bool:
        """Ctrl-C was pressed (in any process): the run saves at the end of this step and stops."""
        flag = bool(self._stop)
        if self.world_size > 1:
            t = torch.tensor([float(flag)], device=dist.get_device())
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            flag = bool(t.item())
        return flag

    @property
    def done(self) -> bool:
        return self.cur_nimg >= self.total_nimg

    def state_dict(self) -> dict:
        return dict(cur_nimg=self.cur_nimg, cur_tick=self.cur_tick, tick_start_nimg=self.tick_start_nimg)

    def load_state_dict(self, state: dict) -> None:
        self.cur_nimg, self.cur_tick = int(state['cur_nimg']), int(state['cur_tick'])
        self.tick_start_nimg = int(state.get('tick_start_nimg', self.cur_nimg))
        if self._bar is not None:
            self._bar.reset(total=self.total_nimg)
            self._bar.update(min(self.cur_nimg, self.total_nimg))

    def set_total_kimg(self, total_kimg: float) -> None:
        self.total_nimg = int(round(total_kimg * 1000))
        if self._bar is not None:
            self._bar.total = self.total_nimg

    def advance(self, nimg: int) -> bool:
        """Count `nimg` trained images; True when a tick ends here (tick length reached, the end, or Ctrl-C)."""
        self.cur_nimg += nimg
        if self._bar is not None:
            self._bar.update(min(self.cur_nimg, self.total_nimg) - self._bar.n)
        if self.stopping:
            self.total_nimg = min(self.total_nimg, self.cur_nimg)  # `done` from now on.
        return self.done or self.cur_nimg >= self.tick_start_nimg + self.tick_nimg

    def end_tick(self) -> dnnlib.EasyDict:
        """Close the tick: report progress and timing, append the tick's statistics to stats.jsonl (and
        TensorBoard), and decide whether a snapshot and a training state are due. Returns the statistics."""
        now = time.time()
        tick_kimg = (self.cur_nimg - self.tick_start_nimg) / 1000
        training_stats.report0('Progress/tick', self.cur_tick)
        training_stats.report0('Progress/kimg', self.cur_nimg / 1000)
        training_stats.report0('Timing/sec_per_tick', now - self._tick_start_time)
        training_stats.report0('Timing/sec_per_kimg', (now - self._tick_start_time) / max(tick_kimg, 1e-8))
        training_stats.report0('Timing/total_sec', now - self._start_time)
        self.collector.update()
        stats = self.collector.as_dict()
        if self.rank == 0:
            with open(os.path.join(self.run_dir, 'stats.jsonl'), 'a', encoding='utf-8') as f:
                f.write(json.dumps(dict(stats, timestamp=now)) + '\n')
            if self._tb is not None:
                for name, value in stats.items():
                    self._tb.add_scalar(name, value.mean, global_step=int(self.cur_nimg / 1e3))
                self._tb.flush()
        self.cur_tick += 1
        self.snapshot_due = self.done or bool(self.snapshot_ticks and self.cur_tick % self.snapshot_ticks == 0)
        self.state_due = self.done or bool(self.state_ticks and self.cur_tick % self.state_ticks == 0)
        self.tick_start_nimg, self._tick_start_time = self.cur_nimg, time.time()
        return stats

    def elapsed(self) -> float:
        return time.time() - self._start_time

    def log(self, message: str) -> None:
        """A line on the console (above the progress bar) and in log.txt."""
        if self.rank != 0:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)
        if not self.log_file:
            return
        with open(os.path.join(self.run_dir, 'log.txt'), 'a', encoding='utf-8') as f:
            f.write(message + '\n')

    def close(self) -> None:
        """Release the console and Ctrl-C; after a Ctrl-C (everything saved by then) raise KeyboardInterrupt."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}
        if self._stop:
            self._stop.clear()
            message = f'Stopped at {self.cur_nimg / 1000:g} kimg; resume with --resume={self.run_dir}'
            self.log(message)
            raise KeyboardInterrupt(message)
