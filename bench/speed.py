"""Issue 22's speed goals, side by side in one run: each network and a whole refine iteration, reference vs ours.

Run: `python bench/speed.py [--quick] [--sections g,fake,refine] [--configs small,cifar10] [--batch 8]
[--repeats 3] [--device cpu|cuda] [--threads 1] [--no-compile]`. Prints a table (a row per variant, with its ratio
to the section's reference), then one JSON object as its last line.

Sections (every variant is timed interleaved with the others, A B C A B C ..., after one untimed warm-up call
per variant; the warm-up's time is reported as `first`, which for compiled variants is the compile time):

- `g`: StyleGAN2 generator forward+backward (training mode, loss on the image, parameter gradients). Reference:
  PyTorch reference ops (`TOOLKIT_OPS_IMPL=ref`), eager, float32, i.e. what NVIDIA's code runs where its CUDA ops
  do not (the CPU). Ours: compiled ops (`auto`), float32 and bf16 autocast, eager and torch.compile'd.
- `fake`: the fake score's step: EDM's DSM loss of a SongUNet denoiser, forward+backward of its parameters.
  Reference: eager float32 (the network code is the same PyTorch calls as EDM's). Ours: bf16, compiled.
- `refine`: one whole `ikl.Trainer.step()` (a StyleGAN2 generator refined by an EDM teacher, fake score a copy
  of the teacher). Reference: `schedule='official'` (upstream's order, one extra generator pass and a separate
  fake forward), reference ops, float32. Ours: `schedule='reuse'` (shared fake forward), in float32, in bf16,
  and in bf16 with `compile`.

Configurations: `small` (StyleGAN2 32x32 with 128 channels at most; SongUNet 32x32, 64 channels, [1,2,2], 2 blocks,
attention at 16x16) and `cifar10` (the CIFAR-10 StyleGAN2-ADA generator of bench/stylegan2.py: 512 channels,
10 classes; the official CIFAR-10 DDPM++ teacher of bench/edm_unet.py, 56 M parameters, 10 classes).
`--quick`: the small configuration, 5 repeats, and torch.compile only for G (bf16): 1-2 minutes for all three
sections on one loaded CPU core. Compiling a U-Net (fake score, teacher) takes 2-6 minutes cold on one CPU core
(`first` is the cold compile time; later runs find inductor's cache and compile faster) and, measured, gains little
on the CPU; ask for it with `--compiled fastest|all`.
"""

import copy
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from edm_unet import CONFIGS as EDM_CONFIGS  # noqa: E402
import ikl  # noqa: E402
from ikl.divergences import autocast, edm_dsm_loss  # noqa: E402
from pipelines.generators import StyleGAN2Adapter  # noqa: E402
from stylegan2 import networks as sg2  # noqa: E402
from teachers import networks as edm  # noqa: E402
from torch_utils import compiling, custom_ops  # noqa: E402

G_CONFIGS = dict(
    small=dict(z_dim=128, w_dim=128, c_dim=0, img_resolution=32, img_channels=3, mapping_kwargs=dict(num_layers=2),
               synthesis_kwargs=dict(channel_base=2048, channel_max=128, num_fp16_res=4, conv_clamp=256)),
    cifar10=dict(z_dim=512, w_dim=512, c_dim=10, img_resolution=32, img_channels=3, mapping_kwargs=dict(num_layers=2),
                 synthesis_kwargs=dict(channel_base=32768, channel_max=512, num_fp16_res=4, conv_clamp=256)),
)
EDM_CONFIG = dict(small='small', cifar10='cifar10')
AMP = dict(fp32=None, bf16=torch.bfloat16)


class Variant:
    """One timed thing: `call()` runs it once, under its ops implementation."""

    def __init__(self, name, ops, call, reference=False):
        self.name, self.ops, self.call, self.reference = name, ops, call, reference
        self.first = None
        self.times = []

    def run(self):
        with custom_ops.ops_impl(self.ops):
            start = time.perf_counter()
            self.call()
            return time.perf_counter() - start


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def make_G(cfg, device):
    torch.manual_seed(0)
    return sg2.Generator(**G_CONFIGS[cfg]).train().to(device)


def make_edm(cfg, device):
    torch.manual_seed(0)
    return edm.EDMPrecond(**EDM_CONFIGS[EDM_CONFIG[cfg]]).to(device)


def quiet_compile(net, name):
    return compiling.compile_module(net, name, log=lambda line: None)


def g_variants(cfg, batch, device, with_compile):
    gen = torch.Generator(device=device).manual_seed(1)
    base = make_G(cfg, device)
    z = torch.randn([batch, base.z_dim], generator=gen, device=device)
    c = torch.nn.functional.one_hot(torch.arange(batch, device=device) % max(base.c_dim, 1), max(base.c_dim, 1)).float()
    c = c[:, :base.c_dim]

    def step(G, amp):
        def call():
            G.zero_grad(set_to_none=True)
            with autocast(G, device, AMP[amp]):
                img = G(z, c, force_fp32=device.type != 'cuda')
            img.float().square().mean().backward()
            sync(device)
        return call

    out = [Variant('reference ops, fp32', 'ref', step(copy.deepcopy(base), 'fp32'), reference=True)]
    for amp in ('fp32', 'bf16'):
        out.append(Variant(f'compiled ops, {amp}', 'auto', step(copy.deepcopy(base), amp)))
        if with_compile == 'all' or (with_compile == 'fastest' and amp == 'bf16'):
            out.append(Variant(f'compiled ops, {amp}, torch.compile', 'auto',
                               step(quiet_compile(copy.deepcopy(base), 'G'), amp)))
    return out


def fake_variants(cfg, batch, device, with_compile):
    base = make_edm(cfg, device).train().requires_grad_(True)
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn([batch, base.img_channels, base.img_resolution, base.img_resolution], generator=gen, device=device)
    labels = (torch.eye(base.label_dim, device=device)[torch.arange(batch, device=device) % base.label_dim]
              if base.label_dim else None)
    sigma = ikl.LogNormal()

    def step(net, amp):
        def call():
            net.zero_grad(set_to_none=True)
            loss = edm_dsm_loss(net, x, labels, sigma, torch.Generator(device=device).manual_seed(2), 0.5, AMP[amp])
            loss.sum().backward()
            sync(device)
        return call

    out = [Variant('eager, fp32', 'auto', step(copy.deepcopy(base), 'fp32'), reference=True),
           Variant('eager, bf16', 'auto', step(copy.deepcopy(base), 'bf16'))]
    for amp in {'all': ('fp32', 'bf16'), 'fastest': ('bf16',), 'none': ()}[with_compile]:
        out.append(Variant(f'torch.compile, {amp}', 'auto', step(quiet_compile(copy.deepcopy(base), 'fake'), amp)))
    return out


def refine_variants(cfg, batch, device, with_compile, run_dir):
    G, teacher = make_G(cfg, device), make_edm(cfg, device).eval()
    label_dim = teacher.label_dim if G.c_dim == teacher.label_dim else 0
    base = dict(batch=batch, batch_gpu=batch, total_kimg=1e6, progress=False, tensorboard=False, grid_size=0,
                snapshot_ticks=None, image_ticks=None, g_lr=1e-5, fake_lr=1e-5)

    def trainer(**opts):
        t = copy.deepcopy(teacher)
        adapter = StyleGAN2Adapter(copy.deepcopy(G), resolution=teacher.img_resolution, label_dim=label_dim)
        tr = ikl.Trainer(adapter, t, copy.deepcopy(t).train().requires_grad_(True), dict(base, **opts), run_dir,
                         device=device)

        def call():
            tr.step()
            sync(device)
        return call

    out = [Variant('official, reference ops, fp32', 'ref', trainer(schedule='official', fake_forward='separate'),
                   reference=True),
           Variant('official, compiled ops, fp32', 'auto', trainer(schedule='official', fake_forward='separate')),
           Variant('reuse, fp32', 'auto', trainer(schedule='reuse')),
           Variant('reuse, bf16', 'auto', trainer(schedule='reuse', precision='bf16'))]
    if with_compile != 'none':
        out.append(Variant('reuse, bf16, compile', 'auto', trainer(schedule='reuse', precision='bf16', compile=True)))
    return out


SECTIONS = dict(g='StyleGAN2 G forward+backward', fake='fake score DSM forward+backward', refine='one refine iteration')


@click.command()
@click.option('--sections', default='g,fake,refine', show_default=True, help='Comma-separated: g, fake, refine')
@click.option('--configs', default='small', show_default=True, help='Comma-separated: small, cifar10')
@click.option('--batch', type=click.IntRange(min=1), default=8, show_default=True)
@click.option('--repeats', type=click.IntRange(min=1), default=3, show_default=True, help='Timed calls per variant')
@click.option('--quick', is_flag=True, help='The small configuration, 2 repeats')
@click.option('--device', default='cpu', show_default=True, help='cpu or cuda')
@click.option('--threads', type=click.IntRange(min=1), help='torch.set_num_threads (CPU)')
@click.option('--compiled', type=click.Choice(['all', 'fastest', 'none']), default='all', show_default=True,
              help='torch.compile variants: fp32 and bf16, only the fastest (bf16), or none')
def main(sections, configs, batch, repeats, quick, device, threads, compiled):
    if threads:
        torch.set_num_threads(threads)
    per_section = dict(g=compiled, fake=compiled, refine=compiled)
    if quick:  # Compiling the U-Nets takes minutes on a CPU core (and gains little there): G only.
        configs, repeats = 'small', 5
        per_section = dict(g='fastest', fake='none', refine='none')
    device = torch.device(device)
    names = [s.strip() for s in sections.split(',') if s.strip()]
    cfgs = [s.strip() for s in configs.split(',') if s.strip()]
    for value, allowed, option in ((names, SECTIONS, '--sections'), (cfgs, G_CONFIGS, '--configs')):
        if any(v not in allowed for v in value):
            raise click.BadParameter(f'choose from {sorted(allowed)}', param_hint=option)
    rows = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter('ignore')
        for cfg in cfgs:
            for section in names:
                if section == 'g':
                    variants = g_variants(cfg, batch, device, per_section['g'])
                elif section == 'fake':
                    variants = fake_variants(cfg, batch, device, per_section['fake'])
                else:
                    variants = refine_variants(cfg, batch, device, per_section['refine'], tmp)
                for v in variants:
                    v.first = v.run()
                for _ in range(repeats):
                    for v in variants:
                        v.times.append(v.run())
                ref = statistics.median(next(v for v in variants if v.reference).times)
                for v in variants:
                    med = statistics.median(v.times)
                    failed = [c.failure for m in _modules(v) for c in [compiling.compiled_call(m)] if c and c.failure]
                    rows.append(dict(section=section, config=cfg, variant=v.name, ops=v.ops, median_sec=med,
                                     first_sec=v.first, speedup=ref / med, time_ratio=med / ref,
                                     reference=v.reference, compile_failed=failed[0] if failed else None))
                del variants

    print(f'{device.type}, batch {batch}, {torch.get_num_threads()} thread(s), median of {repeats} (interleaved), '
          f'torch {torch.__version__}, {time.perf_counter() - started:.0f} s in all')
    print(f'{"section":<8}{"config":<9}{"variant":<34}{"sec":>9}{"first":>9}{"speed-up":>10}{"time ratio":>12}')
    for r in rows:
        note = f'  (compile failed: {r["compile_failed"]})' if r['compile_failed'] else ''
        print(f'{r["section"]:<8}{r["config"]:<9}{r["variant"]:<34}{r["median_sec"]:>9.3f}{r["first_sec"]:>9.1f}'
              f'{r["speedup"]:>9.2f}x{r["time_ratio"]:>12.3f}{note}')
    goals = {}
    for cfg in cfgs:
        for section in ('g', 'fake'):
            best = [r for r in rows if r['section'] == section and r['config'] == cfg]
            if best:
                top = max(best, key=lambda r: r['speedup'])
                goals[f'{section}/{cfg}'] = dict(best=top['variant'], speedup=round(top['speedup'], 3),
                                                 goal='>= 1.5', met=top['speedup'] >= 1.5)
        it = [r for r in rows if r['section'] == 'refine' and r['config'] == cfg and not r['reference']]
        if it:
            top = min(it, key=lambda r: r['time_ratio'])
            goals[f'refine/{cfg}'] = dict(best=top['variant'], time_ratio=round(top['time_ratio'], 3),
                                          goal='<= 0.5', met=top['time_ratio'] <= 0.5)
    print(json.dumps(dict(bench='speed', device=device.type, batch=batch, repeats=repeats,
                          threads=torch.get_num_threads(), torch=torch.__version__, results=rows, goals=goals)))


def _modules(variant):
    """The modules a variant's closure compiled (for reporting a compile failure)."""
    found = []
    for cell in variant.call.__closure__ or ():
        value = cell.cell_contents
        if isinstance(value, torch.nn.Module):
            found.append(value)
        elif isinstance(value, ikl.Trainer):
            found += [*value.adapter.children(), value.teacher] + ([value.fake_score] if value.fake_score is not None else [])
    return found


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
