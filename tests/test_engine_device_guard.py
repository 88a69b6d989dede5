"""The non-finite guard decided on the device (ikl.updates, issue 22: no host-device syncs in the inner loop) gives
what the host-side guard gives: the same parameters, Adam state, loss scale and skip counts, bit for bit. Checked
on the CPU with a fused Adam (the device path's requirement) by forcing each path."""

import copy
import glob
import os
import pickle
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ikl  # noqa: E402
from ikl import updates  # noqa: E402
from ikl.toy import MLPDenoiser, MLPGenerator  # noqa: E402
from teachers.analytic import ring8  # noqa: E402
from torch_utils import misc  # noqa: E402


def _reads(monkeypatch):
    """Count reads of tensor values on the host (what would be a sync on a GPU)."""
    count = [0]
    for name in ('item', '__bool__', '__float__', '__int__', 'tolist'):
        orig = getattr(torch.Tensor, name)

        def counted(self, *args, _orig=orig, **kwargs):
            count[0] += 1
            return _orig(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    return count


@pytest.mark.parametrize('enabled', [False, True])
def test_apply_update_on_device_equals_host(monkeypatch, enabled):
    torch.manual_seed(0)
    nets = [torch.nn.Linear(4, 3), None]
    nets[1] = copy.deepcopy(nets[0])
    opts = [torch.optim.Adam(n.parameters(), lr=1e-2, betas=(0.0, 0.99), fused=True) for n in nets]
    scalers = [ikl.LossScaler(enabled, init_scale=8.0, growth_interval=2) for _ in nets]
    gen = torch.Generator().manual_seed(1)
    bad_steps = {2, 5, 6}
    for step in range(9):
        grads = [torch.randn(p.shape, generator=gen) for p in nets[0].parameters()]
        if step in bad_steps:
            grads[step % 2].view(-1)[0] = float('nan') if step % 3 else float('inf')
        lr = float('inf') if step == 7 else 1e-2  # finite gradients, non-finite update: undone
        for on_device, net, opt, scaler in zip((False, True), nets, opts, scalers):
            monkeypatch.setattr(updates, 'ON_DEVICE', on_device)
            for p, g in zip(net.parameters(), grads):
                p.grad = g * scaler.scale  # as if the loss had been scaled
            stepped = updates.apply_update(list(net.parameters()), opt, scaler, lr, 'x', 1, 100)
            assert isinstance(stepped, torch.Tensor) == on_device
        for a, b in zip(nets[0].parameters(), nets[1].parameters()):
            assert torch.equal(a, b), step
        for sa, sb in zip(opts[0].state.values(), opts[1].state.values()):
            assert all(torch.equal(sa[k], sb[k]) for k in sa), step
        assert scalers[0].state_dict() == scalers[1].state_dict(), step
    assert scalers[1].skipped == len(bad_steps) + 1
    assert scalers[1].scale == (2.0 if enabled else 1.0)  # 8 -> 16 -> 8 -> 16 -> 8 -> 4 -> 2


def _fused(monkeypatch):
    monkeypatch.setattr(misc, 'adam_kernel_kwargs', lambda params: dict(fused=True))


class _Flaky(torch.nn.Module):
    def __init__(self, inner, bad_call):
        super().__init__()
        self.inner, self.bad_call, self.calls = inner, bad_call, 0

    def forward(self, x, sigma, class_labels=None):
        self.calls += 1
        out = self.inner(x, sigma, class_labels)
        return out * float('nan') if self.calls == self.bad_call else out


OPTS = dict(total_kimg=0.096, batch=16, batch_gpu=8, g_lr=1e-3, fake_lr=1e-3, sigma_data=1.0, tick_kimg=0.032,
            snapshot_ticks=1, image_ticks=None, grid_size=0, progress=False, tensorboard=False, seed=3)


def _trainer(tmp_path, name, teacher=None, **extra):
    torch.manual_seed(0)
    adapter = ikl.ModuleAdapter(MLPGenerator(2, 2, 32, 2), [2])
    fake = MLPDenoiser(2, 32, 2, sigma_data=1.0)
    return ikl.Trainer(adapter, teacher or ring8(), fake, dict(OPTS, **extra), str(tmp_path / name))


def test_engine_on_device_equals_host_and_reads_nothing_back(tmp_path, monkeypatch):
    _fused(monkeypatch)
    trainers = {}
    for on_device in (False, True):
        monkeypatch.setattr(updates, 'ON_DEVICE', on_device)
        trainers[on_device] = _trainer(tmp_path, str(on_device), teacher=_Flaky(ring8(), bad_call=5), precision='fp16')
        trainers[on_device].step()  # warm-up (first-call costs aside)
        reads = _reads(monkeypatch)
        for _ in range(4):
            trainers[on_device].step()
        monkeypatch.undo()
        _fused(monkeypatch)
        if on_device:
            assert reads[0] == 0, reads[0]
        else:
            assert reads[0] == 4 * 2 * 2 - 1  # two updates per iteration, two reads each but the skipped one's
    host, dev = trainers[False], trainers[True]
    for a, b in zip(list(host.adapter.parameters()) + host.fake.params, list(dev.adapter.parameters()) + dev.fake.params):
        assert torch.equal(a, b)
    assert host.g_scaler.state_dict() == dev.g_scaler.state_dict() and dev.g_scaler.skipped == 1
    assert host.fake.scaler.state_dict() == dev.fake.scaler.state_dict()


def test_device_path_stops_a_diverged_run_at_the_tick(tmp_path, monkeypatch):
    _fused(monkeypatch)
    monkeypatch.setattr(updates, 'ON_DEVICE', True)
    adapter = ikl.ModuleAdapter(MLPGenerator(2, 2, 32, 2), [2])
    with pytest.raises(ikl.TrainingDiverged, match='G: 2 steps in a row'):
        ikl.train(adapter, ring8(), MLPDenoiser(2, 32, 2, sigma_data=1.0),
                  dict(OPTS, g_lr=float('inf'), max_skipped_in_row=1), str(tmp_path / 'run'))
    assert not glob.glob(str(tmp_path / 'run' / 'network-snapshot-*.pkl'))  # stopped before the first snapshot
    # A run that recovers is not stopped, and what it saves is finite.
    trainer = _trainer(tmp_path, 'ok', teacher=_Flaky(ring8(), bad_call=3))
    trainer.run()
    for path in glob.glob(str(tmp_path / 'ok' / 'network-snapshot-*.pkl')):
        with open(path, 'rb') as f:
            assert all(bool(torch.isfinite(p).all()) for p in pickle.load(f)['G_ema'].parameters())
    assert trainer.g_scaler.skipped == 1
