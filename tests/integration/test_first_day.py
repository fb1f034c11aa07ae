"""A newcomer's first commands, with relative paths from their own folder: each command resolves its
paths once against the working directory, every scored image gets a decision, and evaluate finds its
rows (it filtered the table's absolute URIs by the relative prefix and found none)."""
from __future__ import annotations

import glob
import json
import os

import numpy as np

from helpers import CROP
from patchcore_dist.artifacts.scores import read_scores
from patchcore_dist.cli import main

FAST = [f"image.resize={CROP}", f"image.crop={CROP}", "runtime.executor=local"]


def _run(*argv) -> int:
    return main(list(argv))


def test_every_command_with_relative_paths(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert _run("synthesize", "--photo", "gravel", "--image-size", "160", "--images", "14",
                "--output", "data/gravel") == 0
    assert _run("fit", "--train", "data/gravel", "--model", "runs/m", *FAST) == 0
    manifest = json.loads((tmp_path / "runs/m/manifest.json").read_text())
    st = manifest["stats"]
    assert st["threshold"] is not None and st["threshold_images"] >= 2 and st["heatmap_threshold"] == st["threshold"]
    assert manifest["training"]["uri"] == str(tmp_path / "data/gravel/train/good")
    assert _run("score", "--model", "runs/m", "--images", "data/gravel/test", "--output", "runs/s", *FAST) == 0
    table = read_scores(str(tmp_path / "runs/s"))
    n = len(glob.glob(str(tmp_path / "data/gravel/test/*/*.png")))
    assert table.num_rows == n and all(u.startswith(str(tmp_path) + "/") for u in table.column("image").to_pylist())
    heatmaps = table.column("heatmap").to_pylist()  # stored resolved, like the images (not runs/s/...)
    assert all(h and h.startswith(str(tmp_path / "runs/s") + "/") and os.path.exists(h) for h in heatmaps)
    score = np.array(table.column("score").to_pylist())
    decision = table.column("is_anomaly").to_pylist()
    norm = np.array(table.column("normalized_score").to_pylist())
    assert None not in decision and decision == list(score > st["threshold"])  # a decision for every image
    assert np.all((norm > 0.5) == (score > st["threshold"]))
    assert np.allclose(norm, 0.5 + (score - st["threshold"]) / (st["heatmap_max"] - st["heatmap_min"]))
    record = json.loads(open(glob.glob(str(tmp_path / "runs/s/runs/*.json"))[0]).read())
    assert record["model_uri"] == str(tmp_path / "runs/m") and record["anomalies"] == sum(decision)
    assert _run("evaluate", "--model", "runs/m", "--dataset", "data/gravel", "--output", "runs/e", *FAST) == 0
    metrics = json.loads((tmp_path / "runs/e/metrics.json").read_text())
    assert metrics["scored"] == n and metrics["pixel_auroc"] > 0.8  # the maps find the defects
    assert _run("maintain", "--output", "runs/s") == 0
    capsys.readouterr()
    assert _run("runs", "--output", "runs/s") == 0
    assert "score" in capsys.readouterr().out
    assert not os.path.exists("/runs")  # nothing went to the wrong place


def test_a_threshold_from_few_held_out_images_is_pooled(category, tmp_path, caplog):
    """fit.holdout_fraction=0.1 of a small folder holds out 1-3 images: their maximum alone made the
    threshold (a normal archive image then came out flagged). Fewer than 20 are pooled with training
    images scored without their own patches, and the fit says so."""
    from patchcore_dist.config import load_config
    from patchcore_dist.pipeline.fit import run_fit
    caplog.set_level("INFO", logger="patchcore_dist")
    manifest = run_fit(category, str(tmp_path / "m"), load_config(None, FAST + ["fit.holdout_fraction=0.1"]))
    st = manifest["stats"]
    held = int(manifest["training"]["validation"].split()[0])
    assert 1 <= held < 20 and st["threshold_images"] > held
    assert st["threshold_source"].startswith(f"normal images ({held} held-out training images")
    assert any("pooled with" in r.getMessage() for r in caplog.records)


def test_heatmaps_for_anomalies_only(small_model, category, tmp_path):
    """output.heatmaps=anomalies (archive-wide runs): heatmaps and overlays only for the images above the
    threshold; the others keep their scores and decisions, with no heatmap and no warning."""
    from helpers import SMALL
    from patchcore_dist.pipeline.score import run_score
    out = str(tmp_path / "out")
    run_score(small_model, f"{category}/test", out, None, SMALL + ["runtime.executor=local", "output.heatmaps=anomalies"])
    rows = read_scores(out).to_pylist()
    flagged = [r for r in rows if r["is_anomaly"]]
    assert flagged and len(flagged) < len(rows)
    assert all(r["heatmap"] and os.path.exists(r["heatmap"]) for r in flagged)
    assert all(r["heatmap"] is None and r["warning"] is None for r in rows if not r["is_anomaly"])
    pngs = glob.glob(os.path.join(out, "heatmaps", "**", "*.png"), recursive=True)
    assert len(pngs) == len(flagged)
