"""The exact denoiser of recent generator samples: the toy study's fake score with no fitting error."""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from torch_utils import persistence  # noqa: E402

from ikl.fake_scores import ObservingDenoiser  # noqa: E402
from ikl.toy import VectorDenoiser  # noqa: E402


@persistence.persistent_class
class EmpiricalDenoiser(VectorDenoiser, ObservingDenoiser):
    """The exact denoiser of the empirical distribution of the last N generator samples: a fake score
    with no fitting error, for low-dimensional data, to tell the IKL gradient's own behaviour from a fitted fake
    score's (experiments/toy2d/toy2d.py `--fake-init empirical`). D(x, sigma) = sum_i softmax_i(-|x - b_i|^2 / 2 sigma^2) b_i
    over the stored samples b_i; cost O(batch * N) per call. Its errors are the finite sample (below the
    samples' spacing it snaps to the nearest one) and a lag of N / batch iterations. N is the number of `initial`
    samples it starts from (fresh samples of the generator).

    The engine does not fit it: wrapped in `ikl.ObservingFakeScore`, each fake-score step calls `observe(samples)`,
    which overwrites the oldest stored samples. The samples and the write position are buffers, so they pickle and resume exactly. Class labels are
    ignored: it models the unconditional law."""

    def __init__(self, initial: torch.Tensor):
        if initial.ndim != 2 or initial.shape[0] == 0:
            raise ValueError(f'EmpiricalDenoiser: initial samples must be [capacity, dim], got {list(initial.shape)}')
        super().__init__(initial.shape[1])
        self.register_buffer('samples', initial.detach().to(torch.float32).clone())
        self.register_buffer('write_pos', torch.zeros([], dtype=torch.int64))

    @torch.no_grad()
    def observe(self, x: torch.Tensor, class_labels=None) -> None:
        x = x.detach().to(self.samples.dtype).reshape(-1, self.dim)[-self.samples.shape[0]:]
        rows = (self.write_pos + torch.arange(x.shape[0], device=x.device)) % self.samples.shape[0]
        self.samples[rows] = x
        self.write_pos.copy_((self.write_pos + x.shape[0]) % self.samples.shape[0])

    def forward(self, x: torch.Tensor, sigma, class_labels=None, **unused_kwargs) -> torch.Tensor:
        x = x.to(torch.float32)
        sigma = self._sigma_column(sigma, x)
        # Differences, not |x|^2 + |b|^2 - 2 x.b, whose cancellation would blur distances below about 0.01.
        distances = torch.cdist(x, self.samples, compute_mode='donot_use_mm_for_euclid_dist')
        logits = distances.square() / (-2 * sigma ** 2)
        return torch.softmax(logits, dim=1) @ self.samples
