"""The executor curve: `patchcore score` as whole processes, heatmaps and overlays on, with
runtime.executor=local, =ray and the default (auto), over archives of several sizes.

    python benchmarks/executor_curve.py [--sizes 64,128,256,257,384,1024] [--repeat 1]

A model fitted once on the demo's brick training images; each archive mixes the test images of brick,
coffee and gravel (benchmarks/score_job.py's archive), cycled to the size. Every run is a fresh
process into a fresh output (no incremental skipping), as a scheduler starts it, with no Ray instance
running beforehand. Prints one line per size: seconds per executor, and the default's time over the
better of local and ray (the target: at most 1.0 at every size, no cliff).
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from common import demo_data

from score_job import archive

BIN = os.path.dirname(sys.executable)


def score_seconds(model: str, images: str, out: str, executor: str | None) -> float:
    """Wall time of one `patchcore score` process (the default config, or runtime.executor=...)."""
    cmd = [os.path.join(BIN, "patchcore"), "score", "--model", model, "--images", images, "--output", out]
    if executor:
        cmd.append(f"runtime.executor={executor}")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - t
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="64,128,256,257,384,1024")
    p.add_argument("--repeat", type=int, default=1, help="runs per size and executor (medians)")
    a = p.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "model")
        fit = subprocess.run([os.path.join(BIN, "patchcore"), "fit", "--train", os.path.join(demo_data(), "brick"),
                              "--model", model], capture_output=True, text=True)
        if fit.returncode:
            raise SystemExit(fit.stderr[-3000:])
        print(f"{'images':>7} {'local s':>8} {'ray s':>8} {'auto s':>8} {'auto / best':>12}")
        for n in sizes:
            images = archive(tmp, n)
            t = {ex: float(np.median([score_seconds(model, images, os.path.join(tmp, f"out-{ex}-{n}-{r}"),
                                                    None if ex == "auto" else ex) for r in range(a.repeat)]))
                 for ex in ("local", "ray", "auto")}
            print(f"{n:>7} {t['local']:>8.1f} {t['ray']:>8.1f} {t['auto']:>8.1f} "
                  f"{t['auto'] / min(t['local'], t['ray']):>12.2f}", flush=True)


if __name__ == "__main__":
    main()
