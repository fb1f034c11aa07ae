"""CPU coreset: ours (pruned) vs today's dense step vs the original loop (concatenate + min per
step), same projected features, one run.

    python benchmarks/coreset.py [--sizes 20000,80000,200000] [--ratio 0.01]
    python benchmarks/coreset.py --features textures --sizes 156800 --ratio 0.1   # the 200-image fit

Features: ``demo``: real EfficientNet-Lite0 patch features of the demo images, plus small
perturbations to reach N; ``textures``: real features only, of N / 784 training images of one demo
texture with flips and rotations (``common.texture_training_images``), as a 200-image fit has them.
Prints seconds, the ratios, whether the pruned selection is the dense one (same indices, same
order), the share of points the pruned step measured, and whether the original loop's first steps
chose the same set; plus the driver's peak memory.
"""
import argparse
import json

import time

import numpy as np
import torch

from common import crops, image_files, peak_rss_mb, side_by_side, texture_training_images

from patchcore_dist.config import load_config
import patchcore_dist.core.coreset as coreset_mod
from patchcore_dist.core.coreset import covering_radius, greedy_coreset, project, projection_matrix
from patchcore_dist.core.reference import greedy_coreset_reference
from patchcore_dist.core.patchcore import PatchCore
from patchcore_dist.core.preprocessing import resize_crop


def real_features(n: int) -> torch.Tensor:
    pc = PatchCore(load_config())
    base, _ = pc.embed(crops(image_files("*/train/good/*.png")))
    g = torch.Generator().manual_seed(0)
    reps = [base]
    while sum(len(r) for r in reps) < n:
        reps.append(base + 0.05 * base.std() * torch.randn(base.shape, generator=g))
    return torch.cat(reps)[:n]


def texture_features(n: int) -> torch.Tensor:
    """Real patch features of ceil(n / 784) texture training images (784 patches each at 224 px)."""
    pc = PatchCore(load_config())
    images = texture_training_images(-(-n // 784))
    feats, _ = pc.embed(np.stack([resize_crop(im, 256, 224) for im in images]))
    return feats[:n]


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def measured_share(x, k) -> float:
    """Share of the k x N point-centre distances that the pruned traversal computed."""
    seen = {}
    init = coreset_mod._PrunedTraversal.__init__

    def spy(self, *a):
        init(self, *a)
        seen["t"] = self
    coreset_mod._PrunedTraversal.__init__ = spy
    try:
        greedy_coreset(x, k)
    finally:
        coreset_mod._PrunedTraversal.__init__ = init
    return seen["t"].measured / (len(x) * k)


def compare(x, k, steps: int, repeat: int) -> dict:
    """Pruned, dense and the original loop on the same projected features, alternately."""
    if repeat > 1:
        t = side_by_side({"pruned": lambda: greedy_coreset(x, k), "dense": lambda: greedy_coreset(x, k, pruned=False),
                          "ref": lambda: greedy_coreset_reference(x, steps)}, repeat)
        t_pruned, t_dense, t_ref = t["pruned"], t["dense"], t["ref"]
    else:  # large sizes: one run each, back to back
        t_dense, _ = timed(lambda: greedy_coreset(x, k, pruned=False))
        t_pruned, _ = timed(lambda: greedy_coreset(x, k))
        t_ref, _ = timed(lambda: greedy_coreset_reference(x, steps))
    ours, dense, ref = greedy_coreset(x, k), greedy_coreset(x, k, pruned=False), greedy_coreset_reference(x, steps)
    t_orig = t_ref / steps * k  # the original: per-step time x k
    return {"k": k, "pruned_s": t_pruned, "dense_s": t_dense, "original_s_extrapolated": t_orig,
            "dense_over_pruned": t_dense / t_pruned, "original_over_pruned": t_orig / t_pruned,
            "identical_to_dense": bool(torch.equal(ours, dense)), "measured_share": measured_share(x, k),
            "same_first_steps_as_original": set(ours[:steps].tolist()) == set(ref.tolist()),
            "radius": covering_radius(x, ours)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="20000,80000,200000")
    p.add_argument("--ratio", type=float, default=0.01)
    p.add_argument("--features", choices=("demo", "textures"), default="demo")
    p.add_argument("--reference-steps", type=int, default=300, help="original loop steps timed (then per step)")
    a = p.parse_args()
    torch.set_num_threads(2)
    sizes = [int(s) for s in a.sizes.split(",")]
    feats = real_features(max(sizes)) if a.features == "demo" else texture_features(max(sizes))
    matrix = projection_matrix(feats.shape[1], 128, 0)
    out = {}
    for n in sizes:
        x = project(feats[:n], matrix)
        k = max(1, int(n * a.ratio))
        r = out[n] = compare(x, k, min(k, a.reference_steps), 3 if n <= 50_000 else 1)
        print(f"N={n:>8} k={k:>6}: pruned {r['pruned_s']:7.2f} s, dense (before) {r['dense_s']:7.2f} s, original "
              f"{r['original_s_extrapolated']:8.2f} s (from {min(k, a.reference_steps)} steps); dense/pruned "
              f"x{r['dense_over_pruned']:.2f}, original/pruned x{r['original_over_pruned']:.1f}; identical to dense: "
              f"{r['identical_to_dense']}, measured {100 * r['measured_share']:.1f} % of the distances; same set as "
              f"the original's first steps: {r['same_first_steps_as_original']}, radius {r['radius']:.3f}", flush=True)
    print(f"peak RSS of this process: {peak_rss_mb():.0f} MB; the largest full feature matrix alone would be "
          f"{max(sizes) * feats.shape[1] * 4 / 2**20:.0f} MB float32 (projected: {max(sizes) * 128 * 4 / 2**20:.0f} MB)")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
