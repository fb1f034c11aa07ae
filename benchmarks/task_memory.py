"""Memory of one scoring process per kind of image (issue 25: the capacity plan's per-task and
per-actor figures, measured instead of estimated).

Fits a small model (four 256-px crops of scikit-image's brick), then scores one folder per case
through the real ``patchcore score`` command in a fresh process, in process with one scoring actor
(``runtime.executor=local``, ``runtime.num_actors=1``: the CPU actor that decodes, scores and
renders each batch, as on a CPU node), heatmaps and overlays on, and prints the process's peak
resident set and its excess over the baseline case (8 small images: the imports, the backbone and
the bank):

    python benchmarks/task_memory.py [--cases small,12mp,25mp,100mp]

Images are a real photograph (scikit-image's astronaut) mirrored to the size (the synthetic
mosaics of ``synthesize --photo``), saved as PNG.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import skimage.data
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from patchcore_dist.synthetic.photos import mosaic_variants  # noqa: E402
PEAK = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
        "print('peak_kb', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
CASES = {"small": (8, 256), "12mp": (8, 3464), "25mp": (2, 5000), "100mp": (1, 10000)}
RUN = ["runtime.executor=local", "runtime.num_actors=1"]


def model(base: str) -> str:
    from patchcore_dist.config import load_config
    from patchcore_dist.pipeline.fit import run_fit
    train = os.path.join(base, "train")
    os.makedirs(train)
    brick = skimage.data.brick()
    for i in range(4):
        Image.fromarray(brick[40 * i:40 * i + 256, 40 * i:40 * i + 256]).save(os.path.join(train, f"{i}.png"))
    run_fit(train, os.path.join(base, "model"), load_config(None, RUN))
    return os.path.join(base, "model")


def case(base: str, name: str, m: str) -> tuple[float, float]:
    n, side = CASES[name]
    folder = os.path.join(base, name)
    os.makedirs(folder)
    for i, arr in enumerate(mosaic_variants("astronaut", n, side, seed=0)):
        Image.fromarray(arr).save(os.path.join(folder, f"{i}.png"), compress_level=1)
    cmd = [sys.executable, "-m", "patchcore_dist.cli", "score", "--model", m, "--images", folder,
           "--output", os.path.join(base, f"out-{name}")] + RUN
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", PEAK] + cmd, cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": ROOT})
    if r.returncode:
        raise SystemExit(r.stdout[-2000:] + r.stderr[-2000:])
    return int(r.stdout.rsplit("peak_kb", 1)[1]) / 1024, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="small,12mp,25mp,100mp")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="task-memory-") as base:
        m = model(base)
        baseline = None
        print("| case | images | megapixels each | peak RSS (MB) | over the small case (MB) | seconds |")
        print("|---|---|---|---|---|---|")
        for name in ["small"] + [c for c in a.cases.split(",") if c != "small"]:
            peak, secs = case(base, name, m)
            baseline = peak if baseline is None else baseline
            n, side = CASES[name]
            print(f"| {name} | {n} | {side * side / 1e6:.1f} | {peak:,.0f} | {peak - baseline:+,.0f} | {secs:.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
