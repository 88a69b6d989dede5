"""Metric formulas against closed forms and independent implementations written here."""

import itertools

import numpy as np
import pytest
import scipy.linalg
import torch

from metrics import formulas
from metrics.feature_stats import FeatureStats


def _random_cov(rng, dim, rank=None):
    a = rng.standard_normal((dim, rank or dim))
    return a @ a.T / dim


def _samples_with_exact_moments(rng, mu, sigma, n):
    """n samples whose biased sample mean and covariance are exactly mu and sigma."""
    x = rng.standard_normal((n, len(mu)))
    x -= x.mean(axis=0)
    x = x @ np.linalg.inv(np.linalg.cholesky(x.T @ x / n)).T  # Whitened: covariance exactly I.
    return x @ np.linalg.cholesky(sigma).T + mu


def _fid_independent(mu1, s1, mu2, s2):
    """tr sqrt(S1 S2) = tr sqrt(S2^1/2 S1 S2^1/2), both square roots by scipy on symmetric matrices."""
    root2 = np.real(scipy.linalg.sqrtm(s2))
    inner = np.real(scipy.linalg.sqrtm(root2 @ s1 @ root2))
    return np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(inner)


def test_fid_of_a_set_with_itself_is_zero():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 16)) @ rng.standard_normal((16, 16))
    mu, sigma = FeatureStats.from_features(x).get_mean_cov()
    assert abs(formulas.frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_fid_of_commuting_gaussians_matches_closed_form():
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    a, b = rng.uniform(0.1, 3, 8), rng.uniform(0.1, 3, 8)
    mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = formulas.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-10)


def test_fid_between_gaussian_feature_sets_equals_closed_form():
    rng = np.random.default_rng(2)
    dim = 6
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim) + 1
    s1, s2 = _random_cov(rng, dim) + 0.1 * np.eye(dim), _random_cov(rng, dim) + 0.1 * np.eye(dim)
    x1 = _samples_with_exact_moments(rng, mu1, s1, 3000)
    x2 = _samples_with_exact_moments(rng, mu2, s2, 3000)
    m1, c1 = FeatureStats.from_features(x1.astype(np.float32)).get_mean_cov()
    m2, c2 = FeatureStats.from_features(x2.astype(np.float32)).get_mean_cov()
    assert formulas.frechet_distance(m1, c1, m2, c2) == pytest.approx(_fid_independent(mu1, s1, mu2, s2), rel=1e-5)


def test_fid_agrees_with_independent_implementation_on_features():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((400, 32)) @ rng.standard_normal((32, 32))
    y = rng.standard_normal((300, 32)) @ rng.standard_normal((32, 32)) + 0.5
    m1, c1 = x.mean(0), np.cov(x, rowvar=False, bias=True)
    m2, c2 = y.mean(0), np.cov(y, rowvar=False, bias=True)
    mu_x, cov_x = FeatureStats.from_features(x).get_mean_cov()
    assert np.allclose(cov_x, c1, rtol=1e-5, atol=1e-5)  # Stats in float32 features, float64 sums.
    assert formulas.frechet_distance(m1, c1, m2, c2) == pytest.approx(_fid_independent(m1, c1, m2, c2), rel=1e-8)


def test_unbiased_covariance_is_the_edm_convention():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((50, 5))
    stats = FeatureStats.from_features(x)
    assert np.allclose(stats.get_mean_cov(unbiased=True)[1], np.cov(x.astype(np.float32), rowvar=False), atol=1e-6)
    assert np.allclose(stats.get_mean_cov(unbiased=False)[1], np.cov(x.astype(np.float32), rowvar=False, bias=True),
                       atol=1e-6)


@pytest.mark.parametrize('n_samples', [5, 20, 63])
def test_sqrtm_near_singular_covariances(n_samples):
    """Fewer samples than features: rank-deficient covariances, the case where plain sqrtm misbehaves."""
    rng = np.random.default_rng(n_samples)
    dim = 64
    x = rng.standard_normal((n_samples, dim)) * rng.uniform(0.1, 5, dim)
    y = rng.standard_normal((n_samples, dim)) + 0.2
    m1, c1 = x.mean(0), np.cov(x, rowvar=False, bias=True)
    m2, c2 = y.mean(0), np.cov(y, rowvar=False, bias=True)
    # Independent reference: the non-zero eigenvalues of C1 C2 are those of the small Gram-type matrix
    # (A^T B)(B^T A) with C1 = A A^T, C2 = B B^T.
    a = (x - m1).T / np.sqrt(n_samples)
    b = (y - m2).T / np.sqrt(n_samples)
    small = (a.T @ b) @ (b.T @ a)
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((small + small.T) / 2), 0, None)).sum()
    expected = np.sum((m1 - m2) ** 2) + np.trace(c1) + np.trace(c2) - 2 * tr_sqrt
    got = formulas.frechet_distance(m1, c1, m2, c2)
    assert np.isfinite(got) and isinstance(got, float)
    assert got == pytest.approx(expected, rel=1e-6)
    assert abs(formulas.frechet_distance(m1, c1, m1, c1)) < 1e-6 * np.trace(c1)


def test_singular_diagonal_covariances_closed_form():
    a = np.array([2.0, 0.0, 1.0, 0.0, 0.5])
    b = np.array([0.0, 0.0, 4.0, 3.0, 0.5])
    expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert formulas.frechet_distance(np.zeros(5), np.diag(a), np.zeros(5), np.diag(b)) == pytest.approx(expected)


def test_sqrtm_small_imaginary_parts_are_dropped():
    """Low-rank covariances for which scipy's sqrtm returns a complex matrix with round-off imaginary parts."""
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((64, 10)), rng.standard_normal((64, 10))
    s1, s2 = a @ a.T / 64, b @ b.T / 64
    root = scipy.linalg.sqrtm(s1 @ s2)
    assert np.iscomplexobj(root) and 0 < np.abs(root.imag).max() < 1e-5  # The situation under test.
    small = (a.T @ b) @ (b.T @ a) / 64 ** 2
    expected = np.sqrt(np.clip(np.linalg.eigvals(small).real, 0, None)).sum()
    got = formulas.trace_sqrt_product(s1, s2)
    assert isinstance(got, float)
    assert got == pytest.approx(expected, rel=1e-6)


def test_trace_sqrt_falls_back_when_sqrtm_fails(monkeypatch):
    rng = np.random.default_rng(6)
    s1, s2 = _random_cov(rng, 10), _random_cov(rng, 10)
    expected = formulas.trace_sqrt_product(s1, s2)
    monkeypatch.setattr(scipy.linalg, 'sqrtm', lambda m: np.full_like(m, np.nan))
    assert formulas.trace_sqrt_product(s1, s2) == pytest.approx(expected, rel=1e-8)
    monkeypatch.setattr(scipy.linalg, 'sqrtm', lambda m: m)  # Finite but wrong: the residual check catches it.
    assert formulas.trace_sqrt_product(s1, s2) == pytest.approx(expected, rel=1e-8)


def test_fid_rejects_mismatched_dimensions():
    with pytest.raises(ValueError, match='different detectors'):
        formulas.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def _kid_independent(real, gen):
    """Unbiased MMD^2 with k(x,y) = (x.y/d + 1)^3 written with explicit pair loops."""
    d = real.shape[1]
    k = lambda u, v: (np.dot(u, v) / d + 1) ** 3  # noqa: E731
    m = len(real)
    xx = sum(k(gen[i], gen[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    yy = sum(k(real[i], real[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    xy = sum(k(gen[i], real[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_agrees_with_independent_implementation():
    rng = np.random.default_rng(7)
    real = rng.standard_normal((25, 4))
    gen = rng.standard_normal((25, 4)) * 1.3 + 0.4
    # One subset holding every item: the statistic does not depend on the order the subset is drawn in.
    got = formulas.kernel_inception_distance(real, gen, num_subsets=1, max_subset_size=25)
    assert got == pytest.approx(_kid_independent(real, gen), rel=1e-10)


def test_kid_is_unbiased_near_zero_for_same_distribution_and_positive_otherwise():
    rng = np.random.default_rng(8)
    a, b = rng.standard_normal((2000, 8)), rng.standard_normal((2000, 8))
    same = formulas.kernel_inception_distance(a, b, num_subsets=20, max_subset_size=500)
    shifted = formulas.kernel_inception_distance(a, b + 1.0, num_subsets=20, max_subset_size=500)
    assert abs(same) < 0.01 and shifted > 0.5


def test_inception_score_closed_forms():
    one_hot = np.tile(np.eye(10), (10, 1))  # 100 confident predictions, classes uniform within each split.
    assert formulas.inception_score(one_hot, num_splits=10)[0] == pytest.approx(10.0)
    uniform = np.full((100, 10), 0.1)
    assert formulas.inception_score(uniform)[0] == pytest.approx(1.0)
    p = np.array([[0.7, 0.3], [0.2, 0.8]] * 5)
    marginal = p.mean(0)
    expected = np.exp(np.mean(np.sum(p * np.log(p / marginal), axis=1)))
    mean, std = formulas.inception_score(p, num_splits=5)
    assert mean == pytest.approx(expected) and std == pytest.approx(0.0, abs=1e-12)


def _pr_independent(real, gen, k):
    def radii(x):
        d = np.linalg.norm(x[:, None] - x[None], axis=2)
        return np.sort(d, axis=1)[:, k]

    def coverage(manifold, r, probes):
        d = np.linalg.norm(probes[:, None] - manifold[None], axis=2)
        return np.mean(np.any(d <= r[None], axis=1))

    return coverage(real, radii(real), gen), coverage(gen, radii(gen), real)


def test_precision_recall_agrees_with_brute_force():
    rng = np.random.default_rng(9)
    real = rng.standard_normal((120, 5)).astype(np.float32)
    gen = (rng.standard_normal((90, 5)) * 0.6 + 0.8).astype(np.float32)
    expected = _pr_independent(real.astype(np.float64), gen.astype(np.float64), 3)
    assert formulas.precision_recall(real, gen, k=3, block=17) == pytest.approx(expected, abs=1e-6)  # float32 mean
    assert formulas.precision_recall(real, real, k=3) == (1.0, 1.0)
    assert formulas.precision_recall(real, real + 100, k=3) == (0.0, 0.0)


def test_pixel_statistics_match_a_direct_computation():
    from metrics.pixels import pixel_statistics

    class Fixed:
        device = torch.device('cpu')

        def sample(self, n, gen):
            return torch.rand([n, 1, 4, 4], generator=gen) * 2 - 1, None

    stats = pixel_statistics(Fixed(), num=10, batch=4, seed=5)
    gen = torch.Generator().manual_seed(5)
    x = torch.cat([Fixed().sample(n, gen)[0] for n in (4, 4, 2)]).double().add(1).div(2)
    assert abs(stats['pixel_mean'] - float(x.mean())) < 1e-9
    assert abs(stats['pixel_std'] - float(x.std(unbiased=False))) < 1e-9
    assert abs(stats['pixel_contrast'] - float(x.flatten(1).std(dim=1).mean())) < 1e-9


def test_pixel_summary_matches_a_direct_computation():
    from metrics.pixels import pixel_summary, pooled_pixels

    class Fixed:
        device = torch.device('cpu')

        def sample(self, n, gen):
            return torch.rand([n, 1, 16, 16], generator=gen) * 2 - 1, None

    rng = np.random.default_rng(0)
    data = rng.uniform(0.3, 0.7, size=(400, 64))
    got = pixel_summary(Fixed(), num=300, data_pixels=data, batch=128, seed=2)
    gen = torch.Generator().manual_seed(2)
    x = torch.cat([Fixed().sample(n, gen)[0] for n in (128, 128, 44)])
    images = (x * 127.5 + 128).clamp(0, 255).floor().to(torch.uint8)  # 8 bits, as every metric sees samples
    pooled = (images.double().reshape(300, 1, 8, 2, 8, 2).mean((3, 5)).reshape(300, 64) / 255).numpy()
    assert np.allclose(pooled, pooled_pixels(images))
    want = _fid_independent(pooled.mean(0), np.cov(pooled, rowvar=False), data.mean(0), np.cov(data, rowvar=False))
    assert abs(got['brightness'] - float(images.double().mean() / 255)) < 1e-6  # float32 mean
    per_image = images.numpy().reshape(300, -1).astype(np.float64).mean(1) / 255
    assert got['brightness_spread'] == pytest.approx(float(np.std(per_image)), rel=1e-9)
    assert got['fd_pixels'] == pytest.approx(want, rel=1e-6)


def test_dataset_pixels_are_a_fixed_random_pick_of_the_pooled_images(tmp_path):
    from metrics.pixels import dataset_pixels, pooled_pixels
    from training.dataset import ImageFolderDataset
    import PIL.Image
    rng = np.random.default_rng(1)
    for i in range(12):
        PIL.Image.fromarray(rng.integers(0, 256, size=(16, 16), dtype=np.uint8)).save(tmp_path / f'{i:02d}.png')
    images, _ = ImageFolderDataset(str(tmp_path)).load_all()
    got = dataset_pixels(str(tmp_path), num=5, seed=3)
    want = pooled_pixels(torch.from_numpy(images[np.random.default_rng(3).permutation(12)[:5]]))
    assert got.shape == (5, 64) and np.array_equal(got, want)
    assert not np.array_equal(got, pooled_pixels(torch.from_numpy(images[:5])))
