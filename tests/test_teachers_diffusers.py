"""Diffusers models as teachers (teachers.diffusers_teacher, teachers.diffusers_load), checked against diffusers'
own schedulers and against closed forms, on tiny random UNet2DModels saved with save_pretrained into tmp dirs.

The closed-form cases use stand-in "UNets" for Gaussian data x0 ~ N(mu, s^2) (per pixel): their output is the
exact epsilon (VP) or the exact score (score-SDE VE) of that data at the timestep they are handed, so the wrapper's
D must equal the exact Gaussian denoiser mu + s^2 / (s^2 + sigma^2) (x - mu), and every correct sampler, ours and
diffusers', must return N(mu, s^2). The VE stand-in works in diffusers' [0, 1] data convention, which makes the
check of our [-1, 1] conversion a closed-form one too. A fractional VP timestep is read by the stand-in with its
own log-sigma interpolation of the schedule (numpy), the continuous extension the wrapper documents.

Nothing is downloaded: the Hub-id cases point the Hugging Face cache at an empty folder.
"""

import copy
import json
import os
import pickle
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip('diffusers')

import teachers  # noqa: E402
from pipelines import generators  # noqa: E402
from teachers import diffusers_load  # noqa: E402
from teachers.diffusers_load import DiffusersLoadError, teacher_from_scheduler  # noqa: E402
from teachers.diffusers_teacher import DiffusersTeacher  # noqa: E402
from teachers.sampling import edm_sampler  # noqa: E402
from torch_utils import persistence  # noqa: E402
from torch_utils.pickle_reader import read_pickle  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BETA_SCHEDULES = ('linear', 'scaled_linear', 'squaredcos_cap_v2')
PREDICTIONS = ('epsilon', 'sample', 'v_prediction')


def tiny_unet(channels=1, classes=None, seed=0, **kwargs):
    """A random 8 px UNet2DModel (two levels, 8 and 16 channels)."""
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(sample_size=8, in_channels=channels, out_channels=channels, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=('DownBlock2D', 'AttnDownBlock2D'),
                                 up_block_types=('AttnUpBlock2D', 'UpBlock2D'), norm_num_groups=4,
                                 attention_head_dim=4, num_class_embeds=classes, **kwargs).eval()


def save_pipeline(folder, unet, scheduler):
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(str(folder))
    return str(folder)


def save_model_folder(folder, unet, scheduler):
    """The UNet's own folder with `scheduler_config.json` beside its config.json."""
    unet.save_pretrained(str(folder))
    scheduler.save_config(str(folder))
    return str(folder)


def one_line(err):
    message = str(err.value)
    assert '\n' not in message and len(message) < 1000, message
    return message


def sigmas_of(scheduler):
    abar = scheduler.alphas_cumprod.double()
    return ((1 - abar) / abar).sqrt()


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
    d = tmp_path_factory.mktemp('diffusers')
    return dict(
        pipeline=save_pipeline(d / 'pipeline', tiny_unet(), diffusers.DDPMScheduler(num_train_timesteps=1000)),
        model=save_model_folder(d / 'model', tiny_unet(seed=1),
                                diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule='squaredcos_cap_v2',
                                                        prediction_type='v_prediction', clip_sample=False)),
        cond=save_pipeline(d / 'cond', tiny_unet(classes=3, seed=2), diffusers.DDPMScheduler(num_train_timesteps=1000)),
        rgb=save_pipeline(d / 'rgb', tiny_unet(channels=3, seed=3), diffusers.DDPMScheduler(num_train_timesteps=1000)))

# ----------------------------------------------------------------------------------------------------------------
# x0 at the model's own timesteps, against diffusers' schedulers.


@pytest.fixture(scope='module')
def unet():
    return tiny_unet(channels=3, seed=4)


@pytest.mark.parametrize('scheduler_class', ['DDPMScheduler', 'DDIMScheduler'])
@pytest.mark.parametrize('beta_schedule', BETA_SCHEDULES)
@pytest.mark.parametrize('prediction_type', PREDICTIONS)
def test_x0_equals_the_schedulers_pred_original_sample(unet, scheduler_class, beta_schedule, prediction_type):
    scheduler = getattr(diffusers, scheduler_class)(num_train_timesteps=1000, beta_schedule=beta_schedule,
                                                     prediction_type=prediction_type, clip_sample=False)
    if scheduler_class == 'DDIMScheduler':
        scheduler.set_timesteps(20)
    teacher = teacher_from_scheduler(unet, scheduler)
    abar = scheduler.alphas_cumprod.double()
    gen = torch.Generator().manual_seed(1)
    for t in (0, 1, 37, 500, 998, 999):
        x0 = torch.rand(2, 3, 8, 8, generator=gen) * 2 - 1
        noise = torch.randn(2, 3, 8, 8, generator=gen)
        timesteps = torch.full([2], t, dtype=torch.long)
        x_vp = scheduler.add_noise(x0, noise, timesteps)  # diffusers' own forward process
        sigma = float(((1 - abar[t]) / abar[t]).sqrt())
        x = x_vp.double() / abar[t].sqrt()  # x = x0 + sigma n  <=>  x_vp = x / sqrt(1 + sigma^2)
        with torch.no_grad():
            expected = scheduler.step(unet(x_vp, timesteps).sample, t, x_vp,
                                      generator=torch.Generator().manual_seed(0)).pred_original_sample
            ours = teacher(x.float(), torch.full([2], sigma))
        tol = 2e-5 * (1 + sigma)
        assert torch.allclose(ours, expected, atol=tol, rtol=1e-4), (t, float((ours - expected).abs().max()))


# ----------------------------------------------------------------------------------------------------------------
# The map between sigma and timesteps.


def test_sigma_to_timestep_is_exact_at_the_grid_monotone_and_clamped(unet):
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000)
    sigmas = sigmas_of(scheduler)
    teacher = teacher_from_scheduler(unet, scheduler)
    assert teacher.sigma_min == pytest.approx(float(sigmas[0])) and teacher.sigma_max == pytest.approx(float(sigmas[-1]))
    grid = torch.arange(1000, dtype=torch.float64)
    assert torch.allclose(teacher.timestep(sigmas), grid, atol=1e-9, rtol=0)
    assert torch.allclose(teacher.sigma_at(grid), sigmas, rtol=1e-12, atol=0)
    # Between two grid points: linear in log-sigma, so the geometric mean sits half way.
    middle = (sigmas[:-1] * sigmas[1:]).sqrt()
    assert torch.allclose(teacher.timestep(middle), grid[:-1] + 0.5, atol=1e-9, rtol=0)
    dense = torch.logspace(np.log10(float(sigmas[0])), np.log10(float(sigmas[-1])), 5000, dtype=torch.float64)
    t = teacher.timestep(dense)
    assert bool((t[1:] >= t[:-1]).all()) and float(t[0]) == pytest.approx(0) and float(t[-1]) == pytest.approx(999)
    assert torch.allclose(teacher.sigma_at(t), dense, rtol=1e-9, atol=0)
    # Outside the trained range: the timestep is clamped to the schedule's ends.
    outside = torch.tensor([1e-6, float(sigmas[0]) / 2, float(sigmas[-1]) * 2, 1e4], dtype=torch.float64)
    assert teacher.timestep(outside).tolist() == [0.0, 0.0, 999.0, 999.0]
    # ... and the sigma given still scales the input, so D(x; sigma) -> x as sigma -> 0.
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(teacher(x, 1e-7), x, atol=1e-5)
    # A continuous time embedding: round_sigma is the identity.
    assert torch.equal(torch.as_tensor(teacher.round_sigma(torch.tensor([0.3, 2.0]))), torch.tensor([0.3, 2.0]))


def test_round_sigma_snaps_to_the_grid_for_a_learned_time_embedding():
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=100)
    sigmas = sigmas_of(scheduler)
    learned = tiny_unet(time_embedding_type='learned', num_train_timesteps=100)
    teacher = teacher_from_scheduler(learned, scheduler)
    assert teacher.discrete_timesteps
    queries = torch.tensor([float(sigmas[10]) * 1.001, float(sigmas[50]), float((sigmas[70] * sigmas[71]).sqrt()) * 1.01,
                            1e-5, 1e3], dtype=torch.float64)
    expected = sigmas[[10, 50, 71, 0, 99]]
    assert torch.allclose(torch.as_tensor(teacher.round_sigma(queries)), expected, rtol=1e-12, atol=0)
    assert teacher.timestep(queries).tolist() == [10.0, 50.0, 71.0, 0.0, 99.0]
    seen = []
    learned.register_forward_pre_hook(lambda module, args: seen.append(args[1]))
    with torch.no_grad():
        teacher(torch.randn(5, 1, 8, 8), queries)
    assert seen[0].dtype == torch.long and seen[0].tolist() == [10, 50, 71, 0, 99]
    # The sampler's noise levels are the ones the model knows.
    steps = teachers.sampling.edm_time_steps(teacher, num_steps=6)[:-1]
    assert all(bool((sigmas - s).abs().min() < 1e-9 * s) for s in steps)


# ----------------------------------------------------------------------------------------------------------------
# The score identity.


@pytest.mark.parametrize('prediction_type', ['epsilon', 'v_prediction'])
def test_score_identity_against_the_unets_own_epsilon(unet, prediction_type):
    """(D(x; sigma) - x) / sigma^2 is the score of the noisy data in our x = x0 + sigma n space, which is
    sqrt(abar) times the VP model's score -eps / sqrt(1 - abar) (computed here from the UNet's raw output)."""
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule='scaled_linear',
                                        prediction_type=prediction_type)
    teacher = teacher_from_scheduler(unet, scheduler)
    log_sigmas = np.log(sigmas_of(scheduler).numpy())
    gen = torch.Generator().manual_seed(2)
    for sigma in (float(np.exp(log_sigmas[3])), 0.05, 0.8, 3.0, 40.0):
        t = float(np.interp(np.log(sigma), log_sigmas, np.arange(1000)))  # the fractional timestep of this sigma
        abar = 1 / (1 + sigma ** 2)
        x = torch.randn(2, 3, 8, 8, generator=gen, dtype=torch.float64) * (1 + sigma)
        x_vp = x * abar ** 0.5
        with torch.no_grad():
            raw = unet(x_vp.float(), torch.full([2], t)).sample.double()
            score = (teacher(x.float(), sigma).double() - x) / sigma ** 2
        eps = raw if prediction_type == 'epsilon' else abar ** 0.5 * raw + (1 - abar) ** 0.5 * x_vp
        expected = abar ** 0.5 * (-eps / (1 - abar) ** 0.5)
        assert torch.allclose(score, expected, atol=2e-4 * (1 + 1 / sigma), rtol=1e-4), sigma


# ----------------------------------------------------------------------------------------------------------------
# Closed forms: Gaussian data.

MU, S = 0.05, 0.3          # the [-1, 1] data of the VP stand-in (diffusers' pipeline clamps to [-1, 1])
VE_M, VE_V = 0.55, 0.08    # the [0, 1] data of the VE stand-in (in our convention N(0.1, 0.16^2))


class StandInConfig(dict):
    """A config readable both ways, as diffusers' FrozenDict is."""
    __getattr__ = dict.__getitem__


class GaussianStandIn(torch.nn.Module):
    """Called like a UNet2DModel, `(sample, timestep, class_labels=None) -> .sample`, returning the exact
    prediction for Gaussian data. 'vp': x_vp = a x0 + b eps with a^2 = abar(t), a^2 + b^2 = 1, data N(mu, s^2):
    E[eps | x_vp] = b (x_vp - a mu) / (a^2 s^2 + b^2); then converted to the prediction type. 've': data
    N(m, v^2) on [0, 1], the timestep is the noise level; the score is -(y - m) / (v^2 + t^2)."""

    def __init__(self, kind, sample_size=4, channels=1, sigmas=None, prediction_type='epsilon'):
        super().__init__()
        self.kind = kind
        self.prediction_type = prediction_type
        self.log_sigmas = None if sigmas is None else np.log(np.asarray(sigmas, dtype=np.float64))
        self.config = StandInConfig(sample_size=sample_size, in_channels=channels, out_channels=channels)
        self.calls = 0

    dtype = torch.float32
    device = torch.device('cpu')

    def forward(self, sample, timestep, class_labels=None, return_dict=True):
        self.calls += 1
        x = sample.double()
        t = np.broadcast_to(np.asarray(torch.as_tensor(timestep).double().cpu()), [x.shape[0]])
        per_sample = lambda values: torch.as_tensor(np.ascontiguousarray(values)).reshape(-1, 1, 1, 1)
        if self.kind == 've':
            var = per_sample(VE_V ** 2 + t ** 2)
            return types.SimpleNamespace(sample=(-(x - VE_M) / var).float())
        sigma = np.exp(np.interp(t, np.arange(len(self.log_sigmas)), self.log_sigmas))
        a, b = per_sample(1 / np.sqrt(1 + sigma ** 2)), per_sample(sigma / np.sqrt(1 + sigma ** 2))
        eps = b * (x - a * MU) / (a ** 2 * S ** 2 + b ** 2)
        x0 = (x - b * eps) / a
        out = dict(epsilon=eps, sample=x0, v_prediction=a * eps - b * x0)[self.prediction_type]
        return types.SimpleNamespace(sample=out.float())


def gaussian_denoiser(x, sigma, mu, s):
    return mu + s ** 2 / (s ** 2 + sigma ** 2) * (x - mu)


def assert_gaussian(samples, mu, s, what):
    """Mean and std within 4 standard errors, the std also within 3% for the samplers' discretisation."""
    samples = samples.double().flatten()
    n = samples.numel()
    mean, std = float(samples.mean()), float(samples.std())
    assert abs(mean - mu) < 4 * s / n ** 0.5, f'{what}: mean {mean:.4f}, expected {mu} (n={n})'
    assert abs(std / s - 1) < 4 / (2 * n) ** 0.5 + 0.03, f'{what}: std {std:.4f}, expected {s} (n={n})'


def assert_gaussian_transport(latents, samples, mu, s, what):
    """A deterministic sampler of Gaussian data is an affine map of its latents, x0 = mu + s z (in the limit of
    small steps): far tighter than the Monte-Carlo check. Pixels that diffusers' pipeline clamped are left out."""
    z, x = latents.double().flatten(), samples.double().flatten()
    keep = x.abs() < 0.99
    design = torch.stack([torch.ones_like(z[keep]), z[keep]], dim=1)
    (intercept, slope), = torch.linalg.lstsq(design, x[keep, None]).solution.T.tolist()
    residual = float((x[keep] - design @ torch.tensor([intercept, slope], dtype=torch.float64)).abs().max())
    assert abs(intercept - mu) < 3e-3 and abs(slope / s - 1) < 0.03 and residual < 1e-4, \
        f'{what}: x0 = {intercept:.4f} + {slope:.4f} z (max residual {residual:.2g}), expected {mu} + {s} z'


@pytest.mark.parametrize('prediction_type, beta_schedule', [('epsilon', 'linear'), ('sample', 'scaled_linear'),
                                                            ('v_prediction', 'squaredcos_cap_v2')])
def test_vp_gaussian_closed_form_denoiser_and_samples_ours_and_diffusers_ddim(prediction_type, beta_schedule):
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule,
                                        prediction_type=prediction_type, clip_sample=False)
    stand_in = GaussianStandIn('vp', sigmas=sigmas_of(scheduler).numpy(), prediction_type=prediction_type)
    teacher = teacher_from_scheduler(stand_in, scheduler)
    assert (teacher.img_resolution, teacher.img_channels, teacher.label_dim) == (4, 1, 0)
    gen = torch.Generator().manual_seed(3)
    # Grid and off-grid noise levels inside the trained range (outside it only the timestep is clamped, so a
    # sample-predicting model is no longer the exact denoiser there).
    for sigma in (teacher.sigma_min, 0.3, 0.77, 5.0, teacher.sigma_max):
        x = MU + torch.randn(4, 1, 4, 4, generator=gen) * (S ** 2 + sigma ** 2) ** 0.5
        expected = gaussian_denoiser(x.double(), sigma, MU, S)
        assert torch.allclose(teacher(x, sigma).double(), expected, atol=1e-5 * (1 + sigma)), sigma

    latents = torch.randn(256, 1, 4, 4, generator=torch.Generator().manual_seed(4))
    ours = edm_sampler(teacher, latents, num_steps=40)
    assert_gaussian(ours, MU, S, 'our Heun sampler')
    assert_gaussian_transport(latents, ours, MU, S, 'our Heun sampler')

    pipe = diffusers.DDIMPipeline(unet=stand_in, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=256, generator=torch.Generator().manual_seed(5), eta=0.0, num_inference_steps=250,
                  output_type='pt').images
    assert_gaussian(images * 2 - 1, MU, S, "diffusers' DDIMPipeline")
    pipeline_latents = torch.randn(256, 1, 4, 4, generator=torch.Generator().manual_seed(5))  # as the pipeline drew
    assert_gaussian_transport(pipeline_latents, images * 2 - 1, MU, S, "diffusers' DDIMPipeline")


def test_ve_gaussian_closed_form_denoiser_and_samples_ours_and_diffusers_score_sde():
    """The VE model's [0, 1] convention: in our [-1, 1] the data is N(2m - 1, (2v)^2) and D is its exact denoiser."""
    scheduler = diffusers.ScoreSdeVeScheduler(num_train_timesteps=300, sigma_min=0.01, sigma_max=20.0, snr=0.16)
    stand_in = GaussianStandIn('ve', channels=3)
    teacher = teacher_from_scheduler(stand_in, scheduler)
    assert (teacher.sigma_min, teacher.sigma_max) == (pytest.approx(0.02), pytest.approx(40.0))
    mu, s = 2 * VE_M - 1, 2 * VE_V
    gen = torch.Generator().manual_seed(6)
    for sigma in (0.02, 0.1, 1.0, 13.0, 40.0):
        x = mu + torch.randn(4, 3, 4, 4, generator=gen) * (s ** 2 + sigma ** 2) ** 0.5
        assert torch.allclose(teacher(x, sigma).double(), gaussian_denoiser(x.double(), sigma, mu, s),
                              atol=1e-5 * (1 + sigma)), sigma
    # The timestep handed to the model is its own sigma, half of ours.
    assert torch.allclose(teacher.timestep(torch.tensor([0.1, 3.0])), torch.tensor([0.05, 1.5], dtype=torch.float64))

    latents = torch.randn(128, 3, 4, 4, generator=torch.Generator().manual_seed(7))
    ours = edm_sampler(teacher, latents, num_steps=40)
    assert_gaussian(ours, mu, s, 'our Heun sampler (VE)')
    assert_gaussian_transport(latents, ours, mu, s, 'our Heun sampler (VE)')

    pipe = diffusers.ScoreSdeVePipeline(unet=stand_in, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=128, num_inference_steps=300, generator=torch.Generator().manual_seed(8),
                  output_type='np').images
    assert_gaussian(torch.as_tensor(images), VE_M, VE_V, "diffusers' ScoreSdeVePipeline ([0, 1] data)")


# ----------------------------------------------------------------------------------------------------------------
# Class-conditional models, pickles.


def test_class_conditional_one_hot_labels_become_class_indices(folders):
    teacher = teachers.load(folders['cond'])
    assert teacher.label_dim == 3
    unet = teacher.unet
    abar = 1 / (1 + 0.5 ** 2)
    t = float(teacher.timestep(0.5))
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(9))
    x = x[:1].expand(3, -1, -1, -1)  # the same image under each class
    with torch.no_grad():
        ours = teacher(x, 0.5, torch.eye(3)[[0, 1, 2]])
        mixed = teacher(x, 0.5, torch.eye(3)[[2, 0, 1]])
        direct = x - 0.5 * unet(x * abar ** 0.5, torch.full([3], t), class_labels=torch.tensor([0, 1, 2])).sample
    assert torch.allclose(ours, direct, atol=1e-6)
    assert torch.allclose(mixed, ours[[2, 0, 1]], atol=1e-6)
    assert float((ours[0] - ours[1]).abs().max()) > 1e-4 and float((ours[1] - ours[2]).abs().max()) > 1e-4


def test_pickle_round_trips_give_identical_outputs_and_keep_the_callers_rng(folders, tmp_path):
    teacher = teachers.load(folders['cond'])
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(10))
    labels = torch.eye(3)[[0, 2]]
    with torch.no_grad():
        before = teacher(x, torch.tensor([0.3, 4.0]), labels)
    data = pickle.dumps(dict(ema=teacher, init_sigma=2.0))
    path = tmp_path / 'student.pkl'
    path.write_bytes(data)

    torch.manual_seed(123)
    rng = torch.get_rng_state()
    plain = pickle.loads(data)['ema']
    assert torch.equal(torch.get_rng_state(), rng)
    copied = copy.deepcopy(teacher)
    assert torch.equal(torch.get_rng_state(), rng)
    persistence.refuse_unknown_sources(True)
    try:
        restricted = read_pickle(str(path))['ema']
    finally:
        persistence.refuse_unknown_sources(False)
    assert torch.equal(torch.get_rng_state(), rng)
    for other in (plain, copied, restricted):
        assert isinstance(other, DiffusersTeacher) and other.label_dim == 3 and not other.training
        assert not any(p.requires_grad for p in other.parameters())
        with torch.no_grad():
            assert torch.equal(other(x, torch.tensor([0.3, 4.0]), labels), before)
    # What distill.py writes reads back as a one-step student.
    loaded = generators.load_network(str(path))
    assert loaded.kind == 'one-step' and isinstance(loaded.net, DiffusersTeacher)


def test_a_trainable_copy_trains_and_pickles_its_frozen_flags(folders):
    teacher = teachers.load(folders['pipeline'])
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    student.unet.conv_in.requires_grad_(False)
    again = pickle.loads(pickle.dumps(student))
    assert again.training
    assert [n for n, p in again.named_parameters() if not p.requires_grad] == ['unet.conv_in.weight', 'unet.conv_in.bias']
    loss = again(torch.randn(2, 1, 8, 8), 1.0).square().mean()
    loss.backward()
    assert again.unet.conv_out.weight.grad is not None and again.unet.conv_in.weight.grad is None


# ----------------------------------------------------------------------------------------------------------------
# Loading, and one-line errors.


def test_every_folder_layout_loads_through_teachers_and_pipelines(folders):
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule='squaredcos_cap_v2',
                                        prediction_type='v_prediction')
    reference = teacher_from_scheduler(tiny_unet(seed=1), scheduler)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        expected = reference(x, torch.tensor([0.1, 9.0]))
        for source in (folders['model'], folders['model'] + '/'):
            teacher = teachers.load(source)
            assert teacher.prediction_type == 'v_prediction' and not teacher.training
            assert not any(p.requires_grad for p in teacher.parameters())
            assert torch.allclose(teacher(x, torch.tensor([0.1, 9.0])), expected, atol=1e-6)
        pipeline = teachers.load(folders['pipeline'])
        unet_only = teachers.load(os.path.join(folders['pipeline'], 'unet'))  # scheduler found in ../scheduler/
        assert torch.equal(pipeline(x, 2.0), unet_only(x, 2.0))
    loaded = generators.load_network(folders['pipeline'], kinds=('diffusion',))
    assert loaded.kind == 'diffusion' and isinstance(loaded.net, DiffusersTeacher) and loaded.data == {}
    with pytest.raises(teachers.NetworkPickleError) as err:
        generators.load_network(folders['pipeline'], kinds=('stylegan2',))
    assert 'directory' in one_line(err)
    adapter = generators.load_generator(folders['rgb'], num_steps=3)
    images, labels = adapter.sample(2, torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 8, 8) and labels is None and bool(torch.isfinite(images).all())
    # One cache key per model content, whichever folder layout names it.
    assert generators.network_identity(folders['pipeline']) != generators.network_identity(folders['cond'])
    assert generators.network_identity(folders['pipeline']) == generators.network_identity(folders['pipeline'] + '/')


def test_not_a_diffusers_folder_latent_pipelines_and_unsupported_models_fail_in_one_line(folders, tmp_path):
    empty = tmp_path / 'empty'
    empty.mkdir()
    with pytest.raises(DiffusersLoadError) as err:
        teachers.load(str(empty))
    assert str(empty) in one_line(err) and 'not a diffusers model' in one_line(err)

    latent = tmp_path / 'latent'
    save_pipeline(latent, tiny_unet(), diffusers.DDPMScheduler())
    index = json.loads((latent / 'model_index.json').read_text())
    (latent / 'model_index.json').write_text(json.dumps(dict(index, vae=['diffusers', 'AutoencoderKL'])))
    with pytest.raises(DiffusersLoadError) as err:
        teachers.load(str(latent))
    assert str(latent) in one_line(err) and 'latent' in one_line(err)

    conditional = tmp_path / 'sd-unet'
    conditional.mkdir()
    (conditional / 'config.json').write_text(json.dumps(dict(_class_name='UNet2DConditionModel', sample_size=64)))
    diffusers.DDPMScheduler().save_config(str(conditional))
    with pytest.raises(DiffusersLoadError) as err:
        teachers.load(str(conditional))
    assert 'UNet2DConditionModel' in one_line(err) and str(conditional) in one_line(err)

    for scheduler in (diffusers.FlowMatchEulerDiscreteScheduler(), diffusers.CMStochasticIterativeScheduler()):
        message = f'{type(scheduler).__name__} is not supported'
        folder = tmp_path / type(scheduler).__name__
        save_model_folder(folder, tiny_unet(), scheduler)
        with pytest.raises(DiffusersLoadError) as err:
            teachers.load(str(folder))
        assert message in one_line(err) and str(folder) in one_line(err)

    not_a_scheduler = tmp_path / 'bad-scheduler'
    save_model_folder(not_a_scheduler, tiny_unet(), diffusers.DDPMScheduler())
    (not_a_scheduler / 'scheduler_config.json').write_text(json.dumps(dict(_class_name='UNet2DModel')))
    with pytest.raises(DiffusersLoadError) as err:
        teachers.load(str(not_a_scheduler))
    assert 'names no diffusers scheduler' in one_line(err)

    no_scheduler = tmp_path / 'no-scheduler'
    tiny_unet().save_pretrained(str(no_scheduler))
    with pytest.raises(DiffusersLoadError) as err:
        teachers.load(str(no_scheduler))
    assert 'scheduler_config.json' in one_line(err)

    with pytest.raises(DiffusersLoadError) as err:
        teachers.load(folders['pipeline'], rebuild=True)
    assert 'rebuild' in one_line(err)


def test_an_uncached_hub_id_fails_in_one_line_without_the_network(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants
    empty = tmp_path / 'hf'
    empty.mkdir()
    monkeypatch.setenv('HF_HOME', str(empty))
    monkeypatch.setenv('HF_HUB_CACHE', str(empty / 'hub'))
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(hub_constants, 'HF_HUB_CACHE', str(empty / 'hub'))
    monkeypatch.chdir(tmp_path)  # so that the id is no relative path either
    assert diffusers_load.is_diffusers_source('google/ddpm-cifar10-32')
    with pytest.raises(DiffusersLoadError) as err:
        teachers.load('google/ddpm-cifar10-32')
    message = one_line(err)
    assert message.startswith('google/ddpm-cifar10-32: ') and 'not in the local Hugging Face cache' in message
    assert 'hf download google/ddpm-cifar10-32' in message
    # Pickle names are never taken for Hub ids.
    assert not diffusers_load.is_diffusers_source('runs/network-snapshot.pkl')


def test_a_missing_diffusers_package_is_one_line_naming_the_source(folders, monkeypatch):
    monkeypatch.setitem(sys.modules, 'diffusers', None)  # `import diffusers` now raises ImportError
    with pytest.raises(DiffusersLoadError) as err:
        teachers.load(folders['pipeline'])
    assert one_line(err).startswith(folders['pipeline'] + ': ') and 'pip install' in one_line(err)


def test_the_core_imports_without_diffusers(folders):
    code = textwrap.dedent(f'''
        import sys
        sys.modules['diffusers'] = None  # as if it were not installed
        sys.modules['huggingface_hub'] = None
        import teachers, ikl, pipelines.generators, pipelines.cli, refine, distill, generate, calc_metrics
        try:
            teachers.load({folders['pipeline']!r})
        except teachers.NetworkPickleError as err:
            print('ERROR', err)
    ''')
    result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"ERROR {folders['pipeline']}: a diffusers model needs the optional diffusers"), result.stdout


# ----------------------------------------------------------------------------------------------------------------
# The scripts end to end (in-process CLI), with a diffusers teacher folder.


def run_cli(command, args):
    from click.testing import CliRunner
    result = CliRunner().invoke(command, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


@pytest.fixture()
def isolated_cache(tmp_path):
    import dnnlib
    dnnlib.util.set_cache_dir(str(tmp_path / 'cache'))
    yield tmp_path / 'cache'
    dnnlib.util.set_cache_dir(None)


def test_refine_a_stylegan2_pickle_with_a_diffusers_teacher_then_resume(folders, tmp_path, isolated_cache):
    import refine
    from stylegan2.pickles import load_network_pkl
    from test_refine_distill import REFINE_FAST, last_snapshot, only_run_dir, write_generator
    network = write_generator(tmp_path / 'g16.pkl')
    outdir = str(tmp_path / 'runs')
    result = run_cli(refine.main, ['--network', network, '--teacher', folders['pipeline'], '--outdir', outdir,
                                   '--kimg', '0.008', '--adv', '0.5', '--adv-bank', '8', '--seed', '2'] + REFINE_FAST)
    run_dir = only_run_dir(outdir)
    assert run_dir.endswith('-refine-g16-pipeline') and f'Done at 0.008 kimg: {run_dir}' in result.output
    options = json.load(open(os.path.join(run_dir, 'training_options.json')))
    assert options['teacher'] == folders['pipeline'] and options['resolved']['teacher']['type'] == 'DiffusersTeacher'
    refined, original = load_network_pkl(last_snapshot(run_dir)), load_network_pkl(network)
    assert max(float((a - b).abs().max()) for a, b in zip(refined['G_ema'].parameters(),
                                                          original['G_ema'].parameters())) > 0
    assert os.listdir(isolated_cache / 'teacher-banks')  # --adv's teacher samples, keyed by the folder's content
    options['kimg'] = 0.016
    json.dump(options, open(os.path.join(run_dir, 'training_options.json'), 'w'))
    result = run_cli(refine.main, ['--resume', run_dir])
    assert 'Done at 0.016 kimg' in result.output


def test_distill_a_diffusers_teacher_into_a_one_step_student_then_generate(folders, tmp_path):
    import distill
    import generate
    from test_refine_distill import FAST, last_snapshot, only_run_dir
    outdir = str(tmp_path / 'runs')
    run_cli(distill.main, ['--teacher', folders['cond'], '--init-sigma', '2.5', '--outdir', outdir,
                           '--kimg', '0.008'] + FAST)
    snapshot = last_snapshot(only_run_dir(outdir))
    with open(snapshot, 'rb') as f:
        data = pickle.load(f)
    student, teacher = data['ema'], teachers.load(folders['cond'])
    assert isinstance(student, DiffusersTeacher) and data['init_sigma'] == 2.5 and student.label_dim == 3
    assert max(float((a - b).abs().max()) for a, b in zip(student.parameters(), teacher.parameters())) > 0
    gen_dir = str(tmp_path / 'gen')
    run_cli(generate.main, ['--network', snapshot, '--seeds', '0-1', '--class', '2', '--outdir', gen_dir,
                            '--device', 'cpu'])
    assert sorted(os.listdir(gen_dir)) == ['seed0000.png', 'seed0001.png']


def test_generate_samples_a_diffusers_teacher_folder(folders, tmp_path):
    import generate
    from PIL import Image
    out = tmp_path / 'out'
    run_cli(generate.main, ['--network', folders['rgb'], '--seeds', '0-2', '--steps', '4', '--outdir', str(out),
                            '--device', 'cpu'])
    assert sorted(os.listdir(out)) == ['seed0000.png', 'seed0001.png', 'seed0002.png']
    assert Image.open(out / 'seed0000.png').size == (8, 8) and Image.open(out / 'seed0000.png').mode == 'RGB'
    again = tmp_path / 'again'
    run_cli(generate.main, ['--network', folders['rgb'], '--seeds', '1', '--steps', '4', '--outdir', str(again),
                            '--device', 'cpu'])
    assert (again / 'seed0001.png').read_bytes() == (out / 'seed0001.png').read_bytes()  # one stream per seed


def test_calc_metrics_reference_sampled_from_a_diffusers_teacher(folders, tmp_path, isolated_cache):
    import calc_metrics
    from metrics.detectors import FMNIST_FORMAT
    from metrics.fmnist_net import FashionFeatureNet
    from test_refine_distill import write_generator
    network = write_generator(tmp_path / 'g16.pkl')
    torch.manual_seed(0)
    detector = tmp_path / 'random-detector.pt'
    torch.save(dict(state_dict=FashionFeatureNet().state_dict(), meta=dict(format=FMNIST_FORMAT)), detector)
    args = [f'--network={network}', '--metrics=fid40', f'--ref-network={folders["pipeline"]}', '--ref-num=40',
            '--quiet', f'--detector={detector}', '--batch=20', '--device=cpu']
    first, second = (json.loads(run_cli(calc_metrics.main, args).output) for _ in range(2))
    key = generators.network_identity(folders['pipeline'])
    assert first['reference'].startswith(f'generator:{key}:') and first['results']['fd_random-detector40'] > 0
    assert second['results'] == first['results']  # the second run reads the cached reference
    assert any(isolated_cache.rglob('*'))
