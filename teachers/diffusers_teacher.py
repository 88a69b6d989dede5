"""A pixel-space diffusers `UNet2DModel` as a teacher in this project's convention.

`D(x; sigma, class_labels) -> x0_hat` for `x = x0 + sigma * n` with data in [-1, 1], whatever the model was trained
to predict. Two families of diffusers schedules are understood:

* Variance preserving, discrete (DDPM, DDIM and every scheduler with `alphas_cumprod`): the model sees
  `x_vp = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`, which is our `x` scaled by `1 / sqrt(1 + sigma^2)` at
  `sigma_t = sqrt((1 - abar_t) / abar_t)`. Its timestep for a sigma between two training timesteps is found by
  interpolating log(sigma_t) linearly (a fractional timestep, exact at the grid). The prediction (`epsilon`,
  `sample` or `v_prediction`) is turned into x0 with the sigma given.
* Variance exploding (`ScoreSdeVeScheduler`, the score-SDE / NCSN++ ports): the model takes the noisy image itself
  with its sigma as the timestep and returns the score. These models work on data in [0, 1] (diffusers' pipeline
  clamps its output to [0, 1]), so `D(x; sigma) = 2 D_01((x + 1) / 2; sigma / 2) - 1`.

Outside the trained range [sigma_min, sigma_max] only the model's timestep is clamped to the end of the schedule;
the input scaling and the conversion to x0 keep the sigma given, so that D(x; sigma) -> x as sigma -> 0 for an
epsilon or score model. The sampler of `teachers.sampling` stays inside the range; the Diff-Instruct engine's
noise levels can fall outside it. No x0 clipping is applied (diffusers' `clip_sample` is a sampler heuristic that
would bend the score).

diffusers is imported only where a model is rebuilt (unpickling), so this module imports without it.
"""

from typing import Optional

import torch

PREDICTION_TYPES = ('epsilon', 'sample', 'v_prediction')
SCHEDULE_KINDS = ('vp', 've')
#: The diffusers model classes a teacher can hold (and that a pickle may ask to rebuild).
UNET_CLASSES = ('UNet2DModel',)


def interpolate(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear f(x) through the points (xp, fp), xp increasing; x is clamped to [xp[0], xp[-1]]."""
    x = x.clamp(xp[0], xp[-1])
    upper = torch.searchsorted(xp, x).clamp(1, len(xp) - 1)
    lower = upper - 1
    weight = (x - xp[lower]) / (xp[upper] - xp[lower])
    return fp[lower] + weight * (fp[upper] - fp[lower])


class DiffusersTeacher(torch.nn.Module):
    """A teacher around a diffusers UNet2DModel (or anything with its `config` and call signature).

    `schedule_sigmas`: for 'vp', the sigma of every training timestep 0..T-1 (increasing); for 've', the trained
    [sigma_min, sigma_max] of the model's own [0, 1] data. `prediction_type`: what a 'vp' model predicts (default
    epsilon); a 've' model predicts the score. Class-conditional models (`num_class_embeds`) take
    one-hot labels [N, label_dim], handed to the UNet as class indices.
    """

    def __init__(self, unet: torch.nn.Module, schedule_sigmas: torch.Tensor, kind: str = 'vp',
                 prediction_type: Optional[str] = None):
        super().__init__()
        config = unet.config
        if kind not in SCHEDULE_KINDS:
            raise ValueError(f'schedule kind {kind!r}, expected one of {list(SCHEDULE_KINDS)}')
        prediction_type = prediction_type or ('epsilon' if kind == 'vp' else 'score')
        if prediction_type not in (PREDICTION_TYPES if kind == 'vp' else ('score',)):
            raise ValueError(f'prediction_type {prediction_type!r} is not supported (supported: {", ".join(PREDICTION_TYPES)})')
        if config.get('class_embed_type') is not None:
            raise ValueError(f'class_embed_type {config["class_embed_type"]!r} is not supported (only num_class_embeds)')
        size = config['sample_size']
        size = list(size) if isinstance(size, (list, tuple)) else [size, size]
        if size[0] != size[1]:
            raise ValueError(f'sample_size {size}: only square images are supported')
        sigmas = torch.as_tensor(schedule_sigmas, dtype=torch.float64).flatten()
        if len(sigmas) < 2 or not bool((sigmas[1:] > sigmas[:-1]).all()) or not bool(sigmas[0] > 0):
            raise ValueError('the schedule\'s sigmas must be positive and increase with the timestep')

        self.unet = unet
        self.kind = kind
        self.prediction_type = prediction_type
        self.register_buffer('schedule_sigmas', sigmas, persistent=False)
        self.img_resolution = int(size[0])
        self.img_channels = int(config['in_channels'])
        self.label_dim = int(config.get('num_class_embeds') or 0)
        # 've' models work on [0, 1] data, where noise is half as large as on our [-1, 1].
        data_scale = 2.0 if kind == 've' else 1.0
        self.sigma_min = float(sigmas[0]) * data_scale
        self.sigma_max = float(sigmas[-1]) * data_scale
        # A learned (table) time embedding only knows the integer timesteps.
        self.discrete_timesteps = kind == 'vp' and config.get('time_embedding_type') == 'learned'

    # ------------------------------------------------------------------------------------------------------------
    # The map between noise levels and the model's timesteps.

    def timestep(self, sigma) -> torch.Tensor:
        """The model's timestep for our sigma (float64): fractional for 'vp' (integer for a learned time
        embedding), the model's own sigma for 've'; clamped to the trained range."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=self.schedule_sigmas.device)
        if self.kind == 've':
            return (sigma / 2).clamp(self.schedule_sigmas[0], self.schedule_sigmas[-1])
        grid = torch.arange(len(self.schedule_sigmas), dtype=torch.float64, device=sigma.device)
        t = interpolate(sigma.log(), self.schedule_sigmas.log(), grid)
        return t.round() if self.discrete_timesteps else t

    def sigma_at(self, timestep) -> torch.Tensor:
        """Our sigma at a model timestep (the inverse of `timestep` inside the trained range), float64."""
        t = torch.as_tensor(timestep, dtype=torch.float64, device=self.schedule_sigmas.device)
        if self.kind == 've':
            return 2 * t
        grid = torch.arange(len(self.schedule_sigmas), dtype=torch.float64, device=t.device)
        return interpolate(t, grid, self.schedule_sigmas.log()).exp()

    def round_sigma(self, sigma):
        """Sigma as the model sees it: unchanged for a continuous timestep, else snapped to the nearest training
        timestep's sigma (as EDM's iDDPM preconditioner does), float64."""
        sigma = torch.as_tensor(sigma)
        if not self.discrete_timesteps:
            return sigma
        return self.sigma_at(self.timestep(sigma.to(self.schedule_sigmas.device))).to(sigma.device)

    # ------------------------------------------------------------------------------------------------------------

    def _class_indices(self, class_labels: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if self.label_dim == 0 or class_labels is None:
            return None
        return class_labels.reshape(-1, self.label_dim).argmax(dim=1)

    def _unet(self, x: torch.Tensor, timestep: torch.Tensor, class_labels) -> torch.Tensor:
        """The UNet's prediction in float32; a learned-variance model's extra channels are dropped."""
        dtype = getattr(self.unet, 'dtype', torch.float32)
        out = self.unet(x.to(dtype), timestep.to(torch.long if self.discrete_timesteps else torch.float32),
                        class_labels=self._class_indices(class_labels)).sample
        return out[:, :self.img_channels].to(torch.float32)

    def forward(self, x: torch.Tensor, sigma, class_labels: Optional[torch.Tensor] = None, **unused) -> torch.Tensor:
        """x0_hat in float32. Keyword arguments of EDM's networks (force_fp32, augment_labels) do not apply."""
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1)
        sigma = sigma.expand(x.shape[0]) if sigma.numel() == 1 else sigma
        per_sample = lambda value: value.to(torch.float32).reshape(-1, *([1] * (x.ndim - 1)))
        timestep = self.timestep(sigma)
        if self.kind == 've':
            score = self._unet((x + 1) / 2, timestep, class_labels)
            return x + per_sample(sigma ** 2 / 2) * score
        scale = per_sample(1 / (1 + sigma ** 2).sqrt())
        out = self._unet(x * scale, timestep, class_labels)
        if self.prediction_type == 'epsilon':
            return x - per_sample(sigma) * out
        if self.prediction_type == 'v_prediction':
            return x * scale ** 2 - per_sample(sigma) * scale * out
        return out

    # ------------------------------------------------------------------------------------------------------------
    # Pickles hold the UNet as its diffusers config and weights, so reading one names no diffusers class (it passes
    # the restricted unpickler) and does not depend on where diffusers keeps its modules.

    def __getstate__(self) -> dict:
        unet_class = type(self.unet).__name__
        if unet_class not in UNET_CLASSES:
            raise TypeError(f'DiffusersTeacher: cannot pickle a {unet_class} (only {", ".join(UNET_CLASSES)})')
        return dict(unet_class=unet_class, unet_config=dict(self.unet.config), unet_state=self.unet.state_dict(),
                    frozen=[name for name, p in self.unet.named_parameters() if not p.requires_grad],
                    training=self.training, schedule_sigmas=self.schedule_sigmas, kind=self.kind,
                    prediction_type=self.prediction_type)

    def __setstate__(self, state: dict) -> None:
        import diffusers  # noqa: PLC0415 -- optional dependency, needed only here.
        if state['unet_class'] not in UNET_CLASSES:
            raise TypeError(f'DiffusersTeacher: refusing to rebuild a {state["unet_class"]!r}')
        weights = state['unet_state']
        first = next(t for t in weights.values() if t.is_floating_point())
        with torch.random.fork_rng(devices=[]):  # The throw-away initial weights must not move the caller's RNG.
            unet = getattr(diffusers, state['unet_class']).from_config(state['unet_config'])
        unet.to(first.device)
        if first.dtype != unet.dtype:  # diffusers warns about casting with `to()`; only done for fp16/bf16 weights.
            unet.to(first.dtype)
        unet.load_state_dict(weights)
        for name, param in unet.named_parameters():
            param.requires_grad_(name not in state['frozen'])
        self.__init__(unet, state['schedule_sigmas'], state['kind'], state['prediction_type'])
        self.train(state['training'])
