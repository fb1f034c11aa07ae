"""The notebook API scores an image as the score job does: the same score, decision and normalized
score as the image's row in the score table, and an anomaly map at the image's own size that is hot
where the injected defect is."""
from __future__ import annotations

import glob
import os

import numpy as np
import pytest
from PIL import Image

from helpers import SMALL
from patchcore_dist.api import Model
from patchcore_dist.artifacts.scores import read_scores
from patchcore_dist.errors import ImageError
from patchcore_dist.pipeline.score import run_score


def test_predict_equals_the_score_table(small_model, category, tmp_path):
    out = str(tmp_path / "out")
    run_score(small_model, f"{category}/test", out, None, SMALL + ["runtime.executor=local", "output.heatmaps=false"])
    rows = {r["image"]: r for r in read_scores(out).to_pylist()}
    model = Model.load(small_model, overrides=["runtime.executor=local"])
    assert model.threshold is not None
    paths = sorted(glob.glob(f"{category}/test/*/*.png"))[:6] + sorted(glob.glob(f"{category}/test/good/*.png"))[:2]
    for path, p in zip(paths, model.predict_many(paths)):
        row = rows[path]
        assert p.score == pytest.approx(row["score"], rel=1e-5), path
        assert p.is_anomaly == row["is_anomaly"] and p.normalized_score == pytest.approx(row["normalized_score"],
                                                                                         rel=1e-5)
        h, w = np.asarray(Image.open(path)).shape[:2]
        assert p.anomaly_map.shape == (h, w) and p.anomaly_map.max() == pytest.approx(p.score, rel=1e-4)


def test_the_map_is_hot_on_the_defect(small_model, category):
    model = Model.load(small_model)
    defect = sorted(glob.glob(f"{category}/test/hole/*.png"))[0]
    mask = np.asarray(Image.open(defect.replace("/test/", "/ground_truth/").replace(".png", "_mask.png"))) > 0
    rgb = np.asarray(Image.open(defect).convert("RGB"))
    from_array, from_file = model.predict(rgb), model.predict(__import__("pathlib").Path(defect))
    assert from_array.score == pytest.approx(from_file.score, rel=1e-5)  # a PNG decodes to the same pixels
    amap = from_file.anomaly_map
    assert amap[mask].mean() > 1.5 * amap[~mask].mean()


def test_bad_inputs_are_clear_errors(small_model, tmp_path):
    model = Model.load(small_model)
    with pytest.raises(ImageError, match="uint8"):
        model.predict(np.zeros((64, 64, 3), np.float32))
    with pytest.raises(ImageError, match="min_side"):
        model.predict(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(FileNotFoundError):
        model.predict(os.path.join(tmp_path, "missing.png"))


def test_a_file_over_the_byte_limit_is_refused_unread(small_model, category):
    model = Model.load(small_model, overrides=["image.max_bytes=1000"])
    with pytest.raises(ImageError, match="max_bytes=1000"):
        model.predict(sorted(glob.glob(f"{category}/test/good/*.png"))[0])
