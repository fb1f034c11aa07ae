"""High-resolution inspection: tiling at native resolution vs plain resize vs tiling at a working size,
on real texture mosaics with small defects (the Ray jobs: fit + evaluate), side by side in one run.

    python benchmarks/highres.py                       # brick, 1024 px, defects 10-40 px
    python benchmarks/highres.py --photos brick,gravel --size 1536 --images 24
    python benchmarks/highres.py --skip-demo           # without the 256 px demo check

Prints image AUROC, pixel AUROC and PRO per configuration, the fit and evaluate times, tiles/s and
images/s of the evaluate run (its scoring), and the differences tiling - resize. Then the same for
the 256 px demo category (tiling with working_size = the crop: one tile per image) against resize.
"""
import argparse
import json
import os
import tempfile
import time

from common import DATA, demo_data

from patchcore_dist.cli.common import setup_logging
from patchcore_dist.config import load_config
from patchcore_dist.core.tiling import tile_layout
from patchcore_dist.pipeline.evaluate import run_evaluate
from patchcore_dist.pipeline.fit import run_fit


def configs(tiled_ratio: float, working: int) -> dict:
    return {"resize": [],
            "tiled, native": ["tiling.enabled=true", f"coreset.ratio={tiled_ratio}"],
            f"tiled, working_size={working}": ["tiling.enabled=true", f"tiling.working_size={working}",
                                               f"coreset.ratio={tiled_ratio}"]}


def run(category: str, name: str, overrides: list[str], work: str, size: int) -> dict:
    model = os.path.join(work, name.replace(" ", "_").replace(",", ""), "model")
    t0 = time.time()
    run_fit(category, model, load_config(None, overrides))
    t1 = time.time()
    m = run_evaluate(model, category, os.path.join(os.path.dirname(model), "eval"), None, overrides)
    t2 = time.time()
    cfg = load_config(None, overrides)
    tiles = len(tile_layout(size, size, cfg.image.crop, cfg.tiling.overlap, cfg.tiling.working_size)) \
        if cfg.tiling.enabled else 1
    n = m["images"]
    return {"image_auroc": m["image_auroc"], "pixel_auroc": m["pixel_auroc"], "pro": m["pro"], "fit_s": t1 - t0,
            "evaluate_s": t2 - t1, "tiles_per_image": tiles, "images_per_s": n / (t2 - t1),
            "tiles_per_s": n * tiles / (t2 - t1)}


def table(title: str, res: dict) -> str:
    lines = [f"### {title}", "", "| configuration | image AUROC | pixel AUROC | PRO | tiles / image | fit s | evaluate s "
             "| tiles/s | images/s |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in res.items():
        lines.append(f"| {name} | {r['image_auroc']:.3f} | {r['pixel_auroc']:.3f} | {r['pro']:.3f} | "
                     f"{r['tiles_per_image']} | {r['fit_s']:.0f} | {r['evaluate_s']:.0f} | {r['tiles_per_s']:.1f} | "
                     f"{r['images_per_s']:.2f} |")
    base = res.get("resize")
    if base:
        for name, r in res.items():
            if name != "resize":
                lines.append(f"\n{name} - resize: image AUROC {r['image_auroc'] - base['image_auroc']:+.3f}, "
                             f"pixel AUROC {r['pixel_auroc'] - base['pixel_auroc']:+.3f}, PRO {r['pro'] - base['pro']:+.3f}")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--photos", default="brick")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--images", type=int, default=20, help="normal images per category (70 %% train)")
    p.add_argument("--defect-size", default="10-40")
    p.add_argument("--tiled-ratio", type=float, default=0.01, help="coreset ratio of the tiled fits (many patches)")
    p.add_argument("--working-size", type=int, default=512)
    p.add_argument("--skip-demo", action="store_true")
    a = p.parse_args()
    setup_logging()
    from patchcore_dist.synthetic.categories import make_highres_category
    lo, hi = (float(v) for v in a.defect_size.split("-"))
    work = tempfile.mkdtemp(prefix="highres-")
    results = {}
    for photo in a.photos.split(","):
        cat = os.path.join(DATA, f"highres-{a.size}-{a.defect_size}", photo)
        if not os.path.isdir(cat):
            make_highres_category(cat, photo, a.images, a.size, (lo, hi))
        res = {name: run(cat, name, over, os.path.join(work, photo), a.size)
               for name, over in configs(a.tiled_ratio, a.working_size).items()}
        results[photo] = res
        print(table(f"{photo}, {a.size} x {a.size} px, defects {a.defect_size} px", res), flush=True)
    if not a.skip_demo:
        cat = os.path.join(demo_data(), "brick")
        res = {"resize": run(cat, "resize", [], os.path.join(work, "demo"), 256),
               "tiled, working_size=224 (one tile)": run(cat, "tiled224", ["tiling.enabled=true",
                                                                            "tiling.working_size=224"],
                                                         os.path.join(work, "demo"), 256)}
        results["demo-brick-256"] = res
        print(table("demo brick, 256 x 256 px (today's benchmark)", res), flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
