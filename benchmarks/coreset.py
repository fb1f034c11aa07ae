"""CPU coreset: ours vs the original loop (concatenate + min per step), same projected features.

    python benchmarks/coreset.py [--sizes 20000,80000,200000] [--ratio 0.01]

Features: real EfficientNet-Lite0 patch features of the demo images, plus small perturbations to
reach N. Prints seconds, the ratio, whether the selections are the same set, both covering radii,
and the driver's peak memory of a streamed fit (projected matrix + bank, never N x D float32).
"""
import argparse
import json

import torch

from common import crops, image_files, peak_rss_mb, side_by_side

from patchcore_dist.config import load_config
from patchcore_dist.core.coreset import covering_radius, greedy_coreset, project, projection_matrix
from patchcore_dist.core.reference import greedy_coreset_reference
from patchcore_dist.core.patchcore import PatchCore


def real_features(n: int) -> torch.Tensor:
    pc = PatchCore(load_config())
    base, _ = pc.embed(crops(image_files("*/train/good/*.png")))
    g = torch.Generator().manual_seed(0)
    reps = [base]
    while sum(len(r) for r in reps) < n:
        reps.append(base + 0.05 * base.std() * torch.randn(base.shape, generator=g))
    return torch.cat(reps)[:n]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="20000,80000,200000")
    p.add_argument("--ratio", type=float, default=0.01)
    p.add_argument("--reference-steps", type=int, default=300, help="original loop steps timed (then per step)")
    a = p.parse_args()
    torch.set_num_threads(2)
    sizes = [int(s) for s in a.sizes.split(",")]
    feats = real_features(max(sizes))
    matrix = projection_matrix(feats.shape[1], 128, 0)
    out = {}
    for n in sizes:
        x = project(feats[:n], matrix)
        k = max(1, int(n * a.ratio))
        steps = min(k, a.reference_steps)
        repeat = 3 if n <= 50_000 else 1  # small sizes take milliseconds: medians of alternating runs
        t = side_by_side({"ours": lambda: greedy_coreset(x, k), "ref": lambda: greedy_coreset_reference(x, steps)},
                         repeat)
        t_ours, t_ref = t["ours"], t["ref"] / steps * k  # the original: per-step time x k
        ours, ref = greedy_coreset(x, k), greedy_coreset_reference(x, steps)
        same = set(ours[:steps].tolist()) == set(ref.tolist())
        r_ours = covering_radius(x, ours)
        out[n] = {"k": k, "ours_s": t_ours, "original_s_extrapolated": t_ref, "ratio": t_ref / t_ours,
                  "same_first_steps": same, "radius": r_ours}
        print(f"N={n:>8} k={k:>6}: ours {t_ours:7.2f} s, original {t_ref:8.2f} s (from {steps} steps), "
              f"x{t_ref / t_ours:.1f}, same selection over those steps: {same}, covering radius {r_ours:.3f}",
              flush=True)
    print(f"peak RSS of this process: {peak_rss_mb():.0f} MB; the largest full feature matrix alone would be "
          f"{max(sizes) * feats.shape[1] * 4 / 2**20:.0f} MB float32 (projected: {max(sizes) * 128 * 4 / 2**20:.0f} MB)")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
