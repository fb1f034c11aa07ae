"""The demo says what it ran and what it reused: images per category and a mean row; its data reused
only when built with the same --images, its models only when fitted with the same config."""
import json
import logging
import os
import re

from patchcore_dist.artifacts.model import config_digest, load_model
from patchcore_dist.cli.demo import run_demo
from patchcore_dist.config import load_config

TINY = ["image.resize=128", "image.crop=128", "runtime.executor=local"]


def _run(out, images, overrides, caplog, capsys):
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="patchcore_dist"):
        results = run_demo(out, ["brick"], images, overrides)
    return results, caplog.text, capsys.readouterr().out


def _files(folder):
    return len(os.listdir(folder)) if os.path.isdir(folder) else 0


def test_demo_reuses_data_and_model_only_when_they_match(tmp_path, caplog, capsys):
    out = str(tmp_path / "demo")
    data, model = os.path.join(out, "data", "brick"), os.path.join(out, "models", "brick")
    [(cat, metrics, _, counts)], log, printed = _run(out, 8, TINY, caplog, capsys)
    defective = sum(_files(os.path.join(data, "test", k)) for k in os.listdir(os.path.join(data, "test")) if k != "good")
    assert counts == {"train": _files(f"{data}/train/good"), "test_good": _files(f"{data}/test/good"),
                      "test_defective": defective} and counts["train"] + counts["test_good"] == 8
    assert "building the demo data of brick" in log and "reusing" not in log
    header = next(line for line in printed.splitlines() if line.startswith("category"))
    assert header.split() == ["category", "train", "test", "good", "test", "defective", "image", "AUROC", "pixel",
                              "AUROC", "PRO"]
    row = next(line for line in printed.splitlines() if line.startswith("brick "))
    assert row.split()[:4] == ["brick", str(counts["train"]), str(counts["test_good"]), str(defective)]
    assert row.split()[4] == f"{metrics['image_auroc']:.3f}"
    mean = next(line for line in printed.splitlines() if line.startswith("mean "))
    assert mean.split()[1:] == row.split()[4:] and len(mean) == len(row)  # one category: its metrics, aligned
    first_digest = load_model(model).digest

    # a new config: the data is reused, the model fitted again with the new coreset ratio
    ratio = TINY + ["coreset.ratio=0.05"]
    _, log, _ = _run(out, 8, ratio, caplog, capsys)
    assert "reusing the demo data of brick" in log and "fitted with another config" in log
    assert "fit done" in log
    refit = load_model(model)
    assert refit.config.coreset.ratio == 0.05 and refit.digest != first_digest
    assert refit.manifest["config_digest"] == config_digest(load_config(None, ratio))

    # the same config again: both reused, no fit
    _, log, _ = _run(out, 8, ratio, caplog, capsys)
    assert "reusing the demo model" in log and "fit done" not in log and load_model(model).digest == refit.digest

    # another --images: the data built again (no stale images left) and its model fitted on it
    [(_, _, _, counts)], log, _ = _run(out, 9, ratio, caplog, capsys)
    assert "built with --images 8, now 9" in log and "fitted on the old data" in log and "fit done" in log
    assert counts["train"] + counts["test_good"] == 9
    with open(os.path.join(out, "data", "demo.json")) as f:
        assert json.load(f)["categories"]["brick"]["images"] == 9
    assert re.search(r"fit: \d+ training images", log)
