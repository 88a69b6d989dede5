"""The metric formulas on feature arrays: Fréchet distance, KID, Inception Score, precision/recall.

Pure numerics, no detectors or images, so each can be checked against closed forms. Conventions follow
StyleGAN2-ADA (`fid50k_full` etc.); where EDM differs (unbiased covariance) the caller chooses.
"""

import warnings
from typing import Optional, Tuple

import numpy as np
import scipy.linalg
import torch

# sqrtm is trusted when ||X X - A||_F / ||A||_F stays below this; otherwise the symmetric route is used.
SQRTM_MAX_RELATIVE_RESIDUAL = 1e-5


def _trace_sqrt_product_symmetric(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr(sqrt(S1 S2)) via the symmetric PSD matrix S1^1/2 S2 S1^1/2, which has the same eigenvalues as S1 S2.

    Well defined for singular covariances, where the general Schur-based sqrtm loses accuracy.
    """
    eigvals, eigvecs = np.linalg.eigh(sigma1)
    root1 = (eigvecs * np.sqrt(np.clip(eigvals, 0, None))) @ eigvecs.T
    middle = root1 @ sigma2 @ root1
    eigvals = np.linalg.eigvalsh((middle + middle.T) / 2)
    return float(np.sqrt(np.clip(eigvals, 0, None)).sum())


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr(sqrtm(S1 S2)) as StyleGAN2-ADA computes it (scipy sqrtm, real part), with a checked fallback.

    The upstream way keeps the real part of `scipy.linalg.sqrtm(S1 @ S2)`, dropping small imaginary parts that
    round-off creates. When the square root is not finite or does not square back to S1 S2 (near-singular
    covariances, e.g. fewer samples than features), the eigenvalue route gives the same quantity reliably.
    """
    product = sigma1 @ sigma2
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # sqrtm warns on singular input; we check the result ourselves.
        root = scipy.linalg.sqrtm(product)
    if np.all(np.isfinite(root)):
        scale = max(np.linalg.norm(product), np.finfo(np.float64).tiny)
        residual = np.linalg.norm(root @ root - product) / scale
        if residual <= SQRTM_MAX_RELATIVE_RESIDUAL:
            return float(np.real(np.trace(root)))
    return _trace_sqrt_product_symmetric(sigma1, sigma2)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 sqrtm(S1 S2)): the Fréchet distance between two Gaussians."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f'Fréchet distance: mismatched statistics: mu {mu1.shape} vs {mu2.shape}, '
                         f'sigma {sigma1.shape} vs {sigma2.shape} (different detectors?)')
    mean_term = np.square(mu1 - mu2).sum()
    trace_term = np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2)
    return float(mean_term + trace_term)


def kernel_inception_distance(real: np.ndarray, gen: np.ndarray, num_subsets: int = 100,
                              max_subset_size: int = 1000, seed: int = 0) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets.

    Each subset draws m = min(len(real), len(gen), max_subset_size) items from each set without replacement.
    """
    real, gen = np.asarray(real, np.float64), np.asarray(gen, np.float64)
    if real.ndim != 2 or gen.ndim != 2 or real.shape[1] != gen.shape[1]:
        raise ValueError(f'KID: feature arrays must be [N, D] with equal D, got {real.shape} and {gen.shape}')
    dim = real.shape[1]
    m = min(len(real), len(gen), max_subset_size)
    if m < 2:
        raise ValueError(f'KID needs at least 2 items in each set, got {len(real)} real and {len(gen)} generated')
    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(num_subsets):
        x = gen[rng.choice(len(gen), m, replace=False)]
        y = real[rng.choice(len(real), m, replace=False)]
        k_xx = (x @ x.T / dim + 1) ** 3
        k_yy = (y @ y.T / dim + 1) ** 3
        k_xy = (x @ y.T / dim + 1) ** 3
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        total += within - 2 * k_xy.mean()
    return float(total / num_subsets)


def inception_score(probs: np.ndarray, num_splits: int = 10) -> Tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) per split; returns the mean and standard deviation over the splits."""
    probs = np.asarray(probs, np.float64)
    if probs.ndim != 2 or len(probs) < num_splits:
        raise ValueError(f'Inception Score: need [N, classes] probabilities with N >= {num_splits}, '
                         f'got {probs.shape}')
    scores = []
    for part in np.array_split(probs, num_splits):
        marginal = part.mean(axis=0, keepdims=True)
        kl = part * (np.log(np.clip(part, 1e-30, None)) - np.log(np.clip(marginal, 1e-30, None)))
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _pairwise_distances(a: torch.Tensor, b: torch.Tensor, half: bool) -> torch.Tensor:
    if half:
        return torch.cdist(a.half(), b.half()).float()
    return torch.cdist(a, b)


def _kth_neighbour_radii(manifold: torch.Tensor, k: int, block: int, half: bool) -> torch.Tensor:
    """Distance from each point to its k-th nearest neighbour in the same set (the point itself excluded)."""
    radii = []
    for start in range(0, len(manifold), block):
        dist = torch.cat([_pairwise_distances(manifold[start:start + block], manifold[col:col + block], half)
                          for col in range(0, len(manifold), block)], dim=1)
        radii.append(dist.kthvalue(k + 1, dim=1).values)  # The smallest value is the point itself (0).
    return torch.cat(radii)


def _coverage(manifold: torch.Tensor, radii: torch.Tensor, probes: torch.Tensor, block: int,
              half: bool) -> float:
    """Fraction of probes lying inside at least one manifold point's k-NN ball."""
    inside = []
    for start in range(0, len(probes), block):
        hit = torch.zeros(len(probes[start:start + block]), dtype=torch.bool, device=probes.device)
        for col in range(0, len(manifold), block):
            dist = _pairwise_distances(probes[start:start + block], manifold[col:col + block], half)
            hit |= (dist <= radii[col:col + block][None, :]).any(dim=1)
        inside.append(hit)
    return torch.cat(inside).float().mean().item()


def precision_recall(real: np.ndarray, gen: np.ndarray, k: int = 3, block: int = 10000,
                     device: Optional[torch.device] = None, half: Optional[bool] = None) -> Tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-nearest-neighbour manifolds.

    Precision: fraction of generated features inside the real manifold; recall: the converse.
    `half` (default: on CUDA only) computes distances in float16 as StyleGAN2-ADA does on the GPU.
    """
    device = torch.device('cpu') if device is None else device
    half = (device.type == 'cuda') if half is None else half
    real_t = torch.as_tensor(np.asarray(real, np.float32), device=device)
    gen_t = torch.as_tensor(np.asarray(gen, np.float32), device=device)
    if real_t.ndim != 2 or gen_t.ndim != 2 or real_t.shape[1] != gen_t.shape[1]:
        raise ValueError(f'precision/recall: feature arrays must be [N, D] with equal D, '
                         f'got {tuple(real_t.shape)} and {tuple(gen_t.shape)}')
    if min(len(real_t), len(gen_t)) <= k:
        raise ValueError(f'precision/recall with k={k} needs more than {k} items in each set')
    precision = _coverage(real_t, _kth_neighbour_radii(real_t, k, block, half), gen_t, block, half)
    recall = _coverage(gen_t, _kth_neighbour_radii(gen_t, k, block, half), real_t, block, half)
    return precision, recall
