"""Detection quality: fit + evaluate (the Ray jobs) on real scikit-image photographs with injected defects."""
import json
import os

import numpy as np
import pytest

from patchcore_dist.config import load_config
from patchcore_dist.pipeline.evaluate import run_evaluate
from patchcore_dist.pipeline.fit import run_fit
from patchcore_dist.synthetic.categories import make_demo_benchmark

from helpers import SMALL


def test_quality_on_textures_and_objects(ray_local, tmp_path):
    cats = ("brick", "gravel", "coffee")  # two textures, one object
    make_demo_benchmark(str(tmp_path / "data"), cats, n_images=20, size=160, seed=0)
    results = {}
    for cat in cats:
        model = str(tmp_path / "models" / cat)
        run_fit(str(tmp_path / "data" / cat), model, load_config(None, SMALL))
        out = str(tmp_path / "eval" / cat)
        results[cat] = run_evaluate(model, str(tmp_path / "data" / cat), out, overrides=SMALL)
        saved = json.load(open(os.path.join(out, "metrics.json")))
        assert saved["image_auroc"] == pytest.approx(results[cat]["image_auroc"])
        assert set(saved["per_defect"]) == {"scratch", "stain", "foreign", "hole", "deformation"}
        html = open(os.path.join(out, "report.html")).read()
        assert html.count("data:image/png;base64") >= 10 and "Worst-missed" in html
    image = np.mean([r["image_auroc"] for r in results.values()])
    pixel = np.mean([r["pixel_auroc"] for r in results.values()])
    pro = np.mean([r["pro"] for r in results.values()])
    print({c: (round(r["image_auroc"], 3), round(r["pixel_auroc"], 3), round(r["pro"], 3)) for c, r in results.items()})
    # Measured here at this size (128 px, 14 training images per category), image / pixel AUROC / PRO:
    # brick 1.000 / 0.993 / 0.971, gravel 0.833 / 0.935 / 0.809, coffee 0.917 / 0.964 / 0.868; means
    # 0.917 / 0.964 / 0.883. Floors a few points below leave room for numerics across platforms; a
    # scorer that ignores the defects sits near 0.5.
    assert image >= 0.85, results
    assert pixel >= 0.93, results
    assert pro >= 0.8, results
