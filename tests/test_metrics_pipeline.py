"""The whole metric pipeline on CPU with tiny data: datasets, detectors, caching, references, runner."""

import io
import json
import os
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch

import dnnlib
from metrics import FashionDetector, MetricRunner, ModuleDetector, compute_metrics, load_detector, parse_metric
from metrics import references
from metrics.detectors import FMNIST_WEIGHTS, UpstreamDetector
from metrics.feature_stats import FeatureStats
from metrics.fmnist_net import FashionFeatureNet
from metrics.formulas import frechet_distance
from metrics.images import InputSpec, adapt_images, generator_output_to_uint8

DATA = os.path.join(os.path.dirname(__file__), 'data', 'metrics_fmnist_t10k_300.npz')  # Fashion-MNIST (MIT).


def write_dataset_zip(path, images, labels=None):
    """Upstream layout: {idx//1000:05d}/img{idx:08d}.png plus dataset.json."""
    with zipfile.ZipFile(path, 'w') as zf:
        names = []
        for idx, image in enumerate(images):
            name = f'{idx // 1000:05d}/img{idx:08d}.png'
            buf = io.BytesIO()
            PIL.Image.fromarray(image).save(buf, format='png')
            zf.writestr(name, buf.getvalue())
            names.append(name)
        meta = dict(labels=None if labels is None else [[n, int(c)] for n, c in zip(names, labels)])
        zf.writestr('dataset.json', json.dumps(meta))


class BankAdapter:
    """Generator adapter serving a fixed uint8 image bank in order, mapped so uint8 conversion is exact."""

    def __init__(self, bank):
        self.bank = torch.as_tensor(bank)
        if self.bank.ndim == 3:
            self.bank = self.bank[:, None]
        self.position = 0

    def sample(self, batch_size, generator=None):
        idx = (torch.arange(batch_size) + self.position) % len(self.bank)
        self.position += batch_size
        return (self.bank[idx].to(torch.float32) - 127.5) / 127.5, None


class NoiseAdapter:
    """Seeded blurry noise images in [-1, 1]."""

    def __init__(self, resolution=32, channels=1, offset=0.0):
        self.resolution, self.channels, self.offset = resolution, channels, offset

    def sample(self, batch_size, generator=None):
        x = torch.rand(batch_size, self.channels, 8, 8, generator=generator) * 2 - 1 + self.offset
        return torch.nn.functional.interpolate(x, size=self.resolution, mode='bilinear').clamp(-1, 1), None


class CountingDetector(ModuleDetector):
    """A small randomly initialised CNN (Fashion-MNIST input) that counts the images it embeds."""

    def __init__(self, seed=0):
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3, 2),
                                  torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())
        spec = InputSpec(channels=1, resolution=32, value_range='pm1', pad_from=28)
        super().__init__(net, name='rand', input_spec=spec)
        self.count = 0

    def _features(self, x):
        self.count += len(x)
        return super()._features(x)


@pytest.fixture()
def fmnist():
    with np.load(DATA) as data:
        return data['images'][:64], data['labels'][:64]


@pytest.fixture()
def cache_dir(tmp_path):
    dnnlib.util.set_cache_dir(str(tmp_path / 'cache'))
    yield tmp_path / 'cache'
    dnnlib.util.set_cache_dir(None)


def test_adapt_images_pads_resizes_and_converts_channels():
    gray28 = torch.full((2, 1, 28, 28), 200, dtype=torch.uint8)
    x = adapt_images(gray28, InputSpec(channels=1, resolution=32, value_range='pm1', pad_from=28))
    assert x.shape == (2, 1, 32, 32)
    assert x[0, 0, 0, 0] == -1 and x[0, 0, 2, 2] == pytest.approx(200 / 127.5 - 1)
    rgb = adapt_images(gray28, InputSpec(channels=3))
    assert rgb.shape == (2, 3, 28, 28) and rgb.dtype == torch.uint8 and bool((rgb == 200).all())
    colour = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
    colour[:, 0] = 255  # Pure red -> luma 0.299 * 255.
    assert adapt_images(colour, InputSpec(channels=1))[0, 0, 0, 0] == round(0.299 * 255)
    up = adapt_images(torch.full((1, 3, 16, 16), 77, dtype=torch.uint8), InputSpec(resolution=64))
    assert up.shape == (1, 3, 64, 64) and bool((up == 77).all())


def test_generator_output_to_uint8_matches_upstream_rounding():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.999, 1.0, 2.0]).view(1, 1, 1, 6)
    expected = np.clip(x.numpy() * 127.5 + 128, 0, 255).astype(np.uint8)
    assert np.array_equal(generator_output_to_uint8(x).numpy(), expected)


def test_metric_names():
    assert parse_metric('fid50k_full').num_gen == 50000
    assert parse_metric('pr50k3_full').detector == 'vgg16'
    assert parse_metric('fid50k_full', num_gen=2000, detector_name='fmnist').name == 'fd_fmnist2k_full'
    assert parse_metric('pr50k3_full', num_gen=40, detector_name='fmnist').name == 'pr_fmnist40_3_full'
    assert parse_metric(parse_metric('pr50k3_full', num_gen=40).name).num_gen == 40
    for bad in ('fid', 'is50k_full', 'pr503_full', 'fid50k3'):
        with pytest.raises(ValueError, match='--metrics'):
            parse_metric(bad)


def test_random_detector_runs_whole_pipeline(tmp_path, cache_dir, fmnist):
    images, labels = fmnist
    write_dataset_zip(tmp_path / 'data.zip', images, labels)
    torch.manual_seed(0)
    detector = FashionDetector(FashionFeatureNet(), name='rand')  # The offline architecture, untrained.
    records = compute_metrics(['fid64_full', 'kid64_full', 'pr64_3_full', 'is64'], NoiseAdapter(),
                              reference=str(tmp_path / 'data.zip'), detector=detector, batch_size=16)
    names = [r['metric'] for r in records]
    assert names == ['fd_rand64_full', 'kd_rand64_full', 'pr_rand64_3_full', 'is_rand64']
    results = {k: v for r in records for k, v in r['results'].items()}
    assert results['fd_rand64_full'] > 0 and results['kd_rand64_full'] > 0
    assert 0 <= results['pr_rand64_3_full_precision'] <= 1 and 0 <= results['pr_rand64_3_full_recall'] <= 1
    assert 1 <= results['is_rand64_mean'] <= 10
    assert all(r['detector'] == 'rand' and r['covariance'] == 'biased' for r in records)


def test_fid_of_dataset_against_itself_is_zero(tmp_path, cache_dir, fmnist):
    images, _ = fmnist
    write_dataset_zip(tmp_path / 'data.zip', images)
    detector = CountingDetector()
    same = compute_metrics(['fid64_full'], BankAdapter(images), str(tmp_path / 'data.zip'), detector, batch_size=10)
    other = compute_metrics(['fid64_full'], BankAdapter(images[::-1].copy() // 2), str(tmp_path / 'data.zip'),
                            detector, batch_size=10)
    same, other = same[0]['results']['fd_rand64_full'], other[0]['results']['fd_rand64_full']
    assert other > 0 and abs(same) < 1e-4 * other


def test_cached_statistics_are_reused_and_invalidated(tmp_path, cache_dir, fmnist):
    images, _ = fmnist
    data = tmp_path / 'data.zip'
    write_dataset_zip(data, images)
    detector = CountingDetector()
    metrics = ['fid16_full', 'kid16_full']  # Both read all 64 reals: one merged pass.

    def run():
        detector.count = 0
        result = compute_metrics(metrics, NoiseAdapter(), str(data), detector, batch_size=16)
        return detector.count, [r['results'] for r in result]

    count, first = run()
    assert count == 64 + 16
    assert len(os.listdir(cache_dir / 'gan-metrics')) == 1
    count, second = run()
    assert count == 16 and second == first  # Reals from the cache; identical numbers.

    modified = images.copy()
    modified[0] = 255 - modified[0]
    write_dataset_zip(data, modified)
    os.utime(data, ns=(os.stat(data).st_atime_ns, os.stat(data).st_mtime_ns + 10**9))
    count, third = run()
    assert count == 64 + 16 and third != first  # Dataset changed: recomputed.

    with torch.no_grad():
        detector.module[0].weight.mul_(1.5)  # Same module, new weights: a new identity.
    count, _ = run()
    assert count == 64 + 16
    assert len(os.listdir(cache_dir / 'gan-metrics')) == 3


def test_edm_style_npz_reference(tmp_path, fmnist):
    images, _ = fmnist
    detector = CountingDetector()
    real = detector.features(torch.as_tensor(images[:, None])).numpy()
    mu, sigma = real.mean(0), np.cov(real, rowvar=False)
    np.savez(tmp_path / 'ref.npz', mu=mu, sigma=sigma)
    adapter = NoiseAdapter()
    record = compute_metrics(['fid32'], adapter, str(tmp_path / 'ref.npz'), detector, batch_size=8, seed=3)[0]
    assert record['covariance'] == 'unbiased'  # EDM's convention against EDM reference files.
    rng = torch.Generator().manual_seed(3)
    gen = torch.cat([generator_output_to_uint8(adapter.sample(8, rng)[0]) for _ in range(4)])
    feats = detector.features(gen).numpy().astype(np.float64)
    expected = frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), mu, sigma)
    assert record['results']['fd_rand32'] == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match='only mu/sigma'):
        compute_metrics(['kid32'], adapter, str(tmp_path / 'ref.npz'), detector, batch_size=8)
    np.savez(tmp_path / 'bad.npz', mean=mu)
    with pytest.raises(ValueError, match='neither mu/sigma'):
        compute_metrics(['fid32'], adapter, str(tmp_path / 'bad.npz'), detector)


def test_saved_statistics_record_their_detector(tmp_path):
    detector, other = CountingDetector(0), CountingDetector(1)
    stats = FeatureStats(capture_all=True, capture_mean_cov=True)
    stats.append(detector.features(torch.randint(0, 255, (20, 1, 32, 32), dtype=torch.uint8)))
    stats.save(str(tmp_path / 'stats.npz'), detector=detector.identity)
    loaded = FeatureStats.load(str(tmp_path / 'stats.npz'))
    assert np.array_equal(loaded.get_all(), stats.get_all())
    assert np.allclose(loaded.get_mean_cov()[1], stats.get_mean_cov()[1])
    record = compute_metrics(['kid20'], NoiseAdapter(), str(tmp_path / 'stats.npz'), detector, batch_size=10)[0]
    assert record['covariance'] == 'biased'
    with pytest.raises(ValueError, match='another detector'):
        compute_metrics(['fid20'], NoiseAdapter(), str(tmp_path / 'stats.npz'), other)


def test_fid_to_teacher_samples(tmp_path):
    """Data-free reference: samples of another generator (the teacher with its sampler)."""
    detector = CountingDetector()
    teacher = references.GeneratorReference(NoiseAdapter(), num=48, seed=5, batch_size=16)
    same = compute_metrics(['fid48'], NoiseAdapter(), teacher, detector, batch_size=16, seed=5)[0]
    shifted = compute_metrics(['fid48'], NoiseAdapter(offset=0.5), teacher, detector, batch_size=16, seed=5)[0]
    assert abs(same['results']['fd_rand48']) < 1e-6
    assert shifted['results']['fd_rand48'] > 1e-3
    assert same['reference'].startswith('generator:')
    detector.count = 0
    compute_metrics(['fid48'], NoiseAdapter(), teacher, detector, batch_size=16)
    assert detector.count == 48  # Reference samples were kept in memory.


def test_runner_appends_jsonl_and_reuses_reference(tmp_path, cache_dir, fmnist):
    images, _ = fmnist
    write_dataset_zip(tmp_path / 'data.zip', images)
    detector = CountingDetector()
    runner = MetricRunner(['fid32_full', 'kid32_full'], reference=str(tmp_path / 'data.zip'), detector=detector,
                          batch_size=16, run_dir=str(tmp_path))
    first = runner(NoiseAdapter(), snapshot_pkl='network-snapshot-000000.pkl')
    detector.count = 0
    runner(NoiseAdapter(offset=0.3), snapshot_pkl='network-snapshot-000010.pkl')
    assert detector.count == 32  # Generated images embedded once for both metrics; reals cached.
    assert set(first) == {'fd_rand32_full', 'kd_rand32_full'}
    lines = [json.loads(line) for line in open(tmp_path / 'metric-fd_rand32_full.jsonl')]
    assert [line['snapshot_pkl'] for line in lines] == ['network-snapshot-000000.pkl', 'network-snapshot-000010.pkl']
    assert lines[0]['results']['fd_rand32_full'] == first['fd_rand32_full']
    with pytest.raises(ValueError, match='--metrics'):
        MetricRunner(['fid'], reference=str(tmp_path / 'data.zip'))


class _TinyUpstreamStyleNet(torch.nn.Module):
    """Mimics the upstream TorchScript detectors' calling convention on uint8 images."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 5)

    def forward(self, x: torch.Tensor, return_features: bool = False, no_output_bias: bool = False):
        pooled = x.to(torch.float32).mean(dim=(2, 3)) / 255
        if return_features:
            return torch.cat([pooled, pooled ** 2], dim=1)
        return self.proj(pooled).softmax(dim=1)


@pytest.mark.filterwarnings('ignore:`torch.jit:DeprecationWarning')
def test_torchscript_detector_file_with_upstream_convention(tmp_path, cache_dir, fmnist):
    images, _ = fmnist
    path = tmp_path / 'inception-2015-12-05.pt'
    torch.jit.save(torch.jit.script(_TinyUpstreamStyleNet()), str(path))
    detector = load_detector(str(path))
    assert isinstance(detector, UpstreamDetector) and detector.name == 'inception'
    feats = detector.features(torch.as_tensor(images[:4, None]))  # Grayscale goes in as 3 equal channels.
    gray = torch.as_tensor(images[:4]).float().mean(dim=(1, 2)) / 255
    assert torch.allclose(feats[:, 0], gray) and torch.allclose(feats[:, 1], gray)
    write_dataset_zip(tmp_path / 'data.zip', images)
    records = compute_metrics(['fid64_full', 'is64'], BankAdapter(images), str(tmp_path / 'data.zip'),
                              detector={'inception': str(path)}, batch_size=16)
    assert [r['metric'] for r in records] == ['fid64_full', 'is64']  # The standard detector keeps the names.
    assert abs(records[0]['results']['fid64_full']) < 1e-6


def test_shipped_offline_detector_classifies_fashion_mnist():
    detector = load_detector('fmnist')
    assert os.path.getsize(FMNIST_WEIGHTS) <= 2 * 1024 * 1024
    assert detector.input_spec == InputSpec(channels=1, resolution=32, value_range='pm1', pad_from=28)
    with np.load(DATA) as data:
        images, labels = torch.as_tensor(data['images'][:, None]), data['labels']
    predictions = detector.probabilities(images).argmax(dim=1).numpy()
    assert np.mean(predictions == labels) > 0.85
    assert detector.features(images[:3]).shape == (3, 128)
    assert detector.identity != FashionDetector(FashionFeatureNet()).identity  # Trained weights, not random.


def test_any_module_is_a_detector(tmp_path, fmnist):
    images, _ = fmnist
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=4), torch.nn.Flatten())
    detector = load_detector(plain)  # Default input: RGB in [-1, 1] at the images' own size.
    x = torch.as_tensor(images[:2, None])
    assert torch.allclose(detector.features(x), plain(x.repeat(1, 3, 1, 1).float() / 127.5 - 1))
    assert isinstance(load_detector(_TinyUpstreamStyleNet()), UpstreamDetector)
    spec = InputSpec(channels=1, resolution=16, value_range='pm1')
    custom = ModuleDetector(torch.nn.Flatten(), name='pixels', input_spec=spec)
    assert custom.identity == load_detector(ModuleDetector(torch.nn.Flatten(), input_spec=spec)).identity
    assert custom.identity != ModuleDetector(torch.nn.Flatten(), input_spec=InputSpec(resolution=16)).identity
    write_dataset_zip(tmp_path / 'data.zip', images)
    record = compute_metrics(['fid64_full'], BankAdapter(images), str(tmp_path / 'data.zip'), custom,
                             batch_size=32)[0]
    # 256 features from 64 images: rank-deficient covariances, where sqrt of round-off eigenvalues leaves ~1e-5
    # (the covariance trace is ~50).
    assert record['metric'] == 'fd_pixels64_full' and abs(record['results']['fd_pixels64_full']) < 1e-3
    resized = adapt_images(torch.as_tensor(images[:1, None]), spec).flatten(1)
    assert torch.equal(custom.features(torch.as_tensor(images[:1, None])), resized)


def test_dataset_reading_with_worker_processes(tmp_path):
    """Worker processes read the same images as the main process (each opens its own ZIP handle; a shared,
    forked handle races on the file offset and fails with 'Bad CRC-32' under load)."""
    with np.load(DATA) as data:
        images = data['images']
    write_dataset_zip(tmp_path / 'data.zip', images)
    detector = CountingDetector()
    request = references.StatsRequest(capture_all=True, capture_mean_cov=False, max_items=None)
    stats = [references.DatasetReference(str(tmp_path / 'data.zip'), cache=False, batch_size=50, num_workers=workers)
             .get_stats(detector, [request], torch.device('cpu'))[request].get_all() for workers in (0, 2)]
    assert np.array_equal(stats[0], stats[1])
    assert np.array_equal(stats[0], detector.features(torch.as_tensor(images[:, None])).numpy())
