"""CPU extraction throughput: decode + backbone + locally aware patch features, ours vs the original
formulation, side by side on the same PNG files.

    python benchmarks/extraction.py [--images 32] [--config configs/default.yaml]
"""
import argparse
import json

import numpy as np
import torch

from common import best_of, crops, image_files

from patchcore_dist.config import load_config
from patchcore_dist.embedding import patch_features, patch_features_reference
from patchcore_dist.patchcore import Embedder
from patchcore_dist.preprocessing import normalize


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--config", default=None)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    torch.set_num_threads(2)
    cfg = load_config(a.config, a.overrides)
    files = image_files("*/train/good/*.png")[: a.images]
    emb = Embedder(cfg, "cpu")
    e = cfg.embedding

    def run(fn):
        def go():
            x = normalize(torch.from_numpy(crops(files)))
            with torch.inference_mode():
                out = [fn(emb.backbone(x[s:s + 8]), e.patch_size, e.pretrain_dim, e.target_dim)[0]
                       for s in range(0, len(x), 8)]
            return torch.cat(out)
        return go

    t_ours, t_ref = best_of(run(patch_features), 1), best_of(run(patch_features_reference), 1)
    diff = float((run(patch_features)() - run(patch_features_reference)()).abs().max())
    t_decode = best_of(lambda: crops(files), 1)
    n = len(files)
    res = {"ours_images_per_s": n / t_ours, "original_images_per_s": n / t_ref, "ratio": t_ref / t_ours,
           "decode_images_per_s": n / t_decode, "max_abs_diff": diff, "backbone": cfg.backbone.name}
    print(f"{cfg.backbone.name}: ours {n / t_ours:.1f} images/s, original {n / t_ref:.1f} images/s, x{t_ref / t_ours:.2f} "
          f"(decode alone {n / t_decode:.0f} images/s; max |difference| {diff:.1e})")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
