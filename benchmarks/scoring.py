"""CPU scoring throughput: ours vs the literal original formulation, side by side, same inputs.

    python benchmarks/scoring.py [--banks 3000,16000,160000] [--images 16] [--repeat 5] [--exact-search brute]

Ours: the backbone with batch norms folded and copy-free same padding, fast patch features, exact search pruned by lower bounds
(``index.exact_search``; pass --exact-search brute for plain faiss flat L2). Baseline: the unmodified
backbone, the original unfold -> resample every patch component -> pool, and a float32 brute-force
search with faiss IndexFlatL2 (what the official PatchCore code runs on the CPU).
Both from pre-decoded tensors and end to end from PNG files (decode + resize + crop included), and
once more from tensors with anomaly maps, which the official code always computes (bilinear upsampling
of the patch scores, then scipy's gaussian_filter per image; ours: the same in torch).
Each configuration runs alternately with the baseline (--repeat times; images/s are medians, ratios the
median of the per-round ratios) so that machine noise and drift hit both alike. Prints images/s, the
ratio, the rank correlation of the image scores, and the process's peak RSS before, after one pass of
ours and after one pass of the original (high-water marks, ours first, so a higher figure after the
original is the original's extra memory).
"""
import argparse
import json

import faiss
import numpy as np
import torch
from scipy import ndimage
from scipy.stats import spearmanr

from common import crops, image_files, peak_rss_mb, side_by_side

from patchcore_dist.core.backbones import build_backbone
from patchcore_dist.core.inference import optimize_for_inference
from patchcore_dist.config import load_config
from patchcore_dist.core.reference import patch_features_reference
from patchcore_dist.core.patchcore import PatchCore
from patchcore_dist.core.preprocessing import normalize


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--banks", default="3000,16000,160000")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--exact-search", default="auto", choices=["auto", "brute", "pruned"])
    p.add_argument("--repeat", type=int, default=5)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    cfg = load_config(overrides=[f"index.exact_search={a.exact_search}"])
    plain = build_backbone(cfg.backbone.name, cfg.backbone.layers, cfg.backbone.weights)
    files = image_files("brick/test/*/*.png")[: a.images]
    x = crops(files)
    pc = PatchCore(cfg)
    pc.embedder.backbone = optimize_for_inference(plain)  # the very same weights as the baseline's
    train = crops(image_files("brick/train/good/*.png"))
    feats, grid = pc.embed(train)
    rng = np.random.default_rng(0)
    results = {}
    for m in [int(b) for b in a.banks.split(",")]:
        idx = rng.choice(len(feats), size=min(m, len(feats)), replace=False)
        bank = feats[idx].numpy()
        if m > len(feats):  # bigger banks: real features plus small perturbations
            extra = feats[rng.integers(0, len(feats), m - len(feats))].numpy()
            bank = np.concatenate([bank, extra + rng.normal(0, 0.05, extra.shape).astype(np.float32)])
        ours = PatchCore(cfg, bank, embedder=pc.embedder)
        flat = faiss.IndexFlatL2(bank.shape[1])
        flat.add(bank)

        def run_ours(imgs=x, ours=ours):
            return ours.predict(imgs, maps=False).image_scores

        def base_patch_scores(imgs, flat=flat):
            """The original: unmodified backbone, literal patch features, faiss flat: [B, h, w]."""
            with torch.inference_mode():
                levels = plain(normalize(torch.as_tensor(imgs)))
                f, grid = patch_features_reference(levels, 3, 1024, 1024)
            d2, _ = flat.search(f.numpy(), 1)
            return np.sqrt(d2[:, 0]).reshape(len(imgs), *grid)

        def run_base(imgs=x):
            return base_patch_scores(imgs).reshape(len(imgs), -1).max(1)

        def from_files(fn):
            return lambda: fn(crops(files))

        def maps_ours(imgs=x, ours=ours):
            return ours.predict(imgs, maps=True).anomaly_maps

        def maps_base(imgs=x):
            s = torch.from_numpy(base_patch_scores(imgs))[:, None]
            up = torch.nn.functional.interpolate(s, size=imgs.shape[1:3], mode="bilinear", align_corners=False)
            return np.stack([ndimage.gaussian_filter(m, sigma=4) for m in up[:, 0].numpy()])

        mem_start = peak_rss_mb()
        run_ours()
        mem_ours = peak_rss_mb()
        run_base()
        mem_base = peak_rss_mb()
        t = side_by_side({"ours": run_ours, "base": run_base, "f_ours": from_files(run_ours),
                          "f_base": from_files(run_base), "m_ours": maps_ours, "m_base": maps_base}, a.repeat)
        t_ours, t_base, f_ours, f_base = t["ours"], t["base"], t["f_ours"], t["f_base"]
        map_diff = float(np.abs(maps_ours() - maps_base()).max())
        ours.bank.unproven = 0
        run_ours()
        unproven = ours.bank.unproven / (len(x) * 784)
        rho = spearmanr(run_ours(), run_base())[0]
        n = len(x)
        r, f_r, m_r = t.ratio("base", "ours"), t.ratio("f_base", "f_ours"), t.ratio("m_base", "m_ours")
        results[m] = {"tensors_ours": n / t_ours, "tensors_base": n / t_base, "ratio": r,
                      "files_ours": n / f_ours, "files_base": n / f_base, "files_ratio": f_r,
                      "maps_ours": n / t["m_ours"], "maps_base": n / t["m_base"], "maps_ratio": m_r,
                      "maps_max_abs_diff": map_diff, "spearman": rho, "search": ours.bank.backend, "unproven": unproven,
                      "peak_rss_mb": {"before": mem_start, "after_ours": mem_ours, "after_original": mem_base}}
        print(f"bank {m:>7}: from tensors ours {n / t_ours:6.2f} img/s, original {n / t_base:6.2f} img/s, "
              f"x{r:.2f} | from files ours {n / f_ours:6.2f}, original {n / f_base:6.2f}, "
              f"x{f_r:.2f} | with maps ours {n / t['m_ours']:6.2f}, original {n / t['m_base']:6.2f}, "
              f"x{m_r:.2f} (max diff {map_diff:.1e}) | rank corr {rho:.4f} | {ours.bank.backend}, "
              f"searched in full {unproven:.1%} | "
              f"peak RSS {mem_start:.0f} MB -> {mem_ours:.0f} after ours -> {mem_base:.0f} after original", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
