"""`make demo` (``patchcore demo``): build a small benchmark from real photographs (scikit-image) with
injected defects, then fit, score and evaluate each category with the offline default config on a
local Ray instance; print the metrics and where the results are."""
from __future__ import annotations

import logging
import os

log = logging.getLogger("patchcore_dist.demo")


def run_demo(output: str, categories: list[str], n_images: int = 24, overrides: list[str] | None = None,
             config_file: str | None = None) -> list:
    """Fit (once) and evaluate every category under ``output``; returns (category, metrics, result URI)."""
    from ..config import load_config
    from ..pipeline.evaluate import run_evaluate
    from ..pipeline.fit import run_fit
    from ..synthetic.categories import make_demo_benchmark
    out = os.path.abspath(output)
    data = os.path.join(out, "data")
    if not all(os.path.isdir(os.path.join(data, c)) for c in categories):
        log.info("building the demo benchmark under %s from scikit-image photographs: %s", data, ", ".join(categories))
        make_demo_benchmark(data, categories, n_images=n_images, size=256)
    config = load_config(config_file, overrides)
    results = []
    for cat in categories:
        model = os.path.join(out, "models", cat)
        if not os.path.exists(os.path.join(model, "manifest.json")):
            run_fit(os.path.join(data, cat), model, config)
        result = os.path.join(out, "results", cat)
        metrics = run_evaluate(model, os.path.join(data, cat), result, config_file, overrides)
        results.append((cat, metrics, result))
    _print_summary(results, out)
    return results


def _print_summary(results: list, out: str) -> None:
    print("\n=== patchcore-dist demo ===")
    for cat, m, result in results:
        print(f"{cat:8s} image AUROC {m['image_auroc']:.3f}  pixel AUROC {m['pixel_auroc']:.3f}  "
              f"PRO {m['pro']:.3f}   report: {os.path.join(result, 'report.html')}")
        print("  top-scored images:")
        for row in m["top"][:5]:
            print(f"    {row['score']:9.3f}  {row['image']}")
    print(f"\nmodels in {os.path.join(out, 'models')}, score tables and heatmaps in {os.path.join(out, 'results')}")
