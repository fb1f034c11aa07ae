"""`make demo` (``patchcore demo``): build a small benchmark from real photographs (scikit-image) with
injected defects, then fit, score and evaluate each category with the offline default config on a
local Ray instance; print what it ran, the metrics and where the results are.

A later run reuses what an earlier one made under the same output, and says so: a category's data
when it was built with the same ``--images`` (recorded in ``data/demo.json``), its model when it was
fitted with the same config (the manifest's config digest); anything else is made again."""
from __future__ import annotations

import json
import logging
import math
import os
import shutil

from .printing import g4, table

log = logging.getLogger("patchcore_dist.demo")

DATA_RECORD = "demo.json"  # under <output>/data: how each category's data was built
IMAGE_SIZE = 256


def run_demo(output: str, categories: list[str], n_images: int = 24, overrides: list[str] | None = None,
             config_file: str | None = None) -> list:
    """Fit (once per config) and evaluate every category under ``output``; returns (category, metrics,
    result URI, image counts)."""
    from ..config import load_config
    from ..pipeline.evaluate import run_evaluate
    out = os.path.abspath(output)
    data = os.path.join(out, "data")
    config = load_config(config_file, overrides)
    demo_data(out, categories, n_images)
    results = []
    for cat in categories:
        model = demo_model(out, cat, config)
        result = os.path.join(out, "results", cat)
        metrics = run_evaluate(model, os.path.join(data, cat), result, config_file, overrides)
        results.append((cat, metrics, result, split_counts(os.path.join(data, cat))))
    _print_summary(results, out)
    return results


def _read_record(data: str) -> dict:
    try:
        with open(os.path.join(data, DATA_RECORD)) as f:
            return json.load(f).get("categories", {})
    except (OSError, ValueError, AttributeError):
        return {}


def demo_data(out: str, categories: list[str], n_images: int) -> None:
    """Each category's data under ``<out>/data``: reused when ``demo.json`` says it was built with these
    parameters, else (with its model, fitted on the old data) removed and built again."""
    from ..synthetic.categories import make_demo_benchmark
    data = os.path.join(out, "data")
    record = _read_record(data)
    params = {"images": n_images, "size": IMAGE_SIZE}
    stale = [c for c in categories if {k: record.get(c, {}).get(k) for k in params} != params
             or not os.path.isdir(os.path.join(data, c))]
    for cat in categories:
        if cat not in stale:
            log.info("reusing the demo data of %s under %s (built with --images %d)", cat, data, n_images)
            continue
        was = record.get(cat, {}).get("images")
        why = f"built with --images {was}, now {n_images}" if was is not None else "not built yet"
        log.info("building the demo data of %s under %s from scikit-image photographs (%s)", cat, data, why)
        model = os.path.join(out, "models", cat)
        if os.path.isdir(model):
            log.info("removing the demo model %s: it was fitted on the old data", model)
        for folder in (os.path.join(data, cat), model):
            shutil.rmtree(folder, ignore_errors=True)  # the demo's own: older data, a model fitted on it
    if stale:
        made = make_demo_benchmark(data, stale, n_images=n_images, size=IMAGE_SIZE)
        record.update({c: {**params, "counts": made[c]} for c in stale})
        with open(os.path.join(data, DATA_RECORD), "w") as f:
            json.dump({"categories": record}, f, indent=1, sort_keys=True)


def demo_model(out: str, cat: str, config) -> str:
    """The category's model under ``<out>/models``: reused when fitted with ``config`` (the same config
    digest), else fitted (again, after removing the demo's old model)."""
    from ..artifacts.model import MANIFEST, config_digest
    from ..pipeline.fit import run_fit
    model = os.path.join(out, "models", cat)
    manifest = os.path.join(model, MANIFEST)
    if os.path.exists(manifest):
        with open(manifest) as f:
            fitted = json.load(f).get("config_digest")
        now = config_digest(config)
        if fitted == now:
            log.info("reusing the demo model %s (fitted with this config: config digest %s)", model, now)
            return model
        log.info("the demo model %s was fitted with another config (config digest %s, now %s): fitting it again",
                 model, fitted, now)
        shutil.rmtree(model)
    run_fit(os.path.join(out, "data", cat), model, config)
    return model


def split_counts(root: str) -> dict:
    """Images of a category on disk: train/good, test/good, the defective test images."""
    def pngs(folder):
        return len([f for f in os.listdir(folder) if f.endswith(".png")]) if os.path.isdir(folder) else 0
    test = os.path.join(root, "test")
    kinds = [k for k in os.listdir(test) if k != "good"] if os.path.isdir(test) else []
    return {"train": pngs(os.path.join(root, "train", "good")), "test_good": pngs(os.path.join(test, "good")),
            "test_defective": sum(pngs(os.path.join(test, k)) for k in kinds)}


def _mean(values) -> float:
    ok = [v for v in values if v is not None and not math.isnan(v)]
    return sum(ok) / len(ok) if ok else float("nan")


def _f3(x) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.3f}"


def _print_summary(results: list, out: str) -> None:
    keys = ("image_auroc", "pixel_auroc", "pro")
    rows = [[cat, n["train"], n["test_good"], n["test_defective"], *(_f3(m[k]) for k in keys)]
            for cat, m, _, n in results]
    rows.append(["mean", "", "", "", *(_f3(_mean(m[k] for _, m, _, _ in results)) for k in keys)])
    print("\n=== patchcore-dist demo ===")
    print(table(["category", "train", "test good", "test defective", "image AUROC", "pixel AUROC", "PRO"], rows,
                [False, True, True, True, True, True, True]))
    for cat, m, result, _ in results:
        print(f"\n{cat}: report {os.path.join(result, 'report.html')}; top-scored images:")
        for row in m["top"][:5]:
            print(f"    {g4(row['score']):>9}  {row['image']}")
    print(f"\nmodels in {os.path.join(out, 'models')}, score tables and heatmaps in {os.path.join(out, 'results')}")
