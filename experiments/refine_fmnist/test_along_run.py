"""The along-run analysis: per-class distances and precision/recall against an independent computation."""

import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from along_run import evaluate, snapshots  # noqa: E402
from metrics.pixels import pooled_pixels  # noqa: E402


def _gaussian_fd(mu1, cov1, mu2, cov2):
    """Frechet distance by eigendecomposition (an independent route to the matrix square root)."""
    w, v = np.linalg.eigh(cov1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root1 @ cov2 @ root1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2 * np.sum(np.sqrt(np.clip(inner, 0, None))))


def test_per_class_distances_follow_the_class_means_and_a_collapsed_class_loses_recall():
    rng = np.random.default_rng(0)
    real = [(rng.normal(3.0 * c, 1.0, size=(400, 4)), 0.1 * c, rng.normal(0.0, 1.0, size=(400, 3))) for c in range(3)]
    shifted = [(rng.normal(3.0 * c + (2.0 if c == 1 else 0.0), 1.0, size=(400, 4)), 0.2,
                rng.normal(0.5, 1.0, size=(400, 3))) for c in range(3)]
    row = evaluate(shifted, real)
    for c in range(3):
        want = _gaussian_fd(shifted[c][0].mean(0), np.cov(shifted[c][0], rowvar=False),
                            real[c][0].mean(0), np.cov(real[c][0], rowvar=False))
        assert abs(row['fd_class'][c] - want) < 2e-3
    assert row['fd_class'][1] > 10 * max(row['fd_class'][0], row['fd_class'][2])  # only class 1 was moved
    assert row['brightness'] == [0.2, 0.2, 0.2]
    pix_gen, pix_real = np.concatenate([g[2] for g in shifted]), np.concatenate([r[2] for r in real])
    want = _gaussian_fd(pix_gen.mean(0), np.cov(pix_gen, rowvar=False), pix_real.mean(0), np.cov(pix_real, rowvar=False))
    assert abs(row['fd_pixels'] - want) < 2e-3 and abs(want - 3 * 0.5 ** 2) < 0.1  # the pixels' mean moved by 0.5
    fresh = [(rng.normal(3.0 * c, 1.0, size=(400, 4)), 0.0, real[c][2]) for c in range(3)]
    collapsed = [(g if c != 2 else g[:1] + 1e-3 * rng.normal(size=(400, 4)), b, p) for c, (g, b, p) in enumerate(fresh)]
    full, few = evaluate(fresh, real), evaluate(collapsed, real)
    assert full['recall'] > 0.8 and few['recall'] < full['recall'] - 0.2  # one class of three collapsed to a point
    assert full['fd_pixels'] < 1e-9  # the same pixels as the real ones


def test_pixels_are_8x8_means_in_unit_range():
    images = torch.zeros([2, 1, 32, 32], dtype=torch.uint8)
    images[1, :, :4, :4] = 255  # one 4x4 block: one pooled pixel of the second image is white
    pixels = pooled_pixels(images)
    assert pixels.shape == (2, 64) and pixels[0].max() == 0 and pixels[1, 0] == 1.0 and pixels[1, 1:].max() == 0


def test_snapshots_are_the_numbered_pickles_in_kimg_order(tmp_path):
    for name in ['network-snapshot-000010.pkl', 'network-snapshot-000002.048.pkl', 'network-snapshot-best.pkl',
                 'training-state-000002.048.pt']:
        (tmp_path / name).write_bytes(b'')
    assert [k for k, _ in snapshots(str(tmp_path))] == [2.048, 10.0]


def test_spread_is_the_within_class_pixel_std_relative_to_the_data():
    rng = np.random.default_rng(1)
    real = [(rng.normal(size=(300, 4)), 0.0, rng.uniform(0, 1, size=(300, 64))) for _ in range(3)]
    gen = [(f, b, p if c != 1 else 0.5 + 0.01 * (p - 0.5)) for c, (f, b, p) in enumerate(real)]  # class 1 shrunk 100x
    gen[2] = (gen[2][0], 0.0, 0.5 + 0.5 * (real[2][2] - 0.5))  # class 2 at half the spread
    row = evaluate(gen, real)
    want = [np.sqrt(((g[2] - g[2].mean(0)) ** 2).sum(0) / (len(g[2]) - 1)).mean() /
            np.sqrt(((r[2] - r[2].mean(0)) ** 2).sum(0) / (len(r[2]) - 1)).mean() for g, r in zip(gen, real)]
    assert np.allclose(row['spread'], want, atol=1e-4)
    assert abs(row['spread'][0] - 1) < 1e-4 and abs(row['spread'][1] - 0.01) < 1e-4 and abs(row['spread'][2] - 0.5) < 1e-4
    assert abs(row['spread_mean'] - np.mean(want)) < 1e-9
