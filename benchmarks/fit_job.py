"""The whole fit at a realistic size: our `patchcore fit` job as a process vs the original
formulation in one process (plain backbone, unfold-based patch features, the original
concatenate-and-minimum coreset loop, faiss flat), on the same training images.

    python benchmarks/fit_job.py [--images 200] [--original-coreset-steps 0]

Training images: ``common.texture_training_images`` (random crops of one demo texture, half
mirrored, rotated by multiples of 90 degrees), written as PNG files. ``--original-coreset-steps S``
times only S steps of the original loop and scales them to k (marked "extrapolated"); 0 runs it all.
The original's projection and the start of its loop (starting distances, first step) are timed once
and not scaled.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import faiss
import torch

from common import BASELINE_NOTE, crops, texture_training_images, write_training_folder

from patchcore_dist.config import load_config
from patchcore_dist.core.backbones import build_backbone
from patchcore_dist.core.coreset import coreset_size, project, projection_matrix
from patchcore_dist.core.preprocessing import normalize
from patchcore_dist.core.reference import greedy_coreset_reference, patch_features_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ours(train: str, model: str, overrides: list[str]) -> float:
    """Wall seconds of `patchcore fit` as a fresh process (Ray start-up included)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "patchcore_dist.cli", "fit", "--train", train, "--model", model,
                    *overrides], check=True, env=env, cwd=ROOT)
    return time.perf_counter() - t


def original(files: list[str], steps: int) -> dict:
    """The original formulation in this process; returns its phases' seconds."""
    cfg = load_config()
    e, t0 = cfg.embedding, time.perf_counter()
    backbone = build_backbone(cfg.backbone.name, cfg.backbone.layers, cfg.backbone.weights)
    with torch.inference_mode():
        feats = []
        for s in range(0, len(files), 8):
            x = normalize(torch.from_numpy(crops(files[s:s + 8])))
            feats.append(patch_features_reference(backbone(x), e.patch_size, e.pretrain_dim, e.target_dim)[0])
        feats = torch.cat(feats)
    t1 = time.perf_counter()
    k = coreset_size(len(feats), cfg.coreset.ratio)
    x = project(feats, projection_matrix(feats.shape[1], cfg.coreset.projection_dim, cfg.seed))
    projection_s = time.perf_counter() - t1
    run = k if steps <= 0 else min(steps, k)
    t = time.perf_counter()
    idx = greedy_coreset_reference(x, run)
    t2 = time.perf_counter()
    coreset_s = projection_s + (t2 - t)
    if run < k:  # only the loop's steps are scaled: the start (one step and the starting distances) is timed alone
        t = time.perf_counter()
        greedy_coreset_reference(x, 1)
        start_s = time.perf_counter() - t
        coreset_s = projection_s + start_s + (t2 - t1 - projection_s - start_s) * (k - 1) / (run - 1)
    index = faiss.IndexFlatL2(feats.shape[1])
    index.add(feats[idx].numpy())
    t3 = time.perf_counter()
    return {"patches": len(feats), "k": k, "features_s": t1 - t0, "coreset_s": coreset_s,
            "coreset_extrapolated_from_steps": run if run < k else None, "index_s": t3 - t2,
            "total_s": (t1 - t0) + coreset_s + (t3 - t2)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--original-coreset-steps", type=int, default=0, help="0: run the original loop to k")
    p.add_argument("overrides", nargs="*", help="config overrides passed to our fit")
    a = p.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        files = write_training_folder(texture_training_images(a.images), os.path.join(tmp, "train"))
        t_ours = ours(os.path.join(tmp, "train"), os.path.join(tmp, "model"), a.overrides)
        ref = original(files, a.original_coreset_steps)
    res = {"images": a.images, "ours_s": t_ours, "original": ref, "ratio": ref["total_s"] / t_ours}
    note = (f" (coreset extrapolated from {ref['coreset_extrapolated_from_steps']} steps)"
            if ref["coreset_extrapolated_from_steps"] else "")
    print(BASELINE_NOTE)
    print(f"fit of {a.images} images ({ref['patches']} patches, k={ref['k']}): ours (whole job, a process) "
          f"{t_ours:.1f} s; original in process {ref['total_s']:.1f} s (features {ref['features_s']:.1f}, coreset "
          f"{ref['coreset_s']:.1f}{note}, index {ref['index_s']:.2f}); original / ours x{res['ratio']:.2f}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
