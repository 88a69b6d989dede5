"""Issue 22's fast paths: SDPA attention in the EDM U-Nets, bf16 that really computes in bf16 (EDM preconditioners
and StyleGAN2 synthesis under CPU autocast), and the multi-tensor/fused Adam.

Tolerances (CPU, torch 2.13): SDPA vs an explicit einsum softmax within 1e-5 in float32; float16 inputs within
2e-3 and bfloat16 within 2e-2 of float32 relative to the output's scale; whole networks under bf16 autocast within
5% of the float32 output's scale (bfloat16 keeps 8 mantissa bits, about 0.4% per rounding, compounded by depth).
"""

import copy
import os
import sys
import warnings

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ikl  # noqa: E402
from ikl import divergences  # noqa: E402
from stylegan2 import networks as sg2  # noqa: E402
from teachers import networks as edm  # noqa: E402
from torch_utils import misc  # noqa: E402


def einsum_attention(q, k, v):
    """Written out independently of the networks: float32 logits and softmax, then the weighted sum of v."""
    c = q.shape[1]
    logits = torch.einsum('bci,bcj->bij', q.double(), k.double()) / np.sqrt(c)
    weights = torch.softmax(logits, dim=2)
    return torch.einsum('bij,bcj->bci', weights, v.double()).to(q.dtype)


def _randomise(net, seed=0, scale=0.2):
    """Non-zero weights everywhere (EDM zero-initialises its output layers, which would hide the U-Net)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return net


def _unet(model_type='SongUNet', **kwargs):
    torch.manual_seed(0)
    if model_type == 'SongUNet':
        kwargs = dict(dict(model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8]), **kwargs)
    else:
        kwargs = dict(dict(model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8, 4]), **kwargs)
    net = edm.EDMPrecond(img_resolution=16, img_channels=3, label_dim=0, model_type=model_type, **kwargs).eval()
    return _randomise(net)


# ----------------------------------------------------------------------------------------------------------------
# Attention.


@pytest.mark.parametrize('shape', [(2, 64, 16), (6, 8, 64), (1, 32, 256), (3, 5, 7)])
def test_attend_equals_einsum_softmax_in_float32(shape):
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(shape, generator=gen) * 2 for _ in range(3))
    out = edm.attend(q, k, v)
    assert out.dtype == torch.float32 and list(out.shape) == list(shape)
    torch.testing.assert_close(out, einsum_attention(q, k, v), atol=1e-5, rtol=0)


def test_attend_on_non_contiguous_views_like_the_unet():
    """The block hands strided views of its interleaved qkv tensor; the result must not depend on the layout."""
    gen = torch.Generator().manual_seed(2)
    qkv = torch.randn(4, 16, 3, 64, generator=gen)
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    torch.testing.assert_close(edm.attend(q, k, v), einsum_attention(q, k, v), atol=1e-5, rtol=0)


@pytest.mark.parametrize('dtype,tol', [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_attend_half_inputs_keep_float32_softmax(dtype, tol):
    """Large logits (|q.k|/sqrt(c) up to ~1e5, beyond float16's range) stay finite and match float32: the
    products and the softmax are not formed in the half dtype."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 64, 32, generator=gen) for _ in range(3))
    q, k = q * 60, k * 60
    out = edm.attend(q.to(dtype), k.to(dtype), v.to(dtype))
    assert out.dtype == dtype and bool(torch.isfinite(out).all())
    # Rounding q and k to the half dtype moves logits of this size by O(1), so compare with the rounded inputs.
    ref_rounded = einsum_attention(q.to(dtype).float(), k.to(dtype).float(), v.to(dtype).float())
    assert (out.float() - ref_rounded).abs().max() <= tol * ref_rounded.abs().max()
    # Ordinary logits: close to the float32 result of the unrounded inputs.
    q, k = q / 60, k / 60
    out = edm.attend(q.to(dtype), k.to(dtype), v.to(dtype)).float()
    assert (out - einsum_attention(q, k, v)).abs().max() <= tol * 4 * v.abs().max()


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_attend_math_backend_half_inputs_stay_finite(dtype):
    """The math fallback (what a GPU without flash/memory-efficient kernels gets) also upcasts half inputs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    gen = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(2, 64, 32, generator=gen) for _ in range(3))
    q, k = (q * 60).to(dtype), (k * 60).to(dtype)
    ref = einsum_attention(q.float(), k.float(), v.to(dtype).float())
    with sdpa_kernel(SDPBackend.MATH):
        out = edm.attend(q, k, v.to(dtype))
    assert bool(torch.isfinite(out).all())
    assert (out.float() - ref).abs().max() <= 2e-2 * ref.abs().max()


@pytest.mark.parametrize('model_type', ['SongUNet', 'DhariwalUNet'])
def test_unet_with_sdpa_equals_the_einsum_path(monkeypatch, model_type):
    """The whole denoiser, forward and input gradient, with SDPA vs with the einsum reference patched in."""
    net = _unet(model_type)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    sigma = torch.tensor([0.3, 1.0, 5.0])

    def run():
        xi = x.clone().requires_grad_(True)
        out = net(xi, sigma)
        (grad,) = torch.autograd.grad(out.square().sum(), xi)
        return out.detach(), grad

    out, grad = run()
    monkeypatch.setattr(edm, 'attend', einsum_attention)
    ref_out, ref_grad = run()
    assert ref_out.abs().max() > 0.1  # the U-Net (not only the skip path) contributes
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(grad, ref_grad, atol=1e-4, rtol=1e-5)


def test_attend_falls_back_without_sdpa(monkeypatch):
    """A torch without scaled_dot_product_attention (readers of our pickles on torch 1.x) takes the einsum path."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 16, 9, generator=gen) for _ in range(3))
    monkeypatch.delattr(torch.nn.functional, 'scaled_dot_product_attention')
    torch.testing.assert_close(edm.attend(q, k, v), einsum_attention(q, k, v), atol=1e-5, rtol=0)


def test_unet_state_dict_and_pickle_layout_unchanged():
    """Names of parameters and buffers are those of EDM's UNetBlock (no new tensors for the attention)."""
    net = _unet()
    block = net.model.enc['8x8_block0']
    assert sorted(n for n, _ in block.named_parameters()) == sorted(
        f'{m}.{p}' for m in ('norm0', 'conv0', 'affine', 'norm1', 'conv1', 'skip', 'norm2', 'qkv', 'proj')
        for p in ('weight', 'bias'))
    assert set(block.state_dict()) == {n for n, _ in block.named_parameters()}
    assert not any('supports_autocast' in vars(m) for m in net.modules())  # a class attribute, not pickled state


# ----------------------------------------------------------------------------------------------------------------
# bf16 that computes in bf16.


def _record_conv_dtypes(net, kinds):
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append((i[0].dtype, o.dtype)))
             for m in net.modules() if isinstance(m, kinds)]
    return seen, hooks


def test_edm_denoiser_under_bf16_autocast_computes_in_bf16():
    net = _unet()
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    sigma = torch.tensor([0.2, 0.7, 2.0, 10.0])
    with torch.no_grad():
        ref = net(x, sigma)
        seen, hooks = _record_conv_dtypes(net, (edm.Conv2d,))
        with divergences.autocast(net, x.device, torch.bfloat16):
            out = net(x, sigma)
        for h in hooks:
            h.remove()
    assert seen and all(o == torch.bfloat16 for _, o in seen)
    assert sum(i == torch.bfloat16 for i, _ in seen) >= len(seen) - 1  # all but the first conv get bf16 inputs
    assert out.dtype == torch.float32
    # Compare the network part c_out * F (the skip part c_skip * x is exact in both).
    assert not torch.equal(out, ref)
    assert (out - ref).abs().max() <= 0.05 * (ref - x * 0.25 / (sigma.reshape(-1, 1, 1, 1) ** 2 + 0.25)).abs().max()


def test_stylegan2_synthesis_under_bf16_autocast_computes_in_bf16():
    torch.manual_seed(0)
    G = sg2.Generator(z_dim=32, c_dim=0, w_dim=32, img_resolution=16, img_channels=3,
                      synthesis_kwargs=dict(channel_base=1024, channel_max=64, num_fp16_res=2, conv_clamp=256))
    z = torch.randn(4, 32, generator=torch.Generator().manual_seed(7))
    for mode in ('train', 'eval'):
        getattr(G, mode)()
        G_ref = copy.deepcopy(G)
        ref = G_ref(z, None, noise_mode='const')
        seen, hooks = _record_conv_dtypes(G, (sg2.SynthesisLayer, sg2.ToRGBLayer))
        with divergences.autocast(G, z.device, torch.bfloat16):
            img = G(z, None, noise_mode='const')
        for h in hooks:
            h.remove()
        assert all(o == torch.bfloat16 for _, o in seen) and len(seen) == 8  # 4x4: conv1, torgb; 8x8 and 16x16: conv0, conv1, torgb
        assert img.dtype == torch.float32
        assert not torch.equal(img, ref)
        assert (img - ref).abs().max() <= 0.05 * ref.abs().max()
        img.square().mean().backward()  # the backward runs too, with float32 parameter gradients
        assert all(p.grad is None or p.grad.dtype == torch.float32 for p in G.parameters())
        G.zero_grad(set_to_none=True)


def test_autocast_policy():
    net = _unet()
    dev = torch.device('cpu')

    def inside(module, dtype):
        with divergences.autocast(module, dev, dtype):
            return torch.is_autocast_enabled('cpu')

    assert not inside(net, None)
    assert inside(net, torch.bfloat16)  # ours: real bf16
    assert not inside(net, torch.float16)  # fp16 stays with the networks' own use_fp16 switch
    assert inside(torch.nn.Linear(2, 2), torch.float16) and inside(torch.nn.Linear(2, 2), torch.bfloat16)

    class Upstreamish(torch.nn.Module):  # has native precision, does not announce autocast support
        def __init__(self):
            super().__init__()
            self.use_fp16 = False

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        assert not inside(Upstreamish(), torch.bfloat16)
        assert not inside(Upstreamish(), torch.bfloat16)
    assert len([w for w in caught if 'float32, not bfloat16' in str(w.message)]) == 1


def test_fp16_with_loss_scaling_still_uses_the_native_switch(tmp_path):
    """fp16: no autocast for native networks (they run float32 on the CPU), dynamic loss scaling on."""
    teacher = edm.EDMPrecond(img_resolution=8, img_channels=3, model_type='SongUNet', model_channels=8,
                             channel_mult=[1], num_blocks=1, attn_resolutions=[8])
    adapter = ikl.OneStepStudentAdapter.from_teacher(teacher, sigma_init=1.0)
    opts = dict(total_kimg=0.008, batch=4, batch_gpu=4, tick_kimg=0.008, progress=False, tensorboard=False,
                sigma_data=0.5, image_ticks=None, snapshot_ticks=None, precision='fp16', seed=1)
    trainer = ikl.Trainer(adapter, teacher, copy.deepcopy(teacher), opts, str(tmp_path))
    seen, hooks = _record_conv_dtypes(trainer.teacher, (edm.Conv2d,))
    trainer.step()
    for h in hooks:
        h.remove()
    assert seen and all(o == torch.float32 for _, o in seen)
    assert trainer.g_scaler.scale == 2.0 ** 15 * 0.5 ** trainer.g_scaler.skipped
    assert all(bool(torch.isfinite(p).all()) for p in trainer.g_params)


def test_engine_bf16_runs_teacher_and_student_in_bf16(tmp_path):
    teacher = edm.EDMPrecond(img_resolution=8, img_channels=3, model_type='SongUNet', model_channels=8,
                             channel_mult=[1], num_blocks=1, attn_resolutions=[8])
    adapter = ikl.OneStepStudentAdapter.from_teacher(teacher, sigma_init=1.0)
    opts = dict(total_kimg=0.008, batch=4, batch_gpu=4, tick_kimg=0.008, progress=False, tensorboard=False,
                sigma_data=0.5, image_ticks=None, snapshot_ticks=None, precision='bf16', seed=1)
    trainer = ikl.Trainer(adapter, teacher, copy.deepcopy(teacher), opts, str(tmp_path))
    seen_t, hooks_t = _record_conv_dtypes(trainer.teacher, (edm.Conv2d,))
    seen_g, hooks_g = _record_conv_dtypes(trainer.adapter, (edm.Conv2d,))
    trainer.step()
    for h in hooks_t + hooks_g:
        h.remove()
    assert seen_t and all(o == torch.bfloat16 for _, o in seen_t)
    assert seen_g and all(o == torch.bfloat16 for _, o in seen_g)
    assert all(p.dtype == torch.float32 and bool(torch.isfinite(p).all()) for p in trainer.g_params)
    assert trainer.g_scaler.skipped == 0


# ----------------------------------------------------------------------------------------------------------------
# Adam.


def test_adam_kernel_choice():
    assert misc.adam_kernel_kwargs([torch.zeros(2)]) == dict(foreach=True)
    assert misc.make_adam([torch.nn.Parameter(torch.zeros(2))], lr=1e-3).defaults['foreach'] is True
    assert misc.make_adam([torch.nn.Parameter(torch.zeros(2))], lr=1e-3, foreach=False).defaults['foreach'] is False
    groups = [dict(params=[torch.nn.Parameter(torch.zeros(2))], lr=1e-2)]
    assert misc.make_adam(groups, lr=1e-3).defaults['foreach'] is True


@pytest.mark.parametrize('kernel', [dict(foreach=True), dict(fused=True)])
def test_multi_tensor_adam_matches_the_loop(kernel):
    """Ten steps on a small network with changing lr: the same parameters as the per-parameter Adam."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.SiLU(), torch.nn.Linear(16, 4))
    nets = [net, copy.deepcopy(net)]
    opts = [torch.optim.Adam(nets[0].parameters(), lr=1e-2, betas=(0.0, 0.99), eps=1e-8, foreach=False),
            torch.optim.Adam(nets[1].parameters(), lr=1e-2, betas=(0.0, 0.99), eps=1e-8, **kernel)]
    gen = torch.Generator().manual_seed(1)
    for step in range(10):
        x = torch.randn(32, 8, generator=gen)
        for n, o in zip(nets, opts):
            for group in o.param_groups:
                group['lr'] = 1e-2 * (step + 1) / 10
            o.zero_grad(set_to_none=True)
            n(x).square().mean().backward()
            o.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_engine_and_fake_score_use_multi_tensor_adam(tmp_path):
    from ikl.toy import MLPDenoiser, MLPGenerator
    from teachers.analytic import ring8
    torch.manual_seed(0)
    trainer = ikl.Trainer(ikl.ModuleAdapter(MLPGenerator(2, 2, 32, 2), [2]), ring8(), MLPDenoiser(2, 32, 2, sigma_data=1.0),
                          dict(total_kimg=0.032, batch=16, progress=False, tensorboard=False, sigma_data=1.0), str(tmp_path))
    assert trainer.g_opt.defaults['foreach'] is True and trainer.fake.opt.defaults['foreach'] is True


def test_bf16_rebuilds_an_old_source_teacher():
    """The shipped teacher pickle runs its own (older) embedded source, which ignores autocast: refine.py and
    distill.py --precision=bf16 rebuild it as ours (pipelines.cli.bf16_ready), with the same outputs in float32."""
    import teachers
    from pipelines import cli
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'embedded', 'fmnist-edm.pkl')
    old = teachers.load(path)
    assert not divergences.supports_autocast(old)
    new = cli.bf16_ready(old, torch.device('cpu'))
    assert new is not old and divergences.supports_autocast(new) and new.training == old.training
    assert cli.bf16_ready(new, torch.device('cpu')) is new
    x, sigma = torch.randn([2, old.img_channels, old.img_resolution, old.img_resolution]), torch.tensor([0.5, 3.0])
    labels = torch.eye(old.label_dim)[:2] if old.label_dim else None
    with torch.no_grad():
        assert torch.allclose(new(x, sigma, labels), old(x, sigma, labels), atol=1e-5)
