"""The Teacher interface that everything in `ikl/` talks to.

A teacher is a `torch.nn.Module` denoiser `D(x, sigma, class_labels=None) -> x0_hat` in EDM's convention
(x0-prediction for `x = x0 + sigma * n`), float32 output shaped like x, with attributes `img_resolution`,
`img_channels`, `label_dim` (0 = unconditional; labels are one-hot `[N, label_dim]`), `sigma_min`, `sigma_max`
and a method `round_sigma(sigma)`. EDM's preconditioned networks and `teachers.analytic.GaussianMixture` are
teachers as they are.
"""

from typing import Any, List, Optional

import torch

TEACHER_ATTRIBUTES = ('img_resolution', 'img_channels', 'label_dim', 'sigma_min', 'sigma_max')


def missing_teacher_attributes(obj: Any) -> List[str]:
    """What `obj` lacks to be a teacher (empty when it is one)."""
    if not isinstance(obj, torch.nn.Module):
        return ['torch.nn.Module']
    missing = [name for name in TEACHER_ATTRIBUTES if not hasattr(obj, name)]
    if not callable(getattr(obj, 'round_sigma', None)):
        missing.append('round_sigma()')
    return missing


def is_teacher(obj: Any) -> bool:
    return not missing_teacher_attributes(obj)


def score(net: torch.nn.Module, x: torch.Tensor, sigma, class_labels: Optional[torch.Tensor] = None,
          **model_kwargs) -> torch.Tensor:
    """The score of the noisy data density at sigma, `(D(x; sigma) - x) / sigma^2`, float32."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    sigma = sigma.reshape([-1] + [1] * (x.ndim - 1)) if sigma.ndim else sigma
    return (net(x, sigma, class_labels, **model_kwargs) - x) / sigma ** 2
