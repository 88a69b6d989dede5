"""The fake score: the engine's model of the generator's own diffused distribution, in two kinds.

* `FittedFakeScore` wraps a denoiser network (usually a copy of the teacher) that the engine fits to the
  generator's samples with EDM's DSM loss: its trainable parameters, its Adam optimiser and its loss scaler. This
  is what refinement and distillation use. With IKL under the same sigma law for both losses, its DSM gradient can
  come from the generator step's own fake forward (see `ikl.engine`).
* `ObservedFakeScore` is the base of fake scores that are handed the generator's samples instead of being fitted
  (e.g. an exact empirical denoiser in a low-dimensional study): the engine gathers each fake step's samples from
  every process and calls `observe`; there is nothing to optimise.

The engine tells them apart by type, so a new kind is a new class here, not a new flag in the loop.
"""

from typing import Dict, List, Tuple

import torch


class ObservedFakeScore(torch.nn.Module):
    """A denoiser `D(x, sigma, class_labels)` that tracks the generator by being shown its samples."""

    def observe(self, x: torch.Tensor, class_labels=None) -> None:
        raise NotImplementedError


class FittedFakeScore:
    """A denoiser network fitted by DSM: the trainable parameters, Adam and the loss scaler of the fake side."""

    def __init__(self, net: torch.nn.Module, lr: float, betas: Tuple[float, float], eps: float, scaler):
        self.net = net
        self.params: List[torch.nn.Parameter] = [p for p in net.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(self.params, lr=lr, betas=betas, eps=eps)
        self.scaler = scaler

    def state_dict(self) -> Dict:
        return dict(fake_opt=self.opt.state_dict(), fake_scaler=self.scaler.state_dict())

    def load_state_dict(self, state: Dict) -> None:
        self.opt.load_state_dict(state['fake_opt'])
        self.scaler.load_state_dict(state['fake_scaler'])
