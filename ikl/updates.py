"""One optimiser update done safely: gradients summed over processes, loss scaling, and the non-finite guard.

The generator and a fitted fake score both update through `apply_update`, so a NaN or Inf anywhere (a gradient,
or an update Adam made from finite gradients) is skipped, counted and, if it keeps happening, stops the run with
`TrainingDiverged` instead of writing stale networks.
"""

from typing import Dict, List

import torch

from torch_utils import training_stats


class TrainingDiverged(RuntimeError):
    """Too many steps in a row were skipped as non-finite: training on would only write stale networks."""


class LossScaler:
    """Dynamic loss scaling plus the NaN/Inf guard: a step with non-finite gradients is skipped and counted, and
    (when scaling is on) the scale halves; after `growth_interval` good steps in a row it doubles. With scaling
    off the scale stays 1 and only the guard acts."""

    def __init__(self, enabled: bool, init_scale: float = 2.0 ** 15, growth_interval: int = 1000):
        self.enabled = enabled
        self.scale = float(init_scale) if enabled else 1.0
        self.growth_interval = growth_interval
        self.good_steps = 0
        self.skipped = 0
        self.skipped_in_row = 0

    def update(self, finite: bool) -> None:
        self.skipped_in_row = 0 if finite else self.skipped_in_row + 1
        if not finite:
            self.skipped += 1
            self.good_steps = 0
            if self.enabled:
                self.scale = max(self.scale * 0.5, 1.0 / 2 ** 24)
            return
        self.good_steps += 1
        if self.enabled and self.good_steps >= self.growth_interval:
            self.scale = min(self.scale * 2.0, 2.0 ** 24)
            self.good_steps = 0

    def state_dict(self) -> Dict:
        return dict(scale=self.scale, good_steps=self.good_steps, skipped=self.skipped, skipped_in_row=self.skipped_in_row)

    def load_state_dict(self, state: Dict) -> None:
        self.scale, self.good_steps, self.skipped = float(state['scale']), int(state['good_steps']), int(state['skipped'])
        self.skipped_in_row = int(state.get('skipped_in_row', 0))


def all_finite(tensors) -> bool:
    """No NaN/Inf in any of the tensors (one reduction and one sync: a NaN or Inf anywhere makes its sum one)."""
    return bool(torch.isfinite(torch.stack([t.sum() for t in tensors]).sum()))


def apply_update(params: List[torch.nn.Parameter], optimizer: torch.optim.Optimizer, scaler: LossScaler, lr: float,
                 name: str, world_size: int, max_skipped_in_row: int) -> bool:
    """Sum the gradients over processes, then skip the step (non-finite) or unscale and take it; clears the
    gradients. Returns whether it stepped."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    if world_size > 1:
        flat = torch.cat([g.flatten() for g in grads])
        torch.distributed.all_reduce(flat)
        grads = [g.view_as(p) for g, p in zip(flat.split([p.numel() for p in params]), params)]
        finite = bool(torch.isfinite(flat).all())
    else:
        finite = all_finite(grads)
    if finite:
        if scaler.scale != 1.0:
            torch._foreach_mul_(grads, 1.0 / scaler.scale)
        for p, g in zip(params, grads):
            p.grad = g
        for group in optimizer.param_groups:
            group['lr'] = lr
        before = [p.detach().clone() for p in params]
        optimizer.step()
        # Finite gradients can still make a non-finite update (an lr of inf, an overflow in Adam): undo it.
        if not all_finite([p.detach() for p in params]):
            with torch.no_grad():
                for p, old in zip(params, before):
                    p.copy_(old)
            finite = False
    scaler.update(finite)
    training_stats.report0(f'Progress/skipped_{name}', float(not finite))
    for p in params:
        p.grad = None
    if scaler.skipped_in_row > max_skipped_in_row:
        raise TrainingDiverged(f'{name}: {scaler.skipped_in_row} steps in a row had non-finite gradients or '
                               f'updates; stopped (the last snapshot holds the last finite networks; lower the '
                               f'learning rates or raise --max-skipped)')
    return finite
