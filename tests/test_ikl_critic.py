"""The data-free adversarial term (ikl.critic): its losses against closed forms, the engine with a critic
(exact resume), and refine.py's --adv end to end (the pickle's D trained on a cached bank of teacher samples)."""

import copy
import glob
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ikl
import refine
from ikl.critic import PixelMoments
from metrics.formulas import frechet_distance
from teachers import load as teachers_load
from pipelines.critic import bank_cache_path, export_bank, shipped_bank_path, teacher_bank
from stylegan2.pickles import load_network_pkl, save_network_pkl
from teachers.analytic import ring8
from test_ikl_engine import OPTS, _networks
from test_refine_distill import REFINE_FAST, invoke, last_snapshot, only_run_dir, tiny_G, write_generator, write_teacher


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp('nets')
    return dict(teacher8=write_teacher(d / 't8.pkl'), teacher8_cond=write_teacher(d / 't8c.pkl', label_dim=3),
                g16_cond=write_generator(d / 'g16c.pkl', c_dim=3))


class LinearCritic(torch.nn.Module):
    """logits = w . x + b: its loss gradients have closed forms."""

    def __init__(self, dim: int):
        super().__init__()
        self.lin = torch.nn.Linear(dim, 1)

    def forward(self, x, labels):
        return self.lin(x.flatten(1))


class RecordingTrainer:
    """What TeacherSampleCritic.step asks of the engine, recording the gradients handed to the update."""

    rounds = 1

    def __init__(self, seed: int = 7):
        self.seed = seed
        self.grads = None

    def rng(self, purpose, round_idx):
        return torch.Generator().manual_seed(self.seed)

    def lr_factor(self):
        return 1.0

    def update(self, params, optimizer, scaler, lr, name):
        self.grads = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        return True


def _opts(**overrides):
    return ikl.TrainingOptions.from_dict(dict(dict(batch=6, adv_weight=0.5, adv_r1_gamma=0.3, adv_r1_interval=4), **overrides))


def test_generator_loss_is_weighted_softplus_and_reaches_x0_only():
    torch.manual_seed(0)
    net = LinearCritic(4)
    critic = ikl.TeacherSampleCritic(net, torch.randn(10, 1, 2, 2), None, _opts())
    x0 = torch.randn(6, 1, 2, 2, requires_grad=True)
    loss = critic.generator_loss(x0, None)
    logits = x0.flatten(1) @ net.lin.weight.T.detach() + net.lin.bias.detach()
    assert torch.allclose(loss, 0.5 * F.softplus(-logits.reshape(-1)))
    loss.sum().backward()
    assert net.lin.weight.grad is None and net.lin.bias.grad is None
    want = -0.5 * torch.sigmoid(-logits) * net.lin.weight.detach()  # d/dx softplus(-w.x - b) = -sigmoid(-l) w
    assert torch.allclose(x0.grad.flatten(1), want, atol=1e-6)
    assert all(p.requires_grad for p in net.parameters())


@pytest.mark.parametrize('r1_due', [True, False])
def test_critic_step_gradient_matches_the_closed_form(r1_due):
    torch.manual_seed(1)
    net = LinearCritic(4)
    bank = torch.randn(10, 1, 2, 2)
    critic = ikl.TeacherSampleCritic(net, bank, None, _opts())
    critic.steps = 0 if r1_due else 1  # R1 every 4th step, from the first.
    fake = torch.randn(6, 1, 2, 2)
    trainer = RecordingTrainer()
    critic.step(trainer, lambda r: (fake, None))
    idx = torch.randint(10, [6], generator=torch.Generator().manual_seed(trainer.seed))
    real = bank[idx].flatten(1)
    w, b = net.lin.weight.detach().reshape(-1), net.lin.bias.detach()
    lf, lr = fake.flatten(1) @ w + b, real @ w + b
    # Mean over the batch of softplus(l_f) + softplus(-l_r), plus R1 = |dl/dx|^2 = |w|^2 times gamma / 2 * interval.
    grad_w = (torch.sigmoid(lf)[:, None] * fake.flatten(1) - torch.sigmoid(-lr)[:, None] * real).mean(0)
    grad_b = (torch.sigmoid(lf) - torch.sigmoid(-lr)).mean()
    if r1_due:
        grad_w = grad_w + 0.3 * 4 * w
    got_w, got_b = trainer.grads
    assert torch.allclose(got_w.reshape(-1), grad_w, atol=1e-6)
    assert torch.allclose(got_b.reshape(-1), grad_b.reshape(-1), atol=1e-6)
    assert critic.steps == (1 if r1_due else 2)


def test_critic_and_adv_weight_must_agree(tmp_path):
    adapter, teacher, fake = _networks()
    critic = ikl.TeacherSampleCritic(torch.nn.Sequential(torch.nn.Linear(2, 1)), torch.randn(8, 2), None,
                                     ikl.TrainingOptions.from_dict(dict(OPTS, adv_weight=1.0)))
    with pytest.raises(ValueError, match='adv_weight=1 needs a critic'):
        ikl.Trainer(adapter, teacher, fake, dict(OPTS, adv_weight=1.0), str(tmp_path))
    with pytest.raises(ValueError, match='adv_weight=0 needs a critic'):
        ikl.Trainer(adapter, teacher, fake, OPTS, str(tmp_path), critic=critic)
    with pytest.raises(ValueError, match='non-empty'):
        ikl.TeacherSampleCritic(torch.nn.Linear(2, 1), torch.zeros(0, 2), None, critic.opts)


class MLPCritic(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.SiLU(), torch.nn.Linear(16, 1))

    def forward(self, x, labels):
        return self.net(x)


def test_engine_with_critic_resumes_exactly(tmp_path):
    opts = dict(OPTS, adv_weight=1.0, adv_lr=1e-3, fake_warmup_kimg=0.064)
    bank = ring8().sample(64, torch.Generator().manual_seed(0))  # The teacher's exact samples.

    def build(seed):
        adapter, teacher, fake = _networks()
        torch.manual_seed(seed)
        return adapter, teacher, fake, ikl.TeacherSampleCritic(MLPCritic(), bank, None, ikl.TrainingOptions.from_dict(opts))

    adapter, teacher, fake, critic = build(0)
    initial = copy.deepcopy(critic.net.state_dict())
    reference = ikl.train(adapter, teacher, fake, opts, str(tmp_path / 'a'), critic=critic)
    stopped_opts = dict(opts, total_kimg=0.192)
    adapter, teacher, fake, critic = build(0)
    ikl.train(adapter, teacher, fake, stopped_opts, str(tmp_path / 'b'), critic=critic)
    adapter, teacher, fake, critic = build(5)  # A fresh process: other initial weights, restored by the state.
    resumed = ikl.train(adapter, teacher, fake, opts, str(tmp_path / 'b'), critic=critic, resume='auto')
    assert resumed.cur_nimg == reference.cur_nimg == 320
    for (name, want), got in zip(reference.critic.net.state_dict().items(), resumed.critic.net.state_dict().values()):
        assert torch.equal(want, got), name
    for want, got in zip(reference.adapter.parameters(), resumed.adapter.parameters()):
        assert torch.equal(want, got)
    assert resumed.critic.steps == reference.critic.steps == 10  # Every iteration, warm-up included.
    assert not torch.equal(initial['net.0.weight'], reference.critic.net.state_dict()['net.0.weight'])


def test_refine_adv_trains_the_pickles_D_on_a_cached_teacher_bank(tmp_path, files, monkeypatch):
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'cache'))
    args = ['--network', files['g16_cond'], '--teacher', files['teacher8_cond'], '--adv', '0.5', '--adv-bank', '8',
            '--adv-pixels', '1', '--adv-pixels-res', '4', '--seed', '3'] + REFINE_FAST
    result = invoke(refine.main, args + ['--outdir', str(tmp_path / 'a'), '--kimg', '0.016'])
    assert result.exit_code == 0, result.output
    path = bank_cache_path(files['teacher8_cond'], 8, 18, 0)
    saved = torch.load(path, weights_only=True)
    assert saved['images'].shape == (8, 1, 8, 8) and saved['labels'].argmax(1).tolist() == [0, 1, 2, 0, 1, 2, 0, 1]
    images, _ = teacher_bank(files['teacher8_cond'], None, 8)  # Cached: no teacher needed the second time.
    assert torch.equal(images, saved['images'])

    run_a = only_run_dir(str(tmp_path / 'a'))
    before, after = load_network_pkl(files['g16_cond']), load_network_pkl(last_snapshot(run_a))
    assert any(not torch.equal(p, q) for p, q in zip(before['D'].parameters(), after['D'].parameters()))
    stats = open(os.path.join(run_a, 'stats.jsonl')).read()
    assert 'Loss/critic_D' in stats and 'Loss/critic_pixels' in stats

    # Stopped half-way and resumed: the same G, G_ema and D.
    assert invoke(refine.main, args + ['--outdir', str(tmp_path / 'b'), '--kimg', '0.008']).exit_code == 0
    run_b = only_run_dir(str(tmp_path / 'b'))
    options_path = os.path.join(run_b, 'training_options.json')
    options = json.load(open(options_path))
    options['kimg'] = 0.016
    json.dump(options, open(options_path, 'w'))
    result = invoke(refine.main, ['--resume', run_b])
    assert result.exit_code == 0, result.output
    b = load_network_pkl(last_snapshot(run_b))
    for key in ('G', 'G_ema', 'D'):
        for pa, pb in zip(after[key].parameters(), b[key].parameters()):
            assert torch.equal(pa, pb), key
    # The pixel term's start is the GAN's as given, measured once and carried across the resume.
    state_a, state_b = (torch.load(sorted(glob.glob(os.path.join(r, 'training-state-*.pt')))[-1], weights_only=True)
                        for r in (run_a, run_b))
    assert torch.equal(state_a['critic_pixel_reference'], state_b['critic_pixel_reference'])


def test_a_bank_shipped_beside_its_teacher_replaces_drawing(tmp_path, files, monkeypatch):
    """The exported bank loads as the drawn one to 8-bit precision, without a teacher; another teacher's is refused."""
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'cache'))
    teacher = str(tmp_path / 'teacher.pkl')
    with open(files['teacher8_cond'], 'rb') as src, open(teacher, 'wb') as dst:
        dst.write(src.read())
    drawn, labels = teacher_bank(teacher, teachers_load(teacher), 6)
    shipped = shipped_bank_path(teacher, 6, 18, 0)
    assert shipped == str(tmp_path / 'teacher-bank-n6-heun18-seed0.npz')
    export_bank(shipped, teacher, drawn, labels)
    os.remove(bank_cache_path(teacher, 6, 18, 0))

    class NoSampling(torch.nn.Module):
        label_dim = 3
    images, got_labels = teacher_bank(teacher, NoSampling(), 6)
    assert images.dtype == drawn.dtype and images.shape == drawn.shape and torch.equal(got_labels, labels)
    assert (images.float() - drawn.float().clamp(-1, 1)).abs().max() <= 1 / 127.5 + 1e-3
    assert not os.path.exists(bank_cache_path(teacher, 6, 18, 0))  # Read in place, not copied to the cache.

    torch.manual_seed(123)
    other = write_teacher(tmp_path / 'other.pkl', label_dim=3)  # Same shape, other weights.
    os.replace(shipped, shipped_bank_path(other, 6, 18, 0))
    with pytest.raises(ValueError, match='another teacher'):
        teacher_bank(other, NoSampling(), 6)
    result = invoke(refine.main, ['--network', files['g16_cond'], '--teacher', other, '--adv', '1', '--adv-bank', '6',
                                  '--outdir', str(tmp_path / 'runs'), '--kimg', '0.004'] + REFINE_FAST)
    assert result.exit_code != 0 and '--adv-bank:' in result.output and 'another teacher' in result.output
    assert 'Traceback' not in result.output


def test_refine_adv_errors_are_one_line(tmp_path, files):
    result = invoke(refine.main, ['--network', files['g16_cond'], '--teacher', files['teacher8'], '--adv', '1',
                                  '--outdir', str(tmp_path)] + REFINE_FAST)
    assert result.exit_code != 0
    assert 'the discriminator of' in result.output and 'has 3 classes but the teacher sees 0' in result.output
    no_d = str(tmp_path / 'g-only.pkl')
    save_network_pkl(no_d, G=tiny_G(), G_ema=tiny_G())
    result = invoke(refine.main, ['--network', no_d, '--teacher', files['teacher8'], '--adv', '1', '--outdir', str(tmp_path)] + REFINE_FAST)
    assert result.exit_code != 0 and 'holds no discriminator D' in result.output
    result = invoke(refine.main, ['--network', files['g16_cond'], '--teacher', files['teacher8_cond'], '--adv', '0',
                                  '--adv-pixels', '1', '--outdir', str(tmp_path)] + REFINE_FAST)
    assert result.exit_code != 0 and '--adv-pixels:' in result.output and 'needs --adv > 0' in result.output


def _frechet(first, second, bank):
    """The Frechet distance of moments (first, second) to `bank` ([M, D]), by metrics.formulas (scipy's sqrtm)."""
    b = bank.numpy()
    first, second = first.numpy(), second.numpy()
    return frechet_distance(first, second - np.outer(first, first), b.mean(0), np.cov(b, rowvar=False, bias=True))


def test_pixel_moments_of_one_batch_are_the_frechet_distance_of_the_batch():
    """Half-life 0: the loss is the Frechet distance of the batch's own mean and (biased) covariance to the bank's,
    as metrics.formulas computes it, and its gradient is that distance's, by central differences."""
    torch.manual_seed(2)
    bank = torch.randn(50, 1, 2, 2) * 0.5 + 0.2
    term = PixelMoments(bank, res=2, halflife_kimg=0)
    x0 = torch.randn(7, 1, 2, 2, dtype=torch.float64, requires_grad=True)
    loss = term.loss(x0)
    loss.backward()

    def distance(x):
        y = x.flatten(1)
        return _frechet(y.mean(0), y.T @ y / len(y), bank.double().flatten(1))
    assert abs(float(loss.detach()) - distance(x0.detach())) < 1e-5
    eps, x = 1e-5, x0.detach().clone()
    for index in [(0, 0, 0, 0), (3, 0, 1, 0), (6, 0, 1, 1)]:
        up, down = x.clone(), x.clone()
        up[index] += eps
        down[index] -= eps
        assert abs(float(x0.grad[index]) - (distance(up) - distance(down)) / (2 * eps)) < 1e-4


def test_pixel_moments_value_is_the_running_average_and_gradient_flows_through_the_batch():
    """Three batches: the value is the distance at the bias-corrected exponential average of the batches' moments;
    the gradient on the last batch's samples is that distance's gradient in the moments (central differences) times
    d(moments)/d(sample)."""
    torch.manual_seed(3)
    bank = torch.rand(40, 1, 2, 2)
    term = PixelMoments(bank, res=2, halflife_kimg=0.004)  # beta = 0.5 ** (n / 4)
    batches = [torch.randn(4, 1, 2, 2, dtype=torch.float64) * s for s in (0.3, 0.6, 0.9)]
    firsts, seconds = [], []
    for i, x in enumerate(batches):
        loss = term.loss(x.requires_grad_(i == 2))
        y = x.detach().flatten(1)
        firsts.append(y.mean(0))
        seconds.append(y.T @ y / len(y))
    w = [0.5 * 0.5 ** (2 - i) for i in range(3)]
    first = sum(wi * f for wi, f in zip(w, firsts)) / sum(w)
    second = sum(wi * s for wi, s in zip(w, seconds)) / sum(w)
    b = bank.double().flatten(1)
    assert abs(float(loss.detach()) - _frechet(first, second, b)) < 1e-5
    # d loss / d y_i = (dL/dfirst + 2 dL/dsecond y_i) / n, with dL/dfirst, dL/dsecond (symmetric) at the running moments.
    eps, dim = 1e-6, len(first)
    g_first = torch.zeros(dim, dtype=torch.float64)
    g_second = torch.zeros(dim, dim, dtype=torch.float64)
    for i in range(dim):
        step = torch.zeros(dim, dtype=torch.float64)
        step[i] = eps
        g_first[i] = (_frechet(first + step, second, b) - _frechet(first - step, second, b)) / (2 * eps)
        for j in range(dim):
            sym = torch.zeros(dim, dim, dtype=torch.float64)
            sym[i, j] += eps / 2
            sym[j, i] += eps / 2
            g_second[i, j] = (_frechet(first, second + sym, b) - _frechet(first, second - sym, b)) / (2 * eps)
    y = batches[2].detach().flatten(1)
    want = (g_first[None] + 2 * y @ g_second) / len(y)
    loss.backward()
    assert torch.allclose(batches[2].grad.flatten(1), want, atol=1e-5)


def test_pixel_term_starts_from_the_given_generator_and_weighs_its_distance_relative_to_that_start():
    """`start` sets the running moments to the bias-corrected exponential average of the given batches and the
    reference to their distance; the critic adds `adv_pixel_weight` x distance / reference to every sample's loss,
    the distance taken after the batch joined the moments (all computed here by hand)."""
    torch.manual_seed(5)
    bank = torch.rand(40, 1, 2, 2)
    start = [torch.randn(4, 1, 2, 2, dtype=torch.float64) * s + 0.5 for s in (0.2, 0.4)]
    critic = ikl.TeacherSampleCritic(LinearCritic(4), bank, None,
                                     _opts(adv_pixel_weight=2.0, adv_pixel_res=2, adv_pixel_halflife_kimg=0.004))
    term = critic.pixels  # beta = 0.5 per batch of 4
    x0 = torch.randn(4, 1, 2, 2) * 0.1 - 0.5
    with pytest.raises(RuntimeError, match='not started'):
        critic.generator_loss(x0, None)
    assert term.start_batches(4) == 4 and term.start_batches(3) == 6
    term.start(start)
    ys = [x.flatten(1) for x in start]
    first = (0.25 * ys[0].mean(0) + 0.5 * ys[1].mean(0)) / 0.75
    second = (0.25 * ys[0].T @ ys[0] / 4 + 0.5 * ys[1].T @ ys[1] / 4) / 0.75
    b = bank.double().flatten(1)
    reference = _frechet(first, second, b)
    assert abs(float(term.reference) - reference) < 1e-9
    mean, second_moment = term._running(term.moments)
    assert torch.allclose(mean, first) and torch.allclose(second_moment, second)

    loss = critic.generator_loss(x0, None)
    y = x0.double().flatten(1)
    first = (0.5 * 0.75 * first + 0.5 * y.mean(0)) / 0.875
    second = (0.5 * 0.75 * second + 0.5 * y.T @ y / 4) / 0.875
    pull = 2.0 * _frechet(first, second, b) / reference
    adversarial = 0.5 * F.softplus(-critic.net(x0, None)).reshape(-1)
    assert torch.allclose(loss.detach().double(), (adversarial + pull).detach().double(), atol=1e-5)


def test_pixel_moments_pull_a_narrow_generator_to_the_banks_spread():
    """A 'generator' mu + s * eps whose images are too dark and too alike: descending the loss brings its mean and
    spread to the bank's (0.3, 0.5 per pixel, independent pixels)."""
    torch.manual_seed(4)
    bank = 0.3 + 0.5 * torch.randn(4000, 1, 2, 2)
    term = PixelMoments(bank, res=2, halflife_kimg=0.05)
    mu, s = torch.zeros([], requires_grad=True), torch.full([], 0.1, requires_grad=True)
    opt = torch.optim.Adam([mu, s], lr=0.01)
    for _ in range(600):
        opt.zero_grad()
        term.loss(mu + s * torch.randn(32, 1, 2, 2)).backward()
        opt.step()
    assert abs(float(mu.detach()) - 0.3) < 0.05 and abs(float(s.detach()) - 0.5) < 0.05


def test_pixel_moments_need_the_critic_and_its_state():
    with pytest.raises(ValueError, match='needs the critic'):
        ikl.TrainingOptions.from_dict(dict(adv_pixel_weight=1.0)).check(1)
    critic = ikl.TeacherSampleCritic(LinearCritic(4), torch.rand(10, 1, 2, 2), None, _opts(adv_pixel_weight=1.0, adv_pixel_res=2))
    plain = ikl.TeacherSampleCritic(LinearCritic(4), torch.rand(10, 1, 2, 2), None, _opts())
    with pytest.raises(ValueError, match='without the pixel-moment term'):
        critic.load_state_dict(plain.state_dict())
    with pytest.raises(ValueError, match='no pixel variance'):
        PixelMoments(torch.ones(5, 1, 2, 2), res=2, halflife_kimg=1)
