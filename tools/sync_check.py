"""Host-device syncs in the engine's inner loop: run a few `ikl.Trainer.step()`s of a small StyleGAN2 generator
refined by a small EDM teacher, and list every place the host waits for the device.

On CUDA, torch's sync debug mode reports each synchronising call (`torch.cuda.set_sync_debug_mode('warn')`); on the
CPU (no syncs exist there) the reads of tensor values on the host are counted instead, which is what would sync
on a GPU. Exits 1 when any was found on CUDA.

Run: `python tools/sync_check.py --device cuda [--precision fp32|bf16|fp16] [--steps 3]`.
"""

import collections
import copy
import os
import sys
import tempfile
import traceback
import warnings

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ikl  # noqa: E402
from pipelines.generators import StyleGAN2Adapter  # noqa: E402
from stylegan2 import networks as sg2  # noqa: E402
from teachers import networks as edm  # noqa: E402

HOST_READS = ('item', '__bool__', '__float__', '__int__', 'tolist')


def trainer(device, precision, run_dir):
    torch.manual_seed(0)
    teacher = edm.EDMPrecond(img_resolution=16, img_channels=3, label_dim=10, model_type='SongUNet', model_channels=16,
                             channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0.1).to(device)
    G = sg2.Generator(z_dim=32, c_dim=10, w_dim=32, img_resolution=16, img_channels=3,
                      synthesis_kwargs=dict(channel_base=1024, channel_max=32, num_fp16_res=2, conv_clamp=256))
    adapter = StyleGAN2Adapter(G, resolution=16, label_dim=10)
    opts = dict(batch=8, batch_gpu=4, total_kimg=1, progress=False, tensorboard=False, grid_size=0, precision=precision)
    return ikl.Trainer(adapter, teacher, copy.deepcopy(teacher).train().requires_grad_(True), opts, run_dir,
                       device=device)


@click.command()
@click.option('--device', default='cuda', show_default=True)
@click.option('--precision', type=click.Choice(['fp32', 'bf16', 'fp16']), default='fp32', show_default=True)
@click.option('--steps', type=click.IntRange(min=1), default=3, show_default=True)
def main(device, precision, steps):
    device = torch.device(device)
    found = collections.Counter()
    with tempfile.TemporaryDirectory() as tmp:
        tr = trainer(device, precision, tmp)
        tr.step()  # warm-up: first-call work (allocations, cuDNN choices) is not the loop
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter('always')
                torch.cuda.set_sync_debug_mode('warn')
                try:
                    for _ in range(steps):
                        tr.step()
                finally:
                    torch.cuda.set_sync_debug_mode('default')
            for w in caught:
                if 'synchroniz' in str(w.message):
                    found[f'{os.path.relpath(w.filename)}:{w.lineno}'] += 1
        else:
            originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

            def counting(name):
                def read(self, *args, **kwargs):
                    where = traceback.extract_stack(limit=2)[0]
                    found[f'{os.path.relpath(where.filename)}:{where.lineno} ({name})'] += 1
                    return originals[name](self, *args, **kwargs)
                return read
            try:
                for name in HOST_READS:
                    setattr(torch.Tensor, name, counting(name))
                for _ in range(steps):
                    tr.step()
            finally:
                for name, fn in originals.items():
                    setattr(torch.Tensor, name, fn)
    what = 'synchronising calls' if device.type == 'cuda' else 'host reads of tensor values (syncs on a GPU)'
    print(f'sync_check on {device}, {precision}, {steps} steps: {sum(found.values())} {what}')
    for where, n in found.most_common():
        note = ("  (Adam's step counters: host tensors unless Adam is fused, so no sync on a GPU)"
                if 'torch/optim' in where and device.type == 'cpu' else '')
        print(f'  {n:5d}  {where}{note}')
    sys.exit(1 if device.type == 'cuda' and found else 0)


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
