"""Approximate nearest-neighbour indexes vs flat: recall@1, image / pixel AUROC change, images/s.

    python benchmarks/ann.py [--banks 3000,16000,160000]

Banks are real EfficientNet-Lite0 patch features of the demo's training images (coreset-selected),
grown with small perturbations to the larger sizes; queries are the demo's test images. The AUROCs
are measured on the demo's brick category with its true bank (no perturbation) for every index type.
"""
import argparse
import json
import time

import numpy as np
import torch
from PIL import Image

from common import crops, image_files

from patchcore_dist.config import load_config
from patchcore_dist.core.index import build_index
from patchcore_dist.core.memory_bank import MemoryBank
from patchcore_dist.core.metrics import image_auroc, pixel_auroc
from patchcore_dist.core.patchcore import PatchCore

TYPES = ("flat", "ivf_flat", "ivf_pq", "hnsw")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--banks", default="3000,16000,160000", help="empty: only the AUROC comparison")
    a = p.parse_args()
    torch.set_num_threads(2)
    cfg = load_config()
    pc = PatchCore(cfg)
    train, _ = pc.embed(crops(image_files("*/train/good/*.png")))
    tests = image_files("brick/test/*/*.png")
    q, grid = pc.embed(crops(tests))
    rng = np.random.default_rng(0)
    out = {"speed": {}, "quality": {}}
    for m in [int(b) for b in a.banks.split(",") if b]:
        base = train[rng.choice(len(train), size=min(m, len(train)), replace=False)].numpy()
        bank = base
        if m > len(base):
            extra = base[rng.integers(0, len(base), m - len(base))]
            bank = np.concatenate([base, extra + rng.normal(0, 0.05 * base.std(), extra.shape).astype(np.float32)])
        exact_d, exact_i = MemoryBank(bank).search(q, 1)
        for t in TYPES:
            c = load_config(None, [f"index.type={t}"]).index
            t0 = time.perf_counter()
            index = build_index(bank, c)
            build = time.perf_counter() - t0
            mb = MemoryBank(bank, index=index)
            t0 = time.perf_counter()
            d, i = mb.search(q, 1)
            dt = time.perf_counter() - t0
            recall = float((i[:, 0] == exact_i[:, 0]).float().mean())
            per_img = len(tests) / dt
            out["speed"][f"{m}/{t}"] = {"recall@1": recall, "search_images_per_s": per_img, "build_s": build}
            print(f"bank {m:>7} {t:9s}: recall@1 {recall:.3f}, search {per_img:7.1f} images/s, build {build:6.2f} s",
                  flush=True)
    # Quality on the brick category, its own coreset bank
    fitted = PatchCore(cfg, embedder=pc.embedder).fit(crops(image_files("brick/train/good/*.png")))
    labels = [0 if "/good/" in t else 1 for t in tests]
    masks = []
    for t in tests:
        if "/good/" in t:
            masks.append(np.zeros((224, 224), bool))
        else:
            mk = Image.open(t.replace("/test/", "/ground_truth/").replace(".png", "_mask.png")).resize((256, 256))
            masks.append(np.asarray(mk)[16:240, 16:240] > 127)
    x = crops(tests)
    for t in TYPES:
        c = load_config(None, [f"index.type={t}"])
        scorer = PatchCore(c, fitted.bank.bank, embedder=pc.embedder, index=build_index(fitted.bank.bank, c.index))
        pred = scorer.predict(x)
        out["quality"][t] = {"image_auroc": image_auroc(labels, pred.image_scores),
                             "pixel_auroc": pixel_auroc(masks, list(pred.anomaly_maps))}
        print(f"brick, bank {len(fitted.bank)} {t:9s}: image AUROC {out['quality'][t]['image_auroc']:.4f}, "
              f"pixel AUROC {out['quality'][t]['pixel_auroc']:.4f}", flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
