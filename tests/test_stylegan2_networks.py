"""StyleGAN2 networks: shapes, names, and layer maths against closed forms or direct re-computations."""

import ast
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stylegan2 import networks

ARCHS = ('orig', 'skip', 'resnet')


def tiny_G(architecture='skip', c_dim=0, res=16, seed=0, **synthesis_kwargs):
    torch.manual_seed(seed)
    return networks.Generator(z_dim=8, c_dim=c_dim, w_dim=8, img_resolution=res, img_channels=3,
                              mapping_kwargs=dict(num_layers=2),
                              synthesis_kwargs=dict(channel_base=128, channel_max=16, architecture=architecture,
                                                    **synthesis_kwargs))


def tiny_D(architecture='resnet', c_dim=0, res=16, seed=0, **kwargs):
    torch.manual_seed(seed)
    return networks.Discriminator(c_dim=c_dim, img_resolution=res, img_channels=3, architecture=architecture,
                                  channel_base=128, channel_max=16, mapping_kwargs=dict(num_layers=1), **kwargs)


def randomize_noise_strength(G, value=0.5):
    with torch.no_grad():
        for name, p in G.named_parameters():
            if name.endswith('noise_strength'):
                p.fill_(value)


@pytest.mark.parametrize('architecture', ARCHS)
@pytest.mark.parametrize('c_dim', [0, 4])
def test_shapes_every_architecture(architecture, c_dim):
    G = tiny_G(architecture, c_dim, num_fp16_res=2, conv_clamp=256).eval()
    D = tiny_D(architecture, c_dim, num_fp16_res=2, conv_clamp=256).eval()
    assert G.num_ws == 2 * int(np.log2(16)) - 2
    z = torch.randn([4, 8])
    c = torch.eye(4)[[0, 1, 2, 3]][:, :c_dim]
    img = G(z, c, noise_mode='const')
    assert img.shape == (4, 3, 16, 16) and img.dtype == torch.float32 and torch.isfinite(img).all()
    logits = D(img, c)
    assert logits.shape == (4, 1) and logits.dtype == torch.float32
    # torgb exists in every block only for 'skip'; only the last block carries one otherwise.
    has_torgb = [hasattr(getattr(G.synthesis, f'b{r}'), 'torgb') for r in (4, 8, 16)]
    assert has_torgb == ([True, True, True] if architecture == 'skip' else [False, False, True])
    assert hasattr(G.synthesis.b8, 'skip') == (architecture == 'resnet')
    assert hasattr(D.b16, 'skip') == (architecture == 'resnet')
    assert hasattr(D.b8, 'fromrgb') == (architecture == 'skip')


def test_state_dict_names_and_order_match_upstream_layout():
    G = tiny_G('skip', c_dim=4)
    keys = list(G.state_dict())
    assert keys[:9] == ['synthesis.b4.const', 'synthesis.b4.resample_filter', 'synthesis.b4.conv1.weight',
                        'synthesis.b4.conv1.noise_strength', 'synthesis.b4.conv1.bias',
                        'synthesis.b4.conv1.resample_filter', 'synthesis.b4.conv1.noise_const',
                        'synthesis.b4.conv1.affine.weight', 'synthesis.b4.conv1.affine.bias']
    assert keys.index('mapping.w_avg') < keys.index('mapping.embed.weight') < keys.index('mapping.fc0.weight')
    sd = G.state_dict()
    assert sd['synthesis.b8.conv0.noise_const'].shape == (8, 8)
    assert sd['synthesis.b4.conv1.noise_strength'].shape == ()
    assert sd['synthesis.b16.torgb.weight'].shape == (3, 8, 1, 1)
    assert 'synthesis.b16.torgb.resample_filter' not in sd
    assert torch.allclose(sd['synthesis.b4.resample_filter'], torch.outer(*[torch.tensor([1., 3, 3, 1])] * 2) / 64)
    D = tiny_D('resnet', c_dim=4)
    dkeys = list(D.state_dict())
    assert dkeys[:4] == ['b16.resample_filter', 'b16.fromrgb.weight', 'b16.fromrgb.bias',
                         'b16.fromrgb.resample_filter']
    assert 'b16.skip.weight' in dkeys and 'b16.skip.bias' not in dkeys
    assert D.state_dict()['b4.conv.weight'].shape == (16, 17, 3, 3)  # + 1 minibatch-std channel
    assert 'mapping.w_avg' not in dkeys and 'mapping.embed.weight' in dkeys


def test_reference_parameter_counts():
    """Spec A.15: parameter and state-dict counts of the official 32x32 conditional configuration."""
    G = networks.Generator(512, 10, 512, 32, 3, mapping_kwargs=dict(num_layers=2))
    D = networks.Discriminator(10, 32, 3, architecture='orig')
    assert sum(p.numel() for p in G.parameters()) == 20_215_315 and len(G.state_dict()) == 77
    assert sum(p.numel() for p in D.parameters()) == 23_089_664 and len(D.state_dict()) == 49
    assert G.num_ws == 8


def test_fully_connected_equalised_learning_rate_closed_form():
    torch.manual_seed(1)
    layer = networks.FullyConnectedLayer(5, 3, lr_multiplier=0.1, bias_init=2)
    with torch.no_grad():
        layer.bias.copy_(torch.tensor([2.0, -1.0, 0.5]))
    x = torch.randn(4, 5)
    expected = x @ (layer.weight * 0.1 / np.sqrt(5)).T + layer.bias * 0.1
    assert torch.allclose(layer(x), expected, atol=1e-6)
    lrelu = networks.FullyConnectedLayer(5, 3, activation='lrelu')
    pre = x @ (lrelu.weight / np.sqrt(5)).T
    assert torch.allclose(lrelu(x), F.leaky_relu(pre, 0.2) * np.sqrt(2), atol=1e-6)


@pytest.mark.parametrize('fused', [True, False])
@pytest.mark.parametrize('demodulate', [True, False])
def test_modulated_conv2d_matches_per_sample_convolution(fused, demodulate):
    torch.manual_seed(2)
    x, weight, styles = torch.randn(3, 4, 6, 6), torch.randn(5, 4, 3, 3), torch.randn(3, 4)
    noise = torch.randn(3, 1, 6, 6)
    out = networks.modulated_conv2d(x, weight, styles, noise=noise, padding=1, demodulate=demodulate,
                                    fused_modconv=fused)
    for n in range(3):
        w = weight * styles[n].reshape(1, 4, 1, 1)
        if demodulate:
            w = w / w.square().sum(dim=[1, 2, 3], keepdim=True).add(1e-8).sqrt()
        expected = F.conv2d(x[n:n + 1], w, padding=1) + noise[n:n + 1]
        assert torch.allclose(out[n:n + 1], expected, atol=1e-5)


def test_minibatch_std_groups_samples_with_stride():
    torch.manual_seed(3)
    layer = networks.MinibatchStdLayer(group_size=2, num_channels=1)
    x = torch.randn(6, 4, 3, 3)
    y = layer(x)
    assert y.shape == (6, 5, 3, 3) and torch.equal(y[:, :4], x)
    n = 3  # six samples, groups of two: sample i belongs to group i % 3
    for i in range(6):
        members = x[[i % n, i % n + n]]
        sigma = (members.var(dim=0, unbiased=False) + 1e-8).sqrt().mean()
        assert torch.allclose(y[i, 4], sigma.expand(3, 3), atol=1e-6)


def test_truncation_and_cutoff():
    G = tiny_G().eval()
    with torch.no_grad():
        G.mapping.w_avg.copy_(torch.randn(8))
    z = torch.randn(3, 8)
    ws = G.mapping(z, None)
    assert ws.shape == (3, G.num_ws, 8) and torch.equal(ws[:, 0], ws[:, -1])
    ws_t = G.mapping(z, None, truncation_psi=0.5)
    assert torch.allclose(ws_t, G.mapping.w_avg + 0.5 * (ws - G.mapping.w_avg), atol=1e-6)
    ws_c = G.mapping(z, None, truncation_psi=0.5, truncation_cutoff=2)
    assert torch.allclose(ws_c[:, :2], ws_t[:, :2]) and torch.equal(ws_c[:, 2:], ws[:, 2:])
    assert torch.allclose(G.mapping(z, None, truncation_psi=0), G.mapping.w_avg.expand(3, G.num_ws, 8))


def test_w_avg_tracks_batch_mean_only_in_training_mode():
    G = tiny_G()
    beta = G.mapping.w_avg_beta
    z = torch.randn(5, 8)
    G.eval()
    G.mapping(z, None)
    assert torch.equal(G.mapping.w_avg, torch.zeros(8))
    G.train()
    w = G.mapping(z, None)[:, 0].detach()
    assert torch.allclose(G.mapping.w_avg, (1 - beta) * w.mean(0), atol=1e-7)
    before = G.mapping.w_avg.clone()
    G.mapping(z, None, skip_w_avg_update=True)
    assert torch.equal(G.mapping.w_avg, before)


def test_noise_modes():
    G = tiny_G().eval()
    randomize_noise_strength(G)
    z = torch.randn(2, 8)
    const_a, const_b = G(z, None, noise_mode='const'), G(z, None, noise_mode='const')
    assert torch.equal(const_a, const_b)
    assert not torch.allclose(G(z, None, noise_mode='random'), G(z, None, noise_mode='random'))
    assert not torch.allclose(G(z, None, noise_mode='none'), const_a)
    torch.manual_seed(7)
    rand_a = G(z, None, noise_mode='random')
    torch.manual_seed(7)
    assert torch.equal(rand_a, G(z, None, noise_mode='random'))


def test_fused_and_unfused_generator_agree():
    G = tiny_G('resnet')
    randomize_noise_strength(G)
    ws = G.mapping(torch.randn(3, 8), None)
    a = G.synthesis(ws, noise_mode='const', fused_modconv=True)
    b = G.synthesis(ws, noise_mode='const', fused_modconv=False)
    assert torch.allclose(a, b, atol=1e-5)


def test_fp16_blocks_run_in_fp32_on_cpu():
    G = tiny_G(num_fp16_res=2)
    D = tiny_D(num_fp16_res=2)
    assert G.synthesis.b16.use_fp16 and G.synthesis.b8.use_fp16 and not G.synthesis.b4.use_fp16
    z = torch.randn(2, 8)
    img = G(z, None, noise_mode='const')
    assert torch.equal(img, G(z, None, noise_mode='const', force_fp32=True))
    x, _ = G.synthesis.b4(None, None, G.mapping(z, None)[:, :2], force_fp32=False)
    out, _ = G.synthesis.b8(x, None, G.mapping(z, None)[:, 1:4])
    assert out.dtype == torch.float32
    assert torch.equal(D(img, None), D(img, None, force_fp32=True))


def test_conv_clamp_bounds_orig_output():
    G = tiny_G('orig', conv_clamp=0.05).eval()
    img = G(torch.randn(4, 8) * 3, None, noise_mode='const')
    assert img.abs().max() <= 0.05 + 1e-7 and img.abs().max() > 0.04


def test_class_conditioning_changes_outputs():
    G, D = tiny_G(c_dim=3).eval(), tiny_D(c_dim=3).eval()
    z = torch.randn(1, 8).repeat(2, 1)
    c = torch.eye(3)[[0, 1]]
    img = G(z, c, noise_mode='const')
    assert not torch.allclose(img[0], img[1])
    same = img[:1].repeat(2, 1, 1, 1)
    logits = D(same, c)
    assert not torch.allclose(logits[0], logits[1])


def test_freeze_layers_keeps_names_but_not_parameters():
    D = tiny_D(block_kwargs=dict(freeze_layers=2))
    params = dict(D.named_parameters())
    assert 'b16.fromrgb.weight' not in params and 'b16.conv0.weight' not in params
    assert 'b16.conv1.weight' in params
    assert 'b16.fromrgb.weight' in D.state_dict() and 'b16.conv0.bias' in D.state_dict()


def test_embedded_source_uses_only_upstream_available_names():
    """The pickled module source must run inside NVIDIA's tools: check its imports and torch_utils symbols."""
    src = networks.Generator._orig_module_src
    tree = ast.parse(src)
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported |= {f'{node.module}.{alias.name}' for alias in node.names}
    assert imported == {'numpy', 'torch', 'torch_utils.misc', 'torch_utils.persistence', 'torch_utils.ops.bias_act',
                        'torch_utils.ops.conv2d_resample', 'torch_utils.ops.fma', 'torch_utils.ops.upfirdn2d'}
    allowed = {'misc': {'assert_shape', 'profiled_function', 'suppress_tracer_warnings', 'constant'},
               'persistence': {'persistent_class'}, 'conv2d_resample': {'conv2d_resample'},
               'upfirdn2d': {'setup_filter', 'upsample2d', 'downsample2d'},
               'bias_act': {'bias_act', 'activation_funcs'}, 'fma': {'fma'}}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in allowed:
            assert node.attr in allowed[node.value.id], f'{node.value.id}.{node.attr} is not in upstream torch_utils'
    assert os.path.basename(networks.__file__) == 'networks.py'


def test_modulated_conv2d_half_precision_prenormalisation():
    """The fp16 path rescales weight and styles before demodulation; the result must not change beyond rounding."""
    torch.manual_seed(5)
    x, weight, styles = torch.randn(2, 4, 6, 6), torch.randn(5, 4, 3, 3) * 30, torch.randn(2, 4) * 500
    reference = networks.modulated_conv2d(x, weight, styles, padding=1, fused_modconv=False)
    for fused in (True, False):
        half = networks.modulated_conv2d(x.half(), weight, styles, padding=1, fused_modconv=fused)
        assert half.dtype == torch.float16
        assert torch.allclose(half.float(), reference, atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize('architecture,channels_last', [('skip', True), ('resnet', False)])
def test_fp16_code_path_matches_fp32(monkeypatch, architecture, channels_last):
    """The half-precision path (normally CUDA only) run on the CPU: casts, memory formats and shapes hold, and
    the result equals the float32 one up to half-precision rounding."""
    monkeypatch.setattr(networks, 'block_dtype', lambda use_fp16, force_fp32, device:
                        torch.float16 if use_fp16 and not force_fp32 else torch.float32)
    G = tiny_G(architecture, num_fp16_res=2, conv_clamp=256, fp16_channels_last=channels_last).eval()
    D = tiny_D(architecture, num_fp16_res=2, conv_clamp=256, block_kwargs=dict(fp16_channels_last=channels_last))
    z = torch.randn(2, 8)
    ws = G.mapping(z, None)
    b4, b8 = G.synthesis.b4, G.synthesis.b8
    x, img = b4(None, None, ws[:, :b4.num_conv + b4.num_torgb])
    x, img = b8(x, img, ws[:, b4.num_conv:b4.num_conv + b8.num_conv + b8.num_torgb])
    assert x.dtype == torch.float16 and (img is None or img.dtype == torch.float32)
    assert x.is_contiguous(memory_format=torch.channels_last) == channels_last
    half, full = G(z, None, noise_mode='const'), G(z, None, noise_mode='const', force_fp32=True)
    assert half.dtype == torch.float32 and torch.allclose(half, full, atol=2e-2)
    assert not torch.equal(half, full)  # it really ran in half precision
    assert torch.allclose(D(full, None), D(full, None, force_fp32=True), atol=2e-2)
