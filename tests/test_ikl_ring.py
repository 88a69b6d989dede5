"""End to end: a one-step MLP generator instructed by the analytic 8-Gaussian ring teacher covers all 8 modes."""

import torch

import ikl
from ikl.toy import MLPDenoiser, MLPGenerator
from teachers.analytic import ring8


def _mode_shares(x: torch.Tensor, teacher) -> torch.Tensor:
    """Share of samples within 0.5 (a third of the mode spacing) of each centre."""
    d = torch.cdist(x.double(), teacher.means).min(1)
    return torch.bincount(d.indices[d.values < 0.5], minlength=teacher.num_components).float() / x.shape[0]


def test_ring_teacher_spreads_a_collapsed_generator_over_all_modes(tmp_path):
    teacher = ring8()
    torch.manual_seed(0)
    G = MLPGenerator(2, 2, 64, 2)
    # The fake score starts as a learned copy of the teacher (as with a network teacher): brief DSM on its samples.
    fake = MLPDenoiser(2, 64, 2, sigma_data=1.0)
    opt, gen = torch.optim.Adam(fake.parameters(), 2e-3), torch.Generator().manual_seed(0)
    for _ in range(200):
        loss = ikl.edm_dsm_loss(fake, teacher.sample(256, gen), None, ikl.LogNormal(), gen, sigma_data=1.0).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    adapter = ikl.ModuleAdapter(G, [2])
    start = adapter.sample(4000, torch.Generator().manual_seed(1))[0].detach()
    assert (_mode_shares(start, teacher) > 0.03).sum() <= 2  # the untrained generator is a blob: few modes covered

    opts = dict(total_kimg=80, batch=256, g_lr=2e-3, fake_lr=2e-3, sigma_data=1.0, ema_halflife_kimg=5,
                tick_kimg=1000, snapshot_ticks=None, image_ticks=None, grid_size=0, progress=False, tensorboard=False)
    trainer = ikl.train(adapter, teacher, fake, opts, str(tmp_path))
    x = trainer.ema.sample(4000, torch.Generator().manual_seed(1))[0].detach()
    shares = _mode_shares(x, teacher)
    assert bool((shares > 0.03).all()), shares
    assert shares.sum() > 0.5, shares
    assert abs(x.norm(dim=1).mean().item() - 2.0) < 0.15
