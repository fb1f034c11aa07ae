"""Many products: fit and score P products in one job (`fit --products`, `score --models`) against P
separate `patchcore fit` / `score` processes, and the catalogue's cost at many products.

    python benchmarks/catalogue.py [--products 8] [--images 40] [--catalogue 1000]

Whole processes on both sides (start-up, imports and Ray included: that is what one job saves), the
same images and the default config and executor. The catalogue part times read-modify-write updates
(compare-and-swap) of a local catalogue holding --catalogue entries, and its size.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from PIL import Image

from patchcore_dist.artifacts import catalog
from patchcore_dist.synthetic.photos import photo_variants

BIN = os.path.dirname(sys.executable)
PHOTOS = ("brick", "gravel", "grass", "coffee")


def make_products(root: str, products: int, images: int, size: int = 256) -> list[str]:
    names = []
    for k in range(products):
        name = f"p{k}-{PHOTOS[k % len(PHOTOS)]}"
        os.makedirs(os.path.join(root, name))
        for i, img in enumerate(photo_variants(PHOTOS[k % len(PHOTOS)], images, size, seed=k)):
            Image.fromarray(img).save(os.path.join(root, name, f"{i:04d}.png"))
        names.append(name)
    return names


def timed(args: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run([os.path.join(BIN, "patchcore"), *args], check=True, capture_output=True)
    return time.perf_counter() - t


def jobs(tmp: str, names: list[str]) -> dict:
    root = os.path.join(tmp, "products")
    one_fit = timed(["fit", "--products", root, "--models", os.path.join(tmp, "models")])
    sep_fit = sum(timed(["fit", "--train", os.path.join(root, n), "--model", os.path.join(tmp, "sep", n)])
                  for n in names)
    one_score = timed(["score", "--models", os.path.join(tmp, "models"), "--images", root, "--output",
                       os.path.join(tmp, "out1"), "output.heatmaps=false"])
    sep_score = sum(timed(["score", "--model", os.path.join(tmp, "sep", n), "--images", os.path.join(root, n),
                           "--output", os.path.join(tmp, "out2", n), "output.heatmaps=false"]) for n in names)
    return {"fit_one_job_s": round(one_fit, 1), "fit_separate_s": round(sep_fit, 1),
            "fit_ratio": round(sep_fit / one_fit, 2), "score_one_job_s": round(one_score, 1),
            "score_separate_s": round(sep_score, 1), "score_ratio": round(sep_score / one_score, 2)}


def catalogue_cost(tmp: str, n: int, updates: int = 50) -> dict:
    models = os.path.join(tmp, "big")
    entry = {"model": "/m/x/v", "digest": "0" * 64, "version": "v20261208T000000Z-000000", "fitted": "t",
             "images": 40, "threshold": 1.0}
    big = catalog.empty()
    for k in range(n):
        big["products"][f"product-{k:05d}"] = {**entry, "previous": [entry]}
    catalog.update_catalog(models, lambda c: big, {})
    t = time.perf_counter()
    for k in range(updates):
        catalog.update_catalog(models, catalog.promote(f"product-{k:05d}", entry), {})
    per_update = (time.perf_counter() - t) / updates
    t = time.perf_counter()
    catalog.read_catalog(models, {})
    return {"catalogue_products": n, "catalogue_bytes": os.path.getsize(os.path.join(models, catalog.CATALOG)),
            "update_ms": round(1000 * per_update, 2), "read_ms": round(1000 * (time.perf_counter() - t), 2)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--products", type=int, default=8)
    p.add_argument("--images", type=int, default=40)
    p.add_argument("--catalogue", type=int, default=1000)
    p.add_argument("--skip-jobs", action="store_true", help="only the catalogue's cost")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        res = {"products": a.products, "images": a.images}
        if not a.skip_jobs:
            res.update(jobs(tmp, make_products(os.path.join(tmp, "products"), a.products, a.images)))
        res.update(catalogue_cost(tmp, a.catalogue))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
