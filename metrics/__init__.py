"""Evaluation metrics (FID, KID, IS, precision/recall) with pluggable detectors and cached reference statistics.

Entry points: `compute_metrics` (one-off, used by calc_metrics.py), `MetricRunner` (training snapshots),
`load_detector` (the detector registry), `frechet_distance` & co. in `formulas`.
"""

from .detectors import Detector, FashionDetector, ModuleDetector, load_detector
from .feature_stats import FeatureStats
from .formulas import frechet_distance, inception_score, kernel_inception_distance, precision_recall
from .images import InputSpec
from .metric_main import MetricRunner, append_jsonl, compute_metrics, parse_metric
from .references import DatasetReference, GeneratorReference, StatsFileReference, make_reference

__all__ = ['Detector', 'FashionDetector', 'ModuleDetector', 'load_detector', 'FeatureStats', 'frechet_distance',
           'inception_score', 'kernel_inception_distance', 'precision_recall', 'InputSpec', 'MetricRunner',
           'append_jsonl', 'compute_metrics', 'parse_metric', 'DatasetReference', 'GeneratorReference',
           'StatsFileReference', 'make_reference']
