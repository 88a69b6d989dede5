"""StyleGAN2 GAN loss against closed forms (toy linear G/D) and finite differences (R1 through the real ops)."""

import numpy as np
import torch
import torch.nn.functional as F

from stylegan2 import networks
from stylegan2.loss import StyleGAN2Loss


class LinearD(torch.nn.Module):
    """D(x) = <a, x> + b: its input gradient is `a`, so R1 = |a|^2 exactly."""

    def __init__(self, shape):
        super().__init__()
        self.a = torch.nn.Parameter(torch.randn(shape))
        self.b = torch.nn.Parameter(torch.tensor(0.3))

    def forward(self, img, c):
        return (img * self.a).flatten(1).sum(1, keepdim=True) + self.b


class LinearG(torch.nn.Module):
    """ws = z repeated num_ws times; img = sum_{k,d} ws[k,d] * A[k,d], so d<img, y>/d ws = <A, y> exactly."""

    def __init__(self, num_ws=3, w_dim=4, shape=(2, 4, 4)):
        super().__init__()
        self.num_ws = num_ws
        self.A = torch.nn.Parameter(torch.randn(num_ws, w_dim, *shape))
        self.mapping = lambda z, c, skip_w_avg_update=False: z.unsqueeze(1).repeat(1, num_ws, 1)
        self.synthesis = lambda ws: torch.einsum('nkd,kdchw->nchw', ws, self.A)


def test_r1_closed_form_and_lazy_gain():
    torch.manual_seed(0)
    G, D = LinearG(), LinearD((2, 4, 4))
    loss = StyleGAN2Loss(G, D, style_mixing_prob=0, r1_gamma=3.0)
    real = torch.randn(5, 2, 4, 4)
    stats = loss.accumulate_gradients('Dreg', real, None, torch.randn(5, 4), None, gain=16)
    r1 = D.a.detach().square().sum()
    assert np.isclose(stats['D_reg'], 3.0 / 2 * float(r1), rtol=1e-5)
    assert torch.allclose(D.a.grad, 16 * 3.0 * D.a.detach(), rtol=1e-5)  # d/da (gamma/2 |a|^2) * gain
    assert D.b.grad is None or D.b.grad.abs().max() == 0


def test_logistic_losses_closed_form():
    torch.manual_seed(1)
    G, D = LinearG(), LinearD((2, 4, 4))
    loss = StyleGAN2Loss(G, D, style_mixing_prob=0, r1_gamma=0)
    real, z = torch.randn(6, 2, 4, 4), torch.randn(6, 4)
    with torch.no_grad():
        fake_logits = D(G.synthesis(G.mapping(z, None)), None)
        real_logits = D(real, None)
    stats = loss.accumulate_gradients('Dmain', real, None, z, None)
    assert np.isclose(stats['D_loss_fake'], float(F.softplus(fake_logits).mean()), rtol=1e-5)
    assert np.isclose(stats['D_loss_real'], float(F.softplus(-real_logits).mean()), rtol=1e-5)
    assert G.A.grad is None  # fakes are generated without a graph in D phases
    stats = loss.accumulate_gradients('Gmain', real, None, z, None)
    assert np.isclose(stats['G_loss'], float(-F.logsigmoid(fake_logits).mean()), rtol=1e-5)


def test_path_length_closed_form():
    torch.manual_seed(2)
    G, D = LinearG(), LinearD((2, 4, 4))
    loss = StyleGAN2Loss(G, D, style_mixing_prob=0, pl_weight=2, pl_decay=0.01, pl_batch_shrink=2)
    loss.pl_mean.fill_(0.5)
    z = torch.randn(6, 4)
    stats = loss.accumulate_gradients('Greg', None, None, z, None, generator=torch.Generator().manual_seed(9))
    y = torch.randn([3, 2, 4, 4], generator=torch.Generator().manual_seed(9)) / np.sqrt(16)
    grads = torch.einsum('kdchw,nchw->nkd', G.A.detach(), y)  # the Jacobian-transpose product, exactly
    lengths = grads.square().sum(2).mean(1).sqrt()
    pl_mean = 0.5 + 0.01 * (lengths.mean() - 0.5)
    assert np.isclose(float(loss.pl_mean), float(pl_mean), rtol=1e-5)
    assert np.isclose(stats['G_reg'], float(2 * (lengths - pl_mean).square().mean()), rtol=1e-4)
    assert G.A.grad is not None and G.A.grad.abs().sum() > 0


def test_style_mixing_splits_ws_at_a_cutoff():
    torch.manual_seed(3)
    G = LinearG(num_ws=6)
    loss = StyleGAN2Loss(G, LinearD((2, 4, 4)), style_mixing_prob=1.0)
    z = torch.randn(2, 4)
    _, ws = loss.run_G(z, None, generator=torch.Generator().manual_seed(0))
    from_z = (ws == z.unsqueeze(1)).all(dim=2).all(dim=0)
    cutoff = int(from_z.sum())
    assert 1 <= cutoff <= 5 and from_z[:cutoff].all() and not from_z[cutoff:].any()


def test_r1_double_backward_through_ops_matches_finite_differences():
    """The R1 weight gradient needs second derivatives of every op in D; compare with central differences."""
    torch.manual_seed(4)
    D = networks.Discriminator(c_dim=0, img_resolution=8, img_channels=1, architecture='resnet', channel_base=32,
                               channel_max=4, epilogue_kwargs=dict(mbstd_group_size=2))
    real = torch.randn(4, 1, 8, 8)
    loss = StyleGAN2Loss(LinearG(), D, style_mixing_prob=0, r1_gamma=1.0)
    loss.accumulate_gradients('Dreg', real, None, torch.randn(4, 4), None)
    # Weights only: D is piecewise linear, so R1 is flat in the biases except at activation kinks that finite
    # differences would straddle.
    params = [p for name, p in D.named_parameters() if name.endswith('weight')]
    direction = [torch.randn_like(p) for p in params]
    analytic = sum(float((p.grad * v).sum()) for p, v in zip(params, direction))

    def r1_value():
        x = real.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(D(x, None).sum(), [x])
        return float(g.double().square().sum([1, 2, 3]).mean() * 0.5)

    eps = 1e-3
    with torch.no_grad():
        for p, v in zip(params, direction):
            p.add_(v, alpha=eps)
    plus = r1_value()
    with torch.no_grad():
        for p, v in zip(params, direction):
            p.add_(v, alpha=-2 * eps)
    minus = r1_value()
    numeric = (plus - minus) / (2 * eps)
    assert abs(analytic) > 1e-3
    assert np.isclose(analytic, numeric, rtol=2e-2), (analytic, numeric)
