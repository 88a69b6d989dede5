"""Training an EDM teacher: denoising score matching with EDM's loss and preconditioning, an EMA of the weights,
upstream-layout snapshots `dict(ema, loss_fn, augment_pipe, dataset_kwargs)`, and exactly resumable state.

Built for CPUs as much as GPUs: the dataset is held in memory as uint8 and batches are indexed from it (no
loader processes, no per-step host syncs). Noise levels, noise and dropout of each step follow (seed, step) and
the data order a checkpointed sampler, so a resumed run continues bit for bit as if it had not stopped. The run
directory, ticks, statistics and Ctrl-C come from `training.run`.
"""

import copy
import os
import pickle
from typing import Optional

import torch

import dnnlib
from torch_utils import misc
from torch_utils import training_stats
from torch_utils.images import save_image_grid
from torch_utils.misc import EpochSampler
from training.run import Run, atomic_write, counter_generator, ema_beta, kimg_label, update_ema

from .load import NetworkPickleError, load as load_teacher
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
    except NetworkPickleError as err:
        raise ValueError(f'--init {err}') from None
    try:
        net.load_state_dict(source.state_dict())
    except RuntimeError as err:
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
    KeyboardInterrupt is raised. Each step's randomness (noise levels, noise, dropout) follows (seed, step).
    """
    device = torch.device(device)
    run = Run(run_dir, total_kimg, kimg_per_tick, snapshot_ticks, batch_size, state_ticks=state_ticks,
              progress=progress, desc='train_teacher')
    torch.manual_seed(seed)  # The initial weights.

    # Data, held in memory.
    dataset = dnnlib.util.construct_class_by_name(**dict(dataset_kwargs, xflip=False))
    images_u8, labels_np = dataset.load_all()
    images_u8 = torch.from_numpy(images_u8).to(device)
    labels = torch.from_numpy(labels_np).to(device) if dataset.label_dim else None
    label_dim = dataset.label_dim if dataset_kwargs.get('use_labels') else 0
    run.log(f'Dataset {dataset_kwargs["path"]}: {len(dataset)} images {dataset.image_shape}, label_dim {label_dim}, '
            f'{images_u8.numel() / 2 ** 20:.1f} MiB in memory')
    sampler = EpochSampler(len(dataset), batch_size, seed=seed, device=device)

    # Networks, loss, optimizer.
    net = dnnlib.util.construct_class_by_name(**network_kwargs, img_resolution=dataset.resolution,
                                              img_channels=dataset.num_channels, label_dim=label_dim)
    net.train().requires_grad_(True).to(device)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    loss_fn = dnnlib.util.construct_class_by_name(**loss_kwargs)
    if optimizer_kwargs.get('class_name') == 'torch.optim.Adam' and not {'foreach', 'fused'} & set(optimizer_kwargs):
        optimizer_kwargs = dict(optimizer_kwargs, **misc.adam_kernel_kwargs(net.parameters()))
    optimizer = dnnlib.util.construct_class_by_name(params=net.parameters(), **optimizer_kwargs)
    base_lrs = [group['lr'] for group in optimizer.param_groups]
    run.log(f'Network {type(net).__name__}({network_kwargs.get("model_type")}): '
            f'{sum(p.numel() for p in net.parameters()):,} parameters')

    if init_pkl is not None and resume_state is None:
        init_from_pickle(init_pkl, net)
        ema.load_state_dict(net.state_dict())
        run.log(f'Initialised the network and its EMA from {init_pkl}')

    if resume_state is not None:
        state = torch.load(resume_state, map_location='cpu', weights_only=True)
        try:
            net.load_state_dict(state['net'])
            ema.load_state_dict(state['ema'])
            optimizer.load_state_dict(state['optimizer'])
            sampler.load_state_dict(state['sampler'])
            run.load_state_dict(state['run'])
        except (RuntimeError, ValueError, KeyError) as err:
            raise ValueError(f'--resume {resume_state}: does not match this network/optimizer '
                             f'({" ".join(str(err).split())[:300]})') from None
        run.log(f'Resumed from {resume_state} at {run.cur_nimg / 1000:g} kimg')

    def snapshot_data() -> dict:
        return dict(ema=copy.deepcopy(ema).cpu(), loss_fn=copy.deepcopy(loss_fn), augment_pipe=None,
                    dataset_kwargs=dict(dataset_kwargs))

    def save_snapshot() -> None:
        label = kimg_label(run.cur_nimg)
        data = snapshot_data()
        atomic_write(os.path.join(run_dir, f'network-snapshot-{label}.pkl'), lambda f: pickle.dump(data, f))
        if grid_size > 0:
            fakes = sample_grid(ema, grid_size, label_dim, grid_steps, device)
            save_image_grid(fakes, os.path.join(run_dir, f'fakes{label}.png'))

    def save_state() -> None:
        state = dict(net=net.state_dict(), ema=ema.state_dict(), optimizer=optimizer.state_dict(),
                     sampler=sampler.state_dict(), run=run.state_dict())
        atomic_write(os.path.join(run_dir, f'training-state-{kimg_label(run.cur_nimg)}.pt'), lambda f: torch.save(state, f))

    if resume_state is None:
        if grid_size > 0:
            save_image_grid(images_u8[:grid_size].to(torch.float32) / 127.5 - 1, os.path.join(run_dir, 'reals.png'))
        if snapshot_ticks:
            save_snapshot()

    try:
        while not run.done:
            # One optimisation step on a batch held in memory.
            counter_generator(device, seed, run.cur_nimg // batch_size)
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

            ramp = min(run.cur_nimg / (lr_rampup_kimg * 1000), 1) if lr_rampup_kimg > 0 else 1
            for group, base_lr in zip(optimizer.param_groups, base_lrs):
                group['lr'] = base_lr * ramp
            for param in net.parameters():
                if param.grad is not None:
                    torch.nan_to_num(param.grad, nan=0, posinf=1e5, neginf=-1e5, out=param.grad)
            optimizer.step()
            update_ema(ema, net, ema_beta(batch_size, run.cur_nimg, ema_halflife_kimg, ema_rampup_ratio))

            if not run.advance(batch_size):
                continue
            stats = run.end_tick()
            run.log(f'tick {run.cur_tick - 1:<5d} kimg {run.cur_nimg / 1000:<9.3f} loss {stats["Loss/loss"].mean:<8.4f} '
                    f'sec/kimg {stats["Timing/sec_per_kimg"].mean:<8.2f} time {dnnlib.util.format_time(run.elapsed())}')
            if run.snapshot_due:
                save_snapshot()
            if run.state_due:
                save_state()
    finally:
        run.close()
    return snapshot_data()
