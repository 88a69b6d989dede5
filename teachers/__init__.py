"""Teachers: denoisers D(x, sigma, class_labels) in EDM's convention, and everything around them.

* `load(name_or_path_or_url)`: official EDM pickles by short name (`OFFICIAL`), any path or URL, diffusers
  folders and cached Hub ids (`DiffusersTeacher`, needs the optional diffusers package).
* `networks`: SongUNet (DDPM++/NCSN++), DhariwalUNet (ADM), EDMPrecond / VPPrecond / VEPrecond / iDDPMPrecond.
* `loss`: EDM's denoising losses; `sampling`: Heun/Euler samplers and per-seed generation.
* `analytic`: exact Gaussian-mixture teachers.
"""

from .analytic import GaussianMixture, grid25, ring8
from .diffusers_teacher import DiffusersTeacher
from .interface import TEACHER_ATTRIBUTES, is_teacher, missing_teacher_attributes, score
from .load import OFFICIAL, NetworkPickleError, load, load_pickle, rebuild_teacher, resolve
from .networks import DhariwalUNet, EDMPrecond, SongUNet, VEPrecond, VPPrecond, iDDPMPrecond
from .sampling import ablation_sampler, edm_sampler, generate_images

__all__ = [
    'GaussianMixture', 'grid25', 'ring8', 'DiffusersTeacher',
    'TEACHER_ATTRIBUTES', 'is_teacher', 'missing_teacher_attributes', 'score',
    'OFFICIAL', 'NetworkPickleError', 'load', 'load_pickle', 'rebuild_teacher', 'resolve',
    'DhariwalUNet', 'EDMPrecond', 'SongUNet', 'VEPrecond', 'VPPrecond', 'iDDPMPrecond',
    'ablation_sampler', 'edm_sampler', 'generate_images',
]
