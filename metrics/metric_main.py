"""Metric names, their computation for a generator against a reference, and the JSONL records.

Names follow StyleGAN2-ADA: `fid50k_full`, `kid50k_full`, `pr50k3_full`, `is50k`, and any count (`fid2k_full`,
`kid500_full`); without `_full` the reals are capped at the same count (upstream's legacy variants). With a
non-standard detector the name says so: `fd_fmnist2k_full` (Fréchet distance), `kd_fmnist2k_full`, `pr_fmnist...`,
`is_fmnist...` -- such numbers are not comparable with papers' Inception FIDs.

Generated images are produced once per call and shared by every metric and detector; each detector sees them
adapted to its own input. Reference statistics come from metrics/references.py.
"""

import json
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import tqdm

import dnnlib
from . import formulas
from .detectors import Detector, load_detector, standard_detector
from .feature_stats import FeatureStats
from .references import StatsRequest, generated_batches, make_reference

KID_MAX_REAL = 1_000_000
PR_MAX_REAL = 200_000
_NAME_RE = re.compile(r'(fid|kid|is|pr)(\d+k?)(?:_?(\d+))?(_full)?')
_RENAMED_KIND = {'fid': 'fd', 'kid': 'kd', 'pr': 'pr', 'is': 'is'}  # 'fd': not an Inception distance.


@dataclass(frozen=True)
class MetricSpec:
    name: str           # name used in results, e.g. 'fid50k_full' or 'fd_fmnist2k_full'
    kind: str           # 'fid' | 'kid' | 'is' | 'pr'
    num_gen: int
    full: bool          # every real image (capped for KID/PR), not just num_gen of them
    k: int = 3          # neighbourhood size for precision/recall
    detector: Optional[str] = None  # None: the standard detector for `kind`


def _format_count(num: int) -> str:
    return f'{num // 1000}k' if num % 1000 == 0 else str(num)


def fid_full_name(num: int) -> str:
    """The distance against every real image with `num` generated ones: 5000 -> 'fid5k_full', 2500 -> 'fid2500_full'."""
    return f'fid{_format_count(num)}_full'


def parse_metric(name: str, num_gen: Optional[int] = None, detector_name: Optional[str] = None) -> MetricSpec:
    """'fid50k_full' -> MetricSpec; `num_gen` overrides the count (and the name follows), `detector_name` renames."""
    match = _NAME_RE.fullmatch(name.strip())
    if match is None:
        raise ValueError(f'--metrics: unknown metric {name!r}; expected e.g. fid50k_full, kid50k_full, '
                         f'pr50k3_full, is50k (or other counts: fid2k_full, kid500_full)')
    kind, count, k, full = match.group(1), match.group(2), match.group(3), bool(match.group(4))
    if kind == 'pr':
        if not k or (not count.endswith('k') and f'{count}_{k}' not in name):
            raise ValueError(f'--metrics: {name!r}: write precision/recall as pr<count>k<k> (pr50k3_full) or '
                             f'pr<count>_<k> (pr500_3_full)')
    elif k:
        raise ValueError(f'--metrics: unknown metric {name!r}')
    if kind == 'is' and full:
        raise ValueError(f'--metrics: {name!r}: IS uses no real images; write is50k')
    num = num_gen if num_gen is not None else int(count[:-1]) * 1000 if count.endswith('k') else int(count)
    if num < 2:
        raise ValueError(f'--metrics: {name!r}: need at least 2 generated images')
    standard = standard_detector(kind)
    renamed = detector_name is not None and detector_name != standard
    prefix = f'{_RENAMED_KIND[kind]}_{detector_name}' if renamed else kind
    count = _format_count(num)
    neighbours = '' if not k else k if count.endswith('k') else f'_{k}'
    new_name = f'{prefix}{count}{neighbours}{"_full" if full else ""}'
    return MetricSpec(name=new_name, kind=kind, num_gen=num, full=full, k=int(k or 3),
                      detector=detector_name if renamed else standard)


def _reference_request(spec: MetricSpec) -> Optional[StatsRequest]:
    if spec.kind == 'is':
        return None
    cap = dict(fid=None, kid=KID_MAX_REAL, pr=PR_MAX_REAL)[spec.kind] if spec.full else spec.num_gen
    return StatsRequest(capture_all=spec.kind in ('kid', 'pr'), capture_mean_cov=spec.kind == 'fid', max_items=cap)


def _compute(spec: MetricSpec, gen_features: np.ndarray, gen_probs: Optional[np.ndarray], ref_stats: Any,
             unbiased_cov: bool, seed: int, device: torch.device) -> Dict[str, float]:
    features = gen_features[:spec.num_gen]
    if spec.kind == 'fid':
        mu_gen, sigma_gen = FeatureStats.from_features(features, capture_all=False).get_mean_cov(unbiased_cov)
        mu_ref, sigma_ref = ref_stats.get_mean_cov(unbiased_cov)
        return {spec.name: formulas.frechet_distance(mu_gen, sigma_gen, mu_ref, sigma_ref)}
    if spec.kind == 'kid':
        return {spec.name: formulas.kernel_inception_distance(ref_stats.get_all(), features, seed=seed)}
    if spec.kind == 'pr':
        precision, recall = formulas.precision_recall(ref_stats.get_all(), features, k=spec.k, device=device)
        return {f'{spec.name}_precision': precision, f'{spec.name}_recall': recall}
    mean, std = formulas.inception_score(gen_probs[:spec.num_gen])
    return {f'{spec.name}_mean': mean, f'{spec.name}_std': std}


def compute_metrics(metrics: Sequence[str], generator: Any, reference: Any = None, detector: Any = None,
                    device: Any = 'cpu', num_gen: Optional[int] = None, batch_size: int = 64, seed: int = 0,
                    cov_convention: str = 'auto', progress: bool = False) -> List[dict]:
    """Compute several metrics of one generator adapter; returns one record per metric (see `make_record`).

    metrics: names such as 'fid50k_full'. reference: dataset path, statistics .npz, generator adapter, or a
    reference object (needed unless only IS is asked). detector: None (the standard ones), one detector for
    every metric (registered name, path, URL, module or Detector), or a dict of local copies of the standard
    ones ({'inception': path, 'vgg16': path}). cov_convention: 'biased' (StyleGAN2-ADA), 'unbiased' (EDM), or
    'auto' (unbiased only against EDM mu/sigma files, as EDM's fid.py computes them).
    """
    device = torch.device(device)
    reference = None if reference is None else make_reference(reference, batch_size=batch_size)
    locations = dict(detector) if isinstance(detector, dict) else {}
    single = None if detector is None or isinstance(detector, dict) else load_detector(detector, device)

    def get_detector(name: str) -> Detector:
        return single if single is not None else load_detector(locations.get(name, name), device)

    specs = [parse_metric(m, num_gen, None if single is None else single.name) for m in metrics]
    if reference is None and any(s.kind != 'is' for s in specs):
        raise ValueError('metrics other than IS need a reference: --data, --ref or a reference generator')
    if cov_convention not in ('auto', 'biased', 'unbiased'):
        raise ValueError(f'cov_convention must be auto, biased or unbiased, got {cov_convention!r}')
    unbiased = cov_convention == 'unbiased' or (cov_convention == 'auto' and reference is not None
                                                and reference.is_mean_cov_only)

    # Reference statistics first, so a reference that cannot serve a metric fails before the long generation.
    used = sorted({s.detector for s in specs})
    requests = {s: _reference_request(s) for s in specs}
    ref_stats: Dict[str, dict] = {}
    ref_time: Dict[str, float] = {}
    for name in used:
        start_time = time.time()
        wanted = [requests[s] for s in specs if s.detector == name and requests[s] is not None]
        ref_stats[name] = reference.get_stats(get_detector(name), wanted, device, progress) if wanted else {}
        ref_time[name] = time.time() - start_time

    # Generate once; run every detector (and the IS head) on each batch.
    start_time = time.time()
    total = max(s.num_gen for s in specs)
    need_probs = {s.detector for s in specs if s.kind == 'is'}
    features: Dict[str, list] = {name: [] for name in used}
    probs: Dict[str, list] = {name: [] for name in need_probs}
    with tqdm.tqdm(total=total, desc='generated', unit='img', disable=not progress, dynamic_ncols=True) as bar:
        for images in generated_batches(generator, total, batch_size, seed, device):
            for name in used:
                features[name].append(get_detector(name).features(images).cpu().numpy())
            for name in need_probs:
                probs[name].append(get_detector(name).probabilities(images).cpu().numpy())
            bar.update(len(images))
    gen_features = {name: np.concatenate(parts) for name, parts in features.items()}
    gen_probs = {name: np.concatenate(parts) for name, parts in probs.items()}
    gen_time = time.time() - start_time

    records = []
    for spec in specs:
        start_time = time.time()
        results = _compute(spec, gen_features[spec.detector], gen_probs.get(spec.detector),
                           ref_stats[spec.detector].get(requests[spec]), unbiased, seed, device)
        group_size = sum(s.detector == spec.detector for s in specs)
        elapsed = time.time() - start_time + gen_time / len(specs) + ref_time[spec.detector] / group_size
        records.append(make_record(spec, results, elapsed, get_detector(spec.detector), reference, unbiased))
    return records


def make_record(spec: MetricSpec, results: Dict[str, float], total_time: float, detector: Detector,
                reference: Any, unbiased: bool, snapshot_pkl: Optional[str] = None) -> dict:
    """The JSONL line: upstream's keys plus what defines the number (detector, reference, covariance)."""
    return dict(results=dnnlib.EasyDict(results), metric=spec.name, total_time=total_time,
                total_time_str=dnnlib.util.format_time(total_time), num_gpus=1, snapshot_pkl=snapshot_pkl,
                timestamp=time.time(), detector=detector.name, detector_identity=detector.identity,
                reference=None if reference is None else reference.description, num_gen=spec.num_gen,
                covariance='unbiased' if unbiased else 'biased')


def append_jsonl(record: dict, run_dir: str) -> str:
    """Append one record to `<run_dir>/metric-<name>.jsonl` (as upstream) and return the file name."""
    path = os.path.join(run_dir, f'metric-{record["metric"]}.jsonl')
    with open(path, 'at') as f:
        f.write(json.dumps(record) + '\n')
    return path


class MetricRunner:
    """Metrics at training snapshots (refine.py / distill.py `--metrics`).

    Detectors and reference statistics are loaded once and reused at every snapshot; each call samples the
    generator once for all metrics and appends the records to `run_dir/metric-<name>.jsonl`. `reference` is a
    dataset path, a statistics .npz, or, data-free, `GeneratorReference(teacher_adapter, num, cache_key=...)`.
    Call it on rank 0 only: generation is not split across processes.
    """

    def __init__(self, metrics: Sequence[str], reference: Any = None, detector: Any = None, device: Any = 'cpu',
                 num_gen: Optional[int] = None, batch_size: int = 64, seed: int = 0, run_dir: Optional[str] = None,
                 progress: bool = False):
        self.metrics = list(metrics)
        self.device = torch.device(device)
        self.detector = detector
        self.options = dict(num_gen=num_gen, batch_size=batch_size, seed=seed, progress=progress)
        self.run_dir = run_dir
        self.reference = None if reference is None else make_reference(reference, batch_size=batch_size)
        for m in self.metrics:
            parse_metric(m, num_gen)  # Fail at start-up on a bad name, not at the first snapshot.
        self._detector: Any = None

    def __call__(self, generator: Any, snapshot_pkl: Optional[str] = None) -> Dict[str, float]:
        if not self.metrics:
            return {}
        if self._detector is None and self.detector is not None and not isinstance(self.detector, dict):
            self._detector = load_detector(self.detector, self.device)  # Wrap a module once, not per snapshot.
        detector = self._detector if self._detector is not None else self.detector
        records = compute_metrics(self.metrics, generator, self.reference, detector, self.device, **self.options)
        merged: Dict[str, float] = {}
        for record in records:
            record['snapshot_pkl'] = snapshot_pkl
            if self.run_dir is not None:
                append_jsonl(record, self.run_dir)
            merged.update(record['results'])
        return merged
