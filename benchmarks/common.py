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
    """This process's peak resident set, MB: VmHWM where /proc has it (ru_maxrss of a process started by
    a large parent reports at least the parent's peak: it survives fork and exec), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def texture_training_images(n: int, texture: str = "brick", size: int = 256, seed: int = 0) -> list[np.ndarray]:
    """``n`` normal training images of one demo texture: random crops (half of them mirrored, as in
    the demo) of a scikit-image photograph, each also rotated by (i mod 4) x 90 degrees, so that a
    realistic training set (hundreds of images) does not repeat the same few views."""
    from patchcore_dist.synthetic.photos import photo_variants
    return [np.ascontiguousarray(np.rot90(img, i % 4)) for i, img in enumerate(photo_variants(texture, n, size, seed))]


def write_training_folder(images: list[np.ndarray], folder: str) -> list[str]:
    """The images as PNG files (a folder ``patchcore fit`` can read); returns their paths."""
    from PIL import Image
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        paths.append(os.path.join(folder, f"{i:04d}.png"))
        Image.fromarray(img).save(paths[-1])
    return paths


# Printed by every benchmark whose ratio is against the in-repo "original formulation" (issue 27):
# that re-implementation drifts from the official code (1.1-3x slower than it, measured), so its
# ratios are not ratios against the original.
BASELINE_NOTE = ("baseline: this repository's re-implementation of the original formulation, NOT the official "
                 "code; for ratios against amazon-science/patchcore-inspection run ../shared/baseline/"
                 "vs_official.sh (OFFICIAL_SRC, BASELINE_VENV), see benchmarks/README.md")
