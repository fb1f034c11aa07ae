"""High-resolution inspection end to end: a tiled fit, score and evaluate on real texture mosaics with
small defects, heatmaps at the originals' size, and one row per image when a tile's scoring fails."""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from patchcore_dist.artifacts.scores import read_scores
from patchcore_dist.config import load_config
from patchcore_dist.core.tiling import tile_layout
from patchcore_dist.errors import JobError
from patchcore_dist.pipeline.evaluate import run_evaluate
from patchcore_dist.pipeline.faults import FAULT_ENV
from patchcore_dist.pipeline.fit import run_fit
from patchcore_dist.pipeline.score import run_score

# 64-pixel tiles over 320 x 320 mosaics: 7 x 7 tiles of 8 x 8 cells per image (origins 0, 48, ..., 240, 256)
TILES = 49
TILED = ["image.resize=64", "image.crop=64", "tiling.enabled=true", "runtime.batch_size=8", "runtime.num_actors=1",
         "coreset.ratio=0.05"]


@pytest.fixture(scope="module")
def highres(tmp_path_factory):
    from patchcore_dist.synthetic.categories import make_highres_category
    root = str(tmp_path_factory.mktemp("highres") / "brick")
    make_highres_category(root, "brick", n_images=12, size=320, defect_size=(14, 24), defects_per_kind=None)
    return root


@pytest.fixture(scope="module")
def tiled_model(ray_local, highres, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiled") / "model")
    manifest = run_fit(highres, path, load_config(None, TILED))
    return path, manifest


def test_tiled_fit_puts_every_tile_in_one_bank(tiled_model, highres):
    path, manifest = tiled_model
    n_train = len(os.listdir(f"{highres}/train/good"))
    assert manifest["training"]["used"] == n_train and manifest["training"]["errors"] == 0
    images = pq.read_table(f"{path}/images.parquet").to_pydict()
    assert len(tile_layout(320, 320, 64, 0.25)) == TILES
    assert len(images["uri"]) == n_train * TILES and set(images["tiles"]) == {TILES}  # one row per tile
    assert manifest["training"]["patches"] == n_train * TILES * 64
    assert manifest["feature_digest"] == load_config(None, TILED).feature_digest()


def test_tiled_evaluate_finds_small_defects_and_draws_full_size_maps(tiled_model, highres, tmp_path):
    path, _ = tiled_model
    out = str(tmp_path / "eval")
    metrics = run_evaluate(path, highres, out, overrides=TILED[-3:-1])
    assert metrics["pixel_auroc"] > 0.95 and metrics["image_auroc"] > 0.8, metrics
    rows = read_scores(out).to_pylist()
    n_test = sum(len(f) for _, _, f in os.walk(f"{highres}/test"))
    assert len(rows) == n_test == len({r["image"] for r in rows})
    for r in rows:
        assert r["error"] is None and (r["height"], r["width"]) == (320, 320)
        assert Image.open(r["heatmap"]).size == (320, 320)
        assert Image.open(r["heatmap"].removesuffix(".png") + "_overlay.jpg").size == (320, 320)
    assert json.load(open(f"{out}/metrics.json"))["images"] == n_test


def test_one_failed_tile_gives_its_image_an_error_row(tiled_model, highres, tmp_path, monkeypatch):
    path, _ = tiled_model
    images = f"{highres}/test/good"
    n = len(os.listdir(images))
    marker = tmp_path / "score.taken"
    monkeypatch.setenv(FAULT_ENV, f"score:2:{marker}:raise")  # the 2nd batch of 8 tiles fails in the scorer
    out = str(tmp_path / "out")
    summary = run_score(path, images, out, overrides=["output.heatmaps=false"])
    assert marker.exists()
    rows = read_scores(out).to_pylist()
    assert len(rows) == n == len({r["image"] for r in rows}) and summary["errors"] >= 1
    failed = [r for r in rows if r["error"]]
    assert 1 <= len(failed) <= 2  # 8 tiles of a 49-tile image, possibly across two images
    for r in failed:
        assert r["score"] is None and "tile" in r["error"] and "injected fault" in r["error"], r["error"]
    assert all(np.isfinite(r["score"]) for r in rows if not r["error"])
    monkeypatch.delenv(FAULT_ENV)
    again = run_score(path, images, out, overrides=["output.heatmaps=false"])  # the failed images are retried
    assert again["scored"] == len(failed) and all(r["error"] is None for r in read_scores(out).to_pylist())


def test_a_tiled_model_scores_with_tiles_only(tiled_model, highres, tmp_path):
    path, _ = tiled_model
    with pytest.raises(JobError, match="tiling"):
        run_score(path, f"{highres}/test/good", str(tmp_path / "o"), overrides=["tiling.enabled=false"])


def test_tiled_scoring_in_process_equals_ray(tiled_model, highres, tmp_path):
    path, _ = tiled_model
    images = f"{highres}/test/good"
    scores = {}
    for executor in ("ray", "local"):
        out = str(tmp_path / executor)
        run_score(path, images, out, overrides=[f"runtime.executor={executor}", "runtime.batch_size=8"])
        rows = read_scores(out).to_pylist()
        scores[executor] = {r["image"]: r["score"] for r in rows}
        assert all(Image.open(r["heatmap"]).size == (320, 320) for r in rows)
    # equal up to float rounding: Ray may group tiles of neighbouring images into other batches, and a
    # backbone's rounding depends on its batch
    assert scores["local"].keys() == scores["ray"].keys() and len(scores["ray"]) == len(os.listdir(images))
    assert all(scores["local"][k] == pytest.approx(v, rel=1e-5) for k, v in scores["ray"].items())
