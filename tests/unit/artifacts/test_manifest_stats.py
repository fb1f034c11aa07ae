"""The manifest's statistics that a score run reads after its commit (the run record's drift, the review
page's threshold sentence, the heatmap centre) are checked when the model loads: a manifest without
them, or with a non-finite one, is refused before any work, never after the scores are written."""
from __future__ import annotations

import json
import math
import shutil

import pytest

from patchcore_dist.artifacts.model import ModelWriter, config_yaml, load_model, npy_bytes
from patchcore_dist.config import load_config
from patchcore_dist.core.index import build_index, serialize_index
from patchcore_dist.errors import JobError, ModelError

DIM = 64
CALIBRATED = {"heatmap_min": 0.5, "heatmap_max": 2.0, "threshold": 1.25, "threshold_source": "validation images",
              "threshold_images": 40, "target_fpr": 0.05, "calibration_fpr": 0.05, "fpr_resolution": 0.025,
              "heatmap_threshold": 1.25, "heatmap_threshold_source": "decision threshold (validation images)",
              "normal_image_score": {"cold": 0.5, "images": 40, "p50": 1.0, "p99": 1.2, "above_p99": 1, "max": 1.3}}


@pytest.fixture
def model(tmp_path):
    import numpy as np
    cfg = load_config(None, [f"embedding.target_dim={DIM}", f"embedding.pretrain_dim={DIM}", "index.pq_m=8"])
    bank = np.random.default_rng(0).standard_normal((200, DIM)).astype(np.float32)
    writer = ModelWriter(str(tmp_path / "m"))
    writer.put("memory_bank.npy", npy_bytes(bank))
    writer.put("index.faiss", serialize_index(build_index(bank, cfg.index, cfg.seed)))
    writer.put("config.yaml", config_yaml(cfg))
    writer.commit(cfg, bank.shape, {}, json.loads(json.dumps(CALIBRATED)))
    assert load_model(str(tmp_path / "m")).manifest["stats"] == CALIBRATED  # valid as written
    return tmp_path / "m"


def _edit_stats(model, edit) -> None:
    path = model / "manifest.json"
    m = json.loads(path.read_text())
    edit(m["stats"])
    path.write_text(json.dumps(m))


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("heatmap_threshold_source"), "'stats.heatmap_threshold' must be a finite number, with a"),
    (lambda s: s.update(heatmap_threshold=None), "'stats.heatmap_threshold' must be a finite number"),
    (lambda s: s.update(heatmap_threshold="1.2"), "'stats.heatmap_threshold' must be a finite number"),
    (lambda s: s.pop("target_fpr"), "'stats' needs all of target_fpr, calibration_fpr, fpr_resolution, threshold_images"),
    (lambda s: s.update(calibration_fpr=None), "'stats' needs all of target_fpr"),
    (lambda s: s.update(threshold_images=True), "'stats' needs all of target_fpr"),
    (lambda s: s["normal_image_score"].pop("images"), "'stats.normal_image_score' needs a finite p99 with counts"),
    (lambda s: s["normal_image_score"].update(p99="x"), "'stats.normal_image_score' needs a finite p99"),
    (lambda s: s["normal_image_score"].update(above_p99=-1), "'stats.normal_image_score' needs"),
    (lambda s: s.update(normal_image_score=[1]), "'stats.normal_image_score' needs"),
])
def test_bad_statistics_are_refused_at_load(model, edit, message):
    _edit_stats(model, edit)
    with pytest.raises(ModelError, match=f"manifest.json: {message}"):
        load_model(str(model))


def test_non_finite_statistics_are_refused(model):
    """NaN / Infinity (Python's json writes and reads them) in a statistic the scorer uses."""
    for key in ("heatmap_min", "heatmap_max", "threshold", "heatmap_threshold", "fpr_resolution"):
        for bad in (math.nan, math.inf):
            original = json.loads((model / "manifest.json").read_text())
            _edit_stats(model, lambda s, key=key, bad=bad: s.update({key: bad}))
            with pytest.raises(ModelError, match="manifest.json: 'stats"):
                load_model(str(model))
            (model / "manifest.json").write_text(json.dumps(original))


def test_optional_statistics_may_be_absent(model):
    """A model without calibration statistics, heatmap centre or normal reference (older fits) loads."""
    for keys in (("heatmap_threshold", "heatmap_threshold_source"),
                 ("target_fpr", "calibration_fpr", "fpr_resolution", "threshold_images"), ("normal_image_score",)):
        _edit_stats(model, lambda s, keys=keys: [s.pop(k) for k in keys])
        load_model(str(model))
    _edit_stats(model, lambda s: s.update(normal_image_score={"cold": 0.5, "p99": None}))
    load_model(str(model))


def test_a_score_run_refuses_the_model_before_any_work(small_model, category, tmp_path):
    """Before: the review page's threshold sentence raised KeyError('target_fpr') after the commit."""
    from helpers import SMALL

    from patchcore_dist.pipeline.score import run_score
    model = tmp_path / "model"
    shutil.copytree(small_model, model)
    _edit_stats(model, lambda s: s.pop("target_fpr"))
    out = tmp_path / "out"
    with pytest.raises(JobError, match="cannot score: .*manifest.json: 'stats' needs all of target_fpr"):
        run_score(str(model), f"{category}/test/good", str(out), overrides=SMALL + ["runtime.executor=local"])
    assert not out.exists()
