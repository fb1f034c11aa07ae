"""Contaminated training data: detection quality with denoising off and on (docs/quality.md#contaminated-training-data).

    python benchmarks/contamination.py                                        # 0 / 5 / 10 / 20 %, 3 seeds
    python benchmarks/contamination.py --fractions 0 0.1 --seeds 0 1 2 --crop 128   # the reduced run

Per category and seed: the demo category (scikit-image photographs, defects injected into the test
split); then a fraction of its training images replaced by defective versions of themselves (the
test set's kinds, new instances: their own random draws). Each (fraction, denoise off / on) is fitted
and evaluated; printed: image AUROC, pixel AUROC, PRO (means over categories and seeds), the recall of
the injected images among the top-k rows of train_outliers.parquet (k = the number injected) and the
fit time. Extra variants: ``--variant name=override,override``.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402,F401  (puts the checkout on the path)

from patchcore_dist.cli.common import setup_logging  # noqa: E402
from patchcore_dist.config import load_config  # noqa: E402
from patchcore_dist.pipeline.evaluate import run_evaluate  # noqa: E402
from patchcore_dist.pipeline.fit import run_fit  # noqa: E402

METRICS = ("image_auroc", "pixel_auroc", "pro")


def contaminate(category: str, out: str, fraction: float, seed: int) -> list[str]:
    """A copy of ``category`` (test/ and ground_truth/ linked) whose train/good has round(fraction x n)
    images replaced by defective versions; returns the injected file names."""
    from PIL import Image

    from patchcore_dist.render.heatmap import encode
    from patchcore_dist.synthetic.defects import DEFECT_KINDS, inject
    from patchcore_dist.synthetic.photos import photo_variants
    os.makedirs(out, exist_ok=True)
    for part in ("test", "ground_truth"):
        os.symlink(os.path.join(category, part), os.path.join(out, part))
    shutil.copytree(os.path.join(category, "train"), os.path.join(out, "train"))
    good = os.path.join(out, "train", "good")
    names = sorted(os.listdir(good))
    rng = np.random.default_rng(10_000 + seed)  # other draws than the test set's defects
    chosen = sorted(rng.choice(len(names), size=int(round(fraction * len(names))), replace=False).tolist())
    sources = photo_variants("rocket", 2, 128, seed + 7) + photo_variants("astronaut", 2, 128, seed + 7)
    injected = []
    for j, i in enumerate(chosen):
        path = os.path.join(good, names[i])
        image = np.asarray(Image.open(path).convert("RGB"))
        mask = np.zeros(1, bool)
        while not mask.any():
            defective, mask = inject(image, DEFECT_KINDS[j % len(DEFECT_KINDS)], rng,
                                     source=sources[rng.integers(len(sources))])
        with open(path, "wb") as f:
            f.write(encode(defective))
        injected.append(names[i])
    return injected


def one_run(category: str, work: str, fraction: float, seed: int, variants: dict, base: list[str]) -> dict:
    """Fit + evaluate every variant on one contaminated copy of ``category``."""
    data = os.path.join(work, f"data-{fraction}")
    injected = contaminate(category, data, fraction, seed)
    out = {}
    for name, overrides in variants.items():
        over = base + [f"seed={seed}"] + overrides
        model = os.path.join(work, f"model-{fraction}-{name}")
        t = time.time()
        manifest = run_fit(os.path.join(data, "train", "good"), model, load_config(None, over))
        fit_s = time.time() - t
        m = run_evaluate(model, data, os.path.join(work, f"eval-{fraction}-{name}"), None, over)
        ranked = pq.read_table(os.path.join(model, "train_outliers.parquet"))["image"].to_pylist()
        top = {u.rsplit("/", 1)[-1] for u in ranked[:len(injected)]}
        out[name] = {**{k: m[k] for k in METRICS}, "fit_s": round(fit_s, 2),
                     "denoise_s": manifest["stats"]["coreset"].get("denoise_seconds"),
                     "recall": len(top & set(injected)) / len(injected) if injected else None,
                     "injected": len(injected), "train": len(ranked)}
    return out


def summarise(results: list[dict]) -> str:
    """Markdown: one row per (fraction, variant), means over categories and seeds (and min-max of PRO)."""
    lines = ["| defective train images | denoise | image AUROC | pixel AUROC | PRO (min-max) | recall@k | fit s |",
             "|---|---|---|---|---|---|---|"]
    for f in sorted({r["fraction"] for r in results}):
        for name in results[0]["variants"]:
            rs = [r["variants"][name] for r in results if r["fraction"] == f]
            mean = {k: np.mean([r[k] for r in rs]) for k in METRICS + ("fit_s",)}
            rec = [r["recall"] for r in rs if r["recall"] is not None]
            pro = [r["pro"] for r in rs]
            recall = f"{np.mean(rec):.2f}" if rec else "-"
            lines.append(f"| {100 * f:.0f} % | {name} | {mean['image_auroc']:.3f} | {mean['pixel_auroc']:.3f} | "
                         f"{mean['pro']:.3f} ({min(pro):.3f}-{max(pro):.3f}) | {recall} | {mean['fit_s']:.1f} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--categories", nargs="+", default=["brick", "coffee", "gravel"])
    p.add_argument("--fractions", nargs="+", type=float, default=[0.0, 0.05, 0.1, 0.2])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--images", type=int, default=40, help="normal images per category (70 %% train)")
    p.add_argument("--size", type=int, default=160, help="demo image side, pixels")
    p.add_argument("--crop", type=int, default=128, help="model input (image.resize = image.crop)")
    p.add_argument("--variant", action="append", default=[], help="name=override,override (besides off / on)")
    p.add_argument("--json", default=None, help="also write every run's numbers here")
    a = p.parse_args()
    setup_logging()
    variants = {"off": [], "on": ["denoise.enabled=true"]}
    variants.update({v.split("=", 1)[0]: v.split("=", 1)[1].split(",") for v in a.variant})
    base = [f"image.resize={a.crop}", f"image.crop={a.crop}", "runtime.executor=local"]
    from patchcore_dist.synthetic.categories import make_demo_benchmark
    results = []
    for seed in a.seeds:
        with tempfile.TemporaryDirectory() as work:
            make_demo_benchmark(os.path.join(work, "demo"), a.categories, a.images, a.size, seed=seed)
            for cat in a.categories:
                for f in a.fractions:
                    run_work = os.path.join(work, f"{cat}-{f}")
                    r = one_run(os.path.join(work, "demo", cat), run_work, f, seed, variants, base)
                    results.append({"category": cat, "seed": seed, "fraction": f, "variants": r})
                    print(json.dumps(results[-1]), flush=True)
    print("\n" + summarise(results))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
