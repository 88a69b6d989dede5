"""The curves of a run as one PNG: every metric over kimg (from `metric-*.jsonl`), the training losses and the
fake score's tracking (from `stats.jsonl`), so a result is read over the whole run rather than at one moment."""

import json
import os
from typing import Dict, List, Optional, Tuple

import numpy as np

from training.run import snapshot_kimg


def _read_jsonl(path: str) -> List[dict]:
    with open(path, encoding='utf-8') as f:
        return [json.loads(line) for line in f if line.strip()]


def metric_curves(run_dir: str) -> Dict[str, List[Tuple[float, float]]]:
    """{metric: [(kimg, value), ...]} in kimg order from the run's metric files; the start (no snapshot) is kimg 0,
    and records of files other than numbered snapshots (`network-snapshot-best.pkl`) are left out."""
    curves = {}
    for name in sorted(os.listdir(run_dir)):
        if not (name.startswith('metric-') and name.endswith('.jsonl')):
            continue
        for record in _read_jsonl(os.path.join(run_dir, name)):
            kimg = record_kimg(record.get('snapshot_pkl'))
            if kimg is None:
                continue
            for metric, value in record['results'].items():
                curves.setdefault(metric, []).append((kimg, float(value)))
    return {metric: sorted(points) for metric, points in curves.items()}


def record_kimg(snapshot_pkl: Optional[str]) -> Optional[float]:
    """kimg of a metric record's snapshot: 0 for the start, None for a file that is not a numbered snapshot."""
    return 0.0 if snapshot_pkl is None else snapshot_kimg(snapshot_pkl)


def is_distance(metric: str) -> bool:
    """FID/KID (or their renamed FD/KD): lower is better, so the best point of the curve is its minimum."""
    return metric.split('_')[0].rstrip('0123456789k') in ('fid', 'kid', 'fd', 'kd')


STAT_PANELS = (
    ('training losses (per tick)', ('Loss/G/loss', 'Loss/fake_score', 'Loss/loss')),
    ('DSM on fresh samples (fake vs teacher)', ('Tracking/dsm_fake', 'Tracking/dsm_teacher')),
    ('generator update per tick (relative)', ('Tracking/g_update',)),
)


def plot_run(run_dir: str, stat_panels=STAT_PANELS) -> Optional[str]:
    """Write `<run_dir>/curves.png`; returns its path (None when there is nothing to plot yet)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    curves = metric_curves(run_dir)
    stats_path = os.path.join(run_dir, 'stats.jsonl')
    ticks = _read_jsonl(stats_path) if os.path.exists(stats_path) else []
    panels = [(metric, {metric: points}) for metric, points in curves.items()]
    for title, names in stat_panels:
        lines = {}
        for name in names:
            points = [(t['Progress/kimg']['mean'], t[name]['mean']) for t in ticks
                      if name in t and t[name].get('num', 1) > 0 and np.isfinite(t[name]['mean'])]
            if points:
                lines[name] = points
        if lines:
            panels.append((title, lines))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
    for ax, (title, lines) in zip(axes[0], panels):
        for label, points in lines.items():
            x, y = zip(*points)
            ax.plot(x, y, marker='o' if len(x) < 40 else None, markersize=3, label=label)
        if title in curves:
            x, y = zip(*curves[title])
            ax.axhline(y[0], color='gray', linestyle=':', linewidth=1, label='start')
            if is_distance(title):
                best = int(np.argmin(y))
                ax.plot([x[best]], [y[best]], marker='*', markersize=10, color='C3', linestyle='none', label='best')
        ax.set_title(title)
        ax.set_xlabel('kimg')
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(os.path.basename(os.path.normpath(run_dir)), fontsize=9)
    fig.tight_layout()
    path = os.path.join(run_dir, 'curves.png')
    fig.savefig(path + '.tmp.png', dpi=100)
    plt.close(fig)
    os.replace(path + '.tmp.png', path)
    return path
