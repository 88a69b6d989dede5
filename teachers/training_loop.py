"""Training an EDM teacher: denoising score matching with EDM's loss and preconditioning, an EMA of the weights,
upstream-layout snapshots `dict(ema, loss_fn, augment_pipe, dataset_kwargs)`, and exactly resumable state.

Built for CPUs as much as GPUs: the dataset is held in memory as uint8 and batches are indexed from it (no
loader processes, no per-step host syncs), and every random draw comes from state that is checkpointed (the
global torch RNG for noise levels, noise and dropout; a separate generator for the data order), so a resumed
run continues bit for bit as if it had not stopped.
"""

import copy
import json
import os
import pickle
import signal
import threading
import time
from typing import Optional

import torch
from tqdm import tqdm

import dnnlib
from torch_utils import training_stats
from torch_utils.images import save_image_grid
from torch_utils.misc import EpochSampler
from torch_utils.run_files import atomic_write, kimg_label

from .load import TeacherLoadError, load as load_teacher
from .sampling import StackedRandomGenerator, edm_sampler


@torch.no_grad()
def sample_grid(net, num_images: int, label_dim: int, num_steps: int, device) -> torch.Tensor:
    """Samples of the EMA for fixed seeds 0..n-1 (classes cycling), without touching the global RNG."""
    seeds = list(range(num_images))
    rnd = StackedRandomGenerator(device, seeds)
    latents = rnd.randn([num_images, net.img_channels, net.img_resolution, net.img_resolution], device=device)
    labels = torch.eye(label_dim, device=device)[torch.arange(num_images, device=device) % label_dim] if label_dim else None
    return edm_sampler(net, latents, labels, randn_like=rnd.randn_like, num_steps=num_steps)

# ----------------------------------------------------------------------------------------------------------------


def init_from_pickle(path: str, net: torch.nn.Module) -> None:
    """Copy the weights of a snapshot's `ema` into `net`; a ValueError names what does not fit."""
    try:
        source = load_teacher(path, verbose=False)
        net.load_state_dict(source.state_dict())
    except (TeacherLoadError, RuntimeError) as err:
        raise ValueError(f'--init {path}: does not fit the network these options build '
                         f'({" ".join(str(err).split())[:300]})') from None


def training_loop(
    run_dir: str,                       # Output directory (exists, ours alone).
    dataset_kwargs: dict,               # ImageFolderDataset options (class_name recorded for upstream).
    network_kwargs: dict,               # class_name + preconditioner / U-Net options.
    loss_kwargs: dict,                  # class_name + loss options.
    optimizer_kwargs: dict,             # class_name + optimizer options (lr is the peak rate).
    batch_size: int = 512,
    total_kimg: float = 200000,
    ema_halflife_kimg: float = 500,
    ema_rampup_ratio: Optional[float] = 0.05,
    lr_rampup_kimg: float = 10000,
    loss_scaling: float = 1,
    xflip: bool = False,                # Random horizontal flips of training images.
    kimg_per_tick: float = 50,
    snapshot_ticks: Optional[int] = 50,  # Ticks between snapshots (0/None: only at the start and the end).
    state_ticks: Optional[int] = None,  # Ticks between training states (default snapshot_ticks; always at the end).
    grid_size: int = 64,                # Images in the sample grid at each snapshot (0: none).
    grid_steps: int = 18,
    seed: int = 0,
    resume_state: Optional[str] = None,  # training-state-*.pt to continue from.
    init_pkl: Optional[str] = None,     # Network pickle whose `ema` weights start a new run (fresh optimizer).
    device: str = 'cpu',
    progress: bool = True,
) -> dict:
    """Train and return the final `dict(ema=..., ...)` snapshot content.

    On SIGINT (Ctrl-C) the current step is finished, a snapshot and the training state are saved, and
    KeyboardInterrupt is raised.
    """
    device = torch.device(device)
    state_ticks = state_ticks if state_ticks is not None else snapshot_ticks
    torch.manual_seed(seed)

    def log(message: str) -> None:
        tqdm.write(message)
        with open(os.path.join(run_dir, 'log.txt'), 'a', encoding='utf-8') as f:
            f.write(message + '\n')

    # Data, held in memory.
    dataset = dnnlib.util.construct_class_by_name(**dict(dataset_kwargs, xflip=False))
    images_u8, labels_np = dataset.load_all()
    images_u8 = torch.from_numpy(images_u8).to(device)
    labels = torch.from_numpy(labels_np).to(device) if dataset.label_dim else None
    label_dim = dataset.label_dim if dataset_kwargs.get('use_labels') else 0
    log(f'Dataset {dataset_kwargs["path"]}: {len(dataset)} images {dataset.image_shape}, label_dim {label_dim}, '
        f'{images_u8.numel() / 2 ** 20:.1f} MiB in memory')
    sampler = EpochSampler(len(dataset), batch_size, seed=seed, device=device)

    # Networks, loss, optimizer.
    net = dnnlib.util.construct_class_by_name(**network_kwargs, img_resolution=dataset.resolution,
                                              img_channels=dataset.num_channels, label_dim=label_dim)
    net.train().requires_grad_(True).to(device)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    loss_fn = dnnlib.util.construct_class_by_name(**loss_kwargs)
    optimizer = dnnlib.util.construct_class_by_name(params=net.parameters(), **optimizer_kwargs)
    base_lrs = [group['lr'] for group in optimizer.param_groups]
    log(f'Network {type(net).__name__}({network_kwargs.get("model_type")}): '
        f'{sum(p.numel() for p in net.parameters()):,} parameters')

    if init_pkl is not None and resume_state is None:
        init_from_pickle(init_pkl, net)
        ema.load_state_dict(net.state_dict())
        log(f'Initialised the network and its EMA from {init_pkl}')

    cur_nimg, cur_tick = 0, 0
    if resume_state is not None:
        state = torch.load(resume_state, map_location='cpu', weights_only=True)  # RNG states must stay on the CPU.
        try:
            net.load_state_dict(state['net'])
            ema.load_state_dict(state['ema'])
            optimizer.load_state_dict(state['optimizer'])
        except (RuntimeError, ValueError, KeyError) as err:
            raise ValueError(f'--resume {resume_state}: does not match this network/optimizer '
                             f'({" ".join(str(err).split())[:300]})') from None
        sampler.load_state_dict(state['sampler'])
        torch.set_rng_state(state['torch_rng'])
        if device.type == 'cuda' and state.get('cuda_rng') is not None:
            torch.cuda.set_rng_state(state['cuda_rng'], device)
        cur_nimg, cur_tick = int(state['cur_nimg']), int(state['cur_tick'])
        log(f'Resumed from {resume_state} at {cur_nimg / 1000:g} kimg')

    def snapshot_data() -> dict:
        return dict(ema=copy.deepcopy(ema).cpu(), loss_fn=copy.deepcopy(loss_fn), augment_pipe=None,
                    dataset_kwargs=dict(dataset_kwargs))

    def save_snapshot() -> None:
        label = kimg_label(cur_nimg)
        data = snapshot_data()
        atomic_write(os.path.join(run_dir, f'network-snapshot-{label}.pkl'), lambda f: pickle.dump(data, f))
        if grid_size > 0:
            with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
                fakes = sample_grid(ema, grid_size, label_dim, grid_steps, device)
            save_image_grid(fakes, os.path.join(run_dir, f'fakes{label}.png'))

    def save_state() -> None:
        state = dict(net=net.state_dict(), ema=ema.state_dict(), optimizer=optimizer.state_dict(),
                     sampler=sampler.state_dict(), torch_rng=torch.get_rng_state(),
                     cuda_rng=torch.cuda.get_rng_state(device) if device.type == 'cuda' else None,
                     cur_nimg=cur_nimg, cur_tick=cur_tick)
        atomic_write(os.path.join(run_dir, f'training-state-{kimg_label(cur_nimg)}.pt'), lambda f: torch.save(state, f))

    if grid_size > 0 and resume_state is None:
        reals = images_u8[:grid_size].to(torch.float32) / 127.5 - 1
        save_image_grid(reals, os.path.join(run_dir, 'reals.png'))

    # Ctrl-C finishes the current step, then saves everything (a second Ctrl-C aborts at once).
    stop_requested = []

    def request_stop(signum, frame):
        stop_requested.append(signum)
        signal.signal(signal.SIGINT, previous_handler)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous_handler = signal.signal(signal.SIGINT, request_stop) if in_main_thread else None

    collector = training_stats.Collector(regex='.*')
    total_nimg = int(round(total_kimg * 1000))
    tick_start_nimg, tick_start_time, start_time = cur_nimg, time.time(), time.time()
    if resume_state is None and snapshot_ticks:
        save_snapshot()
    stats_path = os.path.join(run_dir, 'stats.jsonl')
    bar = tqdm(total=total_nimg, initial=min(cur_nimg, total_nimg), unit='img', unit_scale=True, desc='train_teacher',
               disable=not progress, mininterval=1.0, smoothing=0.1)
    try:
        while True:
            done = cur_nimg >= total_nimg or bool(stop_requested)
            if not done:
                # One optimisation step on a batch held in memory.
                idx = sampler.next_batch()
                images = images_u8[idx].to(torch.float32).div_(127.5).sub_(1)
                if xflip:
                    flips = sampler.draw_flips()
                    images = torch.where(flips[:, None, None, None], images.flip(3), images)
                batch_labels = labels[idx] if label_dim else None
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(net=net, images=images, labels=batch_labels)
                training_stats.report('Loss/loss', loss)
                loss.sum().mul(loss_scaling / batch_size).backward()

                ramp = min(cur_nimg / (lr_rampup_kimg * 1000), 1) if lr_rampup_kimg > 0 else 1
                for group, base_lr in zip(optimizer.param_groups, base_lrs):
                    group['lr'] = base_lr * ramp
                for param in net.parameters():
                    if param.grad is not None:
                        torch.nan_to_num(param.grad, nan=0, posinf=1e5, neginf=-1e5, out=param.grad)
                optimizer.step()

                ema_halflife_nimg = ema_halflife_kimg * 1000
                if ema_rampup_ratio is not None:
                    ema_halflife_nimg = min(ema_halflife_nimg, cur_nimg * ema_rampup_ratio)
                ema_beta = 0.5 ** (batch_size / max(ema_halflife_nimg, 1e-8))
                with torch.no_grad():
                    for p_ema, p_net in zip(ema.parameters(), net.parameters()):
                        p_ema.copy_(p_net.detach().lerp(p_ema, ema_beta))

                cur_nimg += batch_size
                bar.update(min(cur_nimg, total_nimg) - bar.n)
                done = cur_nimg >= total_nimg or bool(stop_requested)
                if not done and cur_nimg < tick_start_nimg + kimg_per_tick * 1000:
                    continue

            # End of a tick: statistics, then snapshots.
            now = time.time()
            tick_kimg = (cur_nimg - tick_start_nimg) / 1000
            sec_per_kimg = (now - tick_start_time) / max(tick_kimg, 1e-8)
            training_stats.report0('Progress/tick', cur_tick)
            training_stats.report0('Progress/kimg', cur_nimg / 1000)
            training_stats.report0('Timing/sec_per_tick', now - tick_start_time)
            training_stats.report0('Timing/sec_per_kimg', sec_per_kimg)
            training_stats.report0('Timing/total_sec', now - start_time)
            collector.update()
            loss_mean = collector.mean('Loss/loss')
            log(f'tick {cur_tick:<5d} kimg {cur_nimg / 1000:<9.3f} loss {loss_mean:<8.4f} sec/kimg {sec_per_kimg:<8.2f} '
                f'time {dnnlib.util.format_time(now - start_time)}')
            bar.set_postfix(loss=f'{loss_mean:.4f}', tick=cur_tick)
            with open(stats_path, 'a', encoding='utf-8') as f:
                f.write(json.dumps(dict(collector.as_dict(), timestamp=now)) + '\n')

            cur_tick += 1
            if done or (snapshot_ticks and cur_tick % snapshot_ticks == 0):
                save_snapshot()
            if done or (state_ticks and cur_tick % state_ticks == 0):
                save_state()
            tick_start_nimg, tick_start_time = cur_nimg, time.time()
            if done:
                break
    finally:
        bar.close()
        if in_main_thread:
            signal.signal(signal.SIGINT, previous_handler)
    if stop_requested:
        log(f'Stopped at {cur_nimg / 1000:g} kimg; resume with --resume={run_dir}')
        raise KeyboardInterrupt(f'training stopped at {cur_nimg / 1000:g} kimg; state saved in {run_dir}')
    return snapshot_data()
