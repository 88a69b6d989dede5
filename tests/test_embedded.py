"""The shipped Fashion-MNIST models (`embedded/`): they load, they are trained, and the reference statistics match
the offline detector. Real test images: tests/data/metrics_fmnist_t10k_300.npz (Fashion-MNIST, MIT)."""

import os

import numpy as np
import pytest
import torch

from pipelines import generators
import teachers
from metrics import compute_metrics
from metrics.detectors import load_detector
from metrics.references import StatsFileReference
from stylegan2.pickles import load_network_pkl
from test_metrics_pipeline import DATA, BankAdapter, NoiseAdapter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMBEDDED = os.path.join(ROOT, 'embedded')
FILES = dict(gan='fmnist-stylegan2.pkl', gan240='fmnist-stylegan2-240kimg.pkl',
             gan_gamma1='fmnist-stylegan2-gamma1-160kimg.pkl', teacher='fmnist-edm.pkl',
             teacher492='fmnist-edm-492kimg.pkl', student='fmnist-onestep.pkl',
             ref='fmnist-32x32-fmnist.npz', bank='fmnist-edm-492kimg-bank-n10000-heun18-seed0.npz')


def path(kind):
    return os.path.join(EMBEDDED, FILES[kind])


def real_images():
    """The 300 test images, padded 28 -> 32 like the training data, in [-1, 1]."""
    with np.load(DATA) as data:
        images = torch.from_numpy(np.pad(data['images'], [(0, 0), (2, 2), (2, 2)])).float() / 127.5 - 1
        return images[:, None], torch.from_numpy(data['labels']).long()


def test_embedded_files_fit_the_size_budget():
    sizes = {kind: os.path.getsize(path(kind)) for kind in FILES}
    assert sum(sizes.values()) <= 25 * 2 ** 20, sizes


def test_embedded_generators_sample_images_of_the_right_kind():
    for kind in ('gan', 'gan240', 'gan_gamma1'):
        G = load_network_pkl(path(kind))['G_ema']
        assert (G.img_resolution, G.img_channels, G.c_dim) == (32, 1, 10)
    for kind in ('gan', 'gan240', 'gan_gamma1', 'student'):
        images, labels = generators.load_generator(path(kind), torch.device('cpu')).sample(8, torch.Generator().manual_seed(0))
        assert images.shape == (8, 1, 32, 32) and torch.isfinite(images).all(), kind
        assert labels.shape == (8, 10) and bool((labels.sum(1) == 1).all()), kind
        # Garments on a black background, as in the data: the corners are dark, the centre is not.
        assert float(images[:, :, :3, :3].mean()) < -0.8 < float(images[:, :, 12:20, 12:20].mean()), kind


@pytest.mark.parametrize('kind', ['teacher', 'teacher492'])
def test_embedded_teacher_denoises_real_images(kind):
    net = teachers.load(path(kind))
    x, labels = real_images()
    x, onehot = x[:64], torch.nn.functional.one_hot(labels[:64], 10).float()
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    for sigma in (0.1, 0.5, 2.0):
        with torch.no_grad():
            denoised = net(x + sigma * noise, torch.full([64], sigma), onehot)
        # Far better than the noisy input and than the best constant (the data mean).
        assert float((denoised - x).square().mean()) < 0.3 * min(sigma ** 2, float(x.var())), sigma


def test_embedded_reference_statistics_match_real_images():
    """Real test images are close to the shipped statistics of the training set; noise is far."""
    reference = StatsFileReference(path('ref'))
    detector = load_detector('fmnist')
    x, _ = real_images()
    fd = lambda gen: next(iter(compute_metrics(['fid300'], gen, reference, detector=detector, num_gen=300,
                                               batch_size=100)[0]['results'].values()))
    real, noise = fd(BankAdapter(((x + 1) * 127.5).round().to(torch.uint8))), fd(NoiseAdapter())
    assert real < 5 and noise > 20 * real, (real, noise)


def test_the_shipped_teacher_bank_is_the_492kimg_teachers_and_looks_like_the_data():
    """refine.py --adv finds the bank beside its teacher (no drawing); its classes are balanced and its images
    are as close to the training set's statistics as real test images are."""
    from pipelines.critic import load_shipped_bank, shipped_bank_path
    assert shipped_bank_path(path('teacher492'), 10000, 18, 0) == path('bank')
    images, labels = load_shipped_bank(path('bank'), path('teacher492'), 10000, 10)
    assert images.shape == (10000, 1, 32, 32)
    assert labels.argmax(1).tolist()[:20] == list(range(10)) * 2 and labels.sum(0).tolist() == [1000.0] * 10
    pixels = ((images[:300].float() + 1) * 127.5).round().to(torch.uint8)
    fd = next(iter(compute_metrics(['fid300'], BankAdapter(pixels), StatsFileReference(path('ref')),
                                   detector=load_detector('fmnist'), num_gen=300, batch_size=100)[0]['results'].values()))
    assert fd < 5, fd


def test_one_reader_for_every_generator_kind_and_a_clear_refusal_of_the_wrong_one():
    from torch_utils.pickle_reader import NetworkPickleError
    kinds = {name: generators.load_network(os.path.join(EMBEDDED, name)).kind
             for name in ('fmnist-stylegan2.pkl', 'fmnist-onestep.pkl', 'fmnist-edm.pkl')}
    assert kinds == {'fmnist-stylegan2.pkl': 'stylegan2', 'fmnist-onestep.pkl': 'one-step', 'fmnist-edm.pkl': 'diffusion'}
    G = generators.load_network(os.path.join(EMBEDDED, 'fmnist-stylegan2.pkl'), kinds=('stylegan2',)).net
    assert not G.training and not any(p.requires_grad for p in G.parameters())
    with pytest.raises(NetworkPickleError, match='this is a diffusion pickle; expected stylegan2'):
        generators.load_network(os.path.join(EMBEDDED, 'fmnist-edm.pkl'), kinds=('stylegan2',))
