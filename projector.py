"""Project target images into the W space of a StyleGAN2 generator.

Writes, per target, the target as the generator sees it, the projection rendered with the generator's own
constant noise, and (unless --no-save-video) a target|projection video of the optimisation; all ws go to
`projected_w.npz` (array `w`, shape [n, num_ws, w_dim]), which `generate.py --projected-w` renders.

The distance is NVIDIA's VGG16 LPIPS (`vgg16.pt`, downloaded once and cached) when available; offline, or with
--vgg16=pyramid, a multi-scale pixel MSE (see stylegan2/projection.py).

Examples:

\b
    python projector.py --network=ffhq.pkl --target=face.png --outdir=out
    python projector.py --network=g.pkl --target=a.png --target=b.png --num-steps=300 --vgg16=pyramid --outdir=out

Security: a network pickle contains code, and loading it runs that code. Only load files you trust, or pass
--refuse-unknown-code.
"""

import importlib.util
import os
from typing import List

import click
import imageio
import imageio.v3
import numpy as np
import PIL.Image
import torch
import tqdm

from pipelines import generators
from stylegan2 import pickles, projection, scripting
from torch_utils.images import save_png, to_uint8_nhwc


def load_target(path: str, resolution: int, channels: int) -> np.ndarray:
    """Centre-crop to a square, resize (Lanczos) to the generator's resolution; uint8 HWC."""
    try:
        image = PIL.Image.open(path)
        image = image.convert('L' if channels == 1 else 'RGB')
    except (OSError, ValueError) as err:
        raise click.BadParameter(f'{path}: not a readable image ({err})', param_hint='--target') from None
    w, h = image.size
    side = min(w, h)
    image = image.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
    image = image.resize((resolution, resolution), PIL.Image.LANCZOS)
    array = np.asarray(image, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def write_video(path: str, target: np.ndarray, frames: List[np.ndarray]) -> str:
    """target|frame side by side: MP4 through imageio when its ffmpeg plugin (imageio-ffmpeg) is installed,
    otherwise an animated GIF next to it. Returns the path written."""
    frames = [np.concatenate([target, frame], axis=1) for frame in frames]
    frames = [f[:, :, 0] if f.shape[2] == 1 else f for f in frames]
    if importlib.util.find_spec('imageio_ffmpeg') is not None:
        with imageio.get_writer(path, mode='I', fps=10, codec='libx264', bitrate='16M') as writer:
            for frame in frames:
                writer.append_data(frame)
        return path
    path = os.path.splitext(path)[0] + '.gif'
    imageio.v3.imwrite(path, np.stack(frames), duration=100, loop=0)
    return path


@click.command(help=__doc__)
@click.option('--network', 'network_pkl', help='StyleGAN2 network pickle; loading it runs code inside it',
              metavar='PATH|URL', required=True)
@click.option('--target', 'target_paths', help='Target image (repeat for several)', metavar='FILE', multiple=True,
              required=True)
@click.option('--num-steps', help='Optimisation steps', type=click.IntRange(min=1), default=1000, show_default=True)
@click.option('--seed', help='Random seed', type=int, default=303, show_default=True)
@click.option('--class', 'class_idx', help='Class label (conditional generators)', type=click.IntRange(min=0))
@click.option('--save-video/--no-save-video', help='Write a progress video', default=True, show_default=True)
@click.option('--video-every', help='Video frame every N steps', type=click.IntRange(min=1), default=1,
              show_default=True)
@click.option('--vgg16', help="VGG16 LPIPS TorchScript (default: NVIDIA's, cached), or 'pyramid' for the "
              'offline pixel distance', metavar='PATH|URL|pyramid')
@click.option('--device', help='Device (default: cuda if available, else cpu)', metavar='STR')
@click.option('--refuse-unknown-code', is_flag=True, help='Refuse pickles whose code is not on the allow-list')
@click.option('--overwrite', is_flag=True, help='Replace existing outputs in --outdir')
@click.option('--outdir', help='Where to save the results', metavar='DIR', required=True)
def main(network_pkl, target_paths, num_steps, seed, class_idx, save_video, video_every, vgg16, device,
         refuse_unknown_code, overwrite, outdir):
    device = torch.device(device) if device else scripting.default_device()
    scripting.set_code_policy(refuse_unknown_code)
    try:
        G = generators.load_network(network_pkl, kinds=('stylegan2',), device=device).net
        c = scripting.class_labels(G, class_idx, 1, device)
    except pickles.NetworkPickleError as err:
        raise click.BadParameter(str(err), param_hint='--network') from None
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint='--class') from None
    targets = [load_target(path, G.img_resolution, G.img_channels) for path in target_paths]

    suffixes = [''] if len(targets) == 1 else [f'{idx:02d}' for idx in range(len(targets))]
    outputs = [os.path.join(outdir, 'projected_w.npz')]
    for s in suffixes:
        outputs += [os.path.join(outdir, f'target{s}.png'), os.path.join(outdir, f'proj{s}.png')]
        outputs += [os.path.join(outdir, f'proj{s}.{ext}') for ext in ('mp4', 'gif')] if save_video else []
    try:
        scripting.check_outputs_free(outputs, overwrite)
    except FileExistsError as err:
        raise click.ClickException(str(err)) from None
    os.makedirs(outdir, exist_ok=True)
    try:
        distance = projection.load_distance(vgg16, device, log=lambda msg: click.echo(msg, err=True))
    except (OSError, RuntimeError, ValueError) as err:
        raise click.BadParameter(f'{vgg16}: cannot load VGG16 TorchScript ({err})', param_hint='--vgg16') from None

    force_fp32 = scripting.use_fp32(device)
    projected = []
    for suffix, target in zip(suffixes, targets):
        target_tensor = torch.tensor(target.transpose(2, 0, 1), device=device)
        w_steps = []
        with tqdm.tqdm(total=num_steps, desc=f'Projecting{" " + suffix if suffix else ""}', unit='step') as bar:
            for w, dist in projection.project(G, target_tensor, distance, num_steps=num_steps, c=c, seed=seed,
                                              force_fp32=force_fp32):
                w_steps.append(w)
                bar.set_postfix(dist=f'{dist:.4g}')
                bar.update(1)
        ws = w_steps[-1].reshape(1, 1, -1).repeat(1, G.num_ws, 1)
        projected.append(ws.cpu().numpy())

        with torch.no_grad():
            final = to_uint8_nhwc(G.synthesis(ws, noise_mode='const', force_fp32=force_fp32))[0]
        save_png(target, os.path.join(outdir, f'target{suffix}.png'))
        save_png(final, os.path.join(outdir, f'proj{suffix}.png'))
        if save_video:
            frames = []
            with torch.no_grad():
                for w in w_steps[::video_every] + ([] if (num_steps - 1) % video_every == 0 else w_steps[-1:]):
                    frame_ws = w.reshape(1, 1, -1).repeat(1, G.num_ws, 1)
                    frames.append(to_uint8_nhwc(G.synthesis(frame_ws, noise_mode='const',
                                                                 force_fp32=force_fp32))[0])
            video = write_video(os.path.join(outdir, f'proj{suffix}.mp4'), target, frames)
            click.echo(f'Wrote {video}')

    np.savez(os.path.join(outdir, 'projected_w.npz'), w=np.concatenate(projected))
    click.echo(f'Wrote {len(projected)} projection(s) to {outdir}')


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
