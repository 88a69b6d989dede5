"""Finding and loading a diffusers model as a teacher: a local folder as `save_pretrained` writes it, or a Hugging
Face Hub id already in the local cache (nothing is ever downloaded here).

The folder rule, in this order:
* a pipeline folder: `unet/` and `scheduler/scheduler_config.json` (what `DDPMPipeline.save_pretrained` writes;
  a `model_index.json` naming a `vae` or `vqvae` marks a latent model and is refused);
* a model folder: `config.json` of the UNet with its weights, and `scheduler_config.json` beside it in the same
  folder or in `../scheduler/` (so a pipeline's `unet/` folder works too).
A Hub id (`owner/name`) is looked up with `huggingface_hub.snapshot_download(local_files_only=True)`, which honours
HF_HOME / HF_HUB_CACHE, and its snapshot folder follows the same rule.
"""

import importlib.util
import json
import os
import re
from typing import List, NamedTuple

from torch_utils.pickle_reader import NetworkPickleError

from .diffusers_teacher import UNET_CLASSES, DiffusersTeacher

#: What a Hub model id looks like (`owner/name`); a path that exists is never taken for one.
HUB_ID = re.compile(r'^[A-Za-z0-9][\w.-]*/[\w.-]+$')
UNET_CONFIG = 'config.json'
SCHEDULER_CONFIG = 'scheduler_config.json'
LATENT_COMPONENTS = ('vae', 'vqvae')
INSTALL_HINT = "pip install 'diff-instruct-toolkit[diffusers]' (or pip install diffusers)"


class DiffusersLoadError(NetworkPickleError):
    """A diffusers teacher cannot be found or used (one line, naming the source). A NetworkPickleError, so every
    script that reports bad teacher pickles reports these the same way."""


def is_diffusers_source(source: str) -> bool:
    """A folder, or a Hub id that is not a local path (`.pkl` names are always pickles)."""
    source = str(source)
    if os.path.isdir(source):
        return True
    return not os.path.exists(source) and not source.endswith('.pkl') and HUB_ID.match(source) is not None


def _import_diffusers(source: str):
    try:
        import diffusers  # noqa: PLC0415 -- optional dependency.
    except ImportError:
        raise DiffusersLoadError(f'{source}: a diffusers model needs the optional diffusers package: '
                                 f'{INSTALL_HINT}') from None
    return diffusers


def hub_snapshot(repo_id: str) -> str:
    """The cached snapshot folder of a Hub model, or a one-line error saying how to get it."""
    _import_diffusers(repo_id)
    from huggingface_hub import snapshot_download  # noqa: PLC0415 -- installed with diffusers.
    try:
        return snapshot_download(repo_id, local_files_only=True)
    except (OSError, ValueError) as err:
        missing = type(err).__name__ == 'LocalEntryNotFoundError'
        reason = 'not in the local Hugging Face cache' if missing else ' '.join(str(err).split())[:200]
        raise DiffusersLoadError(
            f'{repo_id}: no such file or folder, and as a Hugging Face Hub id: {reason}. Nothing is downloaded: '
            f'run `hf download {repo_id}` (older huggingface_hub: `huggingface-cli download {repo_id}`) on a machine '
            f'with internet and use that cache here (HF_HOME / HF_HUB_CACHE), or pass the folder that '
            f'save_pretrained wrote') from None


class ModelFolders(NamedTuple):
    unet: str               # the folder holding the UNet's config.json and weights
    scheduler_config: str   # the scheduler_config.json that goes with it


def _read_json(path: str, source: str) -> dict:
    try:
        with open(path, encoding='utf-8') as f:
            data = json.load(f)
    except (OSError, ValueError) as err:
        raise DiffusersLoadError(f'{source}: cannot read {path} ({" ".join(str(err).split())[:200]})') from None
    if not isinstance(data, dict):
        raise DiffusersLoadError(f'{source}: {path} is not a JSON object')
    return data


def find_folders(folder: str, source: str) -> ModelFolders:
    """Where the UNet and its scheduler config are in a local folder (see the module's folder rule)."""
    pipeline_scheduler = os.path.join(folder, 'scheduler', SCHEDULER_CONFIG)
    if os.path.isdir(os.path.join(folder, 'unet')):
        index_path = os.path.join(folder, 'model_index.json')
        if os.path.isfile(index_path):
            latent = [name for name in LATENT_COMPONENTS if name in _read_json(index_path, source)]
            if latent:
                raise DiffusersLoadError(f'{source}: a latent diffusion pipeline (it has {latent[0]}/); only '
                                         f'pixel-space models can be teachers')
        if not os.path.isfile(pipeline_scheduler):
            raise DiffusersLoadError(f'{source}: a pipeline folder with unet/ but no scheduler/{SCHEDULER_CONFIG}')
        return ModelFolders(os.path.join(folder, 'unet'), pipeline_scheduler)
    if os.path.isfile(os.path.join(folder, UNET_CONFIG)):
        for candidate in (os.path.join(folder, SCHEDULER_CONFIG),
                          os.path.join(folder, os.pardir, 'scheduler', SCHEDULER_CONFIG)):
            if os.path.isfile(candidate):
                return ModelFolders(folder, os.path.normpath(candidate))
        raise DiffusersLoadError(f'{source}: a model folder ({UNET_CONFIG}) without its scheduler: expected '
                                 f'{SCHEDULER_CONFIG} beside it or in ../scheduler/')
    raise DiffusersLoadError(f'{source}: is a directory, but not a diffusers model: expected unet/ and scheduler/ '
                             f'(a pipeline saved by save_pretrained) or {UNET_CONFIG} with {SCHEDULER_CONFIG} beside '
                             f'it; a teacher pickle must be a file')


def resolve_folders(source: str) -> ModelFolders:
    """The UNet and scheduler of a local folder or of a cached Hub id."""
    source = str(source)
    return find_folders(source if os.path.isdir(source) else hub_snapshot(source), source)


def model_files(source: str) -> List[str]:
    """Every file the teacher is made of (the UNet folder's files and the scheduler config), in a fixed order."""
    folders = resolve_folders(source)
    unet_files = sorted(os.path.join(folders.unet, name) for name in os.listdir(folders.unet))
    return [path for path in unet_files if os.path.isfile(path)] + [folders.scheduler_config]


def teacher_from_scheduler(unet, scheduler, source: str = 'diffusers model') -> DiffusersTeacher:
    """The teacher for a UNet and its diffusers scheduler object (VP with `alphas_cumprod`, or score-SDE VE)."""
    config = scheduler.config
    if hasattr(scheduler, 'alphas_cumprod'):
        alphas_cumprod = scheduler.alphas_cumprod.double()
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()
        args = dict(kind='vp', prediction_type=config.get('prediction_type', 'epsilon'))
    elif type(scheduler).__name__ == 'ScoreSdeVeScheduler':
        sigmas = [config['sigma_min'], config['sigma_max']]
        args = dict(kind='ve')
    else:
        raise DiffusersLoadError(f'{source}: {type(scheduler).__name__} is not supported: expected a DDPM/DDIM-family '
                                 f'scheduler (with alphas_cumprod) or ScoreSdeVeScheduler')
    try:
        return DiffusersTeacher(unet, sigmas, **args)
    except ValueError as err:
        raise DiffusersLoadError(f'{source}: {err}') from None


def load_diffusers_teacher(source: str) -> DiffusersTeacher:
    """The teacher of a diffusers folder or cached Hub id, on the CPU."""
    source = str(source)
    diffusers = _import_diffusers(source)
    folders = resolve_folders(source)
    unet_class = _read_json(os.path.join(folders.unet, UNET_CONFIG), source).get('_class_name')
    if unet_class not in UNET_CLASSES:
        raise DiffusersLoadError(f'{source}: the model is a {unet_class}; supported: {", ".join(UNET_CLASSES)} '
                                 f'(pixel-space, unconditional or class-conditional)')
    scheduler_config = _read_json(folders.scheduler_config, source)
    scheduler_class = getattr(diffusers, str(scheduler_config.get('_class_name')), None)
    if not (isinstance(scheduler_class, type) and issubclass(scheduler_class, diffusers.SchedulerMixin)):
        raise DiffusersLoadError(f'{source}: {folders.scheduler_config} names no diffusers scheduler '
                                 f'(_class_name {scheduler_config.get("_class_name")!r})')
    try:
        unet = getattr(diffusers, unet_class).from_pretrained(
            folders.unet, local_files_only=True, low_cpu_mem_usage=importlib.util.find_spec('accelerate') is not None)
        scheduler = scheduler_class.from_config(scheduler_config)
    except Exception as err:  # noqa: BLE001 -- whatever diffusers raises for a broken folder, one line.
        raise DiffusersLoadError(f'{source}: cannot load the diffusers model ({type(err).__name__}: '
                                 f'{" ".join(str(err).split())[:300]})') from None
    return teacher_from_scheduler(unet, scheduler, source)
