"""CPU extraction throughput: decode + backbone + locally aware patch features, ours vs the original
formulation, side by side on the same PNG files. Ours: the backbone optimised for inference (batch
norms folded into its convolutions, copy-free same padding) and the fast patch features; original:
the unmodified backbone and the literal unfold -> resample -> pool. Also prints the process's peak
RSS after one pass of each (ours first).

    python benchmarks/extraction.py [--images 32] [--config configs/default.yaml]
"""
import argparse
import json

import torch

from common import best_of, crops, image_files, peak_rss_mb, side_by_side

from patchcore_dist.core.backbones import build_backbone
from patchcore_dist.core.inference import optimize_for_inference
from patchcore_dist.config import load_config
from patchcore_dist.core.embedding import patch_features
from patchcore_dist.core.reference import patch_features_reference
from patchcore_dist.core.preprocessing import normalize


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--config", default=None)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    torch.set_num_threads(2)
    cfg = load_config(a.config, a.overrides)
    files = image_files("*/train/good/*.png")[: a.images]
    plain = build_backbone(cfg.backbone.name, cfg.backbone.layers, cfg.backbone.weights)
    folded = optimize_for_inference(plain)  # the very same weights (random weights too)
    e = cfg.embedding

    def run(fn, backbone):
        def go():
            x = normalize(torch.from_numpy(crops(files)))
            with torch.inference_mode():
                out = [fn(backbone(x[s:s + 8]), e.patch_size, e.pretrain_dim, e.target_dim)[0]
                       for s in range(0, len(x), 8)]
            return torch.cat(out)
        return go

    ours, original = run(patch_features, folded), run(patch_features_reference, plain)
    mem = {"before": peak_rss_mb()}
    ours()
    mem["after_ours"] = peak_rss_mb()
    original()
    mem["after_original"] = peak_rss_mb()
    t = side_by_side({"ours": ours, "original": original}, a.repeat)
    t_ours, t_ref = t["ours"], t["original"]
    f_ours, f_ref = ours(), original()
    diff = float((f_ours - f_ref).abs().max() / f_ref.abs().max())
    t_decode = best_of(lambda: crops(files), 1)
    n = len(files)
    res = {"ours_images_per_s": n / t_ours, "original_images_per_s": n / t_ref, "ratio": t.ratio("original", "ours"),
           "decode_images_per_s": n / t_decode, "max_rel_diff": diff, "backbone": cfg.backbone.name,
           "peak_rss_mb": mem}
    print(f"{cfg.backbone.name}: ours {n / t_ours:.1f} images/s, original {n / t_ref:.1f} images/s, x{res['ratio']:.2f} "
          f"(decode alone {n / t_decode:.0f} images/s; max |difference| / max |feature| {diff:.1e}; peak RSS "
          f"{mem['before']:.0f} MB -> {mem['after_ours']:.0f} after ours -> {mem['after_original']:.0f} after original)")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
