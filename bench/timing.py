"""Wall-clock timing shared by the benchmarks."""

import statistics
import time


def median_time(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls of `fn`, after one warm-up call (which also absorbs one-time loads)."""
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)
