"""Shared pieces of the benchmarks: real demo images, timing, peak memory."""
from __future__ import annotations

import glob
import os
import resource
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def demo_data(n_images: int = 24) -> str:
    """The demo benchmark (scikit-image photographs with injected defects), built once."""
    if not os.path.isdir(os.path.join(DATA, "brick")):
        from patchcore_dist.synthetic.categories import make_demo_benchmark
        make_demo_benchmark(DATA, n_images=n_images, size=256)
    return DATA


def image_files(pattern: str = "*/*/*/*.png") -> list[str]:
    return sorted(glob.glob(os.path.join(demo_data(), pattern)))


def crops(paths, size: int = 224) -> np.ndarray:
    from PIL import Image
    from patchcore_dist.core.preprocessing import resize_crop
    return np.stack([resize_crop(np.asarray(Image.open(p).convert("RGB")), 256, size) for p in paths])


def best_of(fn, repeat: int = 3) -> float:
    """Best wall time of ``repeat`` runs (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


class Timings(dict):
    """Median wall time per name, and the per-round times behind them (``rounds``)."""

    def __init__(self, rounds: dict):
        super().__init__({name: float(np.median(v)) for name, v in rounds.items()})
        self.rounds = rounds

    def ratio(self, slow: str, fast: str) -> float:
        """Median over rounds of slow / fast, each round's pair measured back to back: steadier than
        the ratio of medians when the machine's speed drifts between rounds."""
        return float(np.median(np.array(self.rounds[slow]) / np.array(self.rounds[fast])))


def side_by_side(fns: dict, repeat: int = 5, clock=time.perf_counter) -> Timings:
    """Wall times (or ``clock``'s, e.g. ``time.process_time`` for CPU time, steadier on a shared
    machine) of each function, run alternately (after one warm-up each) so that machine noise and
    drift hit ours and the baseline alike."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t = clock()
            fn()
            times[name].append(clock() - t)
    return Timings(times)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
