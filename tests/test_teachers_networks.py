"""EDM networks: every architecture and preconditioner builds and runs; layers and preconditioning against closed
forms and independent computations; shipped configurations have the upstream parameter and key counts."""


import numpy as np
import pytest
import torch

from teachers import networks
from teachers.loss import EDMLoss, VELoss, VPLoss
from teachers.networks import Conv2d, DhariwalUNet, EDMPrecond, PositionalEmbedding, SongUNet, UNetBlock, \
    VEPrecond, VPPrecond, iDDPMPrecond


TINY_SONG = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0.1)
TINY_ADM = dict(model_channels=64, channel_mult=[1, 1], num_blocks=1, attn_resolutions=[8], dropout=0.1)
ARCHS = {
    'ddpmpp': dict(model_type='SongUNet', **TINY_SONG),
    'ncsnpp': dict(model_type='SongUNet', embedding_type='fourier', encoder_type='residual', channel_mult_noise=2,
                   resample_filter=[1, 3, 3, 1], **TINY_SONG),
    'skip-skip': dict(model_type='SongUNet', encoder_type='skip', decoder_type='skip', **TINY_SONG),
    'adm': dict(model_type='DhariwalUNet', **TINY_ADM),
}
PRECONDS = [EDMPrecond, VPPrecond, VEPrecond, iDDPMPrecond]


def randomize_zero_init(net, seed=0):
    """Give zero/tiny-initialised layers random values so the whole network shows in the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return net


@pytest.mark.parametrize('arch', list(ARCHS))
@pytest.mark.parametrize('precond', PRECONDS, ids=lambda c: c.__name__)
def test_every_architecture_and_preconditioner_runs(arch, precond):
    torch.manual_seed(0)
    net = precond(img_resolution=16, img_channels=3, label_dim=4, augment_dim=9, **ARCHS[arch])
    randomize_zero_init(net)
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    sigma = torch.tensor([0.3, 5.0])
    labels = torch.eye(4)[[1, 3]]
    out = net(x, sigma, labels, augment_labels=torch.randn(2, 9))
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in net.model.parameters())
    for name in ('img_resolution', 'img_channels', 'label_dim', 'sigma_min', 'sigma_max'):
        assert hasattr(net, name)
    # Scalar sigma and missing labels broadcast: zeros([1, label_dim]) for the labels.
    net.eval()
    with torch.no_grad():
        a = net(x[:1], torch.tensor(0.3), None)
        b = net(x[:1], torch.tensor([0.3]), torch.zeros(1, 4))
    assert torch.equal(a, b)


def test_labels_change_conditional_output_and_dropout_only_in_training():
    torch.manual_seed(1)
    net = randomize_zero_init(EDMPrecond(16, 3, label_dim=4, label_dropout=1.0, **ARCHS['ddpmpp'])).eval()
    x, sigma = torch.randn(1, 3, 16, 16), torch.tensor([1.0])
    with torch.no_grad():
        d0 = net(x, sigma, torch.eye(4)[[0]])
        d1 = net(x, sigma, torch.eye(4)[[1]])
        dz = net(x, sigma, torch.zeros(1, 4))
        assert (d0 - d1).abs().max() > 1e-4
        net.train()
        for block in net.model.modules():
            if isinstance(block, UNetBlock):
                block.dropout = 0
        dropped = net(x, sigma, torch.eye(4)[[0]])  # label_dropout = 1 zeroes every label row in training.
    assert torch.allclose(dropped, dz, atol=1e-6)

# ----------------------------------------------------------------------------------------------------------------
# Layers.


def test_conv2d_resampling_with_box_filter_is_pooling_and_nearest_upsampling():
    x = torch.randn(2, 3, 8, 8)
    down = Conv2d(3, 3, kernel=0, down=True)
    up = Conv2d(3, 3, kernel=0, up=True)
    assert torch.equal(down.resample_filter, torch.full([1, 1, 2, 2], 0.25))
    assert torch.allclose(down(x), torch.nn.functional.avg_pool2d(x, 2), atol=1e-6)
    assert torch.allclose(up(x), x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3), atol=1e-6)
    assert list(Conv2d(3, 5, 3).state_dict()) == ['weight', 'bias']  # No filter buffer without resampling.
    f = Conv2d(3, 3, kernel=0, up=True, resample_filter=[1, 3, 3, 1]).resample_filter
    assert torch.allclose(f[0, 0], torch.outer(torch.tensor([1., 3, 3, 1]), torch.tensor([1., 3, 3, 1])) / 64)


@pytest.mark.parametrize('fused', [False, True])
@pytest.mark.parametrize('filt', [[1, 1], [1, 3, 3, 1]])
def test_conv2d_resampling_shapes_and_constant_interior(fused, filt):
    """A constant image stays constant away from the border (the filter sums to 1, 4x for the transposed conv)."""
    x = torch.ones(1, 2, 8, 8)
    for kw, size in [(dict(up=True), 16), (dict(down=True), 4)]:
        conv = Conv2d(2, 4, kernel=3, bias=False, resample_filter=filt, fused_resample=fused, **kw)
        y = conv(x)
        assert list(y.shape) == [1, 4, size, size]
        inner = y[:, :, 2:-2, 2:-2]
        expected = conv.weight.sum(dim=(1, 2, 3)).reshape(1, -1, 1, 1)
        assert torch.allclose(inner, expected.expand_as(inner), atol=1e-5)


def test_positional_embedding_closed_form():
    x = torch.tensor([0.0, 0.7, -3.2, 250.0])
    for endpoint in (False, True):
        emb = PositionalEmbedding(8, endpoint=endpoint)(x).double()
        freqs = (1 / 10000) ** (np.arange(4) / (4 - (1 if endpoint else 0)))
        arg = x.double().numpy()[:, None] * freqs[None]
        expected = np.concatenate([np.cos(arg), np.sin(arg)], axis=1)
        assert np.allclose(emb.numpy(), expected, atol=2e-4)


def test_attention_matches_independent_multihead_attention():
    """UNetBlock attention = softmax(q k^T / sqrt(c)) v per head, with q/k/v interleaved per channel in qkv."""
    torch.manual_seed(2)
    block = UNetBlock(8, 8, emb_channels=4, attention=True, num_heads=2, adaptive_scale=False, skip_scale=0.5)
    randomize_zero_init(block)
    block.eval()
    x, emb = torch.randn(2, 8, 4, 4), torch.randn(2, 4)

    # The block without attention, computed by hand.
    h = block.conv0(torch.nn.functional.silu(block.norm0(x)))
    h = torch.nn.functional.silu(block.norm1(h + block.affine(emb)[:, :, None, None]))
    base = (block.conv1(h) + x) * 0.5
    qkv = block.qkv(block.norm2(base)).reshape(2, 2, 4, 3, 16)  # [N, head, c, (q,k,v), HW]
    q, k, v = (qkv[:, :, :, t].transpose(2, 3) for t in range(3))  # [N, head, HW, c]
    attn = torch.nn.functional.scaled_dot_product_attention(q, k, v)  # [N, head, HW, c]
    a = attn.transpose(2, 3).reshape(2, 8, 4, 4)
    expected = (block.proj(a) + base) * 0.5
    assert torch.allclose(block(x, emb), expected, atol=1e-5)

# ----------------------------------------------------------------------------------------------------------------
# Preconditioning.


class RecordingModel(torch.nn.Module):
    """Stands in for the U-Net: returns a fixed F and records what the preconditioner feeds it."""

    def __init__(self, F):
        super().__init__()
        self.F = F

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        self.x_in, self.noise_labels = x, noise_labels
        return self.F.expand(x.shape[0], -1, -1, -1)


@pytest.mark.parametrize('precond', PRECONDS, ids=lambda c: c.__name__)
def test_preconditioning_coefficients_closed_form(precond):
    net = precond(8, 1, **dict(ARCHS['adm'], model_channels=64))
    F = torch.randn(1, 2 if precond is iDDPMPrecond else 1, 8, 8)
    net.model = RecordingModel(F)
    x = torch.randn(3, 1, 8, 8)
    sigma = torch.tensor([0.05, 1.3, 17.0], dtype=torch.float64)
    out = net(x, sigma).double()
    s = sigma.reshape(-1, 1, 1, 1)
    xd, Fd = x.double(), F[:, :1].double()
    if precond is EDMPrecond:
        sd = 0.5
        c_skip, c_out, c_in, c_noise = sd ** 2 / (s ** 2 + sd ** 2), s * sd / (s ** 2 + sd ** 2).sqrt(), \
            1 / (s ** 2 + sd ** 2).sqrt(), sigma.log() / 4
    elif precond is VEPrecond:
        c_skip, c_out, c_in, c_noise = 1, s, 1, (sigma / 2).log()
    elif precond is VPPrecond:
        t = ((0.1 ** 2 + 2 * 19.9 * (1 + sigma ** 2).log()).sqrt() - 0.1) / 19.9
        c_skip, c_out, c_in, c_noise = 1, -s, 1 / (s ** 2 + 1).sqrt(), 999 * t
    else:
        index = (net.u.double()[None, :] - sigma[:, None]).abs().argmin(dim=1)
        c_skip, c_out, c_in, c_noise = 1, -s, 1 / (s ** 2 + 1).sqrt(), 999 - index.double()
    assert torch.allclose(out, c_skip * xd + c_out * Fd, rtol=1e-5, atol=1e-5)
    assert torch.allclose(net.model.x_in.double(), c_in * xd, rtol=1e-5, atol=1e-6)
    assert torch.allclose(net.model.noise_labels.double(), c_noise, rtol=1e-4, atol=1e-4)


def test_zero_initialised_adm_output_gives_skip_only():
    """DhariwalUNet's output conv starts at zero, so a fresh EDMPrecond is exactly D(x) = c_skip * x."""
    net = EDMPrecond(8, 2, **dict(ARCHS['adm'], model_channels=64))
    x, sigma = torch.randn(2, 2, 8, 8), torch.tensor([0.2, 3.0])
    expected = x * 0.25 / (sigma.reshape(-1, 1, 1, 1) ** 2 + 0.25)
    assert torch.allclose(net(x, sigma), expected, atol=1e-6)


def test_vp_and_iddpm_noise_ranges_match_upstream_float32_values():
    vp = VPPrecond(8, 1, **TINY_SONG)
    assert vp.sigma_min == 0.0009765625 and vp.sigma_max == 152.16697692871094
    iddpm = iDDPMPrecond(8, 1, **dict(ARCHS['adm'], model_channels=64))
    # The 1000-step float32 recurrence rounds differently with the CPU's vector width: a few ulps apart.
    assert iddpm.sigma_max == pytest.approx(20291.171875, rel=1e-6)
    assert abs(iddpm.sigma_min - 0.006422337) < 1e-9
    assert list(iddpm.state_dict())[0] == 'u' and iddpm.u.shape == (1001,) and iddpm.u[-1] == 0
    sig = torch.tensor([[0.5, 3.3], [80.0, 0.0071]])
    rounded = iddpm.round_sigma(sig)
    assert rounded.shape == sig.shape and bool(torch.isin(rounded, iddpm.u).all())
    assert torch.equal(iddpm.u[iddpm.round_sigma(sig, return_index=True)], rounded)
    with pytest.raises(ValueError, match='Invalid init mode'):
        networks.weight_init([2], 'nope', 1, 1)


@pytest.mark.parametrize('loss_class', [EDMLoss, VPLoss, VELoss])
def test_losses_are_weighted_denoising_errors(loss_class):
    """With a perfect denoiser for a point mass the loss is 0; with D = 0 it is lambda(sigma) * y^2 (sigma-free for VP/VE)."""
    images = torch.full([4, 1, 2, 2], 0.3)

    class Oracle(torch.nn.Module):
        def forward(self, x, sigma, labels=None, augment_labels=None):
            return torch.full_like(x, 0.3)
    torch.manual_seed(0)
    assert torch.allclose(loss_class()(Oracle(), images), torch.zeros_like(images), atol=1e-10)

    class Zero(torch.nn.Module):
        def forward(self, x, sigma, labels=None, augment_labels=None):
            self.sigma = sigma
            return torch.zeros_like(x)
    zero = Zero()
    loss = loss_class()(zero, images)
    s = zero.sigma
    weight = (s ** 2 + 0.25) / (s * 0.5) ** 2 if loss_class is EDMLoss else 1 / s ** 2
    assert loss.shape == images.shape and torch.allclose(loss, weight * 0.09, rtol=1e-5)

# ----------------------------------------------------------------------------------------------------------------
# Shipped configurations (built on the meta device: shapes only, no memory, no time).


@pytest.mark.parametrize('arch,label_dim,kwargs,num_params,num_keys', [
    ('ddpmpp', 10, dict(model_type='SongUNet', model_channels=128, channel_mult=[2, 2, 2], augment_dim=9, dropout=0.13),
     55_735_299, 427),
    ('ncsnpp', 0, dict(model_type='SongUNet', embedding_type='fourier', encoder_type='residual', channel_mult_noise=2,
                       resample_filter=[1, 3, 3, 1], model_channels=128, channel_mult=[2, 2, 2], augment_dim=9),
     56_397_827, 432),
    ('adm', 1000, dict(model_type='DhariwalUNet', model_channels=192, channel_mult=[1, 2, 3, 4], use_fp16=True),
     295_899_267, 553),
])
def test_official_configurations_have_upstream_counts(arch, label_dim, kwargs, num_params, num_keys):
    res = 64 if arch == 'adm' else 32
    with torch.device('meta'):
        net = EDMPrecond(img_resolution=res, img_channels=3, label_dim=label_dim, **kwargs)
    assert sum(p.numel() for p in net.parameters()) == num_params
    assert len(net.state_dict()) == num_keys
    if arch == 'ddpmpp':
        enc = list(net.model.enc)
        assert enc[:6] == ['32x32_conv', '32x32_block0', '32x32_block1', '32x32_block2', '32x32_block3', '16x16_down']
        assert list(net.model.dec)[-2:] == ['32x32_aux_norm', '32x32_aux_conv']
        assert net.model.dec['32x32_block4'].in_channels == 384
        assert net.model.enc['16x16_block0'].num_heads == 1 and net.model.dec['16x16_block3'].num_heads == 0
    if arch == 'ncsnpp':
        sd = net.state_dict()
        assert sd['model.enc.16x16_aux_residual.weight'].shape == (256, 3, 3, 3)
        assert sd['model.enc.16x16_down.conv0.resample_filter'].shape == (1, 1, 4, 4)
        assert sd['model.map_noise.freqs'].shape == (128,)
    if arch == 'adm':
        assert net.model.dec['8x8_block0'].in_channels == 1536 and net.model.dec['8x8_block3'].in_channels == 1344
        assert net.model.enc['32x32_block0'].num_heads == 6
        assert isinstance(net.model, DhariwalUNet) and not isinstance(net.model, SongUNet)
