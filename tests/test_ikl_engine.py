"""The training engine: exact resume, DDP equivalence (torchrun, gloo), the NaN guard, schedules, snapshots.

Run as a script (`torchrun ... tests/test_ikl_engine.py OUTDIR FAKE_KIND`) this file is the DDP worker.
"""

import copy
import glob
import math
import os
import pickle
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ikl  # noqa: E402
from ikl.toy import MLPDenoiser, MLPGenerator, VectorDenoiser  # noqa: E402
from teachers.analytic import ring8  # noqa: E402
from training.run import latest_training_state  # noqa: E402


OPTS = dict(total_kimg=0.32, batch=32, batch_gpu=16, g_lr=1e-3, fake_lr=1e-3, lr_warmup_kimg=0.1, ema_halflife_kimg=0.05,
            sigma_data=1.0, tick_kimg=0.064, snapshot_ticks=1, image_ticks=None, grid_size=16, progress=False,
            tensorboard=False, seed=3)


class RecentSamples(VectorDenoiser, ikl.ObservingDenoiser):
    """An observing fake score for the tests: keeps the last `capacity` samples it was shown (a ring buffer) and
    denoises everything to their mean, enough to see which samples reach it and that they resume exactly."""

    def __init__(self, initial: torch.Tensor):
        super().__init__(initial.shape[1])
        self.register_buffer('samples', initial.clone())
        self.register_buffer('write_pos', torch.zeros([], dtype=torch.int64))

    @torch.no_grad()
    def observe(self, x, class_labels=None):
        rows = (self.write_pos + torch.arange(x.shape[0])) % self.samples.shape[0]
        self.samples[rows] = x.detach()
        self.write_pos.copy_((self.write_pos + x.shape[0]) % self.samples.shape[0])

    def forward(self, x, sigma, class_labels=None, **unused_kwargs):
        return self.samples.mean(0, keepdim=True).expand_as(x)


FAKES = dict(fitted=lambda: MLPDenoiser(2, 32, 2, sigma_data=1.0),
             observing=lambda: ikl.ObservingFakeScore(RecentSamples(torch.randn(48, 2))))


def _networks(fake='fitted'):
    torch.manual_seed(0)
    return ikl.ModuleAdapter(MLPGenerator(2, 2, 32, 2), [2]), ring8(), FAKES[fake]()


def _weights(trainer):
    return {**{f'G.{k}': v for k, v in trainer.adapter.state_dict().items()},
            **{f'ema.{k}': v for k, v in trainer.ema.state_dict().items()},
            **{f'fake.{k}': v for k, v in trainer.fake_score.state_dict().items()}}


def _state_weights(path):
    state = torch.load(path, weights_only=False)
    return {**{f'G.{k}': v for k, v in state['adapter'].items()}, **{f'ema.{k}': v for k, v in state['ema'].items()},
            **{f'fake.{k}': v for k, v in state['fake_score'].items()}}


@pytest.mark.parametrize('fake_kind', sorted(FAKES))
def test_resume_after_interruption_is_exact(tmp_path, fake_kind):
    adapter, teacher, fake = _networks(fake_kind)
    reference = ikl.train(copy.deepcopy(adapter), teacher, copy.deepcopy(fake), OPTS, str(tmp_path / 'a'))
    assert reference.cur_nimg == 320

    calls = []

    def interrupting_snapshot(*args):
        calls.append(1)
        if len(calls) == 3:  # killed while writing the third snapshot: the latest state is from the second tick
            raise KeyboardInterrupt
        return ikl.default_snapshot(*args)

    with pytest.raises(KeyboardInterrupt):
        ikl.train(copy.deepcopy(adapter), teacher, copy.deepcopy(fake), OPTS, str(tmp_path / 'b'), snapshot_fn=interrupting_snapshot)
    assert os.path.basename(latest_training_state(str(tmp_path / 'b'))) == 'training-state-000000.128.pt'
    assert len(glob.glob(str(tmp_path / 'b' / '*.tmp*'))) == 0
    # A fresh process would rebuild the networks from scratch (different initial weights) and resume.
    torch.manual_seed(123)
    fresh = ikl.ModuleAdapter(MLPGenerator(2, 2, 32, 2), [2])
    resumed = ikl.train(fresh, teacher, FAKES[fake_kind](), OPTS, str(tmp_path / 'b'), resume='auto')
    assert resumed.cur_nimg == 320 and resumed.iteration == reference.iteration
    want, got = _weights(reference), _weights(resumed)
    for name in want:
        assert torch.equal(want[name], got[name]), name
    assert not torch.equal(want['G.G.net.0.weight'], adapter.state_dict()['G.net.0.weight'])  # it did train


def test_observing_fake_score_is_handed_the_generator_step_samples(tmp_path, capsys):
    adapter, teacher, observing = _networks('observing')
    fake = observing.net
    opts = dict(OPTS, total_kimg=0.128, batch=32, batch_gpu=16)
    trainer = ikl.Trainer(adapter, teacher, observing, opts, str(tmp_path))
    assert trainer.fake is observing and trainer.fake_score is fake
    for step in range(3):
        with torch.no_grad():  # what the generator step will sample: its two accumulation rounds, before its update
            want = torch.cat([adapter.sample(16, torch.Generator().manual_seed(trainer.seed(0, r)))[0] for r in range(2)])
        trainer.step()
        assert int(fake.write_pos) == 32 * (step + 1) % 48
    # 96 samples went into 48 places: the stored ones are the last 48, the last step's 32 among them.
    stored = fake.samples[torch.arange(16, 48)]
    assert torch.equal(stored, want)
    trainer.run()
    assert 'fake_loss' not in capsys.readouterr().out
    assert 'fake_opt' not in torch.load(latest_training_state(str(tmp_path)), weights_only=False)


def _ddp_worker(outdir, fake_kind):
    from torch_utils import distributed as dist
    dist.init()
    adapter, teacher, fake = _networks(fake_kind)
    ikl.train(adapter, teacher, fake, dict(OPTS, batch_gpu=16, snapshot_ticks=None), outdir)
    dist.shutdown()


@pytest.mark.parametrize('fake_kind', sorted(FAKES))
def test_two_processes_match_one(tmp_path, fake_kind):
    """With the empirical fake score both processes must also store every process's samples, in the same order."""
    adapter, teacher, fake = _networks(fake_kind)
    single = ikl.train(adapter, teacher, fake, dict(OPTS, snapshot_ticks=None), str(tmp_path / 'one'))
    env = dict(os.environ, OMP_NUM_THREADS='1')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nnodes=1', '--nproc_per_node=2',
           os.path.abspath(__file__), str(tmp_path / 'two'), fake_kind]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    state = torch.load(latest_training_state(str(tmp_path / 'two')), weights_only=False)
    assert state['world_size'] == 2 and state['counters']['cur_nimg'] == 320
    want, got = _weights(single), _state_weights(latest_training_state(str(tmp_path / 'two')))
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


class _FlakyTeacher(torch.nn.Module):
    """Returns NaN on one chosen call, like a numerically unlucky fp16 step."""

    def __init__(self, inner, bad_call):
        super().__init__()
        self.inner, self.bad_call, self.calls = inner, bad_call, 0
        for attr in ('img_resolution', 'img_channels', 'label_dim', 'sigma_min', 'sigma_max'):
            setattr(self, attr, getattr(inner, attr))

    def forward(self, x, sigma, class_labels=None):
        self.calls += 1
        out = self.inner(x, sigma, class_labels)
        return out * float('nan') if self.calls == self.bad_call else out


def test_nan_guard_skips_bad_step_and_training_continues(tmp_path):
    adapter, teacher, fake = _networks()
    flaky = _FlakyTeacher(teacher, bad_call=5)  # 2 rounds per iteration: call 5 is in the third generator step
    trainer = ikl.Trainer(adapter, flaky, fake, dict(OPTS, lr_warmup_kimg=0), str(tmp_path))
    before = [p.detach().clone() for p in trainer.g_params]
    for _ in range(2):
        trainer.step()
    after_two = [p.detach().clone() for p in trainer.g_params]
    trainer.step()  # the poisoned step
    assert trainer.g_scaler.skipped == 1
    assert all(torch.equal(a, b) for a, b in zip(after_two, trainer.g_params))
    for _ in range(3):
        trainer.step()
    assert trainer.g_scaler.skipped == 1
    assert all(bool(torch.isfinite(p).all()) for p in trainer.g_params + trainer.fake.params)
    assert not all(torch.equal(a, b) for a, b in zip(after_two, trainer.g_params))
    assert not all(torch.equal(a, b) for a, b in zip(before, trainer.g_params))


def test_non_finite_updates_are_undone_and_a_run_of_them_stops_training(tmp_path):
    adapter, teacher, fake = _networks()
    opts = dict(OPTS, lr_warmup_kimg=0, g_lr=float('inf'), max_skipped_in_row=3, total_kimg=0.32)
    trainer = ikl.Trainer(adapter, teacher, fake, opts, str(tmp_path))
    before = [p.detach().clone() for p in trainer.g_params]
    for _ in range(3):  # Finite gradients, infinite steps: each update is undone and counted.
        trainer.step()
    assert trainer.g_scaler.skipped == 3 and trainer.g_scaler.skipped_in_row == 3
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.g_params))
    with pytest.raises(ikl.TrainingDiverged, match='4 steps in a row'):
        trainer.step()
    assert all(bool(torch.isfinite(p).all()) for p in trainer.g_params + list(trainer.ema.parameters()))
    # Through the loop: snapshots written before the stop hold finite networks only.
    adapter, teacher, fake = _networks()
    with pytest.raises(ikl.TrainingDiverged):
        ikl.train(adapter, teacher, fake, dict(opts, max_skipped_in_row=5), str(tmp_path / 'run'))
    paths = glob.glob(str(tmp_path / 'run' / 'network-snapshot-*.pkl'))
    assert paths
    for path in paths:
        with open(path, 'rb') as f:
            G = pickle.load(f)['G_ema']
        assert all(bool(torch.isfinite(p).all()) for p in G.parameters())


def test_loss_scaler_backs_off_and_grows():
    scaler = ikl.LossScaler(True, init_scale=1024.0, growth_interval=3)
    scaler.update(False)
    assert scaler.scale == 512.0 and scaler.skipped == 1
    for _ in range(3):
        scaler.update(True)
    assert scaler.scale == 1024.0
    fixed = ikl.LossScaler(False)
    fixed.update(False)
    assert fixed.scale == 1.0 and fixed.skipped == 1


class _CountingAdapter(ikl.ModuleAdapter):
    def sample(self, batch_size, generator=None):
        self.calls = getattr(self, 'calls', 0) + 1
        self.grad_calls = getattr(self, 'grad_calls', 0) + int(torch.is_grad_enabled())
        return super().sample(batch_size, generator)


@pytest.mark.parametrize('schedule,forwards', [('reuse', 1), ('official', 2)])
def test_schedule_generator_forwards(tmp_path, schedule, forwards):
    _, teacher, fake = _networks()
    adapter = _CountingAdapter(MLPGenerator(2, 2, 32, 2), [2])
    trainer = ikl.Trainer(adapter, teacher, fake, dict(OPTS, batch_gpu=32, schedule=schedule), str(tmp_path))
    trainer.step()
    trainer.step()
    assert trainer.adapter.calls == 2 * forwards and trainer.adapter.grad_calls == 2


def test_lr_warmup_then_cosine_rampdown(tmp_path):
    """10 steps of 32 samples: linear warm-up over 64 samples, cosine ramp-down over the last 160 (closed form
    0.5 - 0.5 cos(pi * samples_left / 160)); the fake score follows the same schedule."""
    adapter, teacher, fake = _networks()
    trainer = ikl.Trainer(adapter, teacher, fake, dict(OPTS, batch_gpu=32, lr_warmup_kimg=0.064, lr_rampdown_kimg=0.16),
                          str(tmp_path))
    rates = {'G': [], 'fake': []}
    apply = trainer.update

    def recording(params, optimizer, scaler, lr, name):
        rates[name].append(lr)
        return apply(params, optimizer, scaler, lr, name)

    trainer.update = recording
    for _ in range(10):
        trainer.step()
    cosine_tail = [0.5 - 0.5 * math.cos(math.pi * left / 160) for left in (128, 96, 64, 32)]
    expected = [0.0, 0.5, 1.0, 1.0, 1.0, 1.0] + cosine_tail
    assert rates['G'] == pytest.approx([1e-3 * f for f in expected], abs=1e-12)
    assert rates['fake'] == rates['G']
    with pytest.raises(ValueError, match='lr_rampdown_kimg'):
        ikl.Trainer(adapter, teacher, fake, dict(OPTS, lr_rampdown_kimg=-1), str(tmp_path / 'bad'))


def test_fake_warmup_trains_only_the_fake_score_first(tmp_path):
    adapter, teacher, fake = _networks()
    trainer = ikl.Trainer(adapter, teacher, fake, dict(OPTS, batch_gpu=32, fake_warmup_kimg=0.064), str(tmp_path))
    g0, fake0 = copy.deepcopy(trainer.adapter.state_dict()), copy.deepcopy(trainer.fake_score.state_dict())
    trainer.step()
    trainer.step()  # 64 samples: the warm-up is over after this one
    assert trainer.cur_nimg == 64
    assert all(torch.equal(v, g0[k]) for k, v in trainer.adapter.state_dict().items())
    assert not all(torch.equal(v, fake0[k]) for k, v in trainer.fake_score.state_dict().items())
    trainer.step()
    assert not all(torch.equal(v, g0[k]) for k, v in trainer.adapter.state_dict().items())


def test_tracking_compares_fake_and_teacher_on_the_same_fresh_draws(tmp_path):
    from torch_utils import training_stats
    from ikl.divergences import edm_dsm_loss
    from ikl.sigmas import LogNormal
    from training.run import counter_seed
    adapter, _, fake = _networks()
    teacher = copy.deepcopy(fake).eval()  # The fake score starts as the teacher: no gap until it trains.
    trainer = ikl.Trainer(adapter, teacher, copy.deepcopy(fake), dict(OPTS, batch_gpu=32), str(tmp_path))
    collector = training_stats.Collector(regex='Tracking/.*')
    trainer._report_tracking()
    collector.update()
    assert collector.mean('Tracking/dsm_gap') == 0 and collector.mean('Tracking/dsm_fake') > 0
    assert collector.num('Tracking/g_update') == 0  # No previous tick to compare with yet.
    # An independent computation of the fake's loss on the same samples and draws.
    x, labels = trainer.fresh_samples(1000, 0)
    gen = torch.Generator().manual_seed(counter_seed(OPTS['seed'], 0, 1001, 0))
    expected = edm_dsm_loss(fake.eval(), x, labels, LogNormal(-1.2, 1.2), gen, sigma_data=1.0).mean().item()
    assert collector.mean('Tracking/dsm_fake') == pytest.approx(expected, rel=1e-5)
    before = torch.cat([p.detach().flatten() for p in trainer.g_params])
    trainer.step()
    trainer.step()
    trainer._report_tracking()
    collector.update()
    after = torch.cat([p.detach().flatten() for p in trainer.g_params])
    assert collector.mean('Tracking/g_update') == pytest.approx(((after - before).norm() / before.norm()).item(), rel=1e-5)
    assert collector.mean('Tracking/dsm_gap') != 0


def test_snapshot_stats_and_preview(tmp_path):
    adapter, teacher, fake = _networks()
    ikl.train(adapter, teacher, fake, dict(OPTS, total_kimg=0.128, image_ticks=2), str(tmp_path))
    snaps = sorted(glob.glob(str(tmp_path / 'network-snapshot-*.pkl')))
    assert [os.path.basename(s) for s in snaps] == ['network-snapshot-000000.064.pkl', 'network-snapshot-000000.128.pkl']
    with open(snaps[-1], 'rb') as f:
        data = pickle.load(f)
    assert set(data) == {'G_ema', 'fake_score'}
    assert list(data['G_ema'](torch.zeros(3, 2)).shape) == [3, 2]
    lines = (tmp_path / 'stats.jsonl').read_text().strip().splitlines()
    assert len(lines) == 2 and '"Loss/fake_score"' in lines[0]
    assert (tmp_path / 'fakes_init.png').exists() and (tmp_path / 'fakes000000.128.png').exists()


def test_sds_needs_no_fake_and_bad_options_are_reported(tmp_path, capsys):
    adapter, teacher, _ = _networks()
    trainer = ikl.train(adapter, teacher, None, dict(OPTS, divergence='sds', total_kimg=0.064), str(tmp_path / 'sds'))
    assert trainer.fake_score is None and trainer.cur_nimg == 64
    ticks = [line for line in capsys.readouterr().out.splitlines() if line.startswith('tick ')]
    assert ticks and not any('fake_loss' in line for line in ticks)  # no fake score, so no "fake_loss nan"
    with pytest.raises(ValueError, match='unknown option'):
        ikl.TrainingOptions.from_dict(dict(batchsize=3))
    with pytest.raises(ValueError, match='batch=30'):
        ikl.Trainer(adapter, teacher, None, dict(OPTS, divergence='sds', batch=30), str(tmp_path))
    with pytest.raises(ValueError, match='needs a fake-score'):
        ikl.Trainer(adapter, teacher, None, OPTS, str(tmp_path))


if __name__ == '__main__':
    _ddp_worker(sys.argv[1], sys.argv[2])


@pytest.mark.parametrize('precision', ['fp16', 'bf16'])
def test_one_step_student_on_image_teacher_with_mixed_precision(tmp_path, precision):
    """Distillation wiring: student = D(sigma_init z; sigma_init) copied from a tiny EDM U-Net, autocast, PNG grid."""
    from teachers.networks import EDMPrecond
    torch.manual_seed(0)
    teacher = EDMPrecond(img_resolution=8, img_channels=3, model_type='SongUNet', model_channels=8, channel_mult=[1],
                         num_blocks=1, attn_resolutions=[], dropout=0.1)
    adapter = ikl.OneStepStudentAdapter.from_teacher(teacher, sigma_init=1.0)
    x, labels = adapter.sample(2, torch.Generator().manual_seed(0))
    assert list(x.shape) == [2, 3, 8, 8] and labels is None and x.requires_grad
    opts = dict(OPTS, batch=4, batch_gpu=4, total_kimg=0.008, tick_kimg=0.008, precision=precision, grid_size=4, image_ticks=1)
    trainer = ikl.train(adapter, teacher, copy.deepcopy(teacher), opts, str(tmp_path))
    if precision == 'fp16':  # Every skipped step halves the scale; 2 steps are far below the growth interval.
        assert trainer.g_scaler.scale == 2.0 ** 15 * 0.5 ** trainer.g_scaler.skipped
    else:  # bf16 needs no scaling, and no step may be skipped.
        assert trainer.g_scaler.scale == 1.0 and trainer.g_scaler.skipped == 0
    assert all(bool(torch.isfinite(p).all()) for p in trainer.g_params)
    assert (tmp_path / 'fakes000000.008.png').exists()
    with open(tmp_path / 'network-snapshot-000000.008.pkl', 'rb') as f:
        assert set(pickle.load(f)) == {'ema', 'fake_score'}


@pytest.mark.parametrize('precision', ['fp16', 'bf16'])
def test_autocast_path_on_plain_networks(tmp_path, precision):
    """Networks without native fp16 run under autocast; the fp16 scaler scales the loss and training stays finite."""
    adapter, teacher, fake = _networks()
    trainer = ikl.Trainer(adapter, teacher, fake, dict(OPTS, precision=precision), str(tmp_path))
    before = [p.detach().clone() for p in trainer.g_params]
    for _ in range(3):
        trainer.step()
    assert trainer.g_scaler.scale == (2.0 ** 15 if precision == 'fp16' else 1.0)
    assert trainer.g_scaler.skipped == 0
    assert all(bool(torch.isfinite(p).all()) for p in trainer.g_params + trainer.fake.params)
    assert not all(torch.equal(a, b) for a, b in zip(before, trainer.g_params))
