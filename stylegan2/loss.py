"""The StyleGAN2-ADA GAN loss: non-saturating logistic loss, lazy R1 on reals, optional path-length regularisation.

Phases (as upstream): `Gmain` (generator loss), `Greg` (path length), `Gboth`; `Dmain` (fake + real logistic
loss), `Dreg` (R1), `Dboth`. Each phase backpropagates `mean(loss) * gain`; with lazy regularisation the trainer
runs `Greg`/`Dreg` every k-th step with `gain = k`. The caller decides which network learns in a phase by setting
`requires_grad` on G's and D's parameters (upstream's training loop does the same).
"""

from typing import Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F

from torch_utils import training_stats
from torch_utils.ops import conv2d_gradfix

PHASES = ('Gmain', 'Greg', 'Gboth', 'Dmain', 'Dreg', 'Dboth')


class StyleGAN2Loss:
    """The loss of upstream's `StyleGAN2Loss` for one G/D pair (G has `.mapping` and `.synthesis`).

    Random draws (style-mixing cutoffs, mixing latents, path-length noise) come from `generator` when given.
    The synthesis noise inputs use the device's global RNG, as in every StyleGAN2 generator.
    """

    def __init__(self, G: torch.nn.Module, D: torch.nn.Module, augment_pipe: Optional[torch.nn.Module] = None,
                 style_mixing_prob: float = 0.9, r1_gamma: float = 10, pl_batch_shrink: int = 2,
                 pl_decay: float = 0.01, pl_weight: float = 2, device: torch.device = torch.device('cpu')):
        self.G = G
        self.D = D
        self.augment_pipe = augment_pipe
        self.style_mixing_prob = style_mixing_prob
        self.r1_gamma = r1_gamma
        self.pl_batch_shrink = pl_batch_shrink
        self.pl_decay = pl_decay
        self.pl_weight = pl_weight
        self.pl_mean = torch.zeros([], device=device)  # Running mean of path lengths (not pickled upstream).

    def run_G(self, z: torch.Tensor, c: torch.Tensor, generator: Optional[torch.Generator] = None,
              ws_grad: bool = False):
        """Images and the ws that made them, with style mixing at a random layer cutoff.

        `ws_grad` makes ws differentiable even when the mapping network is frozen (for the path-length term).
        """
        ws = self.G.mapping(z, c)
        if self.style_mixing_prob > 0:
            num_ws = ws.shape[1]
            cutoff = int(torch.randint(1, num_ws, [], generator=generator, device=generator_device(generator)))
            if float(torch.rand([], generator=generator, device=generator_device(generator))) >= self.style_mixing_prob:
                cutoff = num_ws
            if cutoff < num_ws:
                z_mix = torch.randn(z.shape, generator=generator, device=generator_device(generator)).to(z.device)
                ws_mix = self.G.mapping(z_mix, c, skip_w_avg_update=True)
                ws = torch.cat([ws[:, :cutoff], ws_mix[:, cutoff:]], dim=1)
        if ws_grad and not ws.requires_grad:
            ws = ws.detach().requires_grad_(True)
        img = self.G.synthesis(ws)
        return img, ws

    def run_D(self, img: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.augment_pipe is not None:
            img = self.augment_pipe(img)
        return self.D(img, c)

    def accumulate_gradients(self, phase: str, real_img: torch.Tensor, real_c: torch.Tensor, gen_z: torch.Tensor,
                             gen_c: torch.Tensor, gain: float = 1,
                             generator: Optional[torch.Generator] = None) -> Dict[str, float]:
        """Backpropagate one phase's loss (times `gain`); returns the phase's mean loss terms."""
        assert phase in PHASES, f'unknown phase {phase!r}; expected one of {PHASES}'
        do_Gmain = phase in ('Gmain', 'Gboth')
        do_Dmain = phase in ('Dmain', 'Dboth')
        do_Gpl = phase in ('Greg', 'Gboth') and self.pl_weight != 0
        do_Dr1 = phase in ('Dreg', 'Dboth') and self.r1_gamma != 0
        stats = {}

        if do_Gmain:  # Non-saturating: -log sigmoid(D(G(z))).
            gen_img, _ = self.run_G(gen_z, gen_c, generator)
            gen_logits = self.run_D(gen_img, gen_c)
            loss_Gmain = F.softplus(-gen_logits)
            training_stats.report('Loss/scores/fake', gen_logits)
            training_stats.report('Loss/signs/fake', gen_logits.sign())
            training_stats.report('Loss/G/loss', loss_Gmain)
            loss_Gmain.mean().mul(gain).backward()
            stats['G_loss'] = float(loss_Gmain.detach().mean())

        if do_Gpl:  # Path length: |J_w^T y| should stay near its running mean.
            batch = max(gen_z.shape[0] // self.pl_batch_shrink, 1)
            gen_c_pl = gen_c[:batch] if gen_c is not None else None
            gen_img, gen_ws = self.run_G(gen_z[:batch], gen_c_pl, generator, ws_grad=True)
            pl_noise = torch.randn(gen_img.shape, generator=generator, device=generator_device(generator))
            pl_noise = pl_noise.to(gen_img.device) / np.sqrt(gen_img.shape[2] * gen_img.shape[3])
            with conv2d_gradfix.no_weight_gradients():
                pl_grads = torch.autograd.grad(outputs=[(gen_img * pl_noise).sum()], inputs=[gen_ws],
                                               create_graph=True, only_inputs=True)[0]
            pl_lengths = pl_grads.square().sum(dim=2).mean(dim=1).sqrt()
            pl_mean = self.pl_mean.lerp(pl_lengths.mean(), self.pl_decay)  # Not detached, as upstream.
            self.pl_mean.copy_(pl_mean.detach())
            pl_penalty = (pl_lengths - pl_mean).square()
            loss_Gpl = pl_penalty * self.pl_weight
            training_stats.report('Loss/pl_penalty', pl_penalty)
            training_stats.report('Loss/G/reg', loss_Gpl)
            (gen_img[:, 0, 0, 0] * 0 + loss_Gpl).mean().mul(gain).backward()
            stats['G_reg'] = float(loss_Gpl.detach().mean())

        if do_Dmain:  # -log(1 - sigmoid(D(G(z)))) on fakes.
            with torch.no_grad():
                gen_img, _ = self.run_G(gen_z, gen_c, generator)
            gen_logits = self.run_D(gen_img, gen_c)
            loss_Dgen = F.softplus(gen_logits)
            training_stats.report('Loss/scores/fake', gen_logits)
            training_stats.report('Loss/signs/fake', gen_logits.sign())
            loss_Dgen.mean().mul(gain).backward()
            stats['D_loss_fake'] = float(loss_Dgen.detach().mean())

        if do_Dmain or do_Dr1:  # One D pass on reals serves both -log sigmoid(D(x)) and R1.
            real_img_tmp = real_img.detach().requires_grad_(do_Dr1)
            real_logits = self.run_D(real_img_tmp, real_c)
            training_stats.report('Loss/scores/real', real_logits)
            training_stats.report('Loss/signs/real', real_logits.sign())
            loss_Dreal = 0
            if do_Dmain:
                loss_Dreal = F.softplus(-real_logits)
                training_stats.report('Loss/D/loss', loss_Dgen + loss_Dreal)
                stats['D_loss_real'] = float(loss_Dreal.detach().mean())
            loss_Dr1 = 0
            if do_Dr1:
                with conv2d_gradfix.no_weight_gradients():
                    r1_grads = torch.autograd.grad(outputs=[real_logits.sum()], inputs=[real_img_tmp],
                                                   create_graph=True, only_inputs=True)[0]
                r1_penalty = r1_grads.square().sum(dim=[1, 2, 3])
                loss_Dr1 = r1_penalty * (self.r1_gamma / 2)
                training_stats.report('Loss/r1_penalty', r1_penalty)
                training_stats.report('Loss/D/reg', loss_Dr1)
                stats['D_reg'] = float(loss_Dr1.detach().mean())
            (real_logits * 0 + loss_Dreal + loss_Dr1).mean().mul(gain).backward()

        return stats


def generator_device(generator: Optional[torch.Generator]) -> Optional[torch.device]:
    """The device random numbers are drawn on: the generator's own (CPU when none is given)."""
    return generator.device if generator is not None else None
