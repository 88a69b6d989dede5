"""An exact teacher: a Gaussian mixture, whose denoiser, score and samples are known in closed form.

Under EDM noising `x = x0 + sigma * n`, component k (weight w_k, mean mu_k, per-coordinate variance v_k)
has the noisy marginal N(mu_k, v_k + sigma^2). The exact denoiser is the posterior mean

    E[x0 | x] = sum_k r_k(x) * (mu_k + v_k / (v_k + sigma^2) * (x - mu_k)),
    r_k(x) ∝ w_k * N(x; mu_k, v_k + sigma^2),

and the score is (E[x0 | x] - x) / sigma^2 = sum_k r_k(x) * (mu_k - x) / (v_k + sigma^2), which stays finite at
sigma = 0 (the data score). Everything is computed in float64 and returned as float32, following the Teacher
interface (`D(x, sigma, class_labels=None) -> x0_hat`).

Data may have any shape: `[D]` for toy data, or `[C, H, W]` for image-shaped mixtures (then `img_channels` = C and
`img_resolution` = H). With `label_dim > 0` each component belongs to one class and a one-hot label restricts the
mixture to that class's components.

With `trainable=True` the means, log-variances and weight logits are parameters: `trainable_copy()` gives a fake
score of the teacher's own family that starts as its exact copy and can be fitted to a generator's samples by
denoising score matching, as a network fake score is a copy of a network teacher (experiments/toy2d/toy2d.py).
"""

import math
from typing import Optional, Sequence, Union

import torch

# ----------------------------------------------------------------------------------------------------------------


class GaussianMixture(torch.nn.Module):
    """A mixture of Gaussians with isotropic (`[K]`) or diagonal (`[K, D]`) covariances, usable as a teacher."""

    def __init__(self, means: torch.Tensor, variances: Union[torch.Tensor, float], weights: Optional[torch.Tensor] = None,
                 data_shape: Optional[Sequence[int]] = None, component_classes: Optional[Sequence[int]] = None,
                 label_dim: int = 0, trainable: bool = False):
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim != 2:
            raise ValueError(f'GaussianMixture: means must be [K, D] (flattened data), got shape {list(means.shape)}')
        num_components, dim = means.shape
        data_shape = [dim] if data_shape is None else [int(s) for s in data_shape]
        if math.prod(data_shape) != dim:
            raise ValueError(f'GaussianMixture: data_shape {data_shape} does not hold {dim} values per sample')
        variances = torch.as_tensor(variances, dtype=torch.float64)
        if variances.ndim == 0:
            variances = variances.expand(num_components)
        if variances.ndim == 1:
            variances = variances[:, None].expand(num_components, dim)
        if list(variances.shape) != [num_components, dim] or not bool((variances > 0).all()):
            raise ValueError(f'GaussianMixture: variances must be positive, a scalar, [K] or [K, D] with K={num_components}, D={dim}')
        weights = torch.ones(num_components, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if list(weights.shape) != [num_components] or not bool((weights > 0).all()):
            raise ValueError(f'GaussianMixture: weights must be positive with shape [{num_components}]')
        classes = torch.zeros(num_components, dtype=torch.long) if component_classes is None else torch.as_tensor(component_classes, dtype=torch.long)
        if label_dim > 0 and (list(classes.shape) != [num_components] or int(classes.min()) < 0 or int(classes.max()) >= label_dim):
            raise ValueError(f'GaussianMixture: component_classes must give each of the {num_components} components a class in [0, {label_dim})')

        self.data_shape = data_shape
        self.img_channels = data_shape[0] if len(data_shape) == 3 else dim
        self.img_resolution = data_shape[1] if len(data_shape) == 3 else 1
        self.label_dim = int(label_dim)
        self.sigma_min = 0.0
        self.sigma_max = float('inf')
        for name, value in [('means', means), ('log_variances', variances.log()), ('logits', weights.log())]:
            if trainable:
                self.register_parameter(name, torch.nn.Parameter(value.clone()))
            else:
                self.register_buffer(name, value.clone())
        self.register_buffer('component_classes', classes)

    @property
    def variances(self) -> torch.Tensor:
        return self.log_variances.exp()

    @property
    def log_weights(self) -> torch.Tensor:
        return self.logits.log_softmax(dim=0)

    def trainable_copy(self) -> 'GaussianMixture':
        """A copy whose means, variances (per coordinate) and weights are parameters."""
        with torch.no_grad():
            return GaussianMixture(self.means, self.variances, self.log_weights.exp(), self.data_shape,
                                   self.component_classes, self.label_dim, trainable=True)

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def _flat_sigma(self, sigma, n: int, device) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=device).reshape(-1)
        return sigma.expand(n) if sigma.numel() == 1 else sigma

    def _log_prior(self, class_labels: Optional[torch.Tensor], n: int) -> torch.Tensor:
        """Per-sample log weights [N, K], restricted to each sample's class when labels are given."""
        log_w = self.log_weights[None, :].expand(n, -1)
        if self.label_dim == 0 or class_labels is None:
            return log_w
        labels = class_labels.to(torch.float64).reshape(n, self.label_dim)
        mass = labels[:, self.component_classes]  # [N, K]: the label's weight on each component's class
        log_w = log_w + mass.clamp_min(1e-300).log()
        return log_w - log_w.logsumexp(dim=1, keepdim=True)

    def _posterior(self, x: torch.Tensor, sigma, class_labels=None):
        """Flattened x [N, D], total variances [N, K, D] and responsibilities r [N, K], all float64."""
        n = x.shape[0]
        xf = x.reshape(n, -1).to(torch.float64)
        s2 = self._flat_sigma(sigma, n, x.device).square()
        total_var = self.variances[None] + s2[:, None, None]  # [N, K, D]
        diff = xf[:, None, :] - self.means[None]  # [N, K, D]
        log_lik = -0.5 * (diff.square() / total_var + total_var.log() + math.log(2 * math.pi)).sum(dim=2)
        log_joint = self._log_prior(class_labels, n) + log_lik
        resp = torch.softmax(log_joint, dim=1)
        return xf, diff, total_var, resp, log_joint

    def forward(self, x: torch.Tensor, sigma, class_labels: Optional[torch.Tensor] = None, **unused_kwargs) -> torch.Tensor:
        """The exact posterior mean E[x0 | x0 + sigma * n = x], float32, same shape as x."""
        xf, diff, total_var, resp, _ = self._posterior(x, sigma, class_labels)
        shrink = self.variances[None] / total_var  # v_k / (v_k + sigma^2)
        component_means = self.means[None] + shrink * diff
        x0 = (resp[:, :, None] * component_means).sum(dim=1)
        return x0.reshape(x.shape).to(torch.float32)

    def score(self, x: torch.Tensor, sigma, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The exact score of the noisy marginal at sigma (finite at sigma = 0), float32."""
        xf, diff, total_var, resp, _ = self._posterior(x, sigma, class_labels)
        s = -(resp[:, :, None] * diff / total_var).sum(dim=1)
        return s.reshape(x.shape).to(torch.float32)

    def log_prob(self, x: torch.Tensor, sigma=0.0, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Log density of the noisy marginal at sigma, [N], float64."""
        return self._posterior(x, sigma, class_labels)[4].logsumexp(dim=1)

    def sample(self, n: int, generator: Optional[torch.Generator] = None, class_labels: Optional[torch.Tensor] = None,
               device=None, return_components: bool = False):
        """Exact samples of the data distribution, float32 `[n, *data_shape]` (and component indices if asked)."""
        device = self.means.device if device is None else torch.device(device)
        probs = self._log_prior(class_labels, n).detach().exp().cpu()
        comp = torch.multinomial(probs, 1, replacement=True, generator=generator).squeeze(1)
        eps = torch.randn([n, self.means.shape[1]], dtype=torch.float64, generator=generator)
        mu, var = self.means.detach().cpu()[comp], self.variances.detach().cpu()[comp]
        x = (mu + var.sqrt() * eps).to(torch.float32).reshape([n, *self.data_shape]).to(device)
        return (x, comp.to(device)) if return_components else x

    def extra_repr(self) -> str:
        return (f'components={self.num_components}, data_shape={self.data_shape}, label_dim={self.label_dim}, '
                f'trainable={isinstance(self.means, torch.nn.Parameter)}')

# ----------------------------------------------------------------------------------------------------------------
# The standard 2-D benchmarks.


def ring8(radius: float = 2.0, std: float = 0.02) -> GaussianMixture:
    """Eight equally weighted Gaussians on a circle (the classic mode-collapse benchmark)."""
    angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
    return GaussianMixture(means, std ** 2)


def grid25(spacing: float = 2.0, std: float = 0.05) -> GaussianMixture:
    """Twenty-five equally weighted Gaussians on a 5x5 grid centred at the origin (centres at -4..4 by default)."""
    coords = (torch.arange(5, dtype=torch.float64) - 2) * spacing
    means = torch.stack(torch.meshgrid(coords, coords, indexing='ij'), dim=-1).reshape(25, 2)
    return GaussianMixture(means, std ** 2)

# ----------------------------------------------------------------------------------------------------------------
