"""One optimiser update done safely: gradients summed over processes, loss scaling, and the non-finite guard.

The generator and a fitted fake score both update through `apply_update`, so a NaN or Inf anywhere (a gradient,
or an update Adam made from finite gradients) is skipped, counted and, if it keeps happening, stops the run with
`TrainingDiverged` instead of writing stale networks.

Two ways to take the decision, with the same results:

* on the host (CPU parameters, or an optimiser that is not fused): the finiteness of the gradients and of the
  updated parameters is read back (two reads per update), and the step is skipped or undone in Python;
* on the device (a fused Adam, what `torch_utils.misc.make_adam` picks on CUDA): nothing is read back. The
  gradients' finiteness goes to the fused kernel as `found_inf` (it then leaves parameters, moments and step count
  alone), the loss scale is divided out by the kernel (`grad_scale`), a non-finite update is undone by a select,
  and the loss scale and the skip counters are tensors updated on the device. `LossScaler` reads them back only
  when asked (ticks, training states); a run of skipped steps longer than allowed stops the run at the next tick
  (`check_diverged`) instead of at once. Until then every step is still skipped and undone, so what is saved is
  the same.
"""

from typing import Dict, List, Optional, Union

import torch

from torch_utils import training_stats

#: None: decide on the device exactly when the optimiser is fused and the parameters are on CUDA; True / False force
#: it (True still needs a fused optimiser). Tests force it on the CPU to compare both ways.
ON_DEVICE: Optional[bool] = None

MIN_SCALE, MAX_SCALE = 1.0 / 2 ** 24, 2.0 ** 24


class TrainingDiverged(RuntimeError):
    """Too many steps in a row were skipped as non-finite: training on would only write stale networks."""


class LossScaler:
    """Dynamic loss scaling plus the NaN/Inf guard: a step with non-finite gradients is skipped and counted, and
    (when scaling is on) the scale halves; after `growth_interval` good steps in a row it doubles. With scaling
    off the scale stays 1 and only the guard acts.

    Updated on the host (`update`) or on the device (`update_on_device`); reading `scale`, `good_steps`,
    `skipped` or `skipped_in_row` brings device values back (one read). `factor(c)` is `scale * c` for the loss
    without reading anything back."""

    _FIELDS = ('scale', 'good_steps', 'skipped', 'skipped_in_row', 'worst_in_row')

    def __init__(self, enabled: bool, init_scale: float = 2.0 ** 15, growth_interval: int = 1000):
        self.enabled = enabled
        self.growth_interval = growth_interval
        self._host = dict(scale=float(init_scale) if enabled else 1.0, good_steps=0, skipped=0, skipped_in_row=0,
                          worst_in_row=0)
        self._device: Optional[Dict[str, torch.Tensor]] = None

    def _values(self) -> Dict:
        if self._device is not None:
            d, self._device = self._device, None
            self._host = dict(scale=float(d['scale']), good_steps=int(d['good_steps']), skipped=int(d['skipped']),
                              skipped_in_row=int(d['skipped_in_row']), worst_in_row=int(d['worst_in_row']))
        return self._host

    scale = property(lambda self: self._values()['scale'])
    good_steps = property(lambda self: self._values()['good_steps'])
    skipped = property(lambda self: self._values()['skipped'])
    skipped_in_row = property(lambda self: self._values()['skipped_in_row'])

    def factor(self, c: float) -> Union[float, torch.Tensor]:
        """scale * c: a float, or a device tensor while the scale lives there (power-of-two scales make both the
        same number)."""
        if self._device is not None and self.enabled:
            return self._device['scale'] * c
        return self._host['scale'] * c  # With scaling off the scale is 1 wherever it lives.

    def update(self, finite: bool) -> None:
        v = self._values()
        v['skipped_in_row'] = 0 if finite else v['skipped_in_row'] + 1
        v['worst_in_row'] = max(v['worst_in_row'], v['skipped_in_row'])
        if not finite:
            v['skipped'] += 1
            v['good_steps'] = 0
            if self.enabled:
                v['scale'] = max(v['scale'] * 0.5, MIN_SCALE)
            return
        v['good_steps'] += 1
        if self.enabled and v['good_steps'] >= self.growth_interval:
            v['scale'] = min(v['scale'] * 2.0, MAX_SCALE)
            v['good_steps'] = 0

    def device_scale(self, device: torch.device) -> torch.Tensor:
        return self._on(device)['scale']

    def _on(self, device: torch.device) -> Dict[str, torch.Tensor]:
        if self._device is None:
            v = self._host
            self._device = {k: torch.tensor(v[k], dtype=torch.float32 if k == 'scale' else torch.int64, device=device)
                            for k in self._FIELDS}
        return self._device

    def update_on_device(self, finite: torch.Tensor) -> None:
        """`update` with a 0-d bool tensor, without reading it back."""
        d = self._on(finite.device)
        bad = (~finite).to(torch.int64)
        d['skipped_in_row'] = (d['skipped_in_row'] + 1) * bad
        d['worst_in_row'] = torch.maximum(d['worst_in_row'], d['skipped_in_row'])
        d['skipped'] = d['skipped'] + bad
        good = (d['good_steps'] + 1) * (1 - bad)
        if self.enabled:
            grow = good >= self.growth_interval
            d['scale'] = torch.where(finite, torch.where(grow, (d['scale'] * 2.0).clamp(max=MAX_SCALE), d['scale']),
                                     (d['scale'] * 0.5).clamp(min=MIN_SCALE))
            good = torch.where(grow, torch.zeros_like(good), good)
        d['good_steps'] = good

    def check_diverged(self, max_skipped_in_row: int, name: str) -> None:
        """Raise TrainingDiverged if, since the last check, more than `max_skipped_in_row` steps in a row were
        skipped (the device path's deferred form of the host path's immediate stop)."""
        v = self._values()
        worst, v['worst_in_row'] = v['worst_in_row'], v['skipped_in_row']
        if worst > max_skipped_in_row:
            raise TrainingDiverged(f'{name}: {worst} steps in a row had non-finite gradients or updates; stopped '
                                   f'(the last snapshot holds the last finite networks; lower the learning rates or '
                                   f'raise --max-skipped)')

    def state_dict(self) -> Dict:
        v = self._values()
        return dict(scale=v['scale'], good_steps=v['good_steps'], skipped=v['skipped'], skipped_in_row=v['skipped_in_row'])

    def load_state_dict(self, state: Dict) -> None:
        in_row = int(state.get('skipped_in_row', 0))
        self._device = None
        self._host = dict(scale=float(state['scale']), good_steps=int(state['good_steps']), skipped=int(state['skipped']),
                          skipped_in_row=in_row, worst_in_row=in_row)


def finite_flag(tensors) -> torch.Tensor:
    """0-d bool tensor: no NaN/Inf in any of the tensors (one reduction: a NaN or Inf anywhere makes its sum one)."""
    return torch.isfinite(torch.stack([t.sum() for t in tensors]).sum())


def all_finite(tensors) -> bool:
    """No NaN/Inf in any of the tensors (`finite_flag` read back: one sync)."""
    return bool(finite_flag(tensors))


def decides_on_device(params: List[torch.Tensor], optimizer: torch.optim.Optimizer) -> bool:
    fused = bool(optimizer.defaults.get('fused'))
    if ON_DEVICE is not None:
        return ON_DEVICE and fused
    return fused and all(p.is_cuda for p in params)


def apply_update(params: List[torch.nn.Parameter], optimizer: torch.optim.Optimizer, scaler: LossScaler, lr: float,
                 name: str, world_size: int, max_skipped_in_row: int) -> Union[bool, torch.Tensor]:
    """Sum the gradients over processes, then skip the step (non-finite) or unscale and take it; clears the
    gradients. Returns whether it stepped (a 0-d bool tensor when decided on the device)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = None
    if world_size > 1:
        flat = torch.cat([g.flatten() for g in grads])
        torch.distributed.all_reduce(flat)
        grads = [g.view_as(p) for g, p in zip(flat.split([p.numel() for p in params]), params)]
    if decides_on_device(params, optimizer):
        return _apply_on_device(params, grads, flat, optimizer, scaler, lr, name)
    finite = bool(torch.isfinite(flat).all()) if flat is not None else all_finite(grads)
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


@torch.no_grad()
def _apply_on_device(params, grads, flat, optimizer, scaler: LossScaler, lr: float, name: str) -> torch.Tensor:
    finite = torch.isfinite(flat).all() if flat is not None else finite_flag(grads)
    for p, g in zip(params, grads):
        p.grad = g
    for group in optimizer.param_groups:
        group['lr'] = lr
    before = [p.detach().clone() for p in params]
    optimizer.grad_scale = scaler.device_scale(finite.device) if scaler.enabled else None
    optimizer.found_inf = (~finite).to(torch.float32)
    try:
        optimizer.step()  # The fused kernel skips everything (moments, step count too) when found_inf is set.
    finally:
        optimizer.grad_scale = optimizer.found_inf = None
    finite = finite & finite_flag([p.detach() for p in params])
    for p, old in zip(params, before):
        p.copy_(torch.where(finite, p, old))
    scaler.update_on_device(finite)
    training_stats.report0(f'Progress/skipped_{name}', (~finite).to(torch.float32))
    for p in params:
        p.grad = None
    return finite
