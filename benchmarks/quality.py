"""Detection quality per category: fit + evaluate (the Ray jobs) on the demo benchmark.

    python benchmarks/quality.py                                  # offline EfficientNet-Lite0 (default config)
    python benchmarks/quality.py --wrn50-weights /models/wide_resnet50_2-95faca4d.pth   # plus the WRN50 config
    python benchmarks/quality.py --data /datasets/mvtec            # any folder of MVTec-layout categories
    python benchmarks/quality.py coreset.method=two_round coreset.parts=4   # any config overrides

Prints image AUROC, pixel AUROC and PRO per category and their means.
"""
import argparse
import json
import os
import tempfile

from common import demo_data

from patchcore_dist.cli.common import setup_logging
from patchcore_dist.config import load_config
from patchcore_dist.pipeline.evaluate import run_evaluate
from patchcore_dist.pipeline.fit import run_fit


def evaluate_all(data: str, config_file, overrides, work: str) -> dict:
    out = {}
    for cat in sorted(os.listdir(data)):
        if not os.path.isdir(os.path.join(data, cat, "test")):
            continue
        model = os.path.join(work, "models", cat)
        run_fit(os.path.join(data, cat), model, load_config(config_file, overrides))
        m = run_evaluate(model, os.path.join(data, cat), os.path.join(work, "eval", cat), config_file, overrides)
        out[cat] = {k: m[k] for k in ("image_auroc", "pixel_auroc", "pro")}
    return out


def table(name: str, res: dict) -> str:
    lines = [f"| {name} | image AUROC | pixel AUROC | PRO |", "|---|---|---|---|"]
    for cat, m in res.items():
        lines.append(f"| {cat} | {m['image_auroc']:.3f} | {m['pixel_auroc']:.3f} | {m['pro']:.3f} |")
    mean = {k: sum(m[k] for m in res.values()) / len(res) for k in ("image_auroc", "pixel_auroc", "pro")}
    lines.append(f"| **mean** | **{mean['image_auroc']:.3f}** | **{mean['pixel_auroc']:.3f}** | **{mean['pro']:.3f}** |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", default=None, help="folder of MVTec-layout categories (default: the demo benchmark)")
    p.add_argument("--wrn50-weights", default=None)
    p.add_argument("overrides", nargs="*", help="config overrides for every run, e.g. coreset.method=two_round")
    a = p.parse_args()
    setup_logging()
    data = a.data or demo_data()
    results = {}
    with tempfile.TemporaryDirectory() as work:
        name = "default (EfficientNet-Lite0)" + (" " + " ".join(a.overrides) if a.overrides else "")
        results[name] = evaluate_all(data, None, a.overrides, os.path.join(work, "lite0"))
        if a.wrn50_weights:
            results["wrn50"] = evaluate_all(data, "configs/wrn50.yaml",
                                            [f"backbone.weights={a.wrn50_weights}"] + a.overrides,
                                            os.path.join(work, "wrn50"))
    for name, res in results.items():
        print("\n" + table(name, res))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
