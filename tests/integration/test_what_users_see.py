"""What a quality engineer sees: heatmaps that show the defect, a quiet console, a record of every run."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from helpers import ROOT, SMALL
from patchcore_dist import cli
from patchcore_dist.artifacts import storage
from patchcore_dist.artifacts.scores import read_scores
from patchcore_dist.config import load_config
from patchcore_dist.pipeline.evaluate import run_evaluate
from patchcore_dist.pipeline.fit import run_fit
from patchcore_dist.pipeline.score import run_score
from patchcore_dist.render.heatmap import color_table


@pytest.fixture(scope="module")
def model(ray_local, category, tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("seen") / "model")
    run_fit(category, uri, load_config(None, SMALL))
    return uri


def _levels(png_path: str) -> np.ndarray:
    """A heatmap PNG read back onto the colour map: each pixel's level in [0, 1] (nearest colour)."""
    rgb = np.asarray(Image.open(png_path).convert("RGB")).reshape(-1, 3).astype(np.int32)
    table = color_table().astype(np.int32)
    colours, inverse = np.unique(rgb, axis=0, return_inverse=True)
    nearest = ((colours[:, None, :] - table[None]) ** 2).sum(-1).argmin(1)
    return (nearest[inverse.ravel()] / 255.0).reshape(-1)


def test_heatmaps_are_hot_at_defects_above_the_threshold_and_cold_on_normal_images(model, category, tmp_path):
    out = str(tmp_path / "eval")
    metrics = run_evaluate(model, category, out, overrides=SMALL)
    t = metrics["threshold"]
    assert metrics["heatmap"]["threshold"] == t and metrics["heatmap"]["threshold_source"].startswith("F1")
    rows = read_scores(out, {}, metrics["model"]).to_pylist()
    checked = {"defect": 0, "normal": 0}
    test_root = os.path.join(category, "test")
    for r in rows:
        rel = os.path.relpath(r["image"], test_root)
        png = os.path.join(out, "heatmaps", metrics["model"], storage.safe_relpath(rel) + ".png")
        assert Image.open(png).size == Image.open(r["image"]).size  # heatmaps at the original size
        peak = _levels(png).max()
        if not rel.startswith("good/") and r["score"] > t * (1 + 1e-6):
            assert peak >= 0.5, (rel, r["score"], t, peak)
            checked["defect"] += 1
        elif rel.startswith("good/") and r["score"] < t:
            assert peak < 0.5, (rel, r["score"], t, peak)
            checked["normal"] += 1
    assert checked["defect"] >= 5 and checked["normal"] >= 3, checked
    report = open(os.path.join(out, "report.html")).read()
    assert "Heatmap colour scale" in report and "F1-optimal threshold of this test set" in report
    assert report.count('<tr class="') == len(rows)  # one row per image in the sortable table


def test_console_shows_the_jobs_lines_only_and_every_run_is_recorded(model, category, tmp_path, capsys):
    out = str(tmp_path / "out")
    images = os.path.join(category, "test")
    r = subprocess.run([sys.executable, "-m", "patchcore_dist.cli", "score", "--model", model, "--images", images,
                        "--output", out] + SMALL, cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stderr[-3000:]
    console = r.stdout + r.stderr
    assert "score done:" in console
    noise = [line for line in console.splitlines() if re.search(
        r"streaming_executor|Execution plan|Starting execution|Token authentication|Progress bars|\(raylet\)|"
        r"worker\.py|core_worker\.cc", line) and "constructor arguments in the object store" not in line]
    assert not noise, noise  # Ray's one C++ notice per actor pool stays (README: Console)
    n = len([e for e in storage.list_files(images)])
    second = run_score(model, images, out, overrides=SMALL)
    assert (second["scored"], second["skipped"]) == (0, n)
    capsys.readouterr()
    assert cli.main(["runs", "--output", out]) == 0
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 3 and table[0].split()[:4] == ["started", "job", "model", "listed"]
    first, again = (line.split() for line in table[1:])
    assert first[1] == again[1] == "score"
    assert first[3:6] == [str(n), str(n), "0"] and again[3:6] == [str(n), "0", str(n)]  # listed, scored, skipped
    record = json.loads(open(second["run"]).read())
    assert record["skipped"] == n and record["scored"] == 0 and record["model"] == second["model"]
