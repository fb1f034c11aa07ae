"""Two-round (composable) coreset on Ray vs the single-pass greedy, at 2M+ patches.

    python benchmarks/distributed_coreset.py [--patches 2100000] [--ratio 0.001] [--parts 4]

Patches: real EfficientNet-Lite0 patch features of the demo images, projected to 128 dimensions,
repeated with small perturbations up to --patches. Each Ray task regenerates its own part from the
same seed (no shuffling through the object store) and runs greedy k-center on it; the driver runs
the second round over the union. Reports wall time with 1 and 2 concurrent workers, the covering
radius of both methods over all patches, and peak memory (RSS) of the driver and of a worker.
"""
import argparse
import json
import resource
import time

import numpy as np
import ray
import torch

from common import crops, image_files, peak_rss_mb

from patchcore_dist.config import load_config
from patchcore_dist.core.coreset import covering_radius, greedy_coreset, part_size, project, projection_matrix
from patchcore_dist.core.patchcore import PatchCore


def make_part(base: np.ndarray, start: int, stop: int) -> torch.Tensor:
    rng = np.random.default_rng(start)
    idx = rng.integers(0, len(base), stop - start)
    x = base[idx] + rng.normal(0, 0.05 * base.std(), (stop - start, base.shape[1])).astype(np.float32)
    return torch.from_numpy(x)


def first_round(base, start, stop, k_part, seed):
    torch.set_num_threads(1)
    part = make_part(base, start, stop)
    sel = greedy_coreset(part, k_part, seed)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return sel.numpy() + start, part[sel].numpy(), peak


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--patches", type=int, default=2_100_000)
    p.add_argument("--ratio", type=float, default=0.001)
    p.add_argument("--parts", type=int, default=4)
    p.add_argument("--oversample", type=float, default=2.0)
    a = p.parse_args()
    torch.set_num_threads(2)
    pc = PatchCore(load_config())
    feats, _ = pc.embed(crops(image_files("*/train/good/*.png")))
    base = project(feats, projection_matrix(feats.shape[1], 128, 0)).numpy()
    n, k = a.patches, int(a.patches * a.ratio)
    bounds = np.linspace(0, n, a.parts + 1).astype(int)
    full = torch.cat([make_part(base, int(s), int(e)) for s, e in zip(bounds[:-1], bounds[1:])])
    print(f"{n} patches x 128 (projected) = {full.numel() * 4 / 2**30:.2f} GiB; k = {k}", flush=True)
    t = time.perf_counter()
    single = greedy_coreset(full, k)
    t_single = time.perf_counter() - t
    r_single = covering_radius(full, single)
    print(f"single pass: {t_single:.1f} s, covering radius {r_single:.3f}, driver peak RSS {peak_rss_mb():.0f} MB",
          flush=True)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    base_ref = ray.put(base)
    results = {"patches": n, "k": k, "single_s": t_single, "single_radius": r_single}
    for workers in (1, 2):
        task = ray.remote(num_cpus=2 // workers)(first_round)  # 2 CPUs per task = one at a time
        t = time.perf_counter()
        refs = [task.remote(base_ref, int(s), int(e), part_size(k, int(e - s), n, a.oversample), j)
                for j, (s, e) in enumerate(zip(bounds[:-1], bounds[1:]))]
        outs = ray.get(refs)
        t1 = time.perf_counter()
        union = np.concatenate([o[0] for o in outs])
        pool = torch.from_numpy(np.concatenate([o[1] for o in outs]))
        final = union[greedy_coreset(pool, k).numpy()]
        t_two = time.perf_counter() - t
        r_two = covering_radius(full, torch.from_numpy(final))
        worker_peak = max(o[2] for o in outs)
        results[f"two_round_{workers}_workers"] = {"seconds": t_two, "first_round_s": t1 - t, "radius": r_two,
                                                    "radius_ratio": r_two / r_single, "worker_peak_rss_mb": worker_peak,
                                                    "union": int(len(union))}
        print(f"two rounds, {a.parts} parts, {workers} worker(s): {t_two:.1f} s (first round {t1 - t:.1f} s), "
              f"covering radius {r_two:.3f} ({r_two / r_single:.3f} x single), worker peak RSS {worker_peak:.0f} MB",
              flush=True)
    results["driver_peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
